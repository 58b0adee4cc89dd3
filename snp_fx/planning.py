"""PruningPlan: which channels each group keeps.  JSON-serialisable.

Built from ratios (per kind or per group) and per-class scores; the scores
come from ``importance`` (L2 weight norms by default).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from .analysis import Analysis, Group
from .cost import estimate_macs, estimate_params
from .errors import SNPError

KINDS = ("qk", "v", "ffn", "residual", "heads")


@dataclasses.dataclass
class PruningPlan:
    """``groups[name]`` = {"kind", "keep"}: kept indices per head (qk/v) or kept indices."""
    groups: dict[str, dict]
    meta: dict = dataclasses.field(default_factory=dict)
    scores: object = dataclasses.field(default=None, repr=False, compare=False)  # what chose it; not saved

    def to_json(self) -> str:
        return json.dumps({"format": "snp_fx.plan/1", "meta": self.meta, "groups": self.groups}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SNPError(f"plan is not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != "snp_fx.plan/1":
            raise SNPError("not an snp_fx plan (missing 'format': 'snp_fx.plan/1')")
        return cls(groups=data["groups"], meta=data.get("meta", {}))

    def save(self, path) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> "PruningPlan":
        with open(path) as f:
            return cls.from_json(f.read())

    def widths(self) -> dict[str, object]:
        """Kept width per group (per head for qk/v)."""
        out = {}
        for name, g in self.groups.items():
            k = g["keep"]
            out[name] = [len(h) for h in k] if g["kind"] in ("qk", "v") or k and isinstance(k[0], list) else len(k)
        return out

    def __str__(self) -> str:
        lines = [f"{'group':<40} {'kind':<8} kept"]
        for name, w in self.widths().items():
            kind = self.groups[name]["kind"]
            if isinstance(w, list):
                heads = sum(1 for x in w if x)
                per = sorted({x for x in w if x})
                rows = "heads" if kind in ("qk", "v") else "experts"
                w = f"{heads} {rows} x {per[0] if len(per) == 1 else per}" if heads else "0"
            lines.append(f"{name:<40} {kind:<8} {w}")
        return "\n".join(lines)


def kept_width(keep) -> int:
    """Kept width of a non-attention plan entry: its kept indices, or each expert's (MoE experts:
    one list per expert, the same count in each)."""
    return len(keep[0]) if keep and isinstance(keep[0], list) else len(keep)


def _check_ratio(key, r):
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not (0.0 <= r < 1.0):
        raise SNPError(f"ratio for '{key}' must be a number in [0, 1), got {r!r}")


def _keep_count(n: int, ratio: float, what: str, strict: bool = True) -> int:
    k = int(round(n * (1.0 - ratio)))
    if k < 1 and not strict:  # a model-wide ratio keeps one channel/head in small groups
        return 1
    if k < 1:
        raise SNPError(f"ratio {ratio} would remove every channel of {what} (width {n}); "
                       "keep at least one: use a smaller ratio")
    return k


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    idx = torch.argsort(scores, descending=True, stable=True)[:k]
    return sorted(idx.tolist())


def split_by_size(g: Group, k: int) -> dict[int, int]:
    """Units of each size that ``k`` kept units per head of a mixed group (``g.unit_sizes``) are made
    of: in proportion to each size's count (largest remainders), and at least one of each size
    where ``k`` allows, so every head keeps the same layout."""
    have = g.size_counts(0, range(g.width))
    exact = {s: k * n / g.width for s, n in have.items()}
    out = {s: int(x) for s, x in exact.items()}
    for s in sorted(have, key=lambda s: (out[s] - exact[s], -s))[:k - sum(out.values())]:
        out[s] += 1
    for s in have:
        if out[s] == 0 and k >= len(have):
            out[max(out, key=lambda t: (out[t], t))] -= 1
            out[s] = 1
    return out


def pick(g: Group, ranking: torch.Tensor, k: int) -> list:
    """The top ``k`` positions of a non-attention group by ``ranking``: the same count from each block
    where the group has blocks (a grouped conv's groups; ``k`` is then a multiple of their count); for
    MoE experts ((experts, width) rankings) the top ``k`` of each expert's own."""
    if ranking.dim() == 2:
        return [_topk_sorted(row, k) for row in ranking]
    if g.blocks is None:
        return _topk_sorted(ranking, k)
    nb = int(g.blocks.max()) + 1
    out = []
    for b in range(nb):
        pos = (g.blocks == b).nonzero().flatten()
        out += pos[_topk_sorted(ranking[pos], k // nb)].tolist()
    return sorted(out)


def first_kept(g: Group, k: int) -> list[int]:
    """``k`` positions of a 1-d group that a plan may keep (the first ones; per block with blocks)."""
    return pick(g, -torch.arange(g.width, dtype=torch.float64), k)


def _pick_in_head(scores_obj, g: Group, h: int, k: int, ranking: torch.Tensor) -> list[int]:
    """Kept indices of head ``h``: the scores' own selector (exact q/k selection) when it has one
    for this group, else the top ``k`` of ``ranking``; in a group of mixed unit sizes, the top of
    each size (``split_by_size``)."""
    select = None if isinstance(scores_obj, torch.Tensor) else getattr(scores_obj, "select", None)  # not Tensor.select
    picked = select(g, h, k) if select is not None and g.kind == "qk" else None
    if g.unit_sizes is not None and picked is not None and g.size_counts(h, picked) != split_by_size(g, k):
        raise SNPError(f"selection for {g.name} head {h} returned {picked}: this group has channel pairs and "
                       f"single channels, and every head keeps {split_by_size(g, k)} units of each size "
                       "(snp_fx.planning.split_by_size)")
    if g.unit_sizes is not None and picked is None:
        row = g.unit_sizes[h]
        picked = []
        for size, n in split_by_size(g, k).items():
            pos = (row == size).nonzero().flatten()
            picked += pos[_topk_sorted(ranking[pos], n)].tolist()
        return sorted(picked)
    return picked if picked is not None else _topk_sorted(ranking, k)


def check_ratios(analysis: Analysis, ratios: dict) -> None:
    """Raise a clear error for ratios that cannot be planned (before any costly scoring)."""
    if not isinstance(ratios, dict):
        raise SNPError(f"ratios must be a dict like {{'qk': 0.5, 'ffn': 0.3}}, got {type(ratios).__name__}")
    site_names = {g.site for g in analysis.groups.values() if g.site}
    for key, r in ratios.items():
        if key not in KINDS and key not in analysis.groups and not (
                key.endswith(".heads") and key[:-6] in site_names):
            raise SNPError(f"unknown ratio key '{key}': use one of {list(KINDS)} or a group name from "
                           f"analyze() (e.g. {list(analysis.groups)[:3]})")
        _check_ratio(key, r)
        g = analysis.groups.get(key) if key not in KINDS else None  # "residual" is a kind first
        if g is not None and not g.prunable and r > 0:
            raise SNPError(f"group '{key}' cannot be pruned: {g.reason}")
        if g is not None:
            _keep_count(g.width, r, key)
        if key.endswith(".heads") and key[:-6] in site_names:
            qk = analysis.groups.get(key[:-6] + ".qk")
            if qk is not None:
                _keep_count(qk.heads, r, f"heads of {key[:-6]}")


def make_plan(analysis: Analysis, ratios: dict, scores, round_to: int = 1) -> PruningPlan:
    """Plan from ``ratios``: keys are kinds (qk, v, ffn, residual, heads) or group names.

    ``scores``: a ``Scores`` (or a tensor of class scores); the lowest go first.
    """
    head_scores = getattr(scores, "heads", {})
    scores_obj, scores = scores, getattr(scores, "classes", scores)
    check_ratios(analysis, ratios)
    check_round_to(round_to)

    def ratio_for(g: Group) -> float:
        return float(ratios.get(g.name, ratios.get(g.kind, 0.0)))

    def count(g: Group) -> int:
        k = _keep_count(g.width, ratio_for(g), g.name, strict=g.name in ratios and g.name not in KINDS)
        return _round_width(k, g.width, step_of(round_to, g)) if ratio_for(g) > 0 else k

    plan: dict[str, dict] = {}
    heads_kept: dict[str, str] = {}  # site -> why its heads stay although a heads ratio was asked for
    by_site: dict[str, dict[str, Group]] = {}
    for g in analysis.groups.values():
        if g.site:
            by_site.setdefault(g.site, {})[g.kind] = g
    for site, gs in by_site.items():
        qk, v = gs.get("qk"), gs.get("v")
        if qk is None:
            continue
        heads_key = site + ".heads" if site + ".heads" in ratios else "heads"
        heads_ratio = float(ratios.get(heads_key, 0.0))
        kept_heads = list(range(qk.heads))
        can_drop_heads = qk.prunable and (v is not None and v.prunable and v.heads == qk.heads) and \
            not qk.keep_heads and not v.keep_heads
        if heads_ratio > 0 and not can_drop_heads and qk.heads * (v.heads if v is not None else 1) > 1:
            heads_kept[site] = _why_heads_stay(qk, v)
        if heads_ratio > 0 and can_drop_heads:
            n_keep = _keep_count(qk.heads, heads_ratio, f"heads of {site}", strict=heads_key != "heads")
            head_score = head_scores.get(site)
            if head_score is None:  # share of the site's q/k and v scores held by each head
                head_score = scores[qk.classes].sum(1) / scores[qk.classes].sum() + \
                    scores[v.classes].sum(1) / scores[v.classes].sum()
            kept_heads = _topk_sorted(head_score, n_keep)
        for g in (qk, v):
            if g is None or not g.prunable:
                continue
            k = count(g)
            rows = kept_heads if can_drop_heads else range(g.heads)  # heads only go from both at once
            keep = []
            for h in range(g.heads):
                keep.append(_pick_in_head(scores_obj, g, h, k, scores[g.classes[h]]) if h in rows else [])
            plan[g.name] = {"kind": g.kind, "keep": keep}
    for g in analysis.groups.values():
        if g.site or not g.prunable:
            continue
        plan[g.name] = {"kind": g.kind, "keep": pick(g, scores[g.classes], count(g))}
    meta = {"ratios": {k: float(v) for k, v in ratios.items()}}
    if heads_kept:
        meta["heads_kept"] = heads_kept
    return PruningPlan(plan, meta=meta)


def _why_heads_stay(qk: Group, v: Group | None) -> str:
    if not qk.prunable:
        return f"q/k is not prunable ({qk.reason})"
    if v is None or not v.prunable:
        return "v is not prunable" + (f" ({v.reason})" if v is not None else "")
    if qk.keep_heads or v.keep_heads:
        return qk.keep_heads or v.keep_heads
    if qk.heads == 1:
        return "the heads share their q/k channels (a table shared by the heads, e.g. relative positions, " \
               "is contracted with q), so no head can go alone"
    return f"q/k has {qk.heads} head rows and v {v.heads}"


def keep_mask(analysis: Analysis, plan: PruningPlan) -> torch.Tensor:
    """keep[id] for every unit id: False where the plan removes its class."""
    keep_cls = torch.ones(analysis.channels.num_units, dtype=torch.bool)
    # a planner builds hundreds of plans that differ in one group: each entry is checked once
    memo = analysis.__dict__.setdefault("_removed_classes", {})
    for name, entry in plan.groups.items():
        g = analysis.groups.get(name)
        if g is None:
            raise SNPError(f"plan names group '{name}', which this model does not have; "
                           f"its groups are {list(analysis.groups)[:5]}...")
        if entry.get("kind") != g.kind:
            raise SNPError(f"plan group '{name}' has kind {entry.get('kind')!r}, the model's is {g.kind!r}")
        if not g.prunable:
            raise SNPError(f"plan prunes group '{name}', which cannot be pruned: {g.reason}")
        frozen = _frozen(entry["keep"])
        removed = memo.get((name, frozen)) if frozen is not None else None
        if removed is None:
            removed = _removed_classes(g, entry["keep"])
            if frozen is not None:
                if len(memo) > 4 * len(analysis.groups) + 64:  # a few plans' worth
                    memo.clear()
                memo[name, frozen] = removed
        keep_cls[removed] = False
    # dependent classes (heads, head-indexed tables) exist while any support exists
    for dep, sup in analysis.channels.support.items():
        if sup:
            keep_cls[dep] = bool(keep_cls[torch.tensor(sorted(sup))].any())
    _check_heads(analysis, plan, keep_cls)
    return keep_cls[analysis.channels.class_of]


def _frozen(keep):
    """A hashable copy of a plan entry's kept indices (a list of ints, or of lists of ints); None
    for anything else (checked, and refused, every time)."""
    if not isinstance(keep, list):
        return None
    if all(type(i) is int for i in keep):
        return tuple(keep)
    rows = [_frozen(r) for r in keep]
    return None if any(r is None for r in rows) else tuple(rows)


def _removed_classes(g: Group, keep) -> torch.Tensor:
    """The class ids a plan entry ``keep`` of group ``g`` removes, after checking the entry."""
    name = g.name
    removed = []
    if g.slots is not None:  # MoE experts: the same count in every expert (rectangular 3-d weights)
        if not isinstance(keep, list) or len(keep) != g.heads or not all(isinstance(r, list) for r in keep):
            raise SNPError(f"plan group '{name}' must list kept indices for each of its {g.heads} experts")
        widths = {len(r) for r in keep}
        if len(widths) != 1 or not keep[0]:
            raise SNPError(f"plan group '{name}' keeps widths {sorted(widths)} per expert; every expert must "
                           "keep the same count (at least one): its weights are one 3-d tensor")
        k = len(keep[0])
        if g.step > 1 and k % g.step and k != g.width:
            raise SNPError(f"plan group '{name}' keeps {k} channels per expert; its kernel takes multiples "
                           f"of {g.step} (aligned rows)")
        removed.append(g.slots[k:].flatten())  # pruned activation column s: each row's expert's s-th kept neuron
        rows = list(enumerate(keep))
    elif g.classes.dim() == 2:
        if not isinstance(keep, list) or len(keep) != g.heads:
            raise SNPError(f"plan group '{name}' must list kept indices for each of its {g.heads} heads")
        widths = {len(h) for h in keep if h}
        if len(widths) > 1:
            raise SNPError(f"plan group '{name}' keeps different widths per head {sorted(widths)}; "
                           "heads of one site must keep the same count")
        if not widths:
            raise SNPError(f"plan group '{name}' removes every head; keep at least one")
        rows = [(h, idx) for h, idx in enumerate(keep)]
        if g.unit_sizes is not None and all(isinstance(i, int) and 0 <= i < g.width for r in keep for i in r):
            layouts = {tuple(g.size_counts(h, idx).items()) for h, idx in rows if idx}
            if len(layouts) > 1:
                raise SNPError(f"plan group '{name}' keeps different counts of channel pairs and single "
                               f"channels per head {[dict(x) for x in sorted(layouts)]}; heads of one site "
                               "must keep the same layout")
    else:
        rows = [(None, keep)]
        if not keep:
            raise SNPError(f"plan group '{name}' keeps no channel; keep at least one")
        if g.step > 1 and len(keep) % g.step and len(keep) != g.width:
            raise SNPError(f"plan group '{name}' keeps {len(keep)} channels; its kernel takes multiples "
                           f"of {g.step} (aligned rows)")
        if g.blocks is not None and all(isinstance(i, int) and 0 <= i < g.width for i in keep):
            counts = torch.bincount(g.blocks[keep], minlength=int(g.blocks.max()) + 1).tolist()
            if len(set(counts)) > 1:
                raise SNPError(f"plan group '{name}' keeps {counts} channels of its blocks (the groups of a "
                               "grouped conv); each must keep the same count")
    for h, idx in rows:
        cls = g.classes[h] if h is not None else g.classes
        if any((not isinstance(i, int)) or i < 0 or i >= cls.numel() for i in idx) or len(set(idx)) != len(idx):
            raise SNPError(f"plan group '{name}' has invalid indices (must be distinct ints in "
                           f"[0, {cls.numel()}))")
        m = torch.ones(cls.numel(), dtype=torch.bool)
        m[idx] = False
        removed.append(cls[m].flatten())
    return torch.cat(removed) if removed else torch.zeros(0, dtype=torch.long)


def _check_heads(analysis, plan, keep_cls):
    for site in {g.site for g in analysis.groups.values() if g.site}:
        qk = analysis.groups.get(site + ".qk")
        v = analysis.groups.get(site + ".v")
        if qk is None or v is None or qk.heads != v.heads:
            continue
        a = keep_cls[qk.classes].any(1)
        b = keep_cls[v.classes].any(1)
        if not torch.equal(a, b):
            raise SNPError(f"site {site}: a head must be removed from q/k and v together "
                           f"(q/k keeps heads {a.nonzero().flatten().tolist()}, v keeps {b.nonzero().flatten().tolist()})")


# ---------------------------------------------------------------------------
# The SNP authors' config files
# ---------------------------------------------------------------------------

BUNDLED_CONFIGS = {name: os.path.join(os.path.dirname(__file__), "configs", name + ".json")
                   for name in ("DeiT_t", "DeiT_s", "DeiT_s_small", "DeiT_b")}


def paper_ratios(analysis: Analysis, config) -> dict[str, float]:
    """Map the authors' ratio file (DeiT node names) onto this model's groups.

    ``config``: a path, a dict, or a bundled name: DeiT_t, DeiT_s, DeiT_s_small, DeiT_b
    (the SNP authors' published ratios, BSD-3-Clause, Copyright 2024 Nota Inc.).

    ``matmul``/``matmul_{2i}`` -> site i's q/k, ``matmul_{2i+1}`` -> site i's v,
    ``blocks_<i>_mlp_fc1`` -> that FFN, ``add_<n>`` -> the residual stream.
    """
    if isinstance(config, str) and config in BUNDLED_CONFIGS:
        config = BUNDLED_CONFIGS[config]
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SNPError(f"cannot read ratio file {config!r}: {e}") from e
    if not isinstance(config, dict):
        raise SNPError("a ratio config must be a JSON object of node name -> ratio")
    sites = [s.name for s in analysis.sites]
    by_flat = {name.replace(".", "_"): name for name in analysis.groups}
    residual = [g.name for g in analysis.groups.values() if g.kind == "residual"]
    out, unmatched = {}, []
    for key, r in config.items():
        target = None
        if key == "matmul" or key.startswith("matmul_") and key[7:].isdigit():
            j = 0 if key == "matmul" else int(key[7:])
            if j // 2 < len(sites):
                target = f"{sites[j // 2]}.{'qk' if j % 2 == 0 else 'v'}"
        elif key.startswith("add_") and key[4:].isdigit() and len(residual) == 1:
            target = residual[0]
        elif key in by_flat:
            target = by_flat[key]
        elif key in analysis.groups:
            target = key
        if target is None or target not in analysis.groups:
            unmatched.append(key)
        else:
            out[target] = float(r)
    if unmatched:
        raise SNPError(f"ratio file names nodes this model does not have: {unmatched[:10]}"
                       f"{' ...' if len(unmatched) > 10 else ''} (the model's groups: {list(analysis.groups)[:6]} ...)")
    return out


# ---------------------------------------------------------------------------
# Budgets: a MACs or parameter target instead of ratios
# ---------------------------------------------------------------------------

def check_round_to(round_to) -> None:
    """A positive int, or a dict of kind or group name -> positive int."""
    values = round_to.values() if isinstance(round_to, dict) else [round_to]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in values):
        raise SNPError(f"round_to must be a positive integer or a dict like {{'qk': 8, 'v': 8, 'ffn': 64}}, "
                       f"got {round_to!r}")
    if isinstance(round_to, dict):
        bad = [k for k in round_to if not isinstance(k, str)]
        if bad:
            raise SNPError(f"round_to keys are kinds {list(KINDS[:4])} or group names, got {bad}")


def step_of(round_to, g: Group) -> int:
    """The width step of group ``g`` in its own units: ``round_to`` counts channels (per head for
    q/k and v), and rotary q/k groups count channel pairs."""
    r = round_to.get(g.name, round_to.get(g.kind, 1)) if isinstance(round_to, dict) else round_to
    return math.lcm(max(1, r // g.unit_channels), g.step)


def _round_width(k: int, width: int, round_to: int) -> int:
    if round_to <= 1:
        return max(1, min(k, width))
    k = int(round(k / round_to)) * round_to
    return max(min(round_to, width), min(k, width))


def plan_for_target(analysis: Analysis, scores, target_macs=None, target_params=None, round_to: int = 1,
                    heads: bool = False, tolerance: float = 0.01, target_latency=None,
                    fill_padding: bool = False, normalise: str = "group") -> PruningPlan:
    """Allocate widths over every group to meet a MACs, parameter or latency budget.

    Scores are normalised per group (total-sum scaling to mean 1) so one
    global threshold compares them; each group keeps the channels above it
    (the same count in every head), widths rounded to ``round_to``; the
    threshold is bisected until the measured budget is met within ``tolerance``.
    ``target_*``: an absolute count, or a fraction (< 1) of the dense model; MACs per sample
    (``estimate_macs`` divides by ``analysis.batch``), so the example batch size does not matter.
    ``target_latency``: a fraction (< 1) of the dense model's latency or seconds ("35ms"), for
    the example inputs' whole batch on this machine, predicted by ``snp_fx.latency``.
    ``fill_padding``: at a ``scaled_dot_product_attention`` site the narrower of q/k and v keeps as
    many channels per head as the wider (its next best), where the rewrite would otherwise pad it
    with zeros for the fused kernel: the attention costs the same, the pad copies go, and the
    projection's extra rows are paid for by a higher threshold elsewhere.
    ``normalise``: "group" (the scaling above) or "kind": then each kind's deviations from 1 are
    divided by their pooled standard deviation over the kind's groups (heads: over the sites), so
    that a kind whose scores are nearly flat (SNP's v and FFN redundancy) is not kept whole until
    the threshold passes 1 and then cut at once, while the layers of one kind keep their relative
    spreads (see README, "Where a MACs budget goes").
    """
    check_normalise(normalise)
    check_target(analysis, target_macs, target_params, round_to, target_latency=target_latency, heads=heads)
    measure, _, dense, target = _budget(analysis, target_macs, target_params, target_latency, heads)
    head_scores = getattr(scores, "heads", {})
    cls_scores = getattr(scores, "classes", scores)

    def normed(x):
        x = x.double()
        return x / x.abs().mean().clamp_min(1e-30)

    groups = [g for g in analysis.groups.values() if g.prunable]
    norm = {g.name: normed(cls_scores[g.classes]) for g in groups}
    sites: dict[str, dict[str, Group]] = {}
    for g in groups:
        if g.site:
            sites.setdefault(g.site, {})[g.kind] = g
    hnorm = {}
    if heads:
        for site, gs in sites.items():
            if "qk" in gs and "v" in gs and gs["qk"].heads == gs["v"].heads and gs["qk"].heads > 1:
                hs = head_scores.get(site)
                if hs is None:
                    hs = norm[gs["qk"].name].sum(1) + norm[gs["v"].name].sum(1)
                hnorm[site] = normed(hs)
    if normalise == "kind":
        norm = _unit_spread_per_kind(norm, {g.name: g.kind for g in groups})
        hnorm = _unit_spread_per_kind(hnorm, {site: "heads" for site in hnorm})

    fused = {s.name for s in analysis.sites if s.kind == "sdpa"} if fill_padding else set()
    fillable = {site: (gs["qk"], gs["v"]) for site, gs in sites.items() if site in fused and "qk" in gs
                and "v" in gs and gs["qk"].unit_sizes is None and gs["qk"].heads % gs["v"].heads == 0}

    def filled(widths):
        """``widths`` with each fillable site's narrower side widened to the other's channel count."""
        widths = dict(widths)
        for qk, v in fillable.values():
            e, ev = widths[qk.name] * qk.unit_channels, widths[v.name] * v.unit_channels
            narrow, wide = (qk, ev) if e < ev else (v, e) if ev < e else (None, 0)
            if narrow is not None and wide % narrow.unit_channels == 0:
                w = min(wide // narrow.unit_channels, narrow.width)
                if w % step_of(round_to, narrow) == 0:  # widths stay multiples of round_to
                    widths[narrow.name] = w
        return widths

    # a plan is a width per group (per head for q/k, v) and the kept heads per site
    def widths_at(t: float):
        widths, heads_kept = {}, {}
        for site, gs in sites.items():
            any_g = next(iter(gs.values()))
            kept = list(range(any_g.heads))
            if site in hnorm:
                kept = _topk_sorted(hnorm[site], max(1, int((hnorm[site] >= t).sum())))
            heads_kept[site] = kept
            for g in gs.values():
                rows = kept if site in hnorm and g.heads == len(hnorm[site]) else list(range(g.heads))
                widths[g.name] = _round_width(int(round(float((norm[g.name][rows] >= t).sum()) / len(rows))),
                                              g.width, step_of(round_to, g))
        for g in groups:
            if not g.site:  # (MoE experts: (experts, width), the same count in each)
                widths[g.name] = _round_width(int(round(float((norm[g.name] >= t).sum()) / g.heads)),
                                              g.width, step_of(round_to, g))
        return filled(widths), heads_kept

    def build(widths, heads_kept) -> PruningPlan:
        plan = {}
        for g in groups:
            s = norm[g.name]
            if g.site:
                rows = heads_kept[g.site] if g.site in hnorm and g.heads == len(hnorm[g.site]) else range(g.heads)
                rows = set(rows)
                plan[g.name] = {"kind": g.kind, "keep": [
                    _pick_in_head(scores, g, h, widths[g.name], s[h]) if h in rows else [] for h in range(g.heads)]}
            else:  # FFN / residual; MoE experts: each its own neurons (pick)
                plan[g.name] = {"kind": g.kind, "keep": pick(g, s, widths[g.name])}
        return PruningPlan(plan)

    def value(widths, heads_kept):
        p = build(widths, heads_kept)
        return measure(analysis, keep_mask(analysis, p)), p

    def step_score(g, width, direction):
        """Mean normalised score of the channels one step would remove (-1) or add back (+1)."""
        s = norm[g.name].reshape(-1, g.width) if g.classes.dim() == 2 else norm[g.name].reshape(1, -1)
        ranked = s.sort(dim=1, descending=True).values
        step = step_of(round_to, g)
        lo, hi = (width - step, width) if direction < 0 else (width, width + step)
        return float(ranked[:, max(lo, 0):min(hi, g.width)].mean())

    lo = min(float(v.min()) for v in norm.values()) - 1.0
    hi = max(float(v.max()) for v in norm.values()) + 1.0
    best_w = widths_at(lo)
    best_v, best = value(*best_w)
    if best_v > target:
        for _ in range(60):  # bisect the global threshold
            mid = (lo + hi) / 2
            w = widths_at(mid)
            v, p = value(*w)
            if abs(v - target) < abs(best_v - target):
                best_w, best_v, best = w, v, p
            if v > target:
                lo = mid
            else:
                hi = mid
            if abs(v - target) <= tolerance * target * 0.5 or hi - lo < 1e-9:
                break
        # rounding makes the budget a step function of the threshold: finish one step at a time
        widths, heads_kept = dict(best_w[0]), best_w[1]
        for _ in range(10 * len(groups)):
            if abs(best_v - target) <= tolerance * target:
                break
            direction = -1 if best_v > target else 1
            # the step of the lowest-scored channels (removing) or the best ones (adding back) whose
            # budget stays in the band: try them in score order, the first that fits is the step
            options = []
            for g in groups:
                step = step_of(round_to, g)
                w = widths[g.name] + direction * step
                if w < min(step, g.width) or w > g.width or (direction > 0 and widths[g.name] == g.width):
                    continue
                trial = dict(widths)
                trial[g.name] = min(max(w, 1), g.width)
                trial = filled(trial)
                if trial == widths:  # a step the fill undoes (q/k or v of a filled site alone)
                    continue
                options.append((step_score(g, widths[g.name], direction) * -direction, trial))
            options.sort(key=lambda o: o[0])  # stable: ties keep the groups' order
            for _, trial in options:
                v, p = value(trial, heads_kept)
                if v >= target * (1 - tolerance) if direction < 0 else v <= target * (1 + tolerance):
                    widths, best_v, best = trial, v, p
                    break
            else:
                break
    what = "target_macs" if target_macs is not None else "target_params" if target_params is not None \
        else "target_latency"
    best.meta = {what: float(target), "dense": float(dense), "round_to": round_to, "heads": heads}
    if target_latency is not None:  # seconds, predicted for the example inputs on this machine
        best.meta.update(predicted_latency=float(best_v), latency_machine=measure.machine,
                         latency_inputs=[list(x.shape) for x in analysis.inputs if isinstance(x, torch.Tensor)])
    return best


NORMALISE = ("group", "kind")


def check_normalise(normalise) -> None:
    if normalise not in NORMALISE:
        raise SNPError(f"normalise={normalise!r} is not one of {list(NORMALISE)}")


def _unit_spread_per_kind(norm: dict, kind_of: dict) -> dict:
    """Mean-1 scores (name -> tensor) with each kind's deviations from 1 over their pooled standard
    deviation (a kind with one score, or all equal, is left as it is)."""
    pooled = {}
    for name, x in norm.items():
        pooled.setdefault(kind_of[name], []).append(x.flatten() - 1)
    spread = {}
    for kind, devs in pooled.items():
        d = torch.cat(devs)
        sd = float(d.std()) if d.numel() > 1 else 0.0
        spread[kind] = sd if sd > 1e-12 else 1.0
    return {name: 1 + (x - 1) / spread[kind_of[name]] for name, x in norm.items()}


def _budget(analysis: Analysis, target_macs, target_params, target_latency, heads: bool):
    """(measure, unit, dense value, target in the measure's units) of the one budget given."""
    if sum(t is not None for t in (target_macs, target_params, target_latency)) != 1:
        raise SNPError("give exactly one of target_macs, target_params and target_latency")
    if target_latency is not None:
        # imported here: snp_fx.latency builds its probe plans with this module's keep_mask
        from .latency import latency_model, target_seconds
        target_seconds(target_latency, 1.0)  # a malformed target fails before anything is timed
        model = latency_model(analysis, heads=heads)
        return model, "seconds", model.dense, target_seconds(target_latency, model.dense)
    target = target_macs if target_macs is not None else target_params
    if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
        raise SNPError(f"target must be a positive number (absolute, or a fraction < 1), got {target!r}")
    measure = estimate_macs if target_macs is not None else estimate_params
    dense = measure(analysis, torch.ones(analysis.channels.num_units, dtype=torch.bool))
    return measure, "MACs per sample" if target_macs is not None else "parameters", dense, \
        target * dense if target < 1 else target


def _show(value: float, unit: str) -> str:
    return f"{value * 1e3:.4g} ms" if unit == "seconds" else f"{value:.4g} {unit}"


def check_target(analysis: Analysis, target_macs=None, target_params=None, round_to: int = 1,
                 target_latency=None, heads: bool = False) -> None:
    """Raise a clear error for a budget that cannot be met (before any costly scoring; a latency
    budget measures the latency table first, see snp_fx.latency)."""
    check_round_to(round_to)
    measure, unit, dense, target = _budget(analysis, target_macs, target_params, target_latency, heads)
    if target >= dense:  # a target the dense model already meets would silently prune nothing
        raise SNPError(f"target {_show(target, unit)} is at or above the dense model's {_show(dense, unit)}: "
                       "give a smaller number, or a fraction < 1 of the dense model")
    keep = {}
    for g in analysis.groups.values():
        if g.prunable:
            k = _round_width(1, g.width, step_of(round_to, g))
            kept = list(range(k)) if g.classes.dim() == 2 else first_kept(g, k)
            if g.classes.dim() == 2:  # one head per site where heads may go
                drop = heads and _heads_droppable(analysis, g)
                kept = [kept if h == 0 or not drop else [] for h in range(g.heads)]
            keep[g.name] = {"kind": g.kind, "keep": kept}
    smallest = measure(analysis, keep_mask(analysis, PruningPlan(keep)))
    if smallest > target * 1.01:
        raise SNPError(f"target {_show(target, unit)} is below what one channel per group and head allows "
                       f"({_show(smallest, unit)}); raise the target")


def _heads_droppable(analysis: Analysis, g: Group) -> bool:
    """Whether plan_for_target(heads=True) may remove heads of ``g``'s site."""
    qk, v = analysis.groups.get(f"{g.site}.qk"), analysis.groups.get(f"{g.site}.v")
    return qk is not None and v is not None and qk.prunable and v.prunable and qk.heads == v.heads > 1 and \
        not qk.keep_heads and not v.keep_heads


# ---------------------------------------------------------------------------
# uniform plans: the same widths in every layer, as a standard model config states them
# ---------------------------------------------------------------------------

UNIFORM_STEP = 8  # kept FFN / residual widths in a uniform plan: multiples of 8 unless round_to says otherwise


def check_uniform_ratios(analysis: Analysis, ratios: dict) -> None:
    """Ratios a uniform plan takes: per kind only; per-head q/k and v widths only where no rotary
    embedding ties the q/k channels to frequencies (a standard config has one head dim and one
    frequency table for all heads), and then the same ratio for both (one head dim)."""
    named = [k for k in ratios if k not in KINDS]
    if named:
        raise SNPError(f"uniform=True takes ratios per kind ({list(KINDS)}), not per group: {named[:3]}")
    if any(ratios.get(k, 0) for k in ("qk", "v")):
        if any(g.unit_channels > 1 for g in analysis.groups.values() if g.kind == "qk"):
            raise SNPError("uniform=True keeps the head dim of rotary attention whole (a standard config has "
                           "one rotary frequency table per head dim): prune 'heads', 'ffn' and 'residual' instead")
        if ratios.get("qk", 0) != ratios.get("v", 0):
            raise SNPError("uniform=True keeps one head dim for q/k and v: give 'qk' and 'v' the same ratio")


def uniform_ratios_for_target(analysis: Analysis, scores, target_macs=None, target_params=None,
                              round_to=UNIFORM_STEP, tolerance: float = 0.01) -> dict:
    """Ratios {"heads": r_h, "ffn": r_f} of a uniform plan that meets the MACs or parameter budget
    (from below, within ``tolerance``): one ratio for both, bisected; then the kept head count moved
    up to one that divides the hidden size (configs such as transformers' LlamaConfig require it)
    and the FFN ratio bisected again."""
    measure, unit, dense, target = _budget(analysis, target_macs, target_params, None, heads=True)
    value = lambda ratios: measure(analysis, keep_mask(analysis, make_plan(analysis, ratios, scores, round_to)))  # noqa: E731

    def bisect(ratios_at) -> dict | None:
        lo, hi = 0.0, 0.95
        if value(ratios_at(hi)) > target:
            return None
        for _ in range(30):
            mid = (lo + hi) / 2
            got = value(ratios_at(mid))
            if target * (1 - tolerance) <= got <= target:
                return ratios_at(mid)
            lo, hi = (mid, hi) if got > target else (lo, mid)
        return ratios_at(hi)

    ratios = bisect(lambda r: {"heads": r, "ffn": r})
    if ratios is None:
        raise SNPError(f"target {_show(target, unit)} is below what a uniform plan removing 95% of the heads "
                       "and FFN neurons allows; raise the target")
    counts = _head_counts(analysis)
    if counts is None:
        return ratios
    total, allowed = counts
    kept = _keep_count(total, ratios["heads"], "heads", strict=False)
    for k in sorted((k for k in allowed if k >= kept), key=lambda k: k) + sorted(
            (k for k in allowed if k < kept), reverse=True):
        heads = 1 - (k - 0.5) / total if k < total else 0.0  # a ratio that rounds to k kept heads
        found = bisect(lambda r: {"heads": heads, "ffn": r})
        if found is not None:
            return found
    return ratios


def _head_counts(analysis: Analysis):
    """(head rows per site, the kept counts whose query heads divide the hidden size), when every
    site has the same head rows; None otherwise.  With grouped-query attention a q/k head row is a
    kv head with its query heads: query heads = rows * (hidden / (rows * head dim))."""
    qk = [g for g in analysis.groups.values() if g.kind == "qk" and g.prunable]
    res = [g for g in analysis.groups.values() if g.kind == "residual"]
    if not qk or len({(g.heads, g.width) for g in qk}) != 1 or len(res) != 1:
        return None
    rows, dim = qk[0].heads, qk[0].width * qk[0].unit_channels
    hidden = res[0].width
    per_row = hidden // (rows * dim) if hidden % (rows * dim) == 0 else 1
    return rows, [k for k in range(1, rows + 1) if hidden % (k * per_row) == 0]


def check_uniform(analysis: Analysis, plan: PruningPlan) -> None:
    """Raise unless every layer keeps the same widths: per site the same head count and head width
    (q/k = v), every FFN group the same width."""
    def kept(kind):
        out = {}
        for name, g in analysis.groups.items():
            if g.kind != kind or (kind == "ffn" and not g.prunable):  # the model head is no layer's
                continue
            entry = plan.groups.get(name)
            if g.classes.dim() == 2:
                heads = entry["keep"] if entry else [list(range(g.width))] * g.heads
                widths = {len(h) * g.unit_channels for h in heads if h}
                out[name] = (sum(1 for h in heads if h), widths.pop() if len(widths) == 1 else widths)
            else:
                out[name] = len(entry["keep"]) if entry else g.width
        return out
    for kind in ("qk", "v", "ffn"):
        values = kept(kind)
        if len(set(map(str, values.values()))) > 1:
            raise SNPError(f"the plan is not uniform: {kind} widths differ between layers "
                           f"({dict(list(values.items())[:4])}); plan with uniform=True")
    qk, v = kept("qk"), kept("v")
    if qk and v and next(iter(qk.values()))[1] != next(iter(v.values()))[1]:
        raise SNPError(f"the plan is not uniform: q/k keeps {next(iter(qk.values()))[1]} channels per head, "
                       f"v {next(iter(v.values()))[1]}; a standard config has one head dim")

