"""Indexing: getitem / select / slice / narrow / split / chunk / unbind / index_select / index.

Followed on the labels like any movement (movement.Move); the rewrite renumbers positions
on a pruned dim in the kept channels (slice bounds, split sections, strided slices of
interleaved rotary pairs), renumbers a stored index_select index, and refuses a gather
along a pruned dim.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import labels as L
from ..labels import Irregular
from .elementwise import gather_operands
from .movement import Move
from .registry import register


class Index(Move):
    """getitem / select / slice / narrow / split / chunk / index_select / index: positions on a
    pruned dim are renumbered in the kept channels; a gather along one is refused.  A gather's
    index without channels (DeBERTa's relative positions, expanded over batch x heads) is cut to
    the kept slices of the other dims, like a constant operand of an elementwise op."""

    def propagate(self, p, n, key, args, kwargs, result):
        out = super().propagate(p, n, key, args, kwargs, result)
        index = n.args[2] if len(n.args) > 2 else n.kwargs.get("index")
        lab = p.lab(index) if isinstance(index, fx.Node) else None
        if key == "gather" and isinstance(lab, torch.Tensor) and not L.varying_dims(lab):  # the rewrite leaves it whole
            p.gathered[n.name] = [index.name]
        return out

    def rewrite(self, r, node, new, key):
        src = r.a.labels.get(getattr(node.args[0], "name", None)) if node.args else None
        if key in ("split", "split_with_sizes", "chunk") and isinstance(r.a.labels.get(node.name), (list, tuple)):
            fix_split(r, node, new, key)
        elif key in ("index_select", "gather"):
            x = node.args[0]
            lab, shape = r.a.labels[x.name], r.a.shapes[x.name]
            d = node.args[1] % len(shape)
            if d in L.varying_dims(lab) and count_kept(r, lab, shape, d, 0, shape[d]) != shape[d]:
                if key != "index_select" or not remap_index(r, node, lab, d):
                    raise Irregular(f"`{key}` along a pruned dim")
            if node.name in r.a.gathered:
                gather_operands(r, node, new)
        elif key == "narrow":
            fix_narrow(r, node, new)
        elif key in ("slice", "select") and isinstance(src, torch.Tensor):
            fix_slice_select(r, node, new, key)
        elif key == "index":
            x = node.args[0]
            lab, shape = r.a.labels[x.name], r.a.shapes[x.name]
            for d, ix in enumerate(node.args[1]):
                if ix is not None and d in L.varying_dims(lab) and \
                        count_kept(r, lab, shape, d, 0, shape[d]) != shape[d]:
                    raise Irregular("advanced indexing along a pruned dim")
        elif key == "getitem" and isinstance(src, torch.Tensor):
            fix_getitem(r, node, new)


def remap_index(r, node, lab, d) -> bool:
    """index_select along a pruned dim with a stored index (the gather ``restore_order``
    left in a model pruned before): keep the kept outputs, renumbered in the pruned input."""
    idx_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
    if not (isinstance(idx_node, fx.Node) and idx_node.op == "get_attr") or len(L.varying_dims(lab)) != 1:
        return False
    index = operator.attrgetter(idx_node.target)(r.gm)
    ids = lab.reshape(-1)
    kept_in = r.keep[ids.clamp(min=0)] | (ids < 0)
    rank = torch.cumsum(kept_in.long(), 0) - 1  # position of each kept input in the pruned input
    kept_out = kept_in[index]
    r.attrs[idx_node.target] = rank[index[kept_out]].to(index.dtype)
    return True


def fix_split(r, node, new, key):
    outs = r.a.labels[node.name]
    out_shapes = r.a.shapes[node.name]
    x = node.args[0]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(r.a.shapes[x.name])
    if dim not in L.varying_dims(r.a.labels[x.name]):
        return
    sizes = [r.new_sizes(lab, shp, dims=[d for d in range(len(shp)) if lab.shape[d] > 1] or [dim])[dim]
             for lab, shp in zip(outs, out_shapes)]
    if key == "chunk":
        if len(set(sizes)) != 1:  # q, k, v chunks of different widths: split by sizes instead
            new.op, new.target = "call_function", torch.split
            new.args, new.kwargs = (new.args[0], sizes, dim), {}
        return
    if isinstance(node.target, torch._ops.OpOverload):  # aten.split takes one int: use split_with_sizes
        new.target = torch.ops.aten.split_with_sizes.default
        new.args = (new.args[0], sizes, dim)
        new.kwargs = {}
        return
    _set_arg(new, 1, "split_size_or_sections" if node.op == "call_function" else "split_size", sizes)


def count_kept(r, lab, shape, dim, start, stop) -> int:
    sub = lab.narrow(dim, start, stop - start)
    shp = list(shape)
    shp[dim] = stop - start
    dims = [d for d in range(len(shp)) if lab.shape[d] > 1]
    return r.new_sizes(sub, shp, dims=dims)[dim] if stop > start else 0


def strided_slice(r, lab, shape, dim, start, stop, step) -> slice:
    """The slice of the pruned dim that selects what ``start:stop:step`` kept (x[..., 1::2] of
    interleaved rotary pairs): the same arithmetic progression in every row, or Irregular."""
    lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
    var = [d for d in range(len(shape)) if lab.shape[d] > 1]
    kept = torch.where(lab >= 0, r.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
    kept = L.expand(kept, tuple(shape[d] if d in var else 1 for d in range(len(shape)))).movedim(dim, -1)
    rows = kept.reshape(-1, shape[dim])
    if dim != var[-1]:  # an outer dim keeps whole slices: a position exists if any of it is kept
        rows = rows.any(0, keepdim=True)
    picks = set()
    for row in rows:
        if bool(row.any()):
            new_pos = torch.cumsum(row.long(), 0) - 1
            picks.add(tuple(int(new_pos[i]) for i in range(start, stop, step) if row[i]))
    if len(picks) != 1:
        raise Irregular("a strided slice keeps different positions per slice")
    (p,) = picks
    st = p[1] - p[0] if len(p) > 1 else 1
    if not p or list(p) != list(range(p[0], p[-1] + 1, st)):
        raise Irregular("a strided slice of a pruned dim is not regular after pruning")
    return slice(p[0], p[-1] + 1, st)


def fix_narrow(r, node, new):
    x = node.args[0]
    lab, shape = r.a.labels[x.name], r.a.shapes[x.name]
    dim, start, length = node.args[1] % len(shape), node.args[2], node.args[3]
    if dim not in L.varying_dims(lab):
        return
    s = count_kept(r, lab, shape, dim, 0, start)
    n = count_kept(r, lab, shape, dim, start, start + length)
    new.args = (new.args[0], node.args[1], s, n)


def fix_slice_select(r, node, new, key):
    """ATen slice(x, dim, start, end, step) and select(x, dim, index) on a pruned dim."""
    x = node.args[0]
    lab, shape = r.a.labels[x.name], r.a.shapes[x.name]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    if dim not in L.varying_dims(lab):
        return
    if key == "select":
        i = node.args[2] % shape[dim]
        if count_kept(r, lab, shape, dim, i, i + 1) == 0:
            raise Irregular("selects a removed channel")
        new.args = (new.args[0], node.args[1], count_kept(r, lab, shape, dim, 0, i))
        return
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2], args[3], args[4]
    if any(isinstance(v, fx.Node) for v in (start, end, step)):
        raise Irregular("a dynamic slice of a pruned dim")
    if step not in (None, 1):
        sl = strided_slice(r, lab, shape, dim, *slice(start, end, step).indices(shape[dim]))
        new.args = (new.args[0], node.args[1], sl.start, sl.stop, sl.step)
        return
    start, end, _ = slice(start, end).indices(shape[dim])
    s0 = count_kept(r, lab, shape, dim, 0, start)
    new.args = (new.args[0], node.args[1], s0, s0 + count_kept(r, lab, shape, dim, start, end))


def fix_getitem(r, node, new):
    x = node.args[0]
    lab, shape = r.a.labels[x.name], r.a.shapes[x.name]
    var = L.varying_dims(lab)
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not var:
        return
    out, d = [], 0
    n_real = sum(1 for it in idx if it is not None and it is not Ellipsis)
    for it in idx:
        if it is Ellipsis:
            out.append(it)
            d = len(shape) - (n_real - sum(1 for j in out if j is not None and j is not Ellipsis))
            continue
        if it is None:
            out.append(it)
            continue
        is_tensor = isinstance(it, fx.Node) and isinstance(r.a.shapes.get(it.name), tuple)
        if d in var and (isinstance(it, fx.Node) and not is_tensor or isinstance(it, slice) and any(
                isinstance(b, fx.Node) for b in (it.start, it.stop, it.step))):
            raise Irregular("dynamic index into a pruned dim")
        if d in var and is_tensor:
            if count_kept(r, lab, shape, d, 0, shape[d]) != shape[d]:
                raise Irregular("gathers with an index tensor along a pruned dim")
            out.append(it)
        elif d in var and isinstance(it, slice) and it.step not in (None, 1):
            out.append(strided_slice(r, lab, shape, d, *it.indices(shape[d])))
        elif d in var and isinstance(it, slice):
            start, stop, _ = it.indices(shape[d])
            s = count_kept(r, lab, shape, d, 0, start)
            out.append(slice(s, s + count_kept(r, lab, shape, d, start, stop)))
        elif d in var and isinstance(it, int):
            i = it % shape[d]
            if count_kept(r, lab, shape, d, i, i + 1) == 0:
                raise Irregular("indexes a removed channel")
            out.append(count_kept(r, lab, shape, d, 0, i))
        else:
            out.append(it)
        d += 1
    new_idx = fx.node.map_arg(tuple(out), lambda n: r.env[n])
    new.args = (new.args[0], new_idx if isinstance(node.args[1], tuple) else new_idx[0])


def _set_arg(node, pos, name, value):
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


register(Index(), names=["getitem", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "slice",
                         "index_select", "gather", "index"])
