"""Channel labels: the data structure the whole analysis runs on.

Every tensor in the traced graph gets a *label tensor* of the same rank whose
entries name the channel ("unit") each element belongs to:

* ``>= 1`` a unit id: elements with the same id are the same channel;
* ``0``    the FROZEN unit: anything joined to it can never be pruned
           (model inputs, outputs, ops we do not understand);
* ``-1``   no channel (a constant, a token or batch position).

A label tensor is stored *reduced*: a dimension along which every label is the
same is kept at size 1, so tokens and batch cost nothing.  Data-movement ops
(reshape, permute, getitem, cat, ...) are executed on the label tensors
themselves, which is why one small op table covers them exactly.
"""
from __future__ import annotations

import math

import torch

FROZEN = 0
NONE = -1


def reduce(lab: torch.Tensor) -> torch.Tensor:
    """Collapse every dimension along which the labels do not change."""
    for d in range(lab.dim()):
        if lab.shape[d] > 1 and bool((lab == lab.narrow(d, 0, 1)).all()):
            lab = lab.narrow(d, 0, 1)
    return lab.contiguous()


def expand(lab: torch.Tensor, shape) -> torch.Tensor:
    """Broadcast a reduced label tensor to the real shape of its tensor."""
    shape = tuple(shape)
    if lab.dim() < len(shape):
        lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
    return lab.expand(shape)


def varying_dims(lab: torch.Tensor) -> list[int]:
    return [d for d in range(lab.dim()) if lab.shape[d] > 1]


def constant(value: int, ndim: int) -> torch.Tensor:
    return torch.full((1,) * ndim, value, dtype=torch.long)


class UnitSpace:
    """Allocates unit ids and records how units must be pruned together.

    ``union`` couples units (same keep decision; an online union-find whose
    root is the smallest id, so FROZEN stays the root of its class).
    ``support`` records dependent units whose existence is derived from
    others (a head exists while any of its q/k/v channels does).
    ``sensitive`` records units whose removal is not equivalent to zeroing
    them (they are normalised over, e.g. by LayerNorm); ``frozen`` records
    units that must stay, each with the reason.  ``soft`` units belong to
    buffers and constants, not parameters: an elementwise op does not couple
    them to parameter channels (the rewrite gathers the constant instead).
    """

    def __init__(self):
        self._parent = torch.zeros(1 << 16, dtype=torch.long)  # id 0 is FROZEN
        self._soft = torch.zeros(1 << 16, dtype=torch.long)  # 1: every unit of this root's class is soft
        self.next_id = 1
        self.support: dict[int, set[int]] = {}
        self.sensitive: list[tuple[torch.Tensor, str]] = []
        # normalised by a mean only: the rewrite divides by the original count, so removing is zeroing
        # (q/k norms); a residual stream keeps its own semantics (mean over the kept channels)
        self.rescaled: list[tuple[torch.Tensor, str]] = []
        self.frozen: list[tuple[torch.Tensor, str]] = []
        self._compressed = True

    def new(self, n: int, soft: bool = False) -> torch.Tensor:
        start = self.next_id
        if start + n > self._parent.numel():
            size = max(2 * self._parent.numel(), start + n)
            self._parent = torch.cat([self._parent[:start], torch.zeros(size - start, dtype=torch.long)])
            self._soft = torch.cat([self._soft[:start], torch.zeros(size - start, dtype=torch.long)])
        ids = torch.arange(start, start + n, dtype=torch.long)
        self._parent[start:start + n] = ids
        self._soft[start:start + n] = int(soft)
        self.next_id = start + n
        return ids

    def _root(self, x: torch.Tensor) -> torch.Tensor:
        parent = self._parent
        r = parent[x]
        while True:
            rr = parent[r]
            if torch.equal(rr, r):
                return r
            r = rr

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        m = (a >= 0) & (b >= 0) & (a != b)
        if not bool(m.any()):
            return
        keys = torch.unique(a[m] * self.next_id + b[m])  # distinct pairs, as one 1-d key
        a, b = keys // self.next_id, keys % self.next_id
        while True:  # hook the larger root under the smaller until every pair shares a root
            ra, rb = self._root(a), self._root(b)
            diff = ra != rb
            if not bool(diff.any()):
                break
            lo = torch.minimum(ra, rb)[diff]
            hi = torch.maximum(ra, rb)[diff]
            self._parent.scatter_reduce_(0, hi, lo, reduce="amin")
            # soft AND soft, into the roots as they are now (lo may itself have been hooked this round)
            ends = torch.cat([lo, hi])
            self._soft.scatter_reduce_(0, self._root(ends), self._soft[ends], reduce="amin")
            self._compressed = False

    def roots(self) -> torch.Tensor:
        """roots()[id] = representative (smallest id) of the id's class."""
        if not self._compressed:
            p = self._parent[:self.next_id]
            while True:
                nxt = p[p]
                if torch.equal(nxt, p):
                    break
                p = nxt
            self._parent[:self.next_id] = p
            self._compressed = True
        return self._parent[:self.next_id]

    def canon(self, lab: torch.Tensor) -> torch.Tensor:
        if self._compressed:
            return torch.where(lab >= 0, self._parent[lab.clamp(min=0)], lab)
        # only these ids' roots: compressing every id after each union costs more on a big graph
        return torch.where(lab >= 0, self._root(lab.clamp(min=0)), lab)

    def is_soft(self, lab: torch.Tensor) -> bool:
        """True if ``lab`` names channels and all of them are of buffers/constants only."""
        ids = lab[lab > 0]
        return bool(ids.numel()) and bool(self._soft[self.canon(ids)].all())

    def freeze(self, lab, reason: str) -> None:
        """Pin these units (and everything coupled to them) with a reason."""
        if isinstance(lab, torch.Tensor):
            ids = torch.unique(lab[lab > 0])
            if ids.numel():
                self.frozen.append((ids, reason))

    def mark_sensitive(self, lab: torch.Tensor, reason: str, rescaled: bool = False) -> None:
        ids = torch.unique(lab[lab > 0])
        if ids.numel():
            (self.rescaled if rescaled else self.sensitive).append((ids, reason))

    def dependent(self, groups: list[torch.Tensor]) -> torch.Tensor:
        """One new unit per entry of ``groups``, existing iff any unit in it does."""
        ids = self.new(len(groups))
        for i, g in zip(ids.tolist(), groups):
            self.support[i] = set(torch.unique(g[g > 0]).tolist())
        return ids

    def is_dependent(self, t: torch.Tensor) -> torch.Tensor:
        if not self.support:
            return torch.zeros(t.shape, dtype=torch.bool)
        keys = self.canon(torch.tensor(sorted(self.support), dtype=torch.long))
        return torch.isin(self.canon(t), keys) & (t > 0)

    def add_support(self, dep_ids: torch.Tensor, unit_ids: torch.Tensor) -> None:
        dep_ids, unit_ids = torch.broadcast_tensors(dep_ids, unit_ids)
        roots = self.roots()
        by_root = {int(roots[k]): k for k in self.support}
        for d in torch.unique(dep_ids[dep_ids > 0]).tolist():
            key = by_root.get(int(roots[d]))
            if key is not None:
                u = unit_ids[dep_ids == d]
                self.support[key].update(torch.unique(u[u > 0]).tolist())

    def components(self) -> torch.Tensor:
        return self.roots()


# ---------------------------------------------------------------------------
# Pruned layouts: the shape a labelled tensor takes under a keep mask
# ---------------------------------------------------------------------------

class Irregular(Exception):
    """A pruned layout the rewrite cannot express (the rewrite turns it into a RewriteError)."""


def pruned_sizes(lab: torch.Tensor, shape, keep: torch.Tensor, dims=None, ragged=None) -> list[int]:
    """Pruned shape of a tensor with reduced labels ``lab`` and real ``shape``.

    One channel dim (the ragged one: the head dim where a reshape split the heads) may keep
    different indices per slice but the same count; the other channel dims keep whole
    slices.  ``ragged`` says which dim that is (NesT's output permute moves it outwards;
    see ``_Rewriter.ragged_of``); by default the innermost.
    """
    shape = list(shape)
    lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
    k = torch.where(lab >= 0, keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
    var = [d for d in range(len(shape)) if lab.shape[d] > 1] if dims is None else \
        [d for d in dims if lab.shape[d] == shape[d]]
    if not var:
        if not bool(k.all()):
            raise Irregular("a tensor whose channels are all removed")
        return shape
    kk = expand(k, tuple(lab.shape[d] if d in var else 1 for d in range(len(shape))))
    ragged = ragged if ragged in var else var[-1]
    for d in var:
        if d != ragged:
            other = [i for i in range(len(shape)) if i != d]
            shape[d] = int(kk.any(dim=other).sum()) if other else int(kk.sum())
    counts = kk.sum(dim=ragged)
    nz = counts[counts > 0]
    if nz.numel() and not bool((nz == nz.reshape(-1)[0]).all()):
        raise Irregular(f"dim {ragged} keeps different counts per slice: {sorted(set(nz.reshape(-1).tolist()))}")
    shape[ragged] = int(nz.reshape(-1)[0]) if nz.numel() else 0
    if math.prod(shape[d] for d in var) != int(kk.sum()):
        raise Irregular("kept channels do not form a regular block")
    return shape


def kept_sequence(lab: torch.Tensor, shape, keep: torch.Tensor, ragged: int) -> torch.Tensor:
    """Labels of the kept elements over the channel dims, flattened in the pruned tensor's own
    order: whole slices on the other channel dims, each slice's kept entries in order on the ragged one."""
    lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
    var = varying_dims(lab)
    g = lab.reshape([lab.shape[d] for d in var])
    r = var.index(ragged)
    g = g.movedim(r, -1)
    k = keep[g.clamp(min=0)] | (g < 0)
    for d in range(g.dim() - 1):  # whole slices
        other = [i for i in range(g.dim()) if i != d]
        sl = k.any(dim=other).nonzero().flatten()
        g, k = g.index_select(d, sl), k.index_select(d, sl)
    count = int(k.sum()) // max(1, math.prod(g.shape[:-1]))
    g = g[k].reshape(tuple(g.shape[:-1]) + (count,))
    return g.movedim(-1, r).reshape(-1)


# ---------------------------------------------------------------------------
# Small helpers over (nested) label structures
# ---------------------------------------------------------------------------

def map_struct(v, fn):
    """``fn`` over the leaves of nested lists / tuples (a torch.Size is a leaf)."""
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return (list if isinstance(v, list) else tuple)(map_struct(x, fn) for x in v)
    return fn(v)


def flat_labels(x) -> list[torch.Tensor]:
    """Every label tensor in a nested structure."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in flat_labels(y)]
    return []


def unique_ordered(t: torch.Tensor) -> torch.Tensor:
    """Distinct values in order of first appearance."""
    return torch.tensor(list(dict.fromkeys(t.tolist())), dtype=torch.long)


def unique_ordered_rows(t: torch.Tensor) -> torch.Tensor:
    """Distinct rows of a 2-d tensor in order of first appearance."""
    return torch.tensor(list(dict.fromkeys(tuple(r) for r in t.tolist())), dtype=torch.long)


def rows(lab: torch.Tensor) -> torch.Tensor:
    """(heads, width) array of a per-head label tensor, deduplicated over batch positions."""
    lab = reduce(lab)
    flat = lab.reshape(-1, lab.shape[-1]) if lab.dim() else lab.reshape(1, 1)
    return unique_ordered_rows(flat)
