"""Cost of a model: MACs (torch.utils.flop_counter) and parameters, measured or predicted.

MACs are per sample: the count of one forward pass divided by the batch size of its
inputs (``batch_size``: the leading dim of the first tensor input), so a budget or a
report means the same whatever batch the example inputs have.

``estimate_macs`` / ``estimate_params`` predict the pruned model's cost from the analysis
and a keep mask alone (no rewrite, no forward): each op family counts its own MACs
(``OpFamily.macs``) on the pruned shapes.  Planning calls them many times per budget.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import ops
from .labels import Irregular, pruned_sizes


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    # torch 2.14 does not count the CPU fused attention kernel; count it like sdpa
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grouped_mm_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs):
    # MoE experts (snp_fx/ops/experts.py): every token row times its expert's (in, out) matrix
    return 2 * out_shape[0] * out_shape[1] * input_shape[-1]


def _custom_mapping():
    m = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        m[op] = _sdpa_cpu_flops
    # not counted by torch 2.14: aten's grouped matmul and transformers' fallback for it (a custom op,
    # there once transformers' MoE integration is imported)
    for ns, name in (("aten", "_grouped_mm"), ("transformers", "grouped_mm_fallback")):
        try:
            m[getattr(getattr(torch.ops, ns), name)] = _grouped_mm_flops
        except (AttributeError, RuntimeError):
            pass
    return m


def batch_size(inputs) -> int:
    """Samples in ``inputs`` (positional args, or a dict): the leading dim of the first tensor
    with at least one dim (depth first through tuples, lists and dicts); 1 when there is none.

    The rule cannot see a model that takes one unbatched sample (e.g. ids of shape (seq,)):
    pass ``batch=1`` to ``count_macs`` there, or set ``analysis.batch = 1`` before planning.
    """
    stack = [inputs]
    while stack:
        x = stack.pop(0)
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return max(int(x.shape[0]), 1)
        if isinstance(x, dict):
            stack[:0] = list(x.values())
        elif isinstance(x, (list, tuple)):
            stack[:0] = list(x)
    return 1


@torch.no_grad()
def count_macs(model: torch.nn.Module, inputs: tuple | dict, batch: int | None = None) -> int:
    """Multiply-accumulates per sample of one forward pass (FLOPs / 2 / batch); ``inputs``:
    positional args, or keyword args (a dict).

    ``batch``: samples in ``inputs`` (default: ``batch_size(inputs)``).  Work that does not
    scale with the batch (e.g. an MLP over a position table) is shared among the samples.
    """
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return counter.get_total_flops() // 2 // (batch or batch_size(inputs))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Estimator:
    """What a family's ``macs`` reads: pruned shapes (``new``), real shapes, modules, kept counts.

    A planner estimates hundreds of plans that differ in one group: each shape and count is
    memoised per analysis, keyed by the keep bits it reads (its own channels only)."""

    def __init__(self, analysis, keep: torch.Tensor):
        self.analysis, self.keep = analysis, keep
        self.shapes, self.labels = analysis.shapes, analysis.labels
        self.modules = dict(analysis.gm.named_modules())
        self._memo = analysis.__dict__.setdefault("_estimates", {})

    def _memoised(self, key, ids, compute):
        if key not in self._memo:
            self._memo[key] = (ids(), {})
        uids, seen = self._memo[key]
        bits = np.packbits(self.keep[uids].numpy()).tobytes()
        if bits not in seen:
            if len(seen) >= 8:  # the recent plans' values are the ones asked again
                seen.pop(next(iter(seen)))
            seen[bits] = compute()
        return seen[bits]

    def new(self, name: str) -> list[int]:
        """Pruned shape of a node's tensor."""
        lab = self.labels[name]
        if not isinstance(lab, torch.Tensor):
            return self._new(name)
        return list(self._memoised(("new", name), lambda: torch.unique(lab[lab >= 0]), lambda: self._new(name)))

    def _new(self, name: str) -> list[int]:
        try:
            return pruned_sizes(self.labels[name], self.shapes[name], self.keep)
        except Irregular:
            return list(self.shapes[name])  # a fused reshape: its parts are counted downstream

    def kept(self, param: str, shape) -> int:
        """Elements of a parameter the keep mask leaves."""
        ch = self.analysis.channels
        return self._memoised(("kept", param, tuple(shape)), lambda: ch.ids_read(param),
                              lambda: ch.kept_count(param, shape, self.keep))


def estimate_macs(analysis, keep: torch.Tensor) -> int:
    """MACs per sample of the pruned model predicted from the labels alone (no rewrite, no forward).

    Counts what FlopCounterMode counts: linear, matmul/bmm/einsum, conv and
    attention products, with every shape pruned as ``keep`` says; divided by
    ``analysis.batch`` (the example inputs' batch size), as ``count_macs`` does.
    """
    c = _Estimator(analysis, keep)
    return sum(family.macs(c, n, key) for n, key, family in _counted_nodes(analysis, c)) // _batch_of(analysis)


def _batch_of(analysis) -> int:
    return getattr(analysis, "batch", None) or batch_size(analysis.inputs)


def _counted_nodes(analysis, c) -> list:
    """(node, key, family) of every call with a tensor result, looked up once per analysis
    (planning estimates a budget many times)."""
    if getattr(analysis, "_counted_nodes", None) is None:
        analysis._counted_nodes = [
            (n, *ops.family_of(n, c.modules)) for n in analysis.gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module") and isinstance(c.shapes.get(n.name), tuple)]
    return analysis._counted_nodes


def estimate_params(analysis, keep: torch.Tensor) -> int:
    """Parameter count of the pruned model, from the labels alone."""
    c = _Estimator(analysis, keep)
    return sum(c.kept(name, p.shape) for name, p in analysis.gm.named_parameters())

