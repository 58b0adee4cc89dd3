"""snp_fx as one torch.fx pass, for torch.fx.passes.infra.pass_manager.PassManager."""
from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from . import api


class SNPPass(PassBase):
    """Prune a GraphModule: ``SNPPass(example_inputs, ratios=...)(gm) -> PassResult``.

    Takes the keyword options of ``snp_fx.prune`` (ratios, target_macs, importance, ...);
    or ``plan=`` to apply a saved PruningPlan (with ``apply``'s options: verify, compensate, ...).
    The input GraphModule is not modified.
    """

    def __init__(self, example_inputs, *, plan=None, **prune_kwargs):
        super().__init__()
        self.example_inputs = example_inputs
        self.plan = plan
        self.prune_kwargs = prune_kwargs

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if self.plan is not None:
            new = api.apply(graph_module, self.plan, self.example_inputs, **self.prune_kwargs)
        else:
            new = api.prune(graph_module, self.example_inputs, **self.prune_kwargs)
        changed = sum(p.numel() for p in new.parameters()) != sum(p.numel() for p in graph_module.parameters())
        return PassResult(new, changed)
