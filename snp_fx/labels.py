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
            self._soft.scatter_reduce_(0, lo, self._soft[hi], reduce="amin")  # soft AND soft
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
        r = self.roots()
        return torch.where(lab >= 0, r[lab.clamp(min=0)], lab)

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

    def mark_sensitive(self, lab: torch.Tensor, reason: str) -> None:
        ids = torch.unique(lab[lab > 0])
        if ids.numel():
            self.sensitive.append((ids, reason))

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
