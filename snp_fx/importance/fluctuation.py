"""``importance="fluctuation"``: FLAP's activation-aware channel score (An et al., AAAI 2024).

A channel's score is, summed over every weight-applying op that consumes it (Linear, addmm:
the ops whose family names a ``consumer``), Var(x_j) over the calibration tokens of the op's
input channel j times ||W[:, j]||^2, the squared norm of the weight column it meets.  Removing
the channel then costs about that much output variance (its mean can be folded into a bias).

Classes that no such op consumes (q/k pairs: they meet in q k^T) take the structured Wanda
metric of the rows producing them, sum_i |W[r, i]| ||x_i||_2 (||x_i|| over all calibration
rows), summed over the producing weights; a group takes that fallback when none of its
classes has a positive fluctuation.  This is what benchmarks/quality_lm.py's FLAP-style
baseline does (kept there, computed from forward hooks, as an independent oracle).

Only sum x^2, sum x and the row count of each consumer's input are accumulated, streamed over
the calibration batches (snp_fx.calibration.stream); the variance is the unbiased one,
(sum x^2 / n - mean^2) * n / (n - 1).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..calibration import all_reduce_sums, stream
from ..compensate import consumer_input, weight_uses


def linear_consumers(analysis) -> list[tuple[str, str, int, int]]:
    """(node, weight, in_dim, x_pos) of every op applying a 2-d analysed weight to its input's channels."""
    params = dict(analysis.gm.named_parameters())
    return [(n.name, w, in_dim, x_pos) for n, w, _, in_dim, x_pos in weight_uses(analysis)
            if w in params and len(analysis.channels.param_ids[w]) == 2]  # an einsum's weight: as a matrix


class _InputMoments(fx.Interpreter):
    """sum x^2, sum x (per input channel, double) and rows of each consumer's input."""

    def __init__(self, analysis, consumers, params):
        super().__init__(analysis.gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.at = {node: x_pos for node, _, _, x_pos in consumers}
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.width = {node: analysis.channels.param_ids[w][d].numel() for node, w, d, _ in consumers}
        self.sums = {node: [zeros(self.width[node]), zeros(self.width[node]), zeros(1)]
                     for node, w, d, _ in consumers}

    def run_node(self, n):
        x_pos = self.at.get(n.name)
        if x_pos is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = consumer_input(args, x_pos, self.width[n.name]).detach().double()
            s = self.sums[n.name]
            s[0] += x.pow(2).sum(0).cpu()
            s[1] += x.sum(0).cpu()
            s[2] += x.shape[0]
        return super().run_node(n)


def fluctuation_scores(analysis, params, calibration, progress=None) -> torch.Tensor:
    """Class scores (num_units,) float64: see the module docstring."""
    ch = analysis.channels
    consumers = linear_consumers(analysis)
    reader = _InputMoments(analysis, consumers, params)
    stream(analysis, calibration, lambda inputs: reader.run(*inputs), desc="snp_fx fluctuation",
           progress=progress)
    all_reduce_sums([t for s in reader.sums.values() for t in s])  # each rank's shard of the data, summed
    col = torch.zeros(ch.num_units, dtype=torch.float64)
    row = torch.zeros(ch.num_units, dtype=torch.float64)
    for node, name, in_dim, _ in consumers:
        sq, total, n = reader.sums[node]
        n = int(n)
        if not n:  # an op the calibration never reached
            continue
        w = ch.as_view(name, params[name].detach().cpu().double()).movedim(in_dim, 1)     # (out, in)
        var = (sq / n - (total / n) ** 2).clamp_min(0) * n / max(n - 1, 1)
        col.index_add_(0, ch.class_of[ch.param_ids[name][in_dim]], var * w.pow(2).sum(0))
        row.index_add_(0, ch.class_of[ch.param_ids[name][1 - in_dim]], (w.abs() * sq.sqrt()).sum(1))
    scores = torch.zeros(ch.num_units, dtype=torch.float64)
    for g in analysis.groups.values():
        if g.prunable:
            ids = g.classes.reshape(-1)
            scores[ids] = col[ids] if bool((col[ids] > 0).any()) else row[ids]
    return scores
