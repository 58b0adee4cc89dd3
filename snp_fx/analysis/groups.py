"""Groups: the coupled classes pruned together under one ratio.

Per attention site a q/k group (heads x pair width) and a v group; the other channel
producers, linked by shared classes (a networkx graph), form FFN groups and the
residual stream(s).  A group that cannot be pruned says why.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import networkx as nx
import torch

from ..labels import rows, unique_ordered


@dataclasses.dataclass
class Site:
    """One attention: q/k units pair up through q @ k^T, v units feed attn @ v."""
    node: str                  # the q@k^T (or sdpa) node
    kind: str                  # "sdpa" | "matmul"
    q: torch.Tensor            # unit labels of q (batch dims..., E), reduced
    k: torch.Tensor
    v: torch.Tensor | None = None
    av_node: str | None = None
    name: str = ""
    # (args, kwargs) of the site node -> (Q, K), both (..., tokens, E): what calibration reads
    operands: object = None
    producers_before: int = 0  # how many channel producers ran before it (for naming)


@dataclasses.dataclass
class Group:
    """A set of coupled classes pruned together under one ratio."""
    name: str
    kind: str                  # "qk" | "v" | "ffn" | "residual"
    classes: torch.Tensor      # (heads, width) for qk/v, (width,) otherwise
    prunable: bool = True
    reason: str = ""
    site: str | None = None
    # channels per unit: 2 for q/k under rotary embeddings, which tie channels in pairs (i, i + d/2
    # or 2i, 2i + 1) that are kept or removed together; ``width`` counts units (pairs)
    unit_channels: int = 1
    # channels per unit where they differ (heads, width): partial rotary embeddings make q/k of pairs
    # (rotated channels) and singles (the pass-through rest); every head has the same counts of each
    # size, and a plan keeps the same count of each size in every head (the heads' layouts stay equal)
    unit_sizes: torch.Tensor | None = None
    # kept widths must be multiples of this (a kernel's alignment: aten._grouped_mm takes rows of a
    # multiple of 16 bytes); the planner rounds to it, keep_mask refuses other widths
    step: int = 1
    # MoE experts pruned per expert (snp_fx/ops/experts.py): ``classes`` is (experts, width), each
    # expert's own neurons; ``slots`` (width,) the activation columns they share, of which a plan
    # keeping k neurons per expert keeps the first k
    slots: torch.Tensor | None = None
    # the block of each position (width,) where a plan keeps the same count in every block (a grouped
    # conv's groups, each holding its own outputs); None: no such constraint
    blocks: torch.Tensor | None = None
    keep_heads: str = ""  # why whole heads cannot be removed (a grouped conv keeps all its groups)

    def size_counts(self, h: int, idx) -> dict[int, int]:
        """How many units of each size positions ``idx`` of head ``h`` hold ({} without unit_sizes)."""
        if self.unit_sizes is None:
            return {}
        row = self.unit_sizes[h] if self.unit_sizes.dim() == 2 else self.unit_sizes
        return dict(sorted(collections.Counter(row[list(idx)].tolist()).items()))

    def channels(self, h: int, idx) -> int:
        """How many channels positions ``idx`` of head ``h`` hold."""
        if self.unit_sizes is None:
            return len(idx) * self.unit_channels
        return sum(s * n for s, n in self.size_counts(h, idx).items())

    @property
    def heads(self) -> int:
        return self.classes.shape[0] if self.classes.dim() == 2 else 1

    @property
    def width(self) -> int:
        return self.classes.shape[-1]


PROJECTION_NAMES = ("qkv", "query", "q", "q_proj", "c_attn", "in_proj", "query_proj")  # a site is named after its module


def build_groups(channels, sites: list[Site], producers: list[tuple[str, torch.Tensor]],
                 width_steps=(), width_blocks=()) -> dict[str, Group]:
    """Groups of a propagated graph (``producers``: weight name, unit ids it makes; ``width_steps``:
    (unit ids, step) where a kernel needs widths in multiples of step; ``width_blocks``: (unit ids
    (blocks, per block), why) where a plan keeps the same count in every block)."""
    producer_cls = [(name, channels.classes(ids)) for name, ids in producers]
    slot_of = channels.expert_slots
    if slot_of:  # experts pruned per expert: their producers make one 2-d group per MoE layer, below
        experts = [(name, c) for name, c in producer_cls if all(x in slot_of for x in c.tolist())]
        producer_cls = [(name, c) for name, c in producer_cls if not all(x in slot_of for x in c.tolist())]
    groups: list[Group] = []
    used: dict[int, str] = {}

    def owner_module(cls_set, before):
        """The q projection: the earliest of the producers of these channels nearest the site."""
        owner = None
        for name, c in reversed(producer_cls[:before]):
            if bool(torch.isin(c, cls_set).any()):
                owner = name
            elif owner is not None:
                break  # q, k (, v) projections run together; earlier layers stop the search
        return owner.rsplit(".", 1)[0] if owner else None

    def check(g: Group, allow_sensitive: bool):
        for c in torch.unique(g.classes).tolist():
            if c in channels.frozen:
                g.prunable, g.reason = False, channels.frozen[c]
                return
            if c in channels.dependent:
                g.prunable, g.reason = False, "its channels exist only through others"
                return
            if c in channels.sensitive and not allow_sensitive:
                g.prunable, g.reason = False, f"normalised over ({channels.sensitive[c]}): removing is not exact"
                return
            if c in used:
                g.prunable, g.reason = False, f"shares channels with {used[c]}"
                return
        if g.classes.dim() == 2 and torch.unique(g.classes).numel() != g.classes.numel():
            g.prunable, g.reason = False, "channels of different heads are coupled"

    seen_names: dict[str, int] = {}
    for site in sites:
        qk, unit_channels, unit_sizes = _units(rows(channels.classes(site.q)))
        mod = owner_module(torch.unique(qk), site.producers_before) or site.node
        mod = mod if mod.rsplit(".", 1)[-1] not in PROJECTION_NAMES \
            else mod.rsplit(".", 1)[0] if "." in mod else mod
        if mod in seen_names:
            seen_names[mod] += 1
            mod = f"{mod}#{seen_names[mod]}"
        else:
            seen_names[mod] = 0
        site.name = mod
        g = Group(f"{mod}.qk", "qk", qk, site=mod, unit_channels=unit_channels, unit_sizes=unit_sizes)
        check(g, allow_sensitive=False)
        groups.append(g)
        for c in torch.unique(qk).tolist():
            used.setdefault(c, g.name)
        if site.v is None:
            continue
        v, v_units, _ = _units(rows(channels.classes(site.v)))
        if v_units == 1:  # pairs with singles (or none) in v: as it is (coupled channels refuse it)
            v = rows(channels.classes(site.v))
        g = Group(f"{mod}.v", "v", v, site=mod, unit_channels=v_units)
        check(g, allow_sensitive=False)  # v is pruned per head on its own (GQA: per kv head)
        if g.prunable and any(c in channels.summed for c in torch.unique(v).tolist()):
            # added to channels made elsewhere (EfficientViT's cascaded heads add head i's output
            # to the input of head i + 1): the residual stream's, pruned with it, not as v
            g.prunable, g.reason = False, "its channels are added to others: residual stream"
        groups.append(g)
        if not g.prunable and g.reason.endswith("residual stream"):
            continue
        for c in torch.unique(v).tolist():
            used.setdefault(c, g.name)

    # producers coupled by shared classes form one group (residual stream, FFN hidden)
    graph = nx.Graph()
    graph.add_nodes_from(range(len(producer_cls)))
    owner: dict[int, int] = {}
    for i, (_, c) in enumerate(producer_cls):
        for cl in torch.unique(c).tolist():
            if cl in owner:
                graph.add_edge(owner[cl], i)
            else:
                owner[cl] = i
    residual_count = 0
    pending = []
    for comp in sorted(nx.connected_components(graph), key=min):
        members = sorted(comp)
        cls = unique_ordered(torch.cat([producer_cls[i][1] for i in members]))
        cls = cls[~torch.isin(cls, torch.tensor(sorted(used) or [-5]))]
        if cls.numel() == 0:
            continue
        is_res = any(c in channels.sensitive or c in channels.rescaled or c in channels.summed for c in cls.tolist())
        name = producer_cls[members[0]][0].rsplit(".", 1)[0]
        pending.append(Group(name, "residual" if is_res else "ffn", cls))
        residual_count += is_res
    if slot_of:
        done: set[int] = set()
        for name, c in experts:
            if c[0].item() in done:
                continue
            slots = unique_ordered(torch.cat([x for _, x in experts if bool(torch.isin(x, c).any())]))
            done.update(slots.tolist())
            g = Group(name.rsplit(".", 1)[0], "ffn", torch.stack([slot_of[x] for x in slots.tolist()], 1), slots=slots)
            check(g, allow_sensitive=False)
            pending.append(g)
    r = 0
    for g in pending:
        if g.kind == "residual":
            g.name = "residual" if residual_count == 1 else f"residual.{r}"
            r += 1
        check(g, allow_sensitive=g.kind == "residual")
        groups.append(g)
    for ids, step in width_steps:
        cls = torch.unique(channels.classes(ids))
        for g in groups:
            cols = g.slots if g.slots is not None else g.classes if g.classes.dim() == 1 else None
            if cols is not None and bool(torch.isin(cols, cls).any()):
                g.step = math.lcm(g.step, step)
    for ids, why in width_blocks:
        cls = channels.classes(ids)
        for g in groups:
            if g.prunable and bool(torch.isin(g.classes, cls).any()):
                _constrain_blocks(g, cls, why)
    return {g.name: g for g in groups}


def _units(cls: torch.Tensor):
    """(classes per head, unit_channels, unit_sizes) of a site's q/k or v classes (heads, width):
    channels a rotary embedding pairs (i with i + d/2, or 2i with 2i + 1) are one class, a unit
    of ``unit_channels``; partial rotary mixes pairs and singles (``unit_sizes`` per head)."""
    pairs = [unique_ordered(row) for row in cls]
    if len({p.numel() for p in pairs}) != 1:
        return cls, 1, None
    sizes = torch.stack([(row.unsqueeze(0) == p.unsqueeze(1)).sum(1) for row, p in zip(cls, pairs)])
    if bool((sizes == sizes[0, 0]).all()):
        return torch.stack(pairs), int(sizes[0, 0]), None
    if all(torch.equal(r.sort().values, sizes[0].sort().values) for r in sizes):
        return torch.stack(pairs), 1, sizes  # partial rotary: pairs and singles
    return torch.stack(pairs), 1, None


def _constrain_blocks(g: Group, cls: torch.Tensor, why: str) -> None:
    """Keep the same count of ``g``'s channels in each row of ``cls`` (blocks x classes): heads must
    lie whole in blocks (and stay, as no block may go empty); a 1-d group plans per block (``blocks``)
    unless each of its channels is in every block already (coupled across them: equal for free)."""
    nb = cls.shape[0]
    inside = torch.stack([torch.isin(g.classes, row) for row in cls])  # (blocks, *g.classes.shape)
    if g.classes.dim() == 2:
        per_head = inside.any(-1)  # (blocks, heads)
        if bool((per_head.sum(0) > 1).any()) or not bool((inside.any(-1, keepdim=True) <= inside).all()):
            g.prunable, g.reason = False, f"{why} splits its heads"
        else:
            g.keep_heads = f"{why} keeps every group"
        return
    counts = inside.sum(0)
    if bool((counts == nb).all()):
        return
    block = inside.float().argmax(0)
    if not bool((counts == 1).all()) or not bool((torch.bincount(block, minlength=nb) == g.width // nb).all()) or \
            (g.blocks is not None and not torch.equal(g.blocks, block)):
        g.prunable, g.reason = False, f"{why} holds its channels unevenly"
        return
    g.blocks, g.step = block, math.lcm(g.step, nb)
