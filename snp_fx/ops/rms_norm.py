"""RMSNorm: ``nn.RMSNorm``, ``F.rms_norm`` and ``aten.rms_norm``.

Like LayerNorm without the mean: the weight is coupled with the last dim; the norm runs over
the channels (removing one is not zeroing it), so a residual stream through it is pruned
with its masked form — the mean square over kept channels only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import labels as L
from .norms import LayerNorm, affine_params, couple_affine, mask_last_dim_norm
from .registry import Args, register


def masked_rms_norm(x, normalized_shape, weight=None, eps=None, *unused, keep=None):
    """RMSNorm whose mean square runs over the kept channels only (removed ones are zero)."""
    k = keep.to(x.dtype)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt((x * x * k).sum(-1, keepdim=True) / k.sum() + eps)
    return y * weight if weight is not None else y


class RMSNorm(LayerNorm):
    """Sizes and module attributes are fixed as for LayerNorm (``normalized_shape``)."""
    kind = "rms_norm"

    def propagate(self, p, n, key, args, kwargs, result):
        x_lab = p.lab(n.args[0])
        shape = p.modules[n.target].normalized_shape if n.op == "call_module" else \
            Args(n, args, kwargs).value("normalized_shape")
        params = affine_params(p, n, args, kwargs, ["weight"])
        if isinstance(params, str):
            return p.refuse(n, f"{n.name}: rms_norm with a computed weight", result)
        if len(shape) != 1:
            return p.refuse(n, f"{n.name}: rms_norm over {len(shape)} dims", result)
        couple_affine(p, params, x_lab, x_lab.dim() - 1)
        if x_lab.dim() - 1 in L.varying_dims(x_lab):
            p.space.mark_sensitive(x_lab, f"{n.name}: rms_norm")
        return x_lab

    def masked(self, m, node, key):
        mask_last_dim_norm(m, node, masked_rms_norm, lambda mod: (mod.normalized_shape, mod.weight, mod.eps))


register(RMSNorm(), names=["rms_norm"], modules=[nn.RMSNorm])
