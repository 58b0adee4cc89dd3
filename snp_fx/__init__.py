"""snp_fx: structured neuron-level pruning (SNP) of transformers as a torch.fx pass."""
from .analysis import Analysis, Group, Site
from .api import analyze, apply, plan, prune
from .errors import RewriteError, SNPError, TraceError
from .fx_pass import SNPPass
from .io import load, save
from .plan import PruningPlan

__all__ = ["analyze", "apply", "plan", "prune", "SNPPass", "PruningPlan", "save", "load", "Analysis", "Group",
           "Site", "SNPError", "TraceError", "RewriteError"]
__version__ = "0.1.0"
