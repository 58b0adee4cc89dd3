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

MoE experts pruned per expert (snp_fx/ops/experts.py): the consumer of expert e's neuron j is
the down GEMM's matrix of expert e, and its input variance is over the token rows routed to e
(grouped_mm's offsets, batched_mm's gather index): a score per (expert, neuron).

Only sum x^2, sum x and the row count of each consumer's input are accumulated, streamed over
the calibration batches (snp_fx.calibration.stream); the variance is the unbiased one,
(sum x^2 / n - mean^2) * n / (n - 1).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..calibration import all_reduce_sums, stream
from ..compensate import consumer_input, weight_uses
from ..ops.experts import GROUPED
from ..ops.registry import op_key


def linear_consumers(analysis) -> list[tuple[str, str, int, int]]:
    """(node, weight, in_dim, x_pos) of every op applying a 2-d analysed weight to its input's channels."""
    params = dict(analysis.gm.named_parameters())
    return [(n.name, w, in_dim, x_pos) for n, w, _, in_dim, x_pos in weight_uses(analysis)
            if w in params and len(analysis.channels.param_ids[w]) == 2]  # an einsum's weight: as a matrix


def expert_consumers(analysis) -> list:
    """The expert GEMMs (ops.experts.ExpertUse) contracting neurons pruned per expert."""
    dims = analysis.channels.expert_dims
    return [u for u in analysis.channels.expert_uses if u.k_dim in dims.get(u.param, {})]



class _InputMoments(fx.Interpreter):
    """sum x^2, sum x (per input channel, double) and rows of each consumer's input; per expert
    (rows by their expert) for the expert GEMMs."""

    def __init__(self, analysis, consumers, params, experts=()):
        gm = analysis.gm
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False
        self.at = {node: x_pos for node, _, _, x_pos in consumers}
        zeros = lambda *n: torch.zeros(*n, dtype=torch.float64)  # noqa: E731
        self.width = {node: analysis.channels.param_ids[w][d].numel() for node, w, d, _ in consumers}
        self.sums = {node: [zeros(self.width[node]), zeros(self.width[node]), zeros(1)]
                     for node, w, d, _ in consumers}
        self.experts = {u.node: u for u in experts}
        nodes = {x.name: x for x in gm.graph.nodes}
        self.routes = {u.route for u in experts if op_key(nodes[u.node], {}) not in GROUPED}
        self.route_of: dict[str, torch.Tensor] = {}  # batched_mm: each row's expert id, as the gather ran
        for u in experts:
            e, k = params[u.param].shape[0], params[u.param].shape[u.k_dim]
            self.sums[u.node] = [zeros(e, k), zeros(e, k), zeros(e)]

    def run_node(self, n):
        x_pos = self.at.get(n.name)
        if x_pos is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            x = consumer_input(args, x_pos, self.width[n.name]).detach().double()
            s = self.sums[n.name]
            s[0] += x.pow(2).sum(0).cpu()
            s[1] += x.sum(0).cpu()
            s[2] += x.shape[0]
        u = self.experts.get(n.name)
        if u is not None:
            self._expert_rows(n, u)
        out = super().run_node(n)
        if n.name in self.routes and isinstance(out, torch.Tensor):
            self.route_of[n.name] = out.detach()
        return out

    def _expert_rows(self, n, u):
        """The per-expert sums of an expert GEMM's input: rows by the expert they are routed to."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = self.env[next(a for a in n.all_input_nodes if a.name == u.x)].detach()
        x = x.reshape(x.shape[0], -1).double().cpu()  # (rows, neurons): batched_mm's (rows, k, 1) too
        s = self.sums[n.name]
        n_exp = s[2].numel()
        if op_key(n, {}) not in GROUPED:  # batched_mm: the gather's index
            eid = self.route_of[u.route].reshape(-1).long().cpu()
        else:  # grouped_mm: row r belongs to the first expert whose offset exceeds r
            offs = args[2] if len(args) > 2 else kwargs["offs"]
            eid = torch.searchsorted(offs.long().cpu(), torch.arange(x.shape[0]), right=True)
        inside = eid < n_exp  # rows past the last offset belong to no expert
        x, eid = x[inside], eid[inside]
        s[0].index_add_(0, eid, x.pow(2))
        s[1].index_add_(0, eid, x)
        s[2].index_add_(0, eid, torch.ones(eid.numel(), dtype=torch.float64))


def fluctuation_scores(analysis, params, calibration, progress=None) -> torch.Tensor:
    """Class scores (num_units,) float64: see the module docstring."""
    ch = analysis.channels
    consumers = linear_consumers(analysis)
    experts = expert_consumers(analysis)
    reader = _InputMoments(analysis, consumers, params, experts)
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
    for u in experts:  # each expert's neurons: its rows' variance times its own down matrix's columns
        sq, total, n = reader.sums[u.node]
        n = n.clamp_min(1)[:, None]
        var = (sq / n - (total / n) ** 2).clamp_min(0) * n / (n - 1).clamp_min(1)     # (experts, k)
        w = params[u.param].detach().cpu().double()
        w2 = w.pow(2).sum([d for d in (1, 2) if d != u.k_dim])                          # (experts, k)
        col.index_add_(0, ch.class_of[ch.expert_dims[u.param][u.k_dim]].reshape(-1), (var * w2).reshape(-1))
    scores = torch.zeros(ch.num_units, dtype=torch.float64)
    for g in analysis.groups.values():
        if g.prunable:
            ids = g.classes.reshape(-1)
            scores[ids] = col[ids] if bool((col[ids] > 0).any()) else row[ids]
    return scores
