"""Reports: widths tables, interleaved timing, the prune report, attention maps.

MACs and parameter counts: snp_fx/cost.py."""
from __future__ import annotations

import os
import statistics
import time

import torch

from .planning import kept_width


@torch.no_grad()
def attention_scores(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Pre-softmax attention scores (scaled q k^T) of every SDPA call (padded or not), in graph order."""
    import torch.fx as fx

    from .trace import trace

    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    out: list[torch.Tensor] = []
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]

    class Reader(fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and getattr(n.target, "__name__", "") in ("scaled_dot_product_attention",
                                                                                  "padded_sdpa"):
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
        # widths in channels: rotary q/k keeps pairs of channels (partial rotary: pairs and singles)
        if entry is None:
            return g.heads, g.heads, g.channels(0, range(g.width))
        kept = [(h, k) for h, k in enumerate(entry["keep"]) if k]
        return len(kept), g.heads, g.channels(*kept[0]) if kept else 0

    lines = ["| attention site | heads | q/k width per head | v width per head |", "|---|---|---|---|"]
    for site in analysis.sites:
        h, H, qk = per_head(f"{site.name}.qk")
        _, _, v = per_head(f"{site.name}.v")
        qk_dense = analysis.groups[f"{site.name}.qk"].channels(0, range(analysis.groups[f"{site.name}.qk"].width))
        v_dense = analysis.groups[f"{site.name}.v"].width if f"{site.name}.v" in analysis.groups else None
        lines.append(f"| {site.name} | {h}/{H} | {qk}/{qk_dense} | "
                     f"{'-' if v is None else f'{v}/{v_dense}'} |")
    lines += ["", "| group | kind | kept width |", "|---|---|---|"]
    for g in analysis.groups.values():
        if g.kind in ("ffn", "residual"):
            entry = plan.groups.get(g.name)
            kept = kept_width(entry["keep"]) if entry else g.width
            lines.append(f"| {g.name} | {g.kind} | {kept}/{g.width}{_unprunable(g.prunable, g.reason)} |")
    return "\n".join(lines)


def _unprunable(prunable: bool, reason: str, limit: int = 70) -> str:
    """" (unprunable: why)" for a table cell, the reason's first line cut to ``limit`` characters
    (the full text: ``analysis.reasons()``, ``snp-fx inspect``); "" for a prunable group."""
    if prunable:
        return ""
    why = (reason or "no reason recorded").splitlines()[0].replace("|", "\\|")  # | would end the cell
    return f" (unprunable: {why if len(why) <= limit else why[:limit - 3].rstrip() + '...'})"


def load_warning(cores: int | None = None) -> str | None:
    """``"unreliable: load 11.3 on 2 cores"`` when the 1-minute load average is above the core
    count (other jobs then share the CPUs and inflate the times), else None.

    Call it right after timing (``time_interleaved``): the average covers the last minute.
    ``cores``: default ``os.cpu_count()``; the load average counts the whole machine's jobs too.
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform (Windows)
        return None
    cores = cores or os.cpu_count() or 1
    return f"unreliable: load {load:.1f} on {cores} cores" if load > cores else None


def time_interleaved(models: dict, inputs: tuple, repeats: int = 10, warmup: int = 2) -> dict:
    """Median seconds per forward pass of each model, timed in turns (a, b, a, b, ...).

    Interleaving makes machine noise hit every model alike, so ratios between them are
    trustworthy even when the absolute times are not.  ``inputs``: positional args, or a dict of
    keyword args.  On a busy machine even the ratios drift: ``load_warning()`` right after says so
    (``prune_report`` adds it to the latency note).
    """
    return {name: statistics.median(ts) for name, ts in time_turns(models, inputs, repeats, warmup).items()}


@torch.inference_mode()
def time_turns(models: dict, inputs: tuple, repeats: int = 10, warmup: int = 2) -> dict:
    """Seconds of every turn of each model, timed in turns as ``time_interleaved`` does: turn i of
    every model ran back to back, so per-turn ratios cancel the machine's slower spells."""
    values = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in values)

    def call(m):
        out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
        if cuda:  # kernels run asynchronously: time them to completion
            torch.cuda.synchronize()
        return out

    for m in models.values():
        m.eval()
        for _ in range(warmup):
            call(m)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            t = time.perf_counter()
            call(m)
            times[name].append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------------------
# Per-block widths and the prune report (used by the CLI and the examples)
# ---------------------------------------------------------------------------

def _block_of(name: str) -> str:
    """The module path up to its last numeric part: `blocks.3.attn.qk` -> `blocks.3`."""
    parts = name.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
    return ".".join(parts[:last + 1]) if last is not None else name.rsplit(".", 1)[0]


def block_widths(analysis, plan) -> tuple[list[dict], list[dict]]:
    """Kept and dense widths per attention block, and the other groups.

    Blocks: one row per attention site's block (its module path up to the block
    index), with ``heads``, ``qk`` / ``v`` (width per head, in channels) and ``ffn`` (hidden width,
    summed when a block has several FFN groups), each a (kept, dense) pair or None.
    Others: residual groups and FFN-like groups outside the blocks (a classifier),
    as dicts with ``name``, ``kind``, ``kept``, ``dense``, ``prunable``, ``reason``.
    """
    def kept_per_head(name):
        g = analysis.groups[name]
        entry = plan.groups.get(name)
        if entry is None:
            return g.heads, g.width
        widths = [len(k) for k in entry["keep"] if k]
        return len(widths), (max(widths) if widths else 0)

    rows: dict[str, dict] = {}
    for site in analysis.sites:
        row = rows.setdefault(_block_of(site.name), {"block": _block_of(site.name), "heads": None, "qk": None,
                                                     "v": None, "ffn": None})
        qk = analysis.groups.get(f"{site.name}.qk")
        if qk is None:
            continue
        h, _ = kept_per_head(qk.name)
        # in channels, comparable with v and the head dim: rotary keeps pairs (partial rotary: and singles)
        entry = plan.groups.get(qk.name)
        kept = next(((i, k) for i, k in enumerate(entry["keep"]) if k), (0, [])) if entry else (0, range(qk.width))
        row["heads"], row["qk"] = (h, qk.heads), (qk.channels(*kept), qk.channels(0, range(qk.width)))
        v = analysis.groups.get(f"{site.name}.v")
        if v is not None:
            row["v"] = (kept_per_head(v.name)[1], v.width)
    others = []
    for g in analysis.groups.values():
        entry = plan.groups.get(g.name)
        kept = kept_width(entry["keep"]) if entry else g.width
        row = rows.get(_block_of(g.name))
        if g.kind == "ffn" and row is not None:
            k0, d0 = row["ffn"] or (0, 0)
            row["ffn"] = (k0 + kept, d0 + g.width)
        elif g.kind in ("ffn", "residual"):
            others.append({"name": g.name, "kind": g.kind, "kept": kept, "dense": g.width, "prunable": g.prunable,
                           "reason": g.reason})
    return list(rows.values()), others


def _block_notes(analysis, listed: set) -> list[str]:
    """Notes under the blocks table: rotary q/k (widths in pairs) and groups left whole, with why."""
    notes = []
    rotary = [s.name for s in analysis.sites
              if getattr(analysis.groups.get(f"{s.name}.qk"), "unit_channels", 1) > 1]
    if rotary:
        where = "every block" if len(rotary) == len(analysis.sites) else ", ".join(rotary)
        u = analysis.groups[f"{rotary[0]}.qk"].unit_channels
        notes.append(f"q/k ({where}): rotary embeddings tie q/k channels in pairs ({u} channels each), "
                     "kept or removed together, so q/k widths count channels in whole pairs and "
                     "need not match v's.")
    partial = [s.name for s in analysis.sites
               if getattr(analysis.groups.get(f"{s.name}.qk"), "unit_sizes", None) is not None]
    if partial:
        where = "every block" if len(partial) == len(analysis.sites) else ", ".join(partial)
        notes.append(f"q/k ({where}): partial rotary embeddings tie the rotated channels in pairs and leave the "
                     "rest single; every head keeps the same number of pairs and of single channels.")
    whole = [g for g in analysis.groups.values() if not g.prunable and g.name not in listed]
    if whole:
        notes.append("Left whole: " + "; ".join(f"{g.name}{_unprunable(False, g.reason)}" for g in whole[:8])
                     + (f"; and {len(whole) - 8} more (snp-fx inspect lists them)" if len(whole) > 8 else "")
                     + ".")
    return ["", *notes] if notes else []


def _pair(p) -> str:
    return "-" if p is None else f"{p[0]}/{p[1]}"


def _short(v) -> str:
    if isinstance(v, dict) and len(v) > 6:  # e.g. an authors' config: one ratio per group
        return f"{{{len(v)} groups, {min(v.values()):.2f}..{max(v.values()):.2f}}}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def prune_report(title: str, analysis, plan, stats: dict, outputs: dict | None = None) -> str:
    """The markdown report the CLI prints and writes to report.md.

    ``stats``: ``params`` and ``macs`` (per sample, ``count_macs``) as (dense, pruned) pairs,
    optional ``latency`` (dense, pruned) seconds with ``latency_note`` and ``load_warning``
    (``load_warning()`` taken right after timing; when absent it is taken now), optional
    ``elapsed`` seconds, optional ``findings`` (sentences, e.g. the quality on held-out data),
    optional ``kernels`` (attention-site node -> the kernel the pruned model runs, ``attention_kernels``).
    ``outputs``: what was written where (label -> path).
    """
    rows, others = block_widths(analysis, plan)
    lines = [f"# {title}", ""]
    if plan.meta:
        lines += ["Plan: " + ", ".join(f"{k}={_short(v)}" for k, v in plan.meta.items()), ""]
    kernels = {_block_of(s.name): stats["kernels"][s.node] for s in analysis.sites
               if s.node in stats.get("kernels", {})}
    extra = ("", "") if not kernels else (" attention kernel |", "---|")
    lines += ["| block | heads | q/k width per head | v width per head | FFN width |" + extra[0],
              "|---|---|---|---|---|" + extra[1]]
    lines += [f"| {r['block']} | {_pair(r['heads'])} | {_pair(r['qk'])} | {_pair(r['v'])} | {_pair(r['ffn'])} |"
              + (f" {kernels.get(r['block'], '-')} |" if kernels else "") for r in rows]
    lines += _block_notes(analysis, {r["name"] for r in others})
    lines += ["", "| group | kind | kept width |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['kept']}/{r['dense']}{_unprunable(r['prunable'], r['reason'])} |"
              for r in others] or ["| (none) | - | - |"]
    lines += ["", "| | dense | pruned | pruned / dense |", "|---|---|---|---|"]
    (p0, p1), (m0, m1) = stats["params"], stats["macs"]
    lines.append(f"| params | {p0 / 1e6:.2f} M | {p1 / 1e6:.2f} M | {p1 / p0:.1%} |")
    lines.append(f"| MACs | {m0 / 1e9:.3f} G | {m1 / 1e9:.3f} G | {m1 / m0:.1%} |")
    notes = ["MACs are per sample: a forward pass's count divided by its batch size"]
    if stats.get("latency"):
        t0, t1 = stats["latency"]
        lines.append(f"| latency | {_ms(t0)} | {_ms(t1)} | {t1 / t0:.1%} (speed-up {t0 / t1:.2f}x) |")
        busy = stats["load_warning"] if "load_warning" in stats else load_warning()
        note = stats.get("latency_note") or "Latency: this machine"
        notes.append(f"{note} ({busy})" if busy else note)
    if stats.get("findings"):  # e.g. quality on held-out data
        lines += [""] + [f"{n}." for n in stats["findings"]]
    if stats.get("elapsed") is not None:
        notes.append(f"analyze + score + plan + rewrite + verify took {stats['elapsed']:.1f} s")
    if notes:
        lines += [""] + [f"{n}." for n in notes]
    if outputs:
        lines += ["", "Wrote:", ""] + [f"* {label}: `{path}`" for label, path in outputs.items()]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def attention_kernels(gm, inputs, nodes) -> dict:
    """The attention kernel torch runs at each of ``nodes`` (attention-site node names of ``gm``) on
    ``inputs`` (positional, or a dict), on this machine: "flash", "efficient", "cudnn" or "math" for
    scaled_dot_product_attention (after snp_fx's padding, snp_fx/kernels.py), "matmul" for an
    explicit q @ k^T + softmax."""
    import torch.fx as fx

    from .kernels import sdpa_backend
    from .ops import Args, op_key
    from .trace import normalize_inputs
    wanted, found = set(nodes), {}
    modules = dict(gm.named_modules())

    class Reader(fx.Interpreter):
        def run_node(self, n):
            if n.name in wanted:
                key = op_key(n, modules) if n.op.startswith("call_") else ""
                if key in ("scaled_dot_product_attention", "padded_sdpa"):
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    a = Args(n, args, kwargs)
                    found[n.name] = sdpa_backend(
                        a.value("query"), a.value("key"), a.value("value"), a.value("attn_mask"),
                        a.value("dropout_p") or 0.0, bool(a.value("is_causal")), a.value("scale"),
                        bool(a.value("enable_gqa")), padded=key == "padded_sdpa")
                else:
                    found[n.name] = "matmul"
            return super().run_node(n)

    reader = Reader(gm)
    reader.extra_traceback = False
    reader.run(*normalize_inputs(gm, inputs))
    return found


@torch.no_grad()
def attention_maps(gm, inputs: tuple, nodes) -> dict:
    """Attention probabilities at the given attention-site nodes of a GraphModule.

    For ``scaled_dot_product_attention`` the probabilities are recomputed from its
    q, k, mask and scale; for an explicit ``q @ k^T`` the first softmax downstream
    of it (through a scale, a bias, ...) is read.  Returns node name -> tensor
    (..., heads, queries, keys) for the nodes it could read.
    """
    import torch.fx as fx

    from . import ops

    modules = dict(gm.named_modules())
    kind = {n.name: ops.kind_of(n, modules) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")}
    by_name = {n.name: n for n in gm.graph.nodes}
    wanted = [n for n in nodes if n in by_name]
    read_at: dict[str, str] = {}  # node whose output (or args) gives the map -> site node
    for name in wanted:
        if kind.get(name) == "sdpa":
            read_at[name] = name
            continue
        frontier, seen = [by_name[name]], set()
        for _ in range(6):  # a few hops: scale, bias add, mask, then the softmax
            nxt = [u for n in frontier for u in n.users if u.name not in seen]
            seen.update(u.name for u in nxt)
            hit = next((u for u in nxt if kind.get(u.name) == "softmax"), None)
            if hit is not None:
                read_at[hit.name] = name
                break
            frontier = nxt
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    out: dict = {}

    class Reader(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            site = read_at.get(n.name)
            if site is None:
                return result
            if kind.get(n.name) != "sdpa":
                out[site] = result.detach().float()
                return result
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            got = dict(zip(names, args))
            got.update(kwargs)
            q, k, mask = got["query"], got["key"], got.get("attn_mask")
            if k.shape[-3] != q.shape[-3]:  # grouped-query attention
                k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
            scale = got.get("scale") or q.shape[-1] ** -0.5
            s = (q @ k.transpose(-2, -1)).float() * scale
            if got.get("is_causal"):
                causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
                s = s.masked_fill(~causal, float("-inf"))
            if isinstance(mask, torch.Tensor):
                s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
            out[site] = s.softmax(-1)
            return result

    Reader(gm).run(*inputs)
    return out
