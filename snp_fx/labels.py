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


def has_units(lab) -> bool:
    return isinstance(lab, torch.Tensor) and bool((lab > 0).any())


class UnitSpace:
    """Allocates unit ids and records how units must be pruned together.

    ``union`` couples units (same keep decision; an online union-find whose
    root is the smallest id, so FROZEN stays the root of its class).
    ``support`` records dependent units whose existence is derived from
    others (a head exists while any of its q/k/v channels does).
    ``sensitive`` records units whose removal is not equivalent to zeroing
    them (they are normalised over, e.g. by LayerNorm); ``frozen`` records
    units that must stay, each with the reason.
    """

    def __init__(self):
        self.parent: list[int] = [0]  # id 0 is FROZEN
        self.support: dict[int, set[int]] = {}
        self.sensitive: list[tuple[torch.Tensor, str]] = []
        self.frozen: list[tuple[torch.Tensor, str]] = []
        self._roots = None

    @property
    def next_id(self) -> int:
        return len(self.parent)

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self._roots = None
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        m = (a >= 0) & (b >= 0) & (a != b)
        if not bool(m.any()):
            return
        pairs = torch.unique(torch.stack([a[m], b[m]], 1), dim=0).tolist()
        for x, y in pairs:
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                lo, hi = (rx, ry) if rx < ry else (ry, rx)
                self.parent[hi] = lo
                self._roots = None

    def roots(self) -> torch.Tensor:
        """roots()[id] = representative (smallest id) of the id's class."""
        if self._roots is None:
            r = torch.tensor(self.parent, dtype=torch.long)
            while True:
                nxt = r[r]
                if torch.equal(nxt, r):
                    break
                r = nxt
            self._roots = r
        return self._roots

    def canon(self, lab: torch.Tensor) -> torch.Tensor:
        r = self.roots()
        return torch.where(lab >= 0, r[lab.clamp(min=0)], lab)

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
        by_root = {self.find(k): k for k in self.support}
        for d in torch.unique(dep_ids[dep_ids > 0]).tolist():
            key = by_root.get(self.find(d))
            if key is not None:
                u = unit_ids[dep_ids == d]
                self.support[key].update(torch.unique(u[u > 0]).tolist())

    def components(self) -> torch.Tensor:
        return self.roots()
