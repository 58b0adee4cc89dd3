"""Functions that pruned graphs call: attention on the fused kernels whatever the pruned widths.

SNP keeps a different number of q/k and v neurons per head.  torch's fused attention kernels
need one head width for q, k and v (the CPU flash kernel, FlashAttention and the memory-efficient
kernel on CUDA), so an unequal call falls back to the math path: the (batch, heads, tokens, tokens)
score tensor is materialised, ~12 ops and 4 copies, 2.5-6x the fused call at batch 16
(benchmarks/latency.py).  ``padded_sdpa`` zero-pads the narrower side to the wider: zero q/k
columns add nothing to q k^T, zero v columns give zero output columns, which are sliced off.
The scale is the caller's (the rewrite passes the dense model's 1/sqrt(d) explicitly).

It is one graph node (under any fx tracer, through ``__torch_function__``) with the signature of
``F.scaled_dot_product_attention``, so the analysis treats it as that op and a pruned model
prunes again; under torch.export / torch.compile it becomes pad + fused attention + slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _padded(query, key, value):
    """q, k, v padded with zeros to one head width (CUDA's kernels pad that to a multiple of 8 themselves)."""
    e, ev = query.shape[-1], value.shape[-1]
    width = max(e, ev)
    if e < width:
        query, key = F.pad(query, (0, width - e)), F.pad(key, (0, width - e))
    if ev < width:
        value = F.pad(value, (0, width - ev))
    return query, key, value


def padded_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """``F.scaled_dot_product_attention`` for q/k and v of different head widths, on the fused kernel."""
    if torch.overrides.has_torch_function((query, key, value)):
        # fx proxies (any tracer, e.g. a pass that re-traces a pruned model) record one call, as
        # for torch.nn.functional's own functions, instead of tracing the shape checks below
        return torch.overrides.handle_torch_function(
            padded_sdpa, (query, key, value), query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    ev = value.shape[-1]
    if scale is None:  # as the unpadded call would: 1/sqrt(q's width)
        scale = query.shape[-1] ** -0.5
    q, k, v = _padded(query, key, value)
    extra = {"enable_gqa": True} if enable_gqa else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **extra)
    return out[..., :ev] if v.shape[-1] != ev else out


BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def sdpa_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, padded: bool = False) -> str:
    """The kernel torch picks for this attention call ("flash", "efficient", "math", ...)."""
    if padded:
        query, key, value = _padded(query, key, value)
    extra = {"enable_gqa": True} if enable_gqa else {}
    try:
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **extra)
    except (RuntimeError, TypeError):  # a shape torch's selector rejects: the math path
        return "math"
    return BACKENDS.get(int(choice), "math")


def unpadded(gm):
    """A copy of GraphModule ``gm`` whose padded attention calls are plain
    ``F.scaled_dot_product_attention`` again (the math path where widths differ): to count or time
    what the padding changes."""
    import copy
    gm = copy.deepcopy(gm)
    for n in gm.graph.nodes:
        if n.target is padded_sdpa:
            n.target = F.scaled_dot_product_attention
    gm.recompile()
    return gm
