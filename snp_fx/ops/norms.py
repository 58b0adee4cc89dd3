"""Normalisations: LayerNorm, GroupNorm (one group), BatchNorm — module, functional and ATen.

Their per-channel parameters are coupled with the input's channel axis.  LayerNorm and
GroupNorm normalise over channels (removing one is not zeroing it: "sensitive"); the masked
reference computes their statistics over kept channels only, which makes residual
pruning exactly checkable.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import labels as L
from ..labels import NONE
from ..precision import wide
from .registry import Args, OpFamily, register


def couple_affine(p, names_tensors, x_lab, axis):
    """Couple per-channel parameters (name, tensor) with the input's channel axis."""
    axis_labels = L.expand(x_lab, x_lab.shape).movedim(axis, -1)
    for name, t in names_tensors:
        if t is not None and name:
            p.space.union(axis_labels, p.pids(name, t)[0])


def affine_params(p, n, args, kwargs, names):
    """[(parameter name, tensor)] of the arguments ``names`` present, in argument order, or the
    name of the first one that is computed in the graph (not a get_attr)."""
    if n.op == "call_module":
        mod = p.modules[n.target]
        return [(f"{n.target}.{k}", getattr(mod, k, None)) for k in names]
    a = Args(n, args, kwargs)
    out = []
    for k in sorted(names, key=lambda k: a.pos(k) if a.pos(k) >= 0 else 99):
        name = a.param(k)
        if name is False:
            return k
        if name is not None:
            out.append((name, a.value(k)))
    return out


def _standardize(x, k, dims, n, eps):
    """(x - mean) / std over ``dims`` with weights ``k`` (1 kept, 0 removed) and count ``n``."""
    mean = (x * k).sum(dims, keepdim=True) / n
    var = ((x - mean) * k).pow(2).sum(dims, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * k


def masked_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *unused, keep=None):
    """LayerNorm whose statistics run over the kept channels only (removed ones are zero); in
    float32 for float16 / bfloat16 inputs, as torch's own layer_norm."""
    xw = wide(x)
    k = keep.to(xw.dtype)
    y = _standardize(xw, k, -1, k.sum(), eps)
    return (y * (weight if weight is not None else 1) + (bias if bias is not None else 0)).to(x.dtype)


def layer_norm_of_width(x, normalized_shape, weight=None, bias=None, eps=1e-5, *unused, width=None):
    """LayerNorm over the kept channels of a last dim of ``width`` channels whose removed ones are
    zero (a q/k norm; the masked original zeroes their weight and bias too): the statistics of the
    whole width, the zeros counted, so that removing a channel is zeroing it."""
    xw = wide(x)
    gone = width - xw.shape[-1]
    mean = xw.sum(-1, keepdim=True) / width
    var = ((xw - mean).pow(2).sum(-1, keepdim=True) + gone * mean * mean) / width
    y = (xw - mean) * torch.rsqrt(var + eps)
    return (y * (weight if weight is not None else 1) + (bias if bias is not None else 0)).to(x.dtype)


class LayerNormOfWidth(nn.Module):
    """A pruned nn.LayerNorm outside a residual stream: ``layer_norm_of_width``."""

    def __init__(self, mod: nn.LayerNorm, width: int):
        super().__init__()
        self.weight, self.bias, self.eps, self.width = mod.weight, mod.bias, mod.eps, width
        self.normalized_shape = mod.normalized_shape

    def forward(self, x):
        return layer_norm_of_width(x, self.normalized_shape, self.weight, self.bias, self.eps, width=self.width)


def masked_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *unused, keep=None):
    """GroupNorm with one group, channels on dim 1, whose statistics run over the kept channels only."""
    shape, dtype, x = (1, -1) + (1,) * (x.dim() - 2), x.dtype, wide(x)  # float32 at least, as group_norm
    k = keep.to(x.dtype).reshape(shape)
    y = _standardize(x, k, tuple(range(1, x.dim())), k.sum() * x[0, 0].numel(), eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    return (y + bias.reshape(shape) if bias is not None else y).to(dtype)


class MaskedNorm(nn.Module):
    """A norm module in the masked reference: ``fn(x, *args(module), keep=keep)``."""

    def __init__(self, fn, module: nn.Module, keep: torch.Tensor, args):
        super().__init__()
        self.fn, self.module, self.args = fn, module, args
        self.register_buffer("keep", keep)

    def forward(self, x):
        return self.fn(x, *self.args(self.module), keep=self.keep)


def mask_last_dim_norm(m, node, fn, module_args):
    """Swap a norm over the last dim for ``fn`` counting kept channels only (module or function)."""
    mask = m.last_dim_mask(node)
    if mask is not None:
        swap_norm(m, node, fn, mask, module_args)


def swap_norm(m, node, fn, mask, module_args):
    """In the masked reference, ``node`` becomes ``fn(..., keep=mask)``: a module is wrapped
    (``module_args(module)`` gives fn's other arguments), a function call retargeted."""
    if node.op == "call_module":
        m.attrs[node.target] = MaskedNorm(fn, m.attrs[node.target], mask, module_args)
        return
    new = m.env[node]
    keep = m.add_mask(node, mask)
    new.op, new.target = "call_function", fn
    new.kwargs = {**new.kwargs, "keep": keep}


class LayerNorm(OpFamily):
    """A norm over the last dim (``normalized_shape`` of one dim) with per-channel ``PARAMS``.

    In a residual stream its statistics count the kept channels (the masked original's too); over
    other groups' channels (q/k norms, ``rescaled``) the pruned norm keeps the original width's
    statistics, the removed channels counted as zeros (``layer_norm_of_width``): exact."""
    kind = "layer_norm"
    makes_channels = True
    PARAMS = ["weight", "bias"]
    rescaled = True  # RMSNorm: not (yet): sensitive, refused outside residual streams

    def propagate(self, p, n, key, args, kwargs, result):
        x_lab = p.lab(n.args[0])
        shape = p.modules[n.target].normalized_shape if n.op == "call_module" else \
            Args(n, args, kwargs).value("normalized_shape")
        params = affine_params(p, n, args, kwargs, self.PARAMS)
        if isinstance(params, str):
            return p.refuse(n, f"{n.name}: {self.kind} with computed affine parameters", result)
        if len(shape) != 1:
            return p.refuse(n, f"{n.name}: {self.kind} over {len(shape)} dims", result)
        couple_affine(p, params, x_lab, x_lab.dim() - 1)
        if x_lab.dim() - 1 in L.varying_dims(x_lab):
            p.space.mark_sensitive(x_lab, f"{n.name}: {self.kind}", rescaled=self.rescaled)
        return x_lab

    def _of_width(self, a, node) -> int | None:
        """The original width when this norm runs outside residual streams on removed channels."""
        from .reduction import _in_residual
        if not self.rescaled or _in_residual(a, node):
            return None
        return a.shapes[node.args[0].name][-1]

    def rewrite(self, r, node, new, key):
        a = Args(node)
        k = len(a["normalized_shape"])
        sizes = tuple(r.sizes_of(node.args[0])[-k:])
        a.set(new, "normalized_shape", sizes)
        width = self._of_width(r.a, node)
        if width is not None and sizes[-1] != width:
            if key != "layer_norm" or k != 1:
                raise ValueError(f"`{node.name}` ({key}) normalises over removed channels")
            new.target, new.kwargs = layer_norm_of_width, {**new.kwargs, "width": width}

    def prune_module(self, r, mod, node):
        mod.normalized_shape = (r.sizes_of(node.args[0])[-1],)
        width = self._of_width(r.a, node)
        if width is not None and mod.normalized_shape[0] != width:
            return LayerNormOfWidth(mod, width)
        return None

    def masked(self, m, node, key):
        if self._of_width(m.a, node) is not None:
            return  # the original width's statistics over zeros: what the pruned norm computes
        mask_last_dim_norm(m, node, masked_layer_norm,
                           lambda mod: (mod.normalized_shape, mod.weight, mod.bias, mod.eps))


class GroupNorm(OpFamily):
    """GroupNorm with one group over channels on dim 1 (more groups: refused)."""
    kind = "group_norm"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        x_lab = p.lab(n.args[0])
        groups = p.modules[n.target].num_groups if n.op == "call_module" else \
            Args(n, args, kwargs).value("num_groups")
        if groups != 1 or any(d != 1 for d in L.varying_dims(x_lab)):
            return p.refuse(n, f"{n.name}: group_norm with {groups} groups", result)
        params = affine_params(p, n, args, kwargs, ["weight", "bias"])
        if isinstance(params, str):
            return p.refuse(n, f"{n.name}: group_norm with computed `{params}`", result)
        couple_affine(p, params, x_lab, 1)
        p.space.mark_sensitive(x_lab, f"{n.name}: group_norm")
        return x_lab

    def prune_module(self, r, mod, node):
        mod.num_channels = mod.weight.shape[0] if mod.weight is not None else r.sizes_of(node.args[0])[1]

    def masked(self, m, node, key):
        lab = m.a.labels.get(node.args[0].name)
        if not (isinstance(lab, torch.Tensor) and lab.dim() > 1 and lab.shape[1] > 1):
            if m.last_dim_mask(node) is not None:
                raise ValueError(f"`{node.name}` ({key}) normalises over removed channels")
            return
        mask = m.kept(lab).movedim(1, -1).reshape(-1, lab.shape[1])[0].to(m.device)
        if bool(mask.all()):
            return
        swap_norm(m, node, masked_group_norm, mask, lambda mod: (1, mod.weight, mod.bias, mod.eps))


class BatchNorm(OpFamily):
    """Per-channel statistics and affine on dim 1: every channel stands alone."""
    kind = "batch_norm"
    makes_channels = True
    PARAMS = ["weight", "bias", "running_mean", "running_var"]

    def propagate(self, p, n, key, args, kwargs, result):
        x_lab = p.lab(n.args[0])
        if any(d != 1 for d in L.varying_dims(x_lab)):
            return p.refuse(n, f"{n.name}: batch_norm input carries channels outside dim 1", result)
        params = affine_params(p, n, args, kwargs, self.PARAMS)
        if isinstance(params, str):
            return p.refuse(n, f"{n.name}: batch_norm with computed `{params}`", result)
        couple_affine(p, [(k, t) for k, t in params if isinstance(t, torch.Tensor)], x_lab, 1)
        if isinstance(result, (tuple, list)):  # the native form returns (out, save_mean, save_invstd)
            return (x_lab,) + tuple(L.constant(NONE, r.dim()) if isinstance(r, torch.Tensor) else None
                                    for r in result[1:])
        return x_lab

    def prune_module(self, r, mod, node):
        mod.num_features = mod.running_mean.shape[0] if mod.running_mean is not None else mod.weight.shape[0]


register(LayerNorm(), names=["layer_norm"], modules=[nn.LayerNorm])
register(GroupNorm(), names=["group_norm"], modules=[nn.GroupNorm])
register(BatchNorm(), names=["batch_norm", "_native_batch_norm_legit_no_training"],
         modules=[nn.modules.batchnorm._BatchNorm])
