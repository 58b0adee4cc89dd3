"""The channel graph: classes of coupled units and what holds each class in place.

Built from a finished propagation: every unit id belongs to one class (its union-find
root); a class is frozen (with the reason), sensitive (normalised over: removing is not
zeroing), dependent (exists through others: heads, attention scores) or free.  Parameters
map to classes dim by dim (``param_ids``) or element by element (``elem_ids``), which
gives the keep mask of every parameter dim (``dim_masks``).
"""
from __future__ import annotations

import math

import torch

from .. import labels as L
from ..errors import RewriteError


class ChannelGraph:
    def __init__(self, prop):
        self.space = prop.space
        self.param_ids: dict[str, list[torch.Tensor]] = prop.param_ids
        self.elem_ids: dict[str, torch.Tensor] = prop.elem_ids
        self.views: dict[str, list[list[int]]] = dict(prop.param_views)  # dims merged in param_ids (einsum weights)
        self.producers = [(name, prop.producer_dim.get(name, 0)) for name, _ in prop.producers]
        # MoE expert weights whose hidden dims are pruned per expert (snp_fx/ops/experts.py): param ->
        # {dim: unit ids (experts, n)}; their param_ids on those dims are slots (kept: the first k)
        self.expert_dims: dict[str, dict[int, torch.Tensor]] = prop.expert_dims
        self.expert_slots: dict[int, torch.Tensor] = prop.expert_slots
        self.expert_uses = prop.expert_uses  # the expert GEMMs (ops.experts.ExpertUse)
        self.class_of = prop.space.components()
        self.class_size = torch.bincount(self.class_of, minlength=self.class_of.numel())
        self._class_reasons(prop.summed)
        for name, e in self.elem_ids.items():
            # a small parameter coupled element by element to channels of different heads along
            # adjacent dims (XLNet's per-head q biases (heads, head dim), its segment table (2, heads,
            # head dim)): those dims are kept per head like the channels, not by whole slices
            cls = L.reduce(self.class_of[e])
            var = L.varying_dims(cls)
            if len(var) >= 2 and name not in self.param_ids and var == list(range(var[0], var[-1] + 1)) and \
                    bool((self.class_size[cls] > 1).all()) and torch.unique(cls).numel() == cls.numel():
                self.views[name] = [[d] for d in range(var[0])] + [var] + [[d] for d in range(var[-1] + 1, e.dim())]

    @property
    def num_units(self) -> int:
        """Size of every per-unit (or per-class) tensor: scores, keep masks."""
        return self.space.next_id

    def classes(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids >= 0, self.class_of[ids.clamp(min=0)], ids)

    def _class_reasons(self, summed):
        self.frozen: dict[int, str] = {int(self.class_of[0]): "tied to a model input"}
        for ids, why in self.space.frozen:
            for c in torch.unique(self.class_of[ids]).tolist():
                self.frozen.setdefault(c, why)
        self.sensitive: dict[int, str] = {}
        for ids, why in self.space.sensitive:
            for c in torch.unique(self.class_of[ids]).tolist():
                self.sensitive.setdefault(c, why)
        self.rescaled: dict[int, str] = {}  # normalised by means only (see Space.rescaled)
        for ids, why in self.space.rescaled:
            for c in torch.unique(self.class_of[ids]).tolist():
                self.rescaled.setdefault(c, why)
        self.summed: set[int] = set()  # classes added to channels made elsewhere: a residual stream
        for lab in summed:
            self.summed.update(torch.unique(self.class_of[lab[lab > 0]]).tolist())
        self.dependent: set[int] = set()
        if self.space.support:
            self.dependent = set(self.class_of[torch.tensor(sorted(self.space.support))].tolist())
        self.support: dict[int, set[int]] = {}  # dependent class -> the classes it exists through
        for k, v in self.space.support.items():
            members = self.class_of[torch.tensor(sorted(v), dtype=torch.long)].tolist() if v else []
            self.support.setdefault(int(self.class_of[k]), set()).update(members)

    def view_shape(self, name: str, shape) -> tuple:
        """The shape ``param_ids`` label: the parameter's own, or with its merged dims merged."""
        view = self.views.get(name)
        return tuple(shape) if view is None else tuple(math.prod(shape[d] for d in g) for g in view)

    def as_view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` shaped as ``param_ids`` label it (a view of it where its memory allows)."""
        return t.reshape(self.view_shape(name, t.shape)) if name in self.views else t

    def pruned_shape(self, name: str, shape, keep: torch.Tensor) -> tuple:
        """The real shape of a parameter sliced by ``keep``: a merged group of dims keeps whole
        slices on its outer dims and the same count per slice on its last (kept heads x the same
        width in each); raises RewriteError otherwise."""
        masks = self.dim_masks(name, shape, keep)
        if name not in self.views:
            return tuple(int(m.sum()) for m in masks)
        out = []
        for i, (g, m) in enumerate(zip(self.views[name], masks)):
            if len(g) == 1:
                out.append(int(m.sum()))
                continue
            sizes = [shape[d] for d in g]
            if name in self.param_ids:
                ids = self.param_ids[name][i]
            else:  # element ids: the merged dims' (the others do not vary)
                ids = self.elem_ids[name][tuple(slice(None) if d in g else 0 for d in range(len(shape)))]
            try:
                out += L.pruned_sizes(ids.reshape(sizes), sizes, keep)
            except L.Irregular as e:
                raise RewriteError(f"the kept part of `{name}` is not regular: {e}") from None
        return tuple(out)

    def dim_masks(self, name: str, shape, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per-dim keep masks of a parameter/buffer (per dim of ``view_shape``); raises
        RewriteError if not a block."""
        shape = self.view_shape(name, shape)
        masks = [torch.ones(s, dtype=torch.bool) for s in shape]
        for d, ids in enumerate(self.param_ids.get(name, [])):
            masks[d] &= keep[ids]
        e = self.elem_ids.get(name)
        if e is not None:
            e = e.reshape(shape)
            coupled = self.class_size[self.class_of[e]] > 1  # uncoupled elements may go either way
            k = keep[e]
            keep_el, drop_el = k & coupled, ~k & coupled
            for d in range(e.dim()):
                other = [i for i in range(e.dim()) if i != d]
                has_keep = keep_el.any(dim=other) if other else keep_el
                has_drop = drop_el.any(dim=other) if other else drop_el
                masks[d] &= ~(has_drop & ~has_keep)
            block = masks[0]
            for m in masks[1:]:
                block = block.unsqueeze(-1) & m
            if bool((keep_el & ~block).any()) or bool((drop_el & block).any()):
                raise RewriteError(f"the kept part of `{name}` is not a block of whole slices")
        return masks

    def ids_read(self, name: str) -> torch.Tensor:
        """The unit ids whose keep bits ``dim_masks`` reads for a parameter/buffer (its result is a
        function of ``keep`` at these ids alone)."""
        parts = [t.flatten() for t in self.param_ids.get(name, [])]
        if name in self.elem_ids:
            parts.append(self.elem_ids[name].flatten())
        return torch.unique(torch.cat(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def expert_masks(self, name: str, keep: torch.Tensor) -> dict[int, torch.Tensor]:
        """{dim: keep mask (experts, n)} of the dims of an expert weight pruned per expert; the
        ``dim_masks`` of those dims only count (each expert keeps as many)."""
        return {d: keep[ids] for d, ids in self.expert_dims.get(name, {}).items()}

    def kept_count(self, name: str, shape, keep: torch.Tensor) -> int:
        """How many elements of a parameter a keep mask leaves."""
        n = 1
        for m in self.dim_masks(name, shape, keep):
            n *= int(m.sum())
        return n
