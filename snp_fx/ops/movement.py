"""Data movement: reshape / view / permute / cat / ... — executed on the
label tensors themselves, so the tricky ones (``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
.unbind(0)``) are followed exactly; python functions that only move data (probed); padding.

The rewrite recomputes every literal size tied to a pruned dim from the labels (reshape sizes),
splits a fused qkv whose slots keep different widths, and gathers channels back into order
where pruning reordered them (NesT).  Indexing ops: indexing.py.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
import torch.fx as fx

from .. import labels as L
from ..labels import NONE, Irregular, kept_sequence
from .registry import OpFamily, family_of, op_key, register


class Move(OpFamily):
    """Pure data movement, run on the labels."""
    kind = "move"

    def propagate(self, p, n, key, args, kwargs, result):
        data_args = list(args)
        labs = [p.lab(a) for a in n.args]
        if key in ("cat", "concat", "concatenate", "stack"):
            seq = args[0]
            seq_labs = labs[0]
            data_args[0] = [L.expand(lb, t.shape) for lb, t in zip(seq_labs, seq)]
        elif key == "getitem" and isinstance(args[0], (list, tuple)):
            return labs[0][args[1]]
        elif key == "one_hot" and isinstance(labs[0], torch.Tensor):  # a new last dim: each element's labels
            return labs[0].unsqueeze(-1)
        elif isinstance(args[0], torch.Tensor):
            lab0 = labs[0]
            # a constant's channels (a rotary table: repeat_interleave(freqs, 2)) may be moved at will:
            # where it meets channels the rewrite gathers it whole (elementwise.gather_operands)
            if not indexing_ok(n, key, args, kwargs, lab0) and not p.space.is_soft(lab0):
                return p.refuse(n, f"{n.name}: `{key}` gathers along a channel dim", result)
            data_args[0] = L.expand(lab0, args[0].shape)
        else:
            return p.full(NONE, result)
        if key in ("view", "_unsafe_view") and not isinstance(data_args[1], torch.dtype):
            fn = lambda: data_args[0].reshape(*data_args[1:], **kwargs)  # noqa: E731 - labels need not be contiguous
        elif n.op == "call_method":
            fn = lambda: getattr(data_args[0], n.target)(*data_args[1:], **kwargs)  # noqa: E731
        elif n.op == "call_module":
            fn = lambda: p.modules[n.target](data_args[0])  # noqa: E731
        else:
            fn = lambda: n.target(*data_args, **kwargs)  # noqa: E731
        return p.on_labels(n, key, fn, result)


class Reshape(Move):
    """reshape / view / expand / unflatten: literal sizes on pruned dims are recomputed."""
    sizes_ok = True

    def rewrite(self, r, node, new, key):
        if new.target is torch.ops.aten.view.default:
            # torch.export drops a .contiguous() that was a no-op when traced; the pruned graph's
            # kernels (padded attention, gathers) may lay their outputs out otherwise
            new.target = torch.ops.aten.reshape.default
        if key != "flatten":
            fix_sizes(r, node, new, key)
        if key in ("reshape", "view", "_unsafe_view", "flatten") and node not in r.fused:
            restore_order(r, node, new)


class Flatten(Reshape):
    sizes_ok = False  # its arguments are dims, not sizes


class Wrapped(Move):
    """A python function that only moves data (found by probing, see ``moves_data_only``)."""
    kind = "wrapped"

    def propagate(self, p, n, key, args, kwargs, result):
        data_args = [L.expand(p.lab(a), x.shape) if isinstance(x, torch.Tensor) else x
                     for a, x in zip(n.args, args)]
        return p.on_labels(n, key, lambda: n.target(*data_args, **kwargs), result)


class Pad(OpFamily):
    """Padding, only along dims without channels."""
    kind = "pad"

    def propagate(self, p, n, key, args, kwargs, result):
        lab = p.lab(n.args[0])
        pad = args[1]
        for i in range(0, len(pad), 2):
            d = lab.dim() - 1 - i // 2
            if (pad[i] or pad[i + 1]) and d in L.varying_dims(lab):
                return p.refuse(n, f"{n.name}: padding a channel dim", result)
        return lab


def indexing_ok(n, key, args, kwargs, lab) -> bool:
    """False if the op gathers or reorders along a channel dim (roll, flip, repeat_interleave, a reversed slice)."""
    var = set(L.varying_dims(lab))
    if key == "getitem":
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        d = 0
        for it in idx:
            if it is Ellipsis:
                d = lab.dim() - sum(1 for j in idx[idx.index(Ellipsis) + 1:] if j is not None)
                continue
            if it is None:
                continue
            if isinstance(it, slice) and d in var and it.step is not None and it.step < 1:
                return False
            d += 1
        return True
    if key in ("roll", "flip", "repeat", "tile", "repeat_interleave"):
        if key == "flip":  # flip(x, dims) or x.flip(*dims)
            dims = kwargs.get("dims", list(args[1:]) if len(args) > 2 else args[1] if len(args) > 1 else None)
        else:  # roll(x, shifts, dims)
            dims = kwargs.get("dims", args[2] if key == "roll" and len(args) > 2 else None)
        if key in ("repeat", "tile"):
            # tiles whole copies: run on the labels it is exact, and its counts are no sizes
            # (DeBERTa repeats per-head position keys over the merged batch x heads dim)
            return True
        if key == "repeat_interleave":  # along a dim without channels (tokens, MoE's top-k copies) it is exact
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
            rank = args[0].dim() if isinstance(args[0], torch.Tensor) else lab.dim()
            return not var if dim is None else dim % rank - (rank - lab.dim()) not in var
        if dims is None:
            return not var
        dims = [dims] if isinstance(dims, int) else dims
        return not any(d % lab.dim() in var for d in dims)
    return True


def moves_data_only(fn, args, kwargs) -> bool:
    """A wrapped python function (timm's window_reverse, ...) that only moves data.

    Probed by running it on tensors of random distinct values: every output
    value must be an input value, and the same must hold again for another coding.
    """
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or \
            getattr(fn, "__module__", "") in ("torch", "torch.functional", "torch.nn.functional") or \
            not callable(fn) or not hasattr(fn, "__code__"):
        return False
    from torch.utils._pytree import tree_flatten
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    if not tensors or kwargs and any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return False
    total = sum(args[i].numel() for i in tensors)
    others = []
    g = torch.Generator().manual_seed(0)
    for coding in (torch.rand(total, generator=g, dtype=torch.float64) + 1 for _ in range(2)):  # sums never collide
        probe, start = list(args), 0
        for i in tensors:  # every tensor argument gets its own distinct values
            probe[i] = coding[start:start + args[i].numel()].reshape(args[i].shape).clone()  # may be written to
            start += args[i].numel()
        try:
            out = fn(*probe, **kwargs)
        except Exception:  # noqa: BLE001
            return False
        leaves, _ = tree_flatten(out)
        outs = [t for t in leaves if isinstance(t, torch.Tensor)]
        if not outs or not all(bool(torch.isin(t, coding).all()) for t in outs):
            return False
        others.append([x for x in leaves if not isinstance(x, torch.Tensor)])
    return others[0] == others[1]  # what is not a tensor (sizes) must not depend on the values


WRAPPED = Wrapped()
register(Move(), names=[
    "permute", "transpose", "t", "numpy_T", "T", "mT", "squeeze", "unsqueeze", "contiguous", "expand_as", "view_as", "reshape_as",
    "cat", "concat", "concatenate", "stack", "roll", "flip", "repeat", "repeat_interleave", "movedim",
    "swapaxes", "swapdims", "clone", "alias", "tile", "move", "one_hot"], modules=[torch.nn.Flatten, torch.nn.Unflatten])
register(Reshape(), names=["reshape", "view", "_unsafe_view", "expand", "broadcast_to", "unflatten"])
register(Flatten(), names=["flatten"])
register(Pad(), names=["pad", "constant_pad_nd"])


# ---------------------------------------------------------------------------
# Rewrite helpers (``r``: the rewriter, snp_fx/rewrite.py)
# ---------------------------------------------------------------------------

def fix_sizes(r, node, new, key):
    lab = r.a.labels[node.name]
    shape = r.a.shapes[node.name]
    if not isinstance(lab, torch.Tensor) or not L.varying_dims(lab):
        return
    try:
        sizes = r.new_sizes(lab, shape)
    except Irregular:
        if key in ("reshape", "view", "_unsafe_view", "unflatten") and (
                split_fused(r, node, new, key) or gather_takes(r, node, new)):
            return
        raise
    if key == "unflatten":
        dim = node.args[1] % (len(shape) - len(node.args[2]) + 1)  # a dim of the input
        orig, mapped = list(node.args[2]), list(new.args[2])
        out_dims = range(dim, dim + len(orig))
        new_list = [size_arg(r, new, m, o, sizes[d], shape[d], lab.shape[d] > 1)
                    for m, o, d in zip(mapped, orig, out_dims)]
        new.args = (new.args[0], node.args[1], tuple(new_list))
        return
    orig, setter = _size_list(node)
    if len(orig) == 1 and isinstance(orig[0], fx.Node) and len(shape) != 1:
        # reshape(y, x.shape): right as it is when x keeps the sizes y gets
        base = _shape_source(orig[0])
        if base is not None and isinstance(r.a.labels.get(base.name), torch.Tensor) \
                and r.sizes_of(base) == sizes:
            return
        raise Irregular(f"{key} to the shape of another tensor that is pruned differently")
    if len(orig) != len(shape):
        raise Irregular(f"{key} with {len(orig)} sizes for a {len(shape)}-d result")
    mapped, _ = _size_list(new)
    new_list = [size_arg(r, new, m, o, sizes[d], shape[d], lab.shape[d] > 1)
                for d, (m, o) in enumerate(zip(mapped, orig))]
    setter(new, new_list)


def restore_order(r, node, new):
    """Flattening channel dims whose pruned order is not the original one (NesT's heads
    inside the head dim) gathers the result back into the order every consumer's
    weights are sliced in."""
    x = node.args[0]
    lab_in, lab_out = r.a.labels.get(getattr(x, "name", None)), r.a.labels.get(node.name)
    if not (isinstance(lab_in, torch.Tensor) and isinstance(lab_out, torch.Tensor)) or \
            len(L.varying_dims(lab_in)) < 2:
        return
    shape_in = r.a.shapes[x.name]
    ragged = r.ragged_of(x)
    if ragged == len(shape_in) - lab_in.dim() + L.varying_dims(lab_in)[-1]:
        return  # the head dim innermost: kept channels stay in their original order
    var_out = L.varying_dims(lab_out)
    if len(var_out) != 1:
        raise Irregular("channels reordered by pruning are reshaped into several channel dims")
    seq = kept_sequence(lab_in, shape_in, r.keep, ragged)
    out = lab_out.reshape(-1)
    canon = out[r.keep[out.clamp(min=0)] | (out < 0)]
    if torch.equal(seq, canon):
        return
    if seq.numel() != canon.numel() or torch.unique(seq).numel() != seq.numel() or \
            not torch.equal(torch.sort(seq).values, torch.sort(canon).values):
        raise Irregular("channels reordered by pruning cannot be put back in order")
    order = torch.argsort(seq)
    name, i = f"snp_order_{node.name}", 0
    while name in r.attrs or hasattr(r.gm, name):  # a model pruned before has its own
        name, i = f"snp_order_{node.name}_{i}", i + 1
    r.attrs[name] = order[torch.searchsorted(seq[order], canon)]
    index = r.graph.get_attr(name)
    r.env[node] = r.graph.call_function(torch.index_select, (new, var_out[0] - lab_out.dim(), index))


def size_arg(r, new, arg, orig, new_size, old_size, varying):
    """The size for one output dim: ``arg`` in the new graph, ``orig`` in the analysed one."""
    if isinstance(orig, fx.Node):
        if r.a.taint.get(orig.name) is not None:
            # read from a channel dim: at run time it gives that dim's pruned
            # width, which need not be this dim's; the literal is exact
            return new_size
    if not varying or new_size == old_size:
        return arg
    if isinstance(arg, int):
        return -1 if arg == -1 else new_size
    if isinstance(arg, fx.Node):
        with r.graph.inserting_before(new):  # scale a dynamic size (e.g. batch * heads)
            m = r.graph.call_function(operator.mul, (arg, new_size))
            return r.graph.call_function(operator.floordiv, (m, old_size))
    raise Irregular(f"size argument {arg!r} on a pruned dim")


def split_fused(r, node, new, key) -> bool:
    """Fused qkv whose slots keep different widths: split before the reshape / unflatten.

    Follows the slot dim through permute / transpose / (un)squeeze / contiguous up to
    where the slots are taken apart (unbind, or one select / [i] per slot) and rebuilds
    that chain once per slot.
    """
    lab = r.a.labels[node.name]
    shape = list(r.a.shapes[node.name])
    var = L.varying_dims(lab)
    slot = var[0]
    src = node.args[0]
    src_lab = r.a.labels[src.name]
    if len(L.varying_dims(src_lab)) != 1 or len(var) < 2:
        return False
    src_dim = L.varying_dims(src_lab)[0] - src_lab.dim()  # the channel dim, from the end
    chain, cur, pos, rank = [], node, slot, len(shape)
    while True:
        users = list(cur.users)
        takes = [_slot_index(r, u, pos, rank) for u in users]
        if users and all(t is not None for t in takes):
            break  # one select / [i] per slot
        if len(users) != 1:
            return False
        (user,) = users
        ukey = op_key(user, r.modules)
        if ukey == "unbind" and (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) % rank == pos:
            takes = []
            for g in user.users:
                if op_key(g, r.modules) != "getitem":
                    raise Irregular("unbind of a fused qkv used other than by indexing")
                takes.append(g.args[1])
            users = list(user.users)
            r.skip.add(user)
            break
        moved = _track_dim(ukey, user, pos, rank)
        if moved is None and ukey in ("reshape", "view"):  # a reshape that leaves the slot dim alone
            before, after = r.a.shapes[cur.name], r.a.shapes[user.name]
            moved = (pos, len(after)) if tuple(before[:pos + 1]) == tuple(after[:pos + 1]) else None
        if moved is None:
            return False
        pos, rank = moved
        chain.append(user)
        cur = user
    n_slots = shape[slot]
    part_sizes, part_shapes = [], []
    for i in range(n_slots):
        sub = lab.narrow(slot, i, 1)
        sz = r.new_sizes(sub, shape[:slot] + [1] + shape[slot + 1:], dims=var[1:])
        part_shapes.append(sz)
        part_sizes.append(math.prod(sz[d] for d in var[1:]))
    r.graph.erase_node(new)
    x = r.env[src]
    split = r.graph.call_function(torch.split, (x, part_sizes, src_dim))
    if key == "unflatten":
        dim = node.args[1] % len(r.a.shapes[src.name])  # a dim of the input
        n_out = len(node.args[2])
    else:
        orig_sizes, _ = _size_list(node)
        mapped = [fx.node.map_arg(a, lambda n: r.env[n]) for a in orig_sizes]
    outs = []
    for i in range(n_slots):
        part = r.graph.call_function(operator.getitem, (split, i))
        if key == "unflatten":
            cur_new = r.graph.call_method("unflatten", (part, dim, tuple(
                part_shapes[i][d] for d in range(dim, dim + n_out))))
        else:
            sizes = [part_shapes[i][d] if d in var else mapped[d] for d in range(len(shape))]
            cur_new = r.graph.call_method("reshape", (part, *sizes))
        for c in chain:
            rest = fx.node.map_arg((c.args[1:], dict(c.kwargs)), functools.partial(early, r))
            cur_new = r.graph.create_node(c.op, c.target, (cur_new, *rest[0]), rest[1])
            if op_key(c, r.modules) in ("reshape", "view"):
                slot_sizes(r, c, cur_new, pos, i)
        outs.append(r.graph.call_method("squeeze", (cur_new, pos)))
    r.env[node] = split
    r.fused.add(node)
    r.skip.update(chain)
    for user, i in zip(users, takes):
        r.env[user] = outs[i]
        r.skip.add(user)
    return True


def gather_takes(r, node, new) -> bool:
    """A reshape whose pruned result cannot exist (a fused qkv laid out (heads, 3, head_dim): q/k
    and v rows interleave per head and keep different widths) of a source with channels on its
    last dim only: every regular tensor taken from it (select / slice / index / unbind ...,
    through any movement) is gathered from the pruned source instead, its kept channels in its
    own order (index_select, or a slice where contiguous), then unflattened to its pruned shape.
    The positions are found by replaying the original ops on a probe of channel positions."""
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return False
    src_lab, src_shape = r.a.labels.get(src.name), r.a.shapes.get(src.name)
    if not isinstance(src_lab, torch.Tensor) or not isinstance(src_shape, tuple) or \
            L.varying_dims(src_lab) != [src_lab.dim() - 1]:
        return False
    k = len(src_shape) - 1  # leading dims (batch, tokens) that every take keeps as they are
    region, takes, todo = [node], [], [node]
    while todo:
        for u in list(todo.pop().users):
            if u in region or u in takes:
                continue
            if not isinstance(r.a.labels.get(u.name), (torch.Tensor, list, tuple)) or \
                    not isinstance(family_of(u, r.modules)[1], Move):
                return False
            if isinstance(r.a.labels[u.name], torch.Tensor) and _regular(r, u):
                if tuple(r.a.shapes[u.name][:k]) != tuple(src_shape[:k]) or \
                        r.ragged_of(u) not in (None, len(r.a.shapes[u.name]) - 1 - _inner_pad(r.a.labels[u.name])):
                    return False  # the leading dims moved, or the pruned layout is not row-major
                takes.append(u)
            else:
                region.append(u)
                todo.append(u)
    probe = {src: torch.arange(src_shape[-1]).expand(src_shape).contiguous()}
    try:
        for n in sorted(region + takes, key=_order(r)):
            probe[n] = _replay(r, n, probe)
    except Exception:  # noqa: BLE001 - an op the probe cannot replay: not this form
        return False
    lab = src_lab.reshape(-1)
    kept_src = r.keep[lab.clamp(min=0)] | (lab < 0)
    rank = torch.cumsum(kept_src.long(), 0) - 1  # position of each kept channel in the pruned source
    parts = []
    for t in takes:
        pos, shape, t_lab = probe[t], list(r.a.shapes[t.name]), r.a.labels[t.name]
        first = pos[(0,) * k]
        t_lab = L.expand(t_lab.reshape((1,) * (len(shape) - t_lab.dim()) + tuple(t_lab.shape)), shape)[(0,) * k]
        sel = first[r.keep[t_lab.clamp(min=0)] | (t_lab < 0)]  # row-major: the pruned tensor's own order
        if not bool((pos == first).all()) or not bool(kept_src[sel].all()):
            return False  # the leading dims are moved, or a kept entry reads a removed channel
        parts.append((t, rank[sel], r.new_sizes(r.a.labels[t.name], shape)[k:]))
    r.graph.erase_node(new)
    for t, idx, sizes in parts:
        x = r.env[src]
        if idx.numel() and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + idx.numel())):
            if idx.numel() != int(kept_src.sum()):
                x = r.graph.call_method("narrow", (x, -1, int(idx[0]), idx.numel()))
        else:
            name, i = f"snp_take_{t.name}", 0
            while name in r.attrs or hasattr(r.gm, name):  # a model pruned before has its own
                name, i = f"snp_take_{t.name}_{i}", i + 1
            r.attrs[name] = idx
            x = r.graph.call_function(torch.index_select, (x, -1, r.graph.get_attr(name)))
        r.env[t] = r.graph.call_method("unflatten", (x, -1, tuple(sizes))) if len(sizes) != 1 else x
    r.fused.add(node)
    r.skip.update(region[1:] + takes)
    return True


def _inner_pad(lab) -> int:
    """How many dims after a label tensor's innermost varying one (0 when it varies on its last)."""
    var = L.varying_dims(lab)
    return lab.dim() - 1 - var[-1] if var else 0


def _regular(r, n) -> bool:
    try:
        r.new_sizes(r.a.labels[n.name], r.a.shapes[n.name])
        return True
    except Irregular:
        return False


def _order(r):
    pos = {n: i for i, n in enumerate(r.gm.graph.nodes)}
    return lambda n: pos[n]


def _replay(r, n, probe):
    """``n`` run on probe values: reshapes to the shape it had, the rest as they are, with any
    other tensor argument (an index) computed from constants."""
    key = op_key(n, r.modules)
    x = probe[n.args[0]]
    if key in ("reshape", "view", "_unsafe_view", "unflatten", "flatten"):
        return x.reshape(r.a.shapes[n.name])
    if key in ("expand", "broadcast_to"):
        return x.expand(r.a.shapes[n.name])
    args, kwargs = fx.node.map_arg((n.args[1:], n.kwargs), lambda a: probe[a] if a in probe else _constant(r, a))
    if n.op == "call_method":
        return getattr(x, n.target)(*args, **kwargs)
    return n.target(x, *args, **kwargs)


def _constant(r, n):
    """The value of a node computed from parameters and literals only (an index tensor)."""
    if n.op == "get_attr":
        return operator.attrgetter(n.target)(r.gm)
    if n.op != "call_function":
        raise Irregular(f"`{n.name}` is not a constant")
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: _constant(r, a))
    return n.target(*args, **kwargs)


def early(r, n: fx.Node) -> fx.Node:
    """``n`` in the new graph, copied ahead of its turn if it is size arithmetic
    (``B * heads``) that a rebuilt chain needs before the graph reaches it."""
    if n in r.env:
        return r.env[n]
    if n.op not in ("call_function", "call_method") or r.a.shapes.get(n.name) is not None:
        raise Irregular(f"fused qkv chain needs `{n.name}` before it is computed")
    r.env[n] = r.graph.node_copy(n, functools.partial(early, r))
    r.skip.add(n)
    return r.env[n]


def slot_sizes(r, node, new, pos, i):
    """Sizes of a reshape in a fused-qkv chain, rebuilt for slot ``i`` alone."""
    lab = r.a.labels[node.name].narrow(pos, i, 1) if r.a.labels[node.name].shape[pos] > 1 \
        else r.a.labels[node.name]
    shape = list(r.a.shapes[node.name])
    shape[pos] = 1
    sizes = r.new_sizes(lab, shape)
    orig, setter = _size_list(node)
    if len(orig) != len(shape):
        raise Irregular(f"reshape with {len(orig)} sizes for a {len(shape)}-d result")
    mapped = [fx.node.map_arg(a, functools.partial(early, r)) for a in orig]
    old = r.a.shapes[node.name]
    setter(new, [1 if d == pos else size_arg(r, new, m, o, sizes[d], old[d], lab.shape[d] > 1)
                 for d, (m, o) in enumerate(zip(mapped, orig))])


def _slot_index(r, user, pos, rank):
    """i if ``user`` takes slot i of dim ``pos`` (select(pos, i) or x[i] at pos 0), else None."""
    ukey = op_key(user, r.modules)
    if ukey == "select" and user.args[1] % rank == pos and isinstance(user.args[2], int):
        return user.args[2]
    if ukey == "getitem" and pos == 0 and isinstance(user.args[1], int):
        return user.args[1]
    return None


def _size_list(node):
    """(sizes, setter) for reshape/view/expand called with varargs, a list, or size=."""
    if "size" in node.kwargs or "shape" in node.kwargs:
        k = "size" if "size" in node.kwargs else "shape"

        def set_kw(n, v):
            kw = dict(n.kwargs)
            kw[k] = tuple(v)
            n.kwargs = kw
        return list(node.kwargs[k]), set_kw
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1]), lambda n, v: setattr(n, "args", (n.args[0], type(node.args[1])(v)))
    return list(node.args[1:]), lambda n, v: setattr(n, "args", (n.args[0], *v))


def _shape_source(node: fx.Node):
    """x for a node computing x.shape or x.size(), else None."""
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return node.args[0]
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def _track_dim(key, node, pos, rank):
    """Where dim ``pos`` of a rank-``rank`` tensor goes through a layout op: (pos, rank) or None."""
    if key == "permute":
        return perm_args(node).index(pos), rank
    if key == "transpose":
        a, b = [x % rank for x in node.args[1:3]]
        return (b if pos == a else a if pos == b else pos), rank
    if key == "unsqueeze":
        d = node.args[1] % (rank + 1)
        return (pos + 1 if d <= pos else pos), rank + 1
    if key == "squeeze" and len(node.args) > 1 and isinstance(node.args[1], int):
        d = node.args[1] % rank
        return (None if d == pos else (pos - 1 if d < pos else pos), rank - 1) if d != pos else None
    if key in ("contiguous", "clone"):
        return pos, rank
    return None


def perm_args(node):
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return list(node.args[1:]) or list(node.kwargs.get("dims", ()))
