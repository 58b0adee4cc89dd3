"""RMSNorm: ``nn.RMSNorm``, ``F.rms_norm`` and ``aten.rms_norm``.

Like LayerNorm without the mean: the weight is coupled with the last dim; the norm runs over
the channels (removing one is not zeroing it), so a residual stream through it is pruned
with its masked form — the mean square over kept channels only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..precision import wide
from .norms import LayerNorm, mask_last_dim_norm
from .registry import register


def masked_rms_norm(x, normalized_shape, weight=None, eps=None, *unused, keep=None):
    """RMSNorm whose mean square runs over the kept channels only (removed ones are zero); in
    float32 for float16 / bfloat16 inputs, as torch's own rms_norm."""
    dtype, x = x.dtype, wide(x)
    k = keep.to(x.dtype)
    eps = torch.finfo(dtype).eps if eps is None else eps
    y = x * torch.rsqrt((x * x * k).sum(-1, keepdim=True) / k.sum() + eps)
    return (y * weight if weight is not None else y).to(dtype)


class RMSNorm(LayerNorm):
    """Propagation, sizes and module attributes as for LayerNorm (``normalized_shape``); no bias."""
    kind = "rms_norm"
    PARAMS = ["weight"]
    rescaled = False

    def masked(self, m, node, key):
        mask_last_dim_norm(m, node, masked_rms_norm, lambda mod: (mod.normalized_shape, mod.weight, mod.eps))


register(RMSNorm(), names=["rms_norm"], modules=[nn.RMSNorm])
