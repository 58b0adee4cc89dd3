"""Figures for a pruning run: kept widths per block, and dense vs pruned attention maps.

Built on ``matplotlib.figure.Figure`` (no pyplot), so nothing touches the global
backend and the files render headless.
"""
from __future__ import annotations

import torch

from .report import attention_maps, block_widths

DENSE, PRUNED = "#c8c8c8", "#1f77b4"


def _figure(**kw):
    from matplotlib.figure import Figure
    return Figure(**kw)


def residual_caption(residual: list[dict], limit: int = 4) -> str:
    """"residual: a 24/32, b 48/64, c 96/128, ... and 2 more (listed in the report)": every residual
    group (kept/dense width) when there are at most ``limit``, else the first ``limit - 1`` and how many
    are left out (Swin-like models have one stream per stage; the title has room for a few)."""
    if not residual:
        return ""
    shown = residual if len(residual) <= limit else residual[:limit - 1]
    more = len(residual) - len(shown)
    return "residual: " + ", ".join(f"{r['name']} {r['kept']}/{r['dense']}" for r in shown) + \
        (f", ... and {more} more (listed in the report)" if more else "")


def plot_widths(analysis, plan, path, title: str = "") -> None:
    """Bars per block for heads, q/k and v width (all heads), FFN width: dense in grey, kept on top."""
    widths_figure(analysis, plan, title).savefig(path, dpi=110)


def widths_figure(analysis, plan, title: str = ""):
    """The ``plot_widths`` figure (a matplotlib Figure, not saved)."""
    rows, others = block_widths(analysis, plan)
    residual = [r for r in others if r["kind"] == "residual"]

    def total(r, key):  # q/k and v: the layer width, kept heads x kept width per head
        if r[key] is None or r["heads"] is None:
            return None
        return r["heads"][0] * r[key][0], r["heads"][1] * r[key][1]

    panels = [("heads", lambda r: r["heads"]), ("q/k width (all heads)", lambda r: total(r, "qk")),
              ("v width (all heads)", lambda r: total(r, "v")), ("FFN width", lambda r: r["ffn"])]
    panels = [(name, get) for name, get in panels if any(get(r) for r in rows)]
    fig = _figure(figsize=(3.2 * max(len(panels), 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    x = list(range(len(rows)))
    for ax, (name, get) in zip(axes, panels):
        vals = [get(r) or (0, 0) for r in rows]
        ax.bar(x, [d for _, d in vals], color=DENSE, label="dense")
        ax.bar(x, [k for k, _ in vals], color=PRUNED, width=0.6, label="pruned")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("block")
        ax.set_xticks(x if len(x) <= 16 else x[::2])
        if name == "heads":
            ax.yaxis.get_major_locator().set_params(integer=True)
    if panels:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    res = residual_caption(residual)
    fig.suptitle((title + "  " if title else "") + (f"({res})" if res else ""), fontsize=10, wrap=True)
    return fig


def _pick(analysis, plan, n_sites: int, n_heads: int) -> list[tuple]:
    """(site, dense head, pruned head index or None) for the first, middle and last sites."""
    sites = [s for s in analysis.sites if f"{s.name}.qk" in analysis.groups]
    if not sites:
        return []
    idx = sorted({round(i * (len(sites) - 1) / max(n_sites - 1, 1)) for i in range(n_sites)})
    picks = []
    for i in idx:
        site = sites[i]
        entry = plan.groups.get(f"{site.name}.qk")
        heads = analysis.groups[f"{site.name}.qk"].heads
        alive = [bool(k) for k in entry["keep"]] if entry else [True] * heads
        order = [h for h in range(heads) if alive[h]] + [h for h in range(heads) if not alive[h]]
        for h in order[:n_heads]:
            picks.append((site, h, sum(alive[:h]) if alive[h] else None))
    return picks


ATTENTION_CAPTION = (
    "Top row: the dense model; bottom row: the pruned model, same head. Each map: one row per query, one "
    "column per key; colour: attention probability (the bar under each column; both rows share the "
    "dense map's scale, brighter pruned values are clipped). 'head h': head index in the dense model. "
    "TV: total-variation distance between the dense and pruned maps, averaged over queries (0: identical, "
    "1: disjoint). 'head removed': the plan dropped this head.")


def plot_attention(analysis, plan, pruned, inputs: tuple, path, n_sites: int = 3, n_heads: int = 2) -> int:
    """Attention maps of one input, dense (top row) vs pruned (bottom row), for a few heads.

    ``inputs``: the positional inputs of the analysed graph (one item is drawn).
    Each column is titled with the total-variation distance between the two maps
    (0: identical, 1: disjoint), averaged over queries, and has a colour bar; the caption
    (``ATTENTION_CAPTION``) explains the labels.  Returns the number of columns.
    """
    fig, n = attention_figure(analysis, plan, pruned, inputs, n_sites, n_heads)
    fig.savefig(path, dpi=110)
    return n


def attention_figure(analysis, plan, pruned, inputs: tuple, n_sites: int = 3, n_heads: int = 2):
    """The ``plot_attention`` figure (not saved) and its number of columns."""
    import textwrap

    picks = _pick(analysis, plan, n_sites, n_heads)
    nodes = sorted({s.node for s, _, _ in picks})
    dense = attention_maps(analysis.gm, inputs, nodes)
    after = attention_maps(pruned, inputs, nodes)
    picks = [p for p in picks if p[0].node in dense]
    cols = max(len(picks), 1)
    width = max(2.3 * cols, 4.6)  # room for the caption with a single column
    fig = _figure(figsize=(width, 6.4), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for c, (site, h, ph) in enumerate(picks):
        a = dense[site.node].reshape(-1, *dense[site.node].shape[-3:])[0, h]
        im = axes[0, c].imshow(a.numpy(), cmap="viridis", vmin=0, vmax=float(a.max()))
        # one bar per column: each column has its own scale (maps differ a lot in their peaks)
        fig.colorbar(im, ax=axes[:, c], location="bottom", shrink=0.8, label="probability", extend="max")
        axes[0, c].set_title(f"{site.name}\nhead {h}", fontsize=8)
        if ph is None or site.node not in after:
            axes[1, c].text(0.5, 0.5, "head removed", ha="center", va="center", fontsize=9)
        else:
            b = after[site.node].reshape(-1, *after[site.node].shape[-3:])[0, ph]
            axes[1, c].imshow(b.numpy(), cmap="viridis", vmin=0, vmax=float(a.max()))
            tv = 0.5 * (a - b).abs().sum(-1).mean()
            axes[1, c].set_title(f"pruned, TV {float(tv):.3f}", fontsize=8)
        for r in range(2):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_ylabel("dense")
    axes[1, 0].set_ylabel("pruned")
    fig.suptitle("attention maps of one calibration input (rows: queries, columns: keys)", fontsize=9)
    fig.supxlabel(textwrap.fill(ATTENTION_CAPTION, int(width * 14)), fontsize=7, ha="left", x=0.01)
    return fig, len(picks)


def first_item(inputs: tuple) -> tuple:
    """The first batch item of every tensor input (maps are drawn for one input)."""
    return tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)
