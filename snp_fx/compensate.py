"""Least-squares compensation of pruned v / FFN channels (beyond the paper).

After v channels (or FFN hidden neurons) are removed, their consumer — the
Linear whose input channels are exactly that group's units (the attention
output projection, fc2) — sees only the kept channels x_K.  Instead of just
dropping the removed columns, refit it so that it best reproduces the dense
output y = x W^T + b on the calibration set:

    min_{W', b'}  E || x_K W'^T + b' - x W^T - b ||^2 + lam ||W'||^2

Centered, with C = Cov(x), mu = E[x]:  W' = W C[:, K] (C[K, K] + lam I)^-1 and
b' = b + W mu - W' mu_K (the removed channels' mean contribution lands in
the bias).  Only E[x x^T] and E[x] of each consumer's input are accumulated,
streamed over the batches of the dense graph: no activations are stored.

How strong a ridge (``ridge=None``, the default).  With little calibration data (rows
of x not many more than the kept channels |K|, e.g. 16 sentences of 32 tokens = 512
rows for ~650 kept FFN neurons) the near-unregularised solve fits the calibration
rows and generalises badly: all-MiniLM-L6-v2 at 50% MACs fell from 0.55 to 0.40
embedding cosine.  A fixed small ridge toward *zero* cannot help: strong shrinkage
toward zero weights is worse than no refit.  So the default instead penalises the
*correction* to the plain pruned weights,

    min  E || x_K W'^T + b' - x W^T - b ||^2 + lam ||W' - W_K||^2
    W' = W_K + W_R C[R, K] (C[K, K] + lam I)^-1     (= (W C[:, K] + lam W_K)(C[K, K] + lam I)^-1)

which runs from the full refit (lam = 0) to no refit at all (lam -> inf), and picks
lam per layer by 2-fold cross-validation: each consumer's statistics are also kept
for the first half of every calibration run's rows (the first half of the batch for
(batch, tokens, channels) inputs), each half is fitted and scored on the other for
every strength of ``RIDGE_GRID``, and the best is refit on all rows (lam scaled by
the rows: the penalty keeps its weight against the summed squared error).  When no
strength lowers the held-out error, the layer keeps its plain pruned weights.  A
number for ``ridge`` gives the former fixed ridge toward zero instead.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings

import torch
import torch.fx as fx

from . import ops
from .errors import SNPError
from .precision import wide

DEFAULT_RIDGE = None  # chosen per layer on held-out rows (see the module docstring)
FIXED_RIDGE = 1e-3    # what a fixed ridge was by default: lam = ridge * mean variance of the kept inputs
# strengths tried by the cross-validation (times the mean variance of the kept inputs); measured on
# all-MiniLM-L6-v2 it picks 0.1..3 on half the rows (8..128 sentences of 32 tokens), inside the grid
RIDGE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


@dataclasses.dataclass
class Consumer:
    group: str
    node: str                 # the linear node in the traced graph
    weight: str               # parameter name (the same in the pruned GraphModule)
    bias: str | None
    in_dim: int               # weight dim of the input channels (1 for Linear, 0 for addmm / Conv1D)
    x_pos: int | tuple = 0    # which argument is the input (1 for addmm; (1, 0): an einsum's first operand)
    width: int = 0            # input channels: the input is read as (rows, width)


def consumer_input(args, x_pos, width: int) -> torch.Tensor:
    """A consumer's input as (rows, channels): its channels are its trailing dims (an einsum's
    weight contracts its last letters, see Einsum.consumer)."""
    x = args[x_pos[0]][x_pos[1]] if isinstance(x_pos, tuple) else args[x_pos]
    return x.reshape(-1, width)


def weight_uses(analysis):
    """(node, weight, bias, in_dim, x_pos) of every op applying an analysed weight to its input's
    channels (the ops whose family names a ``consumer``: Linear, addmm, an einsum with a parameter),
    in graph order.  ``in_dim`` is a dim of the weight as ``param_ids`` label it (``channels.as_view``)."""
    modules = dict(analysis.gm.named_modules())
    for n in analysis.gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        key, family = ops.family_of(n, modules)
        found = family.consumer(n, key, modules)
        if found is not None and found[0] is not None and found[0] in analysis.channels.param_ids:
            yield (n, *found)


def find_consumers(analysis, groups) -> tuple[list[Consumer], dict[str, str]]:
    """The consumer Linear of each group in ``groups`` (names), and why others have none."""
    found: dict[str, list[Consumer]] = {name: [] for name in groups}
    uses: dict[str, int] = {}
    for n, w, b, in_dim, x_pos in weight_uses(analysis):
        uses[w] = uses.get(w, 0) + 1
        cls = set(analysis.channels.class_of[analysis.channels.param_ids[w][in_dim]].tolist())
        for name in groups:
            g = analysis.groups[name]
            if cls == set(g.classes.reshape(-1).tolist()):
                width = analysis.channels.param_ids[w][in_dim].numel()
                found[name].append(Consumer(name, n.name, w, b, in_dim, x_pos, width))
    out, skipped = [], {}
    for name, cs in found.items():
        if analysis.groups[name].slots is not None:
            skipped[name] = "MoE experts pruned per expert: each expert's down projection is its own matrix " \
                            "of a 3-d weight, not a Linear to refit"
        elif len(cs) != 1:
            skipped[name] = "no linear consumes exactly its channels" if not cs else \
                f"{len(cs)} linears consume its channels"
        elif uses[cs[0].weight] != 1:
            skipped[name] = f"the consumer's weight `{cs[0].weight}` is used more than once"
        elif cs[0].bias == "computed":
            skipped[name] = "the consumer's bias is computed in the graph"
        else:
            out.append(cs[0])
    return out, skipped


class _InputStats(fx.Interpreter):
    """Accumulates sum x x^T, sum x and the row count of each consumer's input, and the same
    over the first half of every run's rows (the cross-validation fold)."""

    def __init__(self, gm, consumers: list[Consumer]):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our errors name the node in one line
        self.at = {c.node: c for c in consumers}
        self.stats: dict[str, list] = {}

    def run_node(self, n):
        c = self.at.get(n.name)
        if c is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = wide(consumer_input(args, c.x_pos, c.width))  # float16 / bfloat16 inputs: Gram sums in float32
            if c.node not in self.stats:  # [sum x x^T, sum x, rows, the same over the first halves]
                self.stats[c.node] = [0, 0, 0, [0, 0, 0]]
            s = self.stats[c.node]
            # the first half of the rows goes to the fold: rows are batch-major, so for (batch,
            # tokens, channels) inputs whole samples; a one-row run goes to the smaller side
            h = x.shape[0] // 2 if x.shape[0] > 1 else int(s[3][2] <= s[2] - s[3][2])
            for part, into in ((x[:h], (s, s[3])), (x[h:], (s,))):
                gram = (part.T @ part).double().cpu()  # the long sum in the input precision (float32 at least), accumulated in double
                total = part.sum(0, dtype=torch.float64).cpu()
                for acc in into:
                    acc[0] = acc[0] + gram
                    acc[1] = acc[1] + total
                    acc[2] += part.shape[0]
        return super().run_node(n)


def solve(gram: torch.Tensor, total: torch.Tensor, n: int, weight: torch.Tensor, bias, kept: torch.Tensor,
          ridge: float = FIXED_RIDGE, toward_kept: bool = False):
    """Refit ``weight`` (out, in) / ``bias`` (out,) or None onto the ``kept`` inputs.

    ``gram`` = sum x x^T, ``total`` = sum x over ``n`` rows.  Returns (W' (out, |K|), b' or None):
    ridge least squares with an unregularised intercept when there is a bias, without one otherwise.
    The penalty is lam ||W'||^2, or lam ||W' - W_K||^2 with ``toward_kept`` (lam = ridge * mean
    variance of the kept inputs)."""
    w = weight.double()
    second = gram.double() / n
    mu = total.double() / n
    cov = second - torch.outer(mu, mu) if bias is not None else second
    ck = cov[kept][:, kept]
    lam = ridge * float(ck.diagonal().mean().clamp_min(1e-30))
    a = ck + lam * torch.eye(ck.shape[0], dtype=torch.float64)
    rhs = w @ cov[:, kept]                                   # (out, |K|)
    if toward_kept:
        rhs = rhs + lam * w[:, kept]
    new_w = torch.linalg.solve(a, rhs.T).T                   # a is symmetric
    if bias is None:
        return new_w, None
    new_b = bias.double() + w @ mu - new_w @ mu[kept]
    return new_w, new_b


def output_error(gram, total, n, weight, bias, new_w, new_b, kept) -> float:
    """E ||x_K W'^T + b' - (x W^T + b)||^2 over the calibration rows, from the statistics alone."""
    w = weight.double()
    d = w.clone()
    d[:, kept] -= new_w
    c = (bias.double() - new_b) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    second = gram.double() / n
    mu = total.double() / n
    return float(torch.einsum("oi,ij,oj->", d, second, d) + 2 * c @ (d @ mu) + c @ c)


def cross_validate(stats, weight: torch.Tensor, bias, kept: torch.Tensor, grid=RIDGE_GRID):
    """The ridge (toward the kept weights, see ``solve``) for all of ``stats``' rows whose
    refit best predicts held-out rows, or None when none beats no refit.

    Each fold (``stats[3]``, the rest) is fitted for every strength in ``grid`` and scored on
    the other.  Returns (ridge or None, held-out error without a refit, with the chosen one):
    mean squared output error per held-out row, both folds together (None with a single row)."""
    gram, total, n, (gram_a, total_a, n_a) = stats
    folds = [(gram_a, total_a, n_a), (gram - gram_a, total - total_a, n - n_a)]
    if min(n_a, n - n_a) == 0:  # a single calibration row: nothing to hold out
        return None, None, None
    w = weight.double()
    w_r = w[:, ~kept]
    gain = torch.zeros(len(grid), dtype=torch.float64)
    base = 0.0
    for (fg, ft, fn), (tg, tt, tn) in (folds, folds[::-1]):
        # fit on one fold: eigenbasis of its C[K, K], every strength at once
        mu = ft.double() / fn
        cov = fg.double() / fn - (torch.outer(mu, mu) if bias is not None else 0)
        s, u = torch.linalg.eigh(cov[kept][:, kept])
        g = w_r @ cov[~kept][:, kept] @ u                    # (out, |K|)
        scale = float(s.mean().clamp_min(1e-30))
        # score on the other: E||x_K D^T + c - x_R W_R^T||^2 for the correction D = W' - W_K and the
        # bias change c, minus its value without a refit (D = 0, c = 0), from the fold's moments
        second, m = tg.double() / tn, tt.double() / tn
        p = second[kept][:, ~kept] @ w_r.T                   # E[x_K (x_R W_R^T)^T]  (|K|, out)
        a = w_r @ m[~kept]                                   # E[x_R W_R^T]
        base += tn * float((w_r @ second[~kept][:, ~kept] * w_r).sum())
        for i, lam in enumerate(grid):
            d = (g / (s + lam * scale).clamp_min(1e-30)) @ u.T
            c = w_r @ mu[~kept] - d @ mu[kept] if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            dm = d @ m[kept]
            gain[i] += tn * float((d @ second[kept][:, kept] * d).sum() - 2 * (d * p.T).sum()
                                  + 2 * c @ (dm - a) + c @ c)
    best = int(torch.argmin(gain))
    if not float(gain[best]) < 0:
        return None, base / n, base / n
    n_fit = n / 2  # each fit saw about half the rows: the same penalty weight per row sum on all rows
    return grid[best] * n_fit / n, base / n, (base + float(gain[best])) / n


def collect_stats(analysis, consumers: list[Consumer], calibration, progress: bool | None = None) -> dict[str, list]:
    """One streamed pass over ``calibration`` through the dense graph: per consumer node,
    [sum x x^T, sum x, rows, [the same over the first half of every run's rows]] of its input.
    Independent of the plan: reusable for many.
    ``progress``: a tqdm bar (None: when stderr is a terminal)."""
    from .calibration import all_reduce_sums, distributed, stream

    reader = _InputStats(analysis.gm, consumers)
    stream(analysis, calibration, lambda inputs: reader.run(*inputs), desc="snp_fx compensation",
           progress=progress, empty_hint=" (a generator already used for the scores is empty: pass a list "
                                         "or a DataLoader)")
    if distributed():  # each rank's shard of the data (torch.distributed): sum the statistics
        for node in dict.fromkeys(c.node for c in consumers):  # the same order on every rank
            s = reader.stats[node]
            fold = [x if isinstance(x, torch.Tensor) else torch.zeros_like(y) for x, y in zip(s[3][:2], s[:2])]
            sums = [s[0], s[1], torch.tensor(float(s[2]), dtype=torch.float64),
                    *fold, torch.tensor(float(s[3][2]), dtype=torch.float64)]
            all_reduce_sums(sums)
            reader.stats[node] = [sums[0], sums[1], int(sums[2]), [sums[3], sums[4], int(sums[5])]]
    return reader.stats


@torch.no_grad()
def compensate(analysis, keep: torch.Tensor, pruned: fx.GraphModule, calibration, ridge: float = DEFAULT_RIDGE,
               kinds=("v", "ffn"), progress: bool | None = None, stats: dict | None = None) -> list[dict]:
    """Refit the consumers of every pruned v / FFN group of ``pruned`` in place.

    ``keep``: the unit keep mask the rewrite used; ``calibration``: batches as for
    the scores (or ``stats`` from ``collect_stats``, covering these consumers).  ``ridge``:
    None chooses it per layer on held-out calibration rows (``cross_validate``); a layer
    that no refit helps there keeps its plain pruned weights (with a warning).  A number
    fixes the former ridge toward zero.  A refit that would raise the calibration error of
    its layer is not applied (with a warning).  Returns one record per group: what was done."""
    pruned_groups = [g.name for g in analysis.groups.values() if g.prunable and g.kind in kinds
                     and not bool(keep[_ids_of(analysis, g)].all())]
    consumers, skipped = find_consumers(analysis, pruned_groups)
    records = [{"group": name, "applied": False, "reason": why} for name, why in skipped.items()]
    for name, why in skipped.items():
        warnings.warn(f"snp_fx: not compensating {name}: {why}", stacklevel=3)
    if not consumers:
        return records
    if stats is None:
        stats = collect_stats(analysis, consumers, calibration, progress)
    gm = analysis.gm
    params = dict(gm.named_parameters())
    params.update(dict(gm.named_buffers()))
    for c in consumers:
        gram, total, n = stats[c.node][:3]
        weight = analysis.channels.as_view(c.weight, params[c.weight].detach())  # an einsum's: a matrix
        w_full = weight if c.in_dim == 1 else weight.T     # (out, in)
        bias = params[c.bias].detach() if c.bias else None
        masks = analysis.channels.dim_masks(c.weight, params[c.weight].shape, keep)
        kept, rows = masks[c.in_dim], masks[1 - c.in_dim]
        if ridge is None:
            lam, held_before, held_after = cross_validate(stats[c.node], w_full, bias, kept)
            if lam is None:
                why = "no refit lowers the held-out error" if held_before is not None else \
                    "a single calibration row: nothing to hold out"
                records.append({"group": c.group, "consumer": c.weight, "applied": False, "rows": n,
                                "kept_inputs": int(kept.sum()), "heldout_before": held_before,
                                "heldout_after": held_after, "reason": why})
                warnings.warn(f"snp_fx: not compensating {c.group}: {why} ({n} calibration rows for "
                              f"{int(kept.sum())} kept inputs); more calibration data may help", stacklevel=3)
                continue
            new_w, new_b = solve(gram, total, n, w_full, bias, kept, lam, toward_kept=True)
        else:
            new_w, new_b = solve(gram, total, n, w_full, bias, kept, ridge)
        zero_w = w_full.double()[:, kept]
        before = output_error(gram, total, n, w_full, bias, zero_w, bias.double() if bias is not None else None, kept)
        after = output_error(gram, total, n, w_full, bias, new_w, new_b, kept)
        rec = {"group": c.group, "consumer": c.weight, "error_before": before, "error_after": after,
               "applied": after <= before}
        if ridge is None:
            rec.update(ridge=lam, rows=n, kept_inputs=int(kept.sum()), heldout_before=held_before,
                       heldout_after=held_after)
        records.append(rec)
        if not after <= before:
            warnings.warn(f"snp_fx: compensation of {c.group} would raise its calibration error "
                          f"({before:.4g} -> {after:.4g}); kept the plain pruned weights", stacklevel=3)
            continue
        target = operator.attrgetter(c.weight)(pruned)
        target = analysis.channels.as_view(c.weight, target)  # a view: written through
        w_new = new_w[rows] if c.in_dim == 1 else new_w[rows].T
        same_shape = tuple(target.shape) == tuple(weight.shape) and tuple(w_new.shape) != tuple(target.shape)
        if same_shape:  # a masked reference (verify.masked_reference): removed slices stay zero
            full = torch.zeros_like(w_full, dtype=torch.float64)
            full[:, kept] = new_w
            full[~rows] = 0
            w_new = full if c.in_dim == 1 else full.T
        if tuple(w_new.shape) != tuple(target.shape):
            raise SNPError(f"compensation of {c.group}: refit weight {tuple(w_new.shape)} does not match the "
                           f"pruned `{c.weight}` {tuple(target.shape)}")
        target.copy_(w_new.to(target.dtype))
        if bias is not None:
            bmask = analysis.channels.dim_masks(c.bias, bias.shape, keep)[0]
            operator.attrgetter(c.bias)(pruned).copy_((new_b * bmask if same_shape else new_b[bmask]).to(bias.dtype))
    return records


def _ids_of(analysis, g):
    """Every unit id of the group's classes (keep is indexed by unit id)."""
    class_of = analysis.channels.class_of
    # a lookup table, not torch.isin: class_of has a unit per channel of every tensor (4M in
    # all-MiniLM-L6-v2 at 8 x 32 tokens), where isin took ~1 s per group
    member = torch.zeros(int(class_of.max()) + 1, dtype=torch.bool)
    member[g.classes.reshape(-1)] = True
    return member[class_of].nonzero().flatten()
