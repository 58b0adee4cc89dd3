"""Models in float16 / bfloat16: what snp_fx computes in, and how closely it checks.

* Statistics (scores, Gram matrices, calibration and compensation sums) are accumulated in
  float32 or wider whatever the model's dtype (``wide``): a bfloat16 sum keeps 8 bits.
* The rewrite slices the model's own tensors, so the pruned model keeps the model's dtype.
* The self-check (``snp_fx.verify.tolerance``) compares the pruned model with the masked
  original in the model's dtype; below float32 both round differently (other matrix sizes,
  other summation orders), so the tolerance is set from the reference's own rounding error,
  measured on the same inputs.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves


def is_low(dtype) -> bool:
    """A floating dtype narrower than float32 (float16, bfloat16, float8 ...)."""
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize < 4


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is in a narrower floating dtype (for sums and products), else ``t``."""
    return t.float() if is_low(t.dtype) else t


def lowest(*things) -> torch.dtype | None:
    """The narrowest floating dtype below float32 among the tensors of ``things`` (modules: their
    parameters and buffers; else nested tensors), None if there is none."""
    ts = [t for x in things for t in ([*x.parameters(), *x.buffers()] if isinstance(x, torch.nn.Module)
                                      else tree_leaves(x))]
    low = {t.dtype for t in ts if isinstance(t, torch.Tensor) and is_low(t.dtype)}
    return max(low, key=lambda d: torch.finfo(d).eps) if low else None
