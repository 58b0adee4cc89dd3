"""Oracles: check a pruned GraphModule against an independent reference.

* identity: pruning nothing gives the same outputs;
* mask equivalence: q/k, v, FFN and head pruning equal the *original* graph
  with the removed weight slices zeroed (the reference is built from the
  original graph and parameters, not from the rewrite).

Usable from users' own tests: ``snp_fx.verify.mask_equivalence(...)``.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from . import ops
from .analysis import Analysis


def _zeroed(analysis, name, t: torch.Tensor, keep) -> torch.Tensor:
    out = t.detach().clone()
    for d, m in enumerate(analysis.channels.dim_masks(name, t.shape, keep)):
        if not bool(m.all()):
            idx = (~m).nonzero().flatten().to(out.device)
            out.index_fill_(d, idx, 0)
    return out


def masked_reference(analysis: Analysis, keep: torch.Tensor, exact_norms: bool = False) -> fx.GraphModule:
    """The original graph with every removed parameter slice set to zero.

    With ``exact_norms``, LayerNorms and channel means over partly removed
    channels are replaced by versions that count kept channels only: then
    residual pruning is exactly equivalent too.  Raises ValueError when some
    other op normalises over removed channels.

    Graph attributes (get_attr: torch.export graphs) are zeroed as the reference runs, each right
    before its first use, so it holds no second copy of the weights; module parameters (fx graphs)
    are zeroed copies.
    """
    gm = analysis.gm
    attrs, zeroed = {}, {}  # get_attr node -> (dim, removed indices) to zero as the reference runs
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = operator.attrgetter(node.target)(gm)
            attrs[node.target] = t
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                zeroed[node.name] = _removed(analysis, node.target, t, keep)
            elif isinstance(t, torch.Tensor):
                attrs[node.target] = _zeroed(analysis, node.target, t, keep)
        elif node.op == "call_module":
            mod = copy.deepcopy(gm.get_submodule(node.target))
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, nn.Parameter(_zeroed(analysis, f"{node.target}.{name}", p, keep),
                                                requires_grad=p.requires_grad))
            attrs[node.target] = mod
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for old, new in list(env.items()):
        removed = zeroed.get(old.name)
        if not removed or not new.users:
            continue
        # zeroed right before the first use (exported graphs fetch every weight at the top: zeroed
        # there, all the zeroed copies would be alive at once); fx frees it after the last use
        users = list(new.users)
        with graph.inserting_before(min(users, key=order.__getitem__)):
            out = new
            for i, (d, idx) in enumerate(removed):
                name = f"_snp_removed_{len(attrs)}"
                attrs[name] = idx
                index = graph.get_attr(name)
                # a copy with the removed slices zeroed, then zeroed in place along the other dims
                out = graph.call_function(torch.index_fill, (out, d, index, 0.0)) if i == 0 else \
                    graph.call_method("index_fill_", (out, d, index, 0.0))
        for u in users:
            u.replace_input_with(new, out)
        env[old] = out
    if exact_norms:
        _mask_norms(analysis, keep, gm, graph, env, attrs)
    return fx.GraphModule(attrs, graph)


def _removed(analysis, name, t: torch.Tensor, keep) -> list[tuple[int, torch.Tensor]]:
    """(dim, indices removed along it) for every dim of ``t`` with removed channels."""
    masks = analysis.channels.dim_masks(name, t.shape, keep)
    return [(d, (~m).nonzero().flatten().to(t.device)) for d, m in enumerate(masks) if not bool(m.all())]


class _Masker:
    """Turns the reference's normalisations over partly removed channels into ones that count
    kept channels only; each op family does its own (``OpFamily.masked``)."""

    def __init__(self, analysis, keep, graph, env, attrs):
        self.a, self.keep, self.graph, self.env, self.attrs = analysis, keep, graph, env, attrs
        self.device = next((p.device for p in analysis.gm.parameters()), torch.device("cpu"))
        self.n_masks = 0

    def shape_of(self, node):
        return self.a.shapes[node.name]

    def kept(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.where(lab >= 0, self.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))

    def last_dim_mask(self, node):
        """Keep mask of the input's last dim where it has partly removed channels, else None;
        ValueError if positions remove different channels."""
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        lab = self.a.labels.get(x.name) if x is not None else None
        if not isinstance(lab, torch.Tensor) or lab.dim() == 0 or lab.shape[-1] == 1:
            return None
        kept = self.kept(lab)
        if bool(kept.all()):
            return None
        last = kept.reshape(-1, kept.shape[-1])
        if not bool((last == last[:1]).all()):
            raise ValueError(f"`{node.name}` normalises channels removed differently per position")
        return last[0].to(self.device)

    def add_mask(self, node, mask) -> fx.Node:
        """A get_attr of ``mask`` in the reference graph, before ``node``'s copy."""
        name = f"_snp_keep_{self.n_masks}"
        self.n_masks += 1
        self.attrs[name] = mask
        with self.graph.inserting_before(self.env[node]):
            return self.graph.get_attr(name)


def _mask_norms(analysis, keep, gm, graph, env, attrs):
    m = _Masker(analysis, keep, graph, env, attrs)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            key, family = ops.family_of(node, modules)
            family.masked(m, node, key)


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
def mask_equivalence(analysis: Analysis, keep: torch.Tensor, pruned: nn.Module, inputs: tuple,
                     exact_norms: bool = False) -> float:
    """Relative error between ``pruned`` and the masked original on ``inputs``.

    ``exact_norms``: normalisations count kept channels only (needed when the
    residual stream is pruned; see ``masked_reference``).
    """
    ref = masked_reference(analysis, keep, exact_norms).eval()
    return relative_error(pruned(*inputs), ref(*inputs))
