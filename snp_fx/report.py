"""Measurements: MACs (torch.utils.flop_counter), parameter counts, widths."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # torch 2.14 does not count the CPU fused attention kernel; count it like sdpa
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping():
    m = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        m[op] = _sdpa_cpu_flops
    return m


@torch.no_grad()
def count_macs(model: torch.nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
