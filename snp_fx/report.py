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


def estimate_macs(analysis, keep: torch.Tensor) -> int:
    """MACs of the pruned model predicted from the labels alone (no rewrite, no forward).

    Counts what FlopCounterMode counts: linear, matmul/bmm/einsum, conv and
    attention products, with every shape pruned as ``keep`` says.
    """
    import math

    from . import ops
    from .rewrite import Irregular, pruned_sizes

    gm = analysis.gm
    modules = dict(gm.named_modules())
    shapes, labels = analysis.shapes, analysis.labels
    cache: dict[str, list[int]] = {}

    def new(name):
        if name not in cache:
            try:
                cache[name] = pruned_sizes(labels[name], shapes[name], keep)
            except Irregular:
                cache[name] = list(shapes[name])  # a fused reshape: its parts are counted downstream
        return cache[name]

    total = 0
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module") or not isinstance(shapes.get(n.name), tuple):
            continue
        kind = ops.kind_of(ops.op_key(n, modules))
        x = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
        if kind == "linear" and x is not None:
            total += math.prod(new(n.name)) * new(x.name)[-1]
        elif kind == "conv" and n.op == "call_module":
            mod = modules[n.target]
            k = math.prod(mod.kernel_size)
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            total += math.prod(new(n.name)) * (1 if depthwise else new(x.name)[1] // mod.groups) * k
        elif kind == "conv" and x is not None:  # functional conv (torch.export)
            w = n.args[1]
            total += math.prod(new(n.name)) * new(x.name)[1] * math.prod(shapes[w.name][2:])
        elif kind == "addmm":
            total += math.prod(new(n.name)) * new(n.args[1].name)[-1]
        elif kind == "matmul":
            total += math.prod(new(n.name)) * new(n.args[0].name)[-1]
        elif kind == "einsum":
            eq = n.args[0].replace(" ", "")
            ins, out = eq.split("->")
            a, b = ins.split(",")
            nodes = n.args[1:] if not isinstance(n.args[1], (list, tuple)) else n.args[1]
            sa = new(nodes[0].name)
            con = math.prod(sa[a.index(c)] for c in a if c in b and c not in out)
            total += math.prod(new(n.name)) * con
        elif kind == "sdpa":
            q, k, v = (new(a.name) for a in n.args[:3])
            total += math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    return total


def estimate_params(analysis, keep: torch.Tensor) -> int:
    """Parameter count of the pruned model, from the labels alone."""
    import math
    total = 0
    for name, p in analysis.gm.named_parameters():
        total += math.prod(int(m.sum()) for m in analysis.dim_masks(name, p.shape, keep))
    return total


@torch.no_grad()
def attention_scores(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Pre-softmax attention scores (scaled q k^T) of every SDPA call, in graph order."""
    import torch.fx as fx

    from .trace import trace

    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    out: list[torch.Tensor] = []
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]

    class Reader(fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "scaled_dot_product_attention":
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                got = dict(zip(names, args))
                got.update(kwargs)
                q, k = got["query"], got["key"]
                scale = got.get("scale") or q.shape[-1] ** -0.5
                out.append((q @ k.transpose(-2, -1)) * scale)
            return super().run_node(n)

    Reader(gm).run(*inputs)
    return out


def widths_table(analysis, plan) -> str:
    """Markdown table of kept widths: per attention site, then FFN and residual groups."""
    def per_head(name):
        g = analysis.groups.get(name)
        entry = plan.groups.get(name)
        if g is None:
            return None, None, None
        if entry is None:
            return g.heads, g.heads, g.width
        kept = [len(k) for k in entry["keep"] if k]
        return len(kept), g.heads, kept[0] if kept else 0

    lines = ["| attention site | heads | q/k width per head | v width per head |", "|---|---|---|---|"]
    for site in analysis.sites:
        h, H, qk = per_head(f"{site.name}.qk")
        _, _, v = per_head(f"{site.name}.v")
        qk_dense = analysis.groups[f"{site.name}.qk"].width
        v_dense = analysis.groups[f"{site.name}.v"].width if f"{site.name}.v" in analysis.groups else None
        lines.append(f"| {site.name} | {h}/{H} | {qk}/{qk_dense} | "
                     f"{'-' if v is None else f'{v}/{v_dense}'} |")
    lines += ["", "| group | kind | kept width |", "|---|---|---|"]
    for g in analysis.groups.values():
        if g.kind in ("ffn", "residual"):
            entry = plan.groups.get(g.name)
            kept = len(entry["keep"]) if entry else g.width
            lines.append(f"| {g.name} | {g.kind} | {kept}/{g.width}" + ("" if g.prunable else " (unprunable)") + " |")
    return "\n".join(lines)


@torch.inference_mode()
def time_interleaved(models: dict, inputs: tuple, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds per forward pass of each model, timed in turns (a, b, a, b, ...).

    Interleaving makes machine noise hit every model alike, so ratios between them are
    trustworthy even when the absolute times are not.  ``inputs``: positional args.
    """
    import statistics
    import time

    for m in models.values():
        m.eval()
        for _ in range(warmup):
            m(*inputs)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t = time.perf_counter()
            m(*inputs)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
