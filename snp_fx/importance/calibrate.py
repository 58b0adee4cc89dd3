"""The q/k statistics of one streamed pass over calibration batches (snp_fx.calibration.stream).

At every attention site the q and k operands are read as the graph computes
them, turned into per-(head, input) slices and scored at once; only running
sums per head are kept, so memory stays flat however many batches come.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..calibration import as_inputs as _as_inputs  # noqa: F401  (moved to snp_fx.calibration)
from ..calibration import all_reduce_sums, graph_runs, stream  # noqa: F401
from ..errors import SNPError
from .snp import qk_pair_scores


class _NonFinite(Exception):
    pass


def _leaves(x):
    from torch.utils._pytree import tree_leaves
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _SiteReader(fx.Interpreter):
    def __init__(self, gm, sites, heads_of, gamma, acc, energy, grams=None, score=True):
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # our errors name the node in one line
        self.sites = {s.node: i for i, s in enumerate(sites) if s.operands is not None}
        self.site_list = sites
        self.heads_of = heads_of
        self.gamma = gamma
        self.acc = acc
        self.energy = energy
        self.grams = grams    # per site (heads, E, E): sum over slices of Gq * Gk (exact q/k selection)
        self.score = score    # False: only the Gram products are wanted

    check_every_node = False  # set when a batch went non-finite, to name the node

    def run_node(self, n):
        out = super().run_node(n)
        if self.check_every_node and isinstance(out, torch.Tensor) and out.is_floating_point() \
                and not bool(torch.isfinite(out).all()):
            raise SNPError(f"calibration produced NaN/inf at node `{n.name}` ({n.format_node()[:120]})")
        i = self.sites.get(n.name)
        if i is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            q, k = self.site_list[i].operands(args, kwargs)
            if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
                raise _NonFinite()
            batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
            q = q.expand(batch + q.shape[-2:]).reshape(-1, *q.shape[-2:])
            k = k.expand(batch + k.shape[-2:]).reshape(-1, *k.shape[-2:])
            head = self.heads_of(i, q.shape[0])
            if self.score:
                w, e = qk_pair_scores(q, k, self.gamma)
                self.acc[i].index_add_(0, head, w.cpu())
                self.energy[i].index_add_(0, head, e.cpu())
            if self.grams is not None:
                wq, wk = _valid_positions(self.site_list[i], args, kwargs, batch, q.shape[-2], k.shape[-2])
                self.grams[i].index_add_(0, head, pair_gram_product(q, k, wq, wk).cpu())
        return out


def _valid_positions(site, args, kwargs, batch, nq: int, nk: int):
    """Query / key weights (P, N) from an SDPA attention mask, or None.

    A key masked for every query carries no score; in self-attention (nq == nk)
    such a position is padding, so its query row is ignored too."""
    if site.kind != "sdpa":
        return None, None
    names = ["query", "key", "value", "attn_mask"]
    got = dict(zip(names, args))
    got.update(kwargs)
    mask = got.get("attn_mask")
    if not isinstance(mask, torch.Tensor):
        return None, None
    valid = mask if mask.dtype == torch.bool else mask > -1e3  # additive masks use large negatives
    valid = valid.expand(batch + (nq, nk)).reshape(-1, nq, nk)
    wk = valid.any(-2)
    wq = valid.any(-1) & wk if nq == nk else valid.any(-1)
    return wq, wk


def pair_gram_product(q: torch.Tensor, k: torch.Tensor, wq=None, wk=None) -> torch.Tensor:
    """(P, d, d): Gq * Gk (elementwise) with Gq = Q^T diag(wq) Q, Gk = K^T diag(wk) K per slice.

    r^T (Gq * Gk) r = ||sum_i r_i Q_i K_i^T||_F^2 (over the weighted rows and
    columns): the score change when the pairs marked by r are removed."""
    qd, kd = q.double(), k.double()
    gq = (qd * wq[..., None]).transpose(-1, -2) @ qd if wq is not None else qd.transpose(-1, -2) @ qd
    gk = (kd * wk[..., None]).transpose(-1, -2) @ kd if wk is not None else kd.transpose(-1, -2) @ kd
    return gq * gk


def calibrate_qk(analysis, calibration, gamma: int, progress: bool | None = None, grams: bool = False,
                 score: bool = True):
    """Per site: summed pair scores (heads, E) and score energy (heads,).

    ``grams=True`` also returns, per site, (heads, E, E) sums of Gq * Gk (see
    ``pair_gram_product``) for exact q/k selection; ``score=False`` skips the SNP scores."""
    from ..labels import rows as _rows  # the same row order as the groups

    gm = analysis.gm
    sites = analysis.sites
    rows, acc, energy, pos_heads, gram = [], [], [], [], []
    for s in sites:
        r = _rows(analysis.channels.classes(s.q))
        rows.append(r)
        acc.append(torch.zeros(r.shape, dtype=torch.float64))
        if grams:
            gram.append(torch.zeros(r.shape + (r.shape[-1],), dtype=torch.float64))
        energy.append(torch.zeros(r.shape[0], dtype=torch.float64))
        # head index of every flattened batch position of the reduced labels
        lab = analysis.channels.classes(s.q)
        flat = lab.reshape(-1, lab.shape[-1])
        index = {tuple(x): h for h, x in enumerate(r.tolist())}
        pos_heads.append(torch.tensor([index[tuple(x)] for x in flat.tolist()], dtype=torch.long))

    def heads_of(i, p):
        """Head of each of p flattened (batch..., head) positions: the label pattern repeats."""
        h = pos_heads[i]
        period = next(t for t in range(1, h.numel() + 1)
                      if h.numel() % t == 0 and torch.equal(h, h[:t].repeat(h.numel() // t)))
        if p % period:
            raise SNPError(f"calibration batch does not match the analysed layout at site {sites[i].name}; "
                           "use batches of the example inputs' size")
        return h[:period].repeat(p // period)

    reader = _SiteReader(gm, sites, heads_of, gamma, acc, energy, gram if grams else None, score)

    def run(inputs):
        try:
            out = reader.run(*inputs)
            finite = all(bool(torch.isfinite(t).all()) for t in _leaves(out))
        except _NonFinite:
            finite = False
        if not finite:
            reader.check_every_node = True  # run again to say where it started
            reader.run(*inputs)

    stream(analysis, calibration, run, desc="snp_fx calibration", progress=progress)
    all_reduce_sums(acc + energy + gram)  # each rank's shard of the data (torch.distributed), summed
    if grams:
        return rows, acc, energy, gram
    return rows, acc, energy
