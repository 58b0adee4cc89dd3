"""Reductions over a dim (sum is linear; mean / var / max are not) and softmax."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from .. import labels as L
from ..labels import NONE, map_struct
from ..precision import wide
from .elementwise import Binary
from .registry import OpFamily, register

# reductions a zero channel does not change: removing a channel equals zeroing it
ZERO_NEUTRAL = {"sum", "norm", "linalg_vector_norm"}


def masked_mean(x, dim, keepdim=False, keep=None):
    """Mean over the last dim counting kept channels only (removed ones are zero); summed in
    float32 for float16 / bfloat16 inputs, as torch's own mean."""
    return (wide(x).sum(dim, keepdim=keepdim) / keep.sum()).to(x.dtype)


def _dims(node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return None if dim is None else [dim] if isinstance(dim, int) else list(dim)


def _two_tensors(a, node, key) -> bool:
    """max(a, b) / min(a, b) (``a``: the analysis): the element-wise overload, not a reduction."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return key in ("max", "min") and isinstance(other, fx.Node) and isinstance(a.shapes.get(other.name), tuple)


class Reduce(OpFamily):
    kind = "reduce"

    def propagate(self, p, n, key, args, kwargs, result):
        if key in ("max", "min") and isinstance(args[1] if len(args) > 1 else kwargs.get("other"), torch.Tensor):
            return BINARY.propagate(p, n, key, args, kwargs, result)  # element-wise, like maximum
        lab = p.lab(n.args[0])
        x = args[0]
        first = 2 if key in ("norm", "linalg_vector_norm") else 1  # norm(x, p, dim, keepdim)
        dim = kwargs.get("dim", args[first] if len(args) > first and not isinstance(args[first], bool) else None)
        keepdim = kwargs.get("keepdim", args[first + 1] if len(args) > first + 1 and isinstance(args[first + 1], bool)
                             else False)
        dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        dims = [d % x.dim() for d in dims]
        var = L.varying_dims(lab)
        if [d for d in dims if d in var]:
            rest = [d for d in var if d not in dims]
            if rest and key != "mean" and key not in ZERO_NEUTRAL:
                return p.refuse(n, f"{n.name}: `{key}` over some channel dims but not others", result)
            if rest:
                # a statistic per head (q/k norms over the head dim): the heads keep the same channels,
                # so none goes alone and the statistic keeps its entry per head
                first = lab
                for d in rest:
                    first = first.narrow(d, 0, 1)
                p.space.union(lab, first)
            if key == "mean":  # exact once the rewrite divides by the original count (see rewrite)
                p.space.mark_sensitive(lab, f"{n.name}: `{key}` over channels", rescaled=True)
            elif key not in ZERO_NEUTRAL:
                p.space.mark_sensitive(lab, f"{n.name}: `{key}` over channels")
            out = L.constant(NONE, lab.dim())
        else:
            out = lab
        if not keepdim:
            for d in sorted(dims, reverse=True):
                out = out.squeeze(d) if out.dim() > d else out
        return map_struct(result, lambda r: L.reduce(out.reshape((1,) * (r.dim() - out.dim()) + tuple(out.shape)))
                          if isinstance(r, torch.Tensor) and r.dim() >= out.dim() else None)

    def rewrite(self, r, node, new, key):
        """A mean over partly removed channels outside a residual stream becomes sum / original count
        (the mean times kept / original): removing a channel is then zeroing it, as in the masked
        original (q/k norms of Qwen3, Gemma3, OLMo2).  A residual stream's mean counts kept channels."""
        if _two_tensors(r.a, node, key):
            BINARY.rewrite(r, node, new, key)
            return
        if key != "mean" or not self._reduces_channels(r, node) or _in_residual(r.a, node):
            return
        x, dims = node.args[0], _dims(node)
        shape, sizes = r.a.shapes[x.name], r.sizes_of(x)
        dims = range(len(shape)) if dims is None else [d % len(shape) for d in dims]
        before = math.prod(shape[d] for d in dims)
        after = math.prod(sizes[d] for d in dims)
        if after == before:
            return
        with r.graph.inserting_after(new):
            scaled = r.graph.call_function(torch.ops.aten.mul.Tensor, (new, after / before))
        r.env[node] = scaled

    def masked(self, m, node, key):
        if key in ZERO_NEUTRAL or _two_tensors(m.a, node, key) or not self._reduces_channels(m, node):
            return  # sums over removed (zero) channels are exact already
        if key == "mean" and not _in_residual(m.a, node):
            return  # the rewrite divides by the original count: exact against zeros already
        mask = m.last_dim_mask(node)
        if mask is None:
            return
        rank = len(m.shape_of(node.args[0]))
        dims = _dims(node) or []
        if key != "mean" or len(dims) != 1 or dims[0] % rank != rank - 1:
            raise ValueError(f"`{node.name}` ({key}) normalises over removed channels")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        new = m.env[node]
        new.op, new.target = "call_function", masked_mean
        new.args, new.kwargs = (new.args[0], dims[0], keepdim), {"keep": m.add_mask(node, mask)}

    @staticmethod
    def _reduces_channels(m, node) -> bool:
        dims = _dims(node)
        if dims is None:
            return True
        x = node.args[0]
        lab, shape = m.a.labels.get(x.name), m.a.shapes[x.name]
        if not isinstance(lab, torch.Tensor):
            return False
        rank = len(shape)
        lab = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
        return any(lab.shape[d % rank] > 1 for d in dims)


class AlongDim(OpFamily):
    """topk / sort / cumsum / diff along one dim (an MoE router's top experts, positions from a
    mask): the results are laid out like the input; along a channel dim they mix or pick
    channels by value, which removing one would change."""
    kind = "along_dim"

    def propagate(self, p, n, key, args, kwargs, result):
        lab, x = p.lab(n.args[0]), args[0]
        if any(isinstance(p.lab(a), torch.Tensor) for a in list(n.args[1:]) + list(n.kwargs.values())):
            return p.refuse(n, f"{n.name}: `{key}` with a second tensor", result)  # diff(x, prepend=t)
        pos = 2 if key in ("topk", "diff") else 1  # topk(x, k, dim), diff(x, n, dim), sort(x, dim), cumsum(x, dim)
        dim = kwargs.get("dim", args[pos] if len(args) > pos and not isinstance(args[pos], bool) else -1)
        lab = lab.reshape((1,) * (x.dim() - lab.dim()) + tuple(lab.shape))
        if dim % x.dim() in L.varying_dims(lab):  # (an MoE router's top experts: the experts stay)
            return p.refuse(n, f"{n.name}: `{key}` over channels" + (" (picks them by value)" if key == "topk" else ""),
                            result)
        return map_struct(result, lambda r: lab if isinstance(r, torch.Tensor) else None)


def _in_residual(a, node) -> bool:
    """Whether ``node`` reduces channels of a residual stream (or channels of no group)."""
    lab = a.labels.get(node.args[0].name)
    cls = torch.unique(a.channels.classes(lab[lab > 0])) if isinstance(lab, torch.Tensor) else torch.tensor([])
    grouped = [g.classes.flatten() for g in a.groups.values() if g.kind != "residual"]
    return not bool(cls.numel()) or not grouped or not bool(torch.isin(cls, torch.cat(grouped)).all())


class Softmax(OpFamily):
    """Normalisation over ``dim``: not the same as zeroing if that is a channel dim."""
    kind = "softmax"

    def propagate(self, p, n, key, args, kwargs, result):
        lab = p.lab(n.args[0])
        if n.op == "call_module":
            dim = p.modules[n.target].dim
        else:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or (dim % lab.dim()) in L.varying_dims(lab):
            p.space.mark_sensitive(lab, f"{n.name}: softmax over channels")
        return lab

    def masked(self, m, node, key):
        if m.last_dim_mask(node) is not None:
            raise ValueError(f"`{node.name}` ({key}) normalises over removed channels")


BINARY = Binary()
register(BINARY, targets=[torch.ops.aten.max.other, torch.ops.aten.min.other])  # by overload (torch.export)
register(Reduce(), names=["sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod",
                          "all", "any", "linalg_vector_norm"])
register(AlongDim(), names=["topk", "sort", "argsort", "cumsum", "cumprod", "diff"])
register(Softmax(), names=["softmax", "log_softmax", "_softmax", "_log_softmax"], modules=[nn.Softmax])
