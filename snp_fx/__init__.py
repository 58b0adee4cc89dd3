"""snp_fx: structured neuron-level pruning (SNP) of transformers as a torch.fx pass."""
from .analysis import Analysis, Group, Site
from .api import analyze, apply, plan, prune
from .errors import InternalError, RewriteError, SNPError, SNPFXError, TraceError
from .fx_pass import SNPPass
from .hf import to_hf
from .io import load, save
from . import latency  # noqa: F401  snp_fx.latency.compare / latency_model
from .ops import OpFamily, register_op
from .planning import PruningPlan

__all__ = ["analyze", "apply", "plan", "prune", "SNPPass", "PruningPlan", "save", "load", "to_hf", "Analysis", "Group",
           "Site", "SNPFXError", "SNPError", "TraceError", "RewriteError", "InternalError", "register_op", "OpFamily"]
__version__ = "0.1.0"
