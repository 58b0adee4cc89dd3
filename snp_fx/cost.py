"""Cost of a model: MACs (torch.utils.flop_counter) and parameters, measured or predicted.

``estimate_macs`` / ``estimate_params`` predict the pruned model's cost from the analysis
and a keep mask alone (no rewrite, no forward): each op family counts its own MACs
(``OpFamily.macs``) on the pruned shapes.  Planning calls them many times per budget.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from . import ops
from .labels import Irregular, pruned_sizes


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
def count_macs(model: torch.nn.Module, inputs: tuple | dict) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2); ``inputs``: positional, or keyword (a dict)."""
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return counter.get_total_flops() // 2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Estimator:
    """What a family's ``macs`` reads: pruned shapes (``new``), real shapes, modules, kept counts."""

    def __init__(self, analysis, keep: torch.Tensor):
        self.analysis, self.keep = analysis, keep
        self.shapes, self.labels = analysis.shapes, analysis.labels
        self.modules = dict(analysis.gm.named_modules())
        self._cache: dict[str, list[int]] = {}

    def new(self, name: str) -> list[int]:
        """Pruned shape of a node's tensor."""
        if name not in self._cache:
            try:
                self._cache[name] = pruned_sizes(self.labels[name], self.shapes[name], self.keep)
            except Irregular:
                self._cache[name] = list(self.shapes[name])  # a fused reshape: its parts are counted downstream
        return self._cache[name]

    def kept(self, param: str, shape) -> int:
        """Elements of a parameter the keep mask leaves."""
        return self.analysis.channels.kept_count(param, shape, self.keep)


def estimate_macs(analysis, keep: torch.Tensor) -> int:
    """MACs of the pruned model predicted from the labels alone (no rewrite, no forward).

    Counts what FlopCounterMode counts: linear, matmul/bmm/einsum, conv and
    attention products, with every shape pruned as ``keep`` says.
    """
    c = _Estimator(analysis, keep)
    return sum(family.macs(c, n, key) for n, key, family in _counted_nodes(analysis, c))


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
    return sum(analysis.channels.kept_count(name, p.shape, keep) for name, p in analysis.gm.named_parameters())

