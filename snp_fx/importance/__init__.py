"""Importance of every channel class: higher = keep.

``compute_scores(analysis, importance, ...)`` returns ``Scores`` with one
float per unit class and, per attention site, one per head.

* ``snp`` (default): q/k pairs by attention-score preservation (calibration,
  see snp.py); v and FFN neurons by inter-neuron redundancy of their producing
  weight rows; residual channels by the authors' "average" policy with
  total-sum scaling of per-layer L2 norms; heads by the energy of their
  pre-softmax score matrices ||Q_h K_h^T||_F^2 (normalised per layer).
* ``l1`` / ``l2``: weight norms of every parameter slice of the class.
* ``fluctuation``: FLAP's activation-aware score (calibration): Var of the channel's input to
  every Linear consuming it times that Linear's squared weight column norm, summed; q/k pairs
  (no Linear consumes them) by the structured Wanda metric of their producing rows
  (fluctuation.py).
* ``gm``: FPGM geometric-median distance of the producing rows.
* ``random``: seeded uniform.  ``reverse``: ``snp`` negated (sanity check).

``selection="exact"`` (any importance): scores still decide how many q/k pairs
each head keeps; which ones is chosen to minimise the exact change of the
head's pre-softmax scores over the calibration set (exact.py).

Custom criteria (callables, in the spirit of Torch-Pruning's ``Importance`` objects):

* ``importance=fn`` with ``fn(analysis, group) -> Tensor``: called once per prunable
  group (``snp_fx.Group``: ``.name``, ``.kind`` in {"qk", "v", "ffn", "residual"},
  ``.classes`` a LongTensor of class ids, (heads, width) for q/k and v, (width,)
  otherwise); returns scores shaped like ``group.classes``, higher = keep.  They
  land in ``Scores.classes`` at ``group.classes`` (averaged where a class id repeats).
  Heads are then ranked by the share of their q/k and v scores.
* ``selection=fn`` with ``fn(analysis, group, head, n_keep) -> list[int]``: for a q/k
  group, the ``n_keep`` positions (0 <= i < group.width) kept in row ``head``; the
  scores still decide ``n_keep`` (as with "exact").  Called once per
  (group, head, n_keep).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..calibration import default_calibration
from ..errors import SNPError
from ..precision import wide
from .calibrate import calibrate_qk
from .exact import exact_keep
from .fluctuation import fluctuation_scores
from .snp import geometric_median_scores, redundancy_scores

IMPORTANCES = ("snp", "l1", "l2", "gm", "random", "reverse", "fluctuation")
SELECTIONS = ("score", "exact")
DEFAULT_GAMMA = 2  # measured: benchmarks/gamma.py (lowest attention-score error at 30-70% q/k)


@dataclasses.dataclass
class Scores:
    classes: torch.Tensor                 # (n_ids,) float64, indexed by class id
    heads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # site -> (H,)
    # q/k group name -> (heads, E, E) sums of Gq * Gk: exact selection (selection="exact")
    pair_grams: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # a custom selection bound to its analysis: (group, head, n_keep) -> kept positions
    selector: Callable | None = dataclasses.field(default=None, repr=False)
    _picked: dict = dataclasses.field(default_factory=dict, repr=False)

    def select(self, group, head: int, n_keep: int) -> list[int] | None:
        """Kept positions of ``group``'s head chosen by exact or custom selection, or None (rank by score)."""
        m = self.pair_grams.get(group.name)
        if m is None and self.selector is None:
            return None
        key = (group.name, head, n_keep)
        if key not in self._picked:  # plan_for_target asks for the same widths many times
            if self.selector is not None:
                self._picked[key] = _checked_pick(self.selector(group, head, n_keep), group, head, n_keep)
            else:
                self._picked[key] = exact_keep(m[head], group.classes[head], n_keep)
        return self._picked[key]


def _checked_pick(picked, group, head: int, n_keep: int) -> list[int]:
    """A custom selection's answer as sorted positions, or a one-line SNPError saying what is wrong."""
    where = f"selection for {group.name} head {head}"
    try:
        out = sorted(int(i) for i in (picked.tolist() if isinstance(picked, torch.Tensor) else picked))
    except (TypeError, ValueError):
        raise SNPError(f"{where} returned {type(picked).__name__}; it must return a list of positions") from None
    if len(out) != n_keep or len(set(out)) != n_keep or (out and not 0 <= out[0] <= out[-1] < group.width):
        raise SNPError(f"{where} returned {out}; it must return {n_keep} distinct positions in "
                       f"0..{group.width - 1}")
    row = group.classes[head] if group.classes.dim() == 2 else group.classes
    if int(torch.isin(row, row[out]).sum()) != n_keep:
        raise SNPError(f"{where} returned {out}, which splits a class: positions sharing a class id in "
                       "group.classes (coupled channels) are kept or removed together")
    return out


def name_of(x) -> str:
    """How an importance / selection is recorded in the plan (callables by their name)."""
    return x if isinstance(x, str) else "custom:" + getattr(x, "__qualname__", type(x).__qualname__)


def check_importance(importance) -> None:
    """A known name or a callable ``(analysis, group) -> Tensor``, else a one-line SNPError."""
    if not (callable(importance) or (isinstance(importance, str) and importance in IMPORTANCES)):
        raise SNPError(f"unknown importance {importance!r}; give one of {list(IMPORTANCES)} or a callable "
                       "(analysis, group) -> Tensor shaped like group.classes")


def check_selection(selection) -> None:
    """A known name or a callable ``(analysis, group, head, n_keep) -> list[int]``, else a one-line SNPError."""
    if not (callable(selection) or (isinstance(selection, str) and selection in SELECTIONS)):
        raise SNPError(f"unknown selection {selection!r}; give one of {list(SELECTIONS)} or a callable "
                       "(analysis, group, head, n_keep) -> list of kept positions")


def custom_scores(analysis, importance: Callable) -> torch.Tensor:
    """Class scores from a callable importance: ``importance(analysis, group)`` per prunable group."""
    scores = torch.zeros(analysis.channels.num_units, dtype=torch.float64)
    for g in analysis.groups.values():
        if not g.prunable:
            continue
        t = importance(analysis, g)
        if not isinstance(t, torch.Tensor):
            try:
                t = torch.as_tensor(t)
            except (TypeError, ValueError, RuntimeError):
                raise SNPError(f"importance for {g.name} returned {type(t).__name__}; it must return a "
                               f"tensor shaped like group.classes {tuple(g.classes.shape)}") from None
        if tuple(t.shape) != tuple(g.classes.shape):
            raise SNPError(f"importance for {g.name} returned shape {tuple(t.shape)}; it must be shaped like "
                           f"group.classes {tuple(g.classes.shape)}")
        t = t.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise SNPError(f"importance for {g.name} returned NaN/inf scores")
        ids = g.classes.reshape(-1)
        total = torch.zeros_like(scores).index_add_(0, ids, t.reshape(-1))
        count = torch.zeros_like(scores).index_add_(0, ids, torch.ones_like(t.reshape(-1)))
        scores[ids] = total[ids] / count[ids]  # the mean where a class id repeats (coupled channels)
    return scores


def params_of(analysis) -> dict[str, torch.Tensor]:
    out = dict(analysis.gm.named_parameters())
    out.update(dict(analysis.gm.named_buffers()))
    return out


def norm_scores(analysis, params, p: int) -> torch.Tensor:
    """Sum over every parameter slice of a class of |w|^p."""
    scores = torch.zeros(analysis.channels.num_units, dtype=torch.float64)
    for name, ids_per_dim in analysis.channels.param_ids.items():
        t = params.get(name)
        if t is None:
            continue
        t = analysis.channels.as_view(name, t.detach().double().cpu().abs().pow(p))
        for d, ids in enumerate(ids_per_dim):
            other = [i for i in range(t.dim()) if i != d]
            scores.index_add_(0, analysis.channels.class_of[ids], t.sum(other) if other else t)
    for name, ids in analysis.channels.elem_ids.items():
        t = params.get(name)
        if t is not None:
            scores.index_add_(0, analysis.channels.class_of[ids.reshape(-1)], t.detach().double().cpu().abs().pow(p).reshape(-1))
    for name, dims in analysis.channels.expert_dims.items():  # MoE experts: each expert's own slices
        t = params.get(name)
        if t is None:
            continue
        t = t.detach().double().cpu().abs().pow(p)
        for d, ids in dims.items():
            other = [i for i in range(1, t.dim()) if i != d]
            scores.index_add_(0, analysis.channels.class_of[ids.reshape(-1)], t.sum(other).reshape(-1))
    return scores


def producer_rows(analysis, params, classes: torch.Tensor) -> torch.Tensor:
    """(n, F): for each class, the weight rows (all producers, concatenated) that create it."""
    flat = classes.reshape(-1).tolist()
    feats = []
    for name, dim, pos in _producer_index(analysis):
        t = params.get(name)
        if t is None or flat[0] not in pos or not all(c in pos for c in flat):
            continue
        t = analysis.channels.as_view(name, t.detach().cpu())
        rows = t.movedim(dim, 0).reshape(t.shape[dim], -1)
        feats.append(rows[torch.tensor([pos[c] for c in flat])])
    if not feats:
        return torch.zeros(len(flat), 1)
    return torch.cat(feats, 1)


def group_rows(analysis, params, g):
    """(class ids, their producing rows) of a group: all at once, or per expert for MoE experts
    (each expert's neurons scored among its own: the planner picks each expert's own)."""
    if g.slots is None:
        return [(g.classes.reshape(-1), producer_rows(analysis, params, g.classes))]
    return [(g.classes[e], expert_rows(analysis, params, g, e)) for e in range(g.heads)]


def expert_rows(analysis, params, g, e: int) -> torch.Tensor:
    """(width, F): the rows of expert ``e``'s own matrices that make each neuron of the MoE experts
    group ``g`` (a fused gate_up weight: its gate and its up row), as producer_rows does for a
    dense FFN's producers."""
    ch = analysis.channels
    feats = []
    for name, dim in ch.producers:
        ids = ch.expert_dims.get(name, {}).get(dim)
        t = params.get(name)
        if ids is None or t is None:
            continue
        where = {c: i for i, c in enumerate(g.slots.tolist())}
        pos = torch.tensor([where.get(c, -1) for c in ch.class_of[ch.param_ids[name][dim]].tolist()])
        counts = torch.bincount(pos.clamp_min(0), minlength=g.width)
        if bool((pos < 0).any()) or not bool((counts == counts[0]).all()):
            continue
        w = t.detach().cpu()[e].movedim(dim - 1, 0)
        # each neuron's rows next to each other (gate j, up j), in the group's order
        feats.append(w[torch.argsort(pos, stable=True)].reshape(g.width, -1))
    if not feats:
        return torch.zeros(g.width, 1)
    return torch.cat(feats, 1)


def _producer_index(analysis) -> list[tuple[str, int, dict]]:
    """Per producing weight: (name, dim, {class: row}), built once per analysis (a scan per group
    would be quadratic in depth)."""
    if getattr(analysis, "_producer_index", None) is None:
        ch = analysis.channels
        analysis._producer_index = [
            (name, dim, {c: i for i, c in enumerate(ch.class_of[ch.param_ids[name][dim]].tolist())})
            for name, dim in ch.producers if name in ch.param_ids]
    return analysis._producer_index


def residual_tss_average(analysis, params, group) -> torch.Tensor:
    """The authors' policy: per layer L2 norm of each channel / layer total, averaged over layers."""
    n = analysis.channels.num_units
    where = torch.full((n,), -1, dtype=torch.long)  # class -> its position in the group
    where[group.classes] = torch.arange(group.classes.numel())
    total = torch.zeros(group.classes.numel(), dtype=torch.float64)
    count = torch.zeros_like(total)

    def add_layer(cls: torch.Tensor, sq: torch.Tensor):
        """A layer's squared weights ``sq`` summed onto its channels' classes ``cls``."""
        at = where[cls]
        inside = at >= 0
        l2 = torch.zeros_like(total).index_add_(0, at[inside], sq[inside].double()).sqrt()
        s = l2.sum()
        if s > 0:
            total.add_(l2 / s)
            count.add_((l2 > 0).double())

    for name, ids_per_dim in analysis.channels.param_ids.items():
        t = params.get(name)
        if t is None:
            continue
        sq = None
        for d, ids in enumerate(ids_per_dim):
            cls = analysis.channels.class_of[ids]
            if not bool((where[cls] >= 0).any()):
                continue
            # float16 squares of small weights underflow
            sq = analysis.channels.as_view(name, wide(t.detach().cpu()).pow(2)) if sq is None else sq
            other = [i for i in range(sq.dim()) if i != d]
            add_layer(cls, sq.sum(other, dtype=torch.float64) if other else sq)
    for name, ids in analysis.channels.elem_ids.items():
        t = params.get(name)
        cls = analysis.channels.class_of[ids.reshape(-1)]
        if t is None or not bool((where[cls] >= 0).any()):
            continue
        add_layer(cls, t.detach().cpu().double().pow(2).reshape(-1))
    out = torch.zeros(n, dtype=torch.float64)
    out[group.classes] = total / count.clamp_min(1)
    return out


def compute_scores(analysis, importance="snp", calibration=None, gamma: int = DEFAULT_GAMMA,
                   seed: int = 0, progress: bool | None = None, selection="score") -> Scores:
    """Scores for every class.  ``importance``: a name from ``IMPORTANCES`` or a callable
    ``(analysis, group) -> Tensor`` (see the module doc).  ``calibration`` (for ``snp``/``reverse``,
    ``fluctuation`` and exact selection): an iterable of batches — a tensor (the model's single input), a
    tuple/list of tensors (positional inputs), a pair ``(inputs, labels)`` from a DataLoader
    (labels are ignored) or a dict of keyword inputs.  Without it the example inputs are the
    calibration set.  ``selection``: "score" (keep the top scores), "exact" or a callable
    ``(analysis, group, head, n_keep) -> list[int]`` (see the module doc).
    ``progress``: a tqdm bar over the calibration batches (None: when stderr is a terminal)."""
    check_importance(importance)
    check_selection(selection)
    if callable(selection):
        base = compute_scores(analysis, importance, calibration, gamma, seed, progress)
        base.selector = lambda group, head, n_keep: selection(analysis, group, head, n_keep)
        return base
    if calibration is None:
        calibration = default_calibration(analysis)
    exact = selection == "exact" and any(g.prunable and g.kind == "qk" for g in analysis.groups.values())
    if exact and (callable(importance) or importance not in ("snp", "reverse")):  # one pass for the Gram products
        base = compute_scores(analysis, importance, calibration, gamma, seed, progress)
        _, _, _, grams = calibrate_qk(analysis, calibration, gamma, progress, grams=True, score=False)
        base.pair_grams = _by_group(analysis, grams)
        return base
    if callable(importance):
        return Scores(custom_scores(analysis, importance))
    params = params_of(analysis)
    n = analysis.channels.num_units
    if importance == "random":
        g = torch.Generator().manual_seed(seed)
        return Scores(torch.rand(n, generator=g, dtype=torch.float64))
    if importance in ("l1", "l2"):
        return Scores(norm_scores(analysis, params, 1 if importance == "l1" else 2))
    if importance == "fluctuation":
        return Scores(fluctuation_scores(analysis, params, calibration, progress))
    scores = torch.zeros(n, dtype=torch.float64)
    heads: dict[str, torch.Tensor] = {}
    groups = [g for g in analysis.groups.values() if g.prunable]
    if importance == "gm":
        for g in groups:
            for ids, rows in group_rows(analysis, params, g):
                scores[ids] = geometric_median_scores(rows)
        return Scores(scores)
    # snp / reverse
    qk_groups = {g.site: g for g in groups if g.kind == "qk"}
    if qk_groups:
        widths = {g.width for g in qk_groups.values()}
        if gamma < 1 or gamma > max(widths):
            raise SNPError(f"gamma={gamma} must be between 1 and the q/k head dim ({max(widths)})")
        rows, acc, energy, *grams = calibrate_qk(analysis, calibration, gamma, progress, grams=exact)
        for site, r, a, e in zip(analysis.sites, rows, acc, energy):
            scores.index_add_(0, r.reshape(-1), a.reshape(-1))  # a class may hold several channels (RoPE)
            heads[site.name] = e / e.sum().clamp_min(1e-30)
    for g in groups:
        if g.kind in ("v", "ffn"):
            for ids, rows in group_rows(analysis, params, g):
                scores[ids] = redundancy_scores(rows)
        elif g.kind == "residual":
            scores[g.classes] = residual_tss_average(analysis, params, g)[g.classes]
    pair_grams = _by_group(analysis, grams[0]) if exact else {}
    if importance == "reverse":
        return Scores(-scores, {k: -v for k, v in heads.items()}, pair_grams)
    return Scores(scores, heads, pair_grams)


def _by_group(analysis, grams) -> dict[str, torch.Tensor]:
    """Per-site Gram products keyed by the prunable q/k group of the site."""
    out = {}
    for site, m in zip(analysis.sites, grams):
        g = analysis.groups.get(f"{site.name}.qk")
        if g is not None and g.prunable and tuple(m.shape[:2]) == tuple(g.classes.shape):
            out[g.name] = m
    return out
