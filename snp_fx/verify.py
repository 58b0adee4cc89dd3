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


def masked_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *unused, keep=None):
    """LayerNorm whose statistics run over the kept channels only (removed ones are zero)."""
    k = keep.to(x.dtype)
    n = k.sum()
    mean = (x * k).sum(-1, keepdim=True) / n
    var = ((x - mean) * k).pow(2).sum(-1, keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + eps) * k
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def masked_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *unused, keep=None):
    """GroupNorm with one group, channels on dim 1, whose statistics run over the kept channels only."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    k = keep.to(x.dtype).reshape(shape)
    dims = tuple(range(1, x.dim()))
    n = k.sum() * x[0, 0].numel()
    mean = (x * k).sum(dims, keepdim=True) / n
    var = ((x - mean) * k).pow(2).sum(dims, keepdim=True) / n
    y = (x - mean) * torch.rsqrt(var + eps) * k
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class _MaskedGroupNormModule(nn.Module):
    def __init__(self, gn: nn.GroupNorm, keep: torch.Tensor):
        super().__init__()
        self.gn = gn
        self.register_buffer("keep", keep)

    def forward(self, x):
        return masked_group_norm(x, 1, self.gn.weight, self.gn.bias, self.gn.eps, keep=self.keep)


def masked_mean(x, dim, keepdim=False, keep=None):
    """Mean over the last dim counting kept channels only (removed ones are zero)."""
    return x.sum(dim, keepdim=keepdim) / keep.to(x.dtype).sum()


class _MaskedLayerNormModule(nn.Module):
    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor):
        super().__init__()
        self.ln = ln
        self.register_buffer("keep", keep)

    def forward(self, x):
        return masked_layer_norm(x, self.ln.normalized_shape, self.ln.weight, self.ln.bias, self.ln.eps,
                                 keep=self.keep)


def masked_reference(analysis: Analysis, keep: torch.Tensor, exact_norms: bool = False) -> fx.GraphModule:
    """The original graph with every removed parameter slice set to zero.

    With ``exact_norms``, LayerNorms and channel means over partly removed
    channels are replaced by versions that count kept channels only: then
    residual pruning is exactly equivalent too.  Raises ValueError when some
    other op normalises over removed channels.
    """
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
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    if exact_norms:
        _mask_norms(analysis, keep, gm, graph, env, attrs)
    return fx.GraphModule(attrs, graph)


def _mask_norms(analysis, keep, gm, graph, env, attrs):
    from . import ops
    modules = dict(gm.named_modules())
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    n_masks = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        key = ops.op_key(node, modules)
        kind = ops.kind_of(key)
        if kind not in ("layer_norm", "reduce", "softmax", "group_norm") or key in ops.ZERO_NEUTRAL_REDUCE:
            continue  # elementwise, contractions and sums over removed (zero) channels are exact already
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        lab = analysis.labels.get(x.name) if x is not None else None
        if kind == "group_norm" and isinstance(lab, torch.Tensor) and lab.dim() > 1 and lab.shape[1] > 1:
            # the analysis follows one group with channels on dim 1 only
            kept = torch.where(lab >= 0, keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
            mask = kept.movedim(1, -1).reshape(-1, lab.shape[1])[0].to(device)
            if bool(mask.all()):
                continue
            if node.op == "call_module":
                attrs[node.target] = _MaskedGroupNormModule(attrs[node.target], mask)
                continue
            name = f"_snp_keep_{n_masks}"
            n_masks += 1
            attrs[name] = mask
            new = env[node]
            with graph.inserting_before(new):
                mask_node = graph.get_attr(name)
            new.op, new.target = "call_function", masked_group_norm
            new.kwargs = {**new.kwargs, "keep": mask_node}
            continue
        if not isinstance(lab, torch.Tensor) or lab.dim() == 0 or lab.shape[-1] == 1:
            continue
        kept = torch.where(lab >= 0, keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
        if bool(kept.all()) or (kind == "reduce" and not _reduces_channels(node, lab, analysis.shapes[x.name])):
            continue
        last = kept.reshape(-1, kept.shape[-1])
        if not bool((last == last[:1]).all()):
            raise ValueError(f"`{node.name}` normalises channels removed differently per position")
        mask = last[0].to(device)
        new = env[node]
        if key == "layer_norm" and node.op == "call_module":
            attrs[node.target] = _MaskedLayerNormModule(attrs[node.target], mask)
            continue
        name = f"_snp_keep_{n_masks}"
        n_masks += 1
        attrs[name] = mask
        with graph.inserting_before(new):
            mask_node = graph.get_attr(name)
        if key == "layer_norm":
            new.target, new.op = masked_layer_norm, "call_function"
            new.kwargs = {**new.kwargs, "keep": mask_node}
        elif key == "mean" and _last_dim_only(node, analysis.shapes[x.name]):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            new.op, new.target = "call_function", masked_mean
            new.args, new.kwargs = (new.args[0], dim, keepdim), {"keep": mask_node}
        else:
            raise ValueError(f"`{node.name}` ({key}) normalises over removed channels")


def _reduces_channels(node, lab, shape) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return True
    dims = [dim] if isinstance(dim, int) else list(dim)
    rank = len(shape)
    lab = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
    return any(lab.shape[d % rank] > 1 for d in dims)


def _last_dim_only(node, shape) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    return len(dims) == 1 and dims[0] % len(shape) == len(shape) - 1


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
