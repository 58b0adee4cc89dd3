"""Oracles: check a pruned GraphModule against an independent reference.

* identity: pruning nothing gives the same outputs;
* mask equivalence: q/k, v, FFN and head pruning equal the *original* graph
  with the removed weight slices zeroed (the reference is built from the
  original graph and parameters, not from the rewrite).

Usable from users' own tests: ``snp_fx.verify.mask_equivalence(...)``.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .analysis import Analysis


def _zeroed(analysis, name, t: torch.Tensor, keep) -> torch.Tensor:
    out = t.detach().clone()
    for d, m in enumerate(analysis.dim_masks(name, t.shape, keep)):
        if not bool(m.all()):
            idx = (~m).nonzero().flatten().to(out.device)
            out.index_fill_(d, idx, 0)
    return out


def masked_reference(analysis: Analysis, keep: torch.Tensor) -> fx.GraphModule:
    """The original graph with every removed parameter slice set to zero."""
    gm = analysis.gm
    attrs = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = gm
            for part in node.target.split("."):
                t = getattr(t, part)
            attrs[node.target] = _zeroed(analysis, node.target, t, keep) if isinstance(t, torch.Tensor) else t
        elif node.op == "call_module":
            mod = copy.deepcopy(gm.get_submodule(node.target))
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, nn.Parameter(_zeroed(analysis, f"{node.target}.{name}", p, keep),
                                                requires_grad=p.requires_grad))
            attrs[node.target] = mod
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(attrs, graph)


def relative_error(a, b) -> float:
    """Largest relative L2 error over the tensors of two (nested) outputs."""
    la = [x for x in tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in tree_leaves(b) if isinstance(x, torch.Tensor)]
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x, y = x.double(), y.double()
        worst = max(worst, float((x - y).norm() / (y.norm() + 1e-12)))
    return worst


@torch.no_grad()
def mask_equivalence(analysis: Analysis, keep: torch.Tensor, pruned: nn.Module, inputs: tuple) -> float:
    """Relative error between ``pruned`` and the masked original on ``inputs``."""
    ref = masked_reference(analysis, keep).eval()
    return relative_error(pruned(*inputs), ref(*inputs))
