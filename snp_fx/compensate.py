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
"""
from __future__ import annotations

import dataclasses
import operator
import warnings

import torch
import torch.fx as fx

from . import ops
from .errors import SNPError

DEFAULT_RIDGE = 1e-3  # lam = ridge * mean variance of the kept inputs


@dataclasses.dataclass
class Consumer:
    group: str
    node: str                 # the linear node in the traced graph
    weight: str               # parameter name (the same in the pruned GraphModule)
    bias: str | None
    in_dim: int               # weight dim of the input channels (1 for Linear, 0 for addmm / Conv1D)
    x_pos: int = 0            # which argument is the input (1 for addmm)


def find_consumers(analysis, groups) -> tuple[list[Consumer], dict[str, str]]:
    """The consumer Linear of each group in ``groups`` (names), and why others have none."""
    modules = dict(analysis.gm.named_modules())
    found: dict[str, list[Consumer]] = {name: [] for name in groups}
    uses: dict[str, int] = {}
    for n in analysis.gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        key, family = ops.family_of(n, modules)
        found_here = family.consumer(n, key, modules)
        if found_here is None:
            continue
        w, b, in_dim, x_pos = found_here
        if w is None or w not in analysis.channels.param_ids:
            continue
        uses[w] = uses.get(w, 0) + 1
        cls = set(analysis.channels.class_of[analysis.channels.param_ids[w][in_dim]].tolist())
        for name in groups:
            g = analysis.groups[name]
            if cls == set(g.classes.reshape(-1).tolist()):
                found[name].append(Consumer(name, n.name, w, b, in_dim, x_pos))
    out, skipped = [], {}
    for name, cs in found.items():
        if len(cs) != 1:
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
    """Accumulates sum x x^T, sum x and the row count of each consumer's input."""

    def __init__(self, gm, consumers: list[Consumer]):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our errors name the node in one line
        self.at = {c.node: c for c in consumers}
        self.stats: dict[str, list] = {}

    def run_node(self, n):
        c = self.at.get(n.name)
        if c is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[c.x_pos]
            x = x.reshape(-1, x.shape[-1])
            gram = (x.T @ x).double().cpu()  # the long sum in the input precision, accumulated in double
            total = x.sum(0, dtype=torch.float64).cpu()
            if c.node not in self.stats:
                self.stats[c.node] = [gram, total, x.shape[0]]
            else:
                s = self.stats[c.node]
                s[0] += gram
                s[1] += total
                s[2] += x.shape[0]
        return super().run_node(n)


def solve(gram: torch.Tensor, total: torch.Tensor, n: int, weight: torch.Tensor, bias, kept: torch.Tensor,
          ridge: float = DEFAULT_RIDGE):
    """Refit ``weight`` (out, in) / ``bias`` (out,) or None onto the ``kept`` inputs.

    ``gram`` = sum x x^T, ``total`` = sum x over ``n`` rows.  Returns (W' (out, |K|), b' or None):
    ridge least squares with an unregularised intercept when there is a bias, without one otherwise."""
    w = weight.double()
    second = gram.double() / n
    mu = total.double() / n
    cov = second - torch.outer(mu, mu) if bias is not None else second
    ck = cov[kept][:, kept]
    lam = ridge * float(ck.diagonal().mean().clamp_min(1e-30))
    a = ck + lam * torch.eye(ck.shape[0], dtype=torch.float64)
    rhs = w @ cov[:, kept]                                   # (out, |K|)
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


def collect_stats(analysis, consumers: list[Consumer], calibration, progress: bool | None = None) -> dict[str, list]:
    """One streamed pass over ``calibration`` through the dense graph: per consumer node,
    [sum x x^T, sum x, rows] of its input.  Independent of the plan: reusable for many.
    ``progress``: a tqdm bar (None: when stderr is a terminal)."""
    from .calibration import stream

    reader = _InputStats(analysis.gm, consumers)
    stream(analysis, calibration, lambda inputs: reader.run(*inputs), desc="snp_fx compensation",
           progress=progress, empty_hint=" (a generator already used for the scores is empty: pass a list "
                                         "or a DataLoader)")
    return reader.stats


@torch.no_grad()
def compensate(analysis, keep: torch.Tensor, pruned: fx.GraphModule, calibration, ridge: float = DEFAULT_RIDGE,
               kinds=("v", "ffn"), progress: bool | None = None, stats: dict | None = None) -> list[dict]:
    """Refit the consumers of every pruned v / FFN group of ``pruned`` in place.

    ``keep``: the unit keep mask the rewrite used; ``calibration``: batches as for
    the scores (or ``stats`` from ``collect_stats``, covering these consumers).  A refit
    that would raise the calibration error of its layer is not applied (with a warning).
    Returns one record per group: what was done."""
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
        gram, total, n = stats[c.node]
        weight = params[c.weight].detach()
        w_full = weight if c.in_dim == 1 else weight.T     # (out, in)
        bias = params[c.bias].detach() if c.bias else None
        masks = analysis.channels.dim_masks(c.weight, weight.shape, keep)
        kept, rows = masks[c.in_dim], masks[1 - c.in_dim]
        new_w, new_b = solve(gram, total, n, w_full, bias, kept, ridge)
        zero_w = w_full.double()[:, kept]
        before = output_error(gram, total, n, w_full, bias, zero_w, bias.double() if bias is not None else None, kept)
        after = output_error(gram, total, n, w_full, bias, new_w, new_b, kept)
        rec = {"group": c.group, "consumer": c.weight, "error_before": before, "error_after": after,
               "applied": after <= before}
        records.append(rec)
        if not after <= before:
            warnings.warn(f"snp_fx: compensation of {c.group} would raise its calibration error "
                          f"({before:.4g} -> {after:.4g}); kept the plain pruned weights", stacklevel=3)
            continue
        target = operator.attrgetter(c.weight)(pruned)
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
    return torch.isin(analysis.channels.class_of, g.classes.reshape(-1)).nonzero().flatten()
