"""Rewrite: emit a new, physically smaller GraphModule for a keep mask.

Every parameter and buffer is sliced on its pruned dims (parameter dims carry
unit ids from the analysis); every literal size tied to a pruned dim is
recomputed from the node's labels; a fused qkv reshape that cannot stay
regular is split into per-slot parts; scaled_dot_product_attention keeps the
original scale.  The input GraphModule and its modules are never modified.
"""
from __future__ import annotations

import copy
import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from . import labels as L
from . import ops
from .analysis import Analysis
from .errors import RewriteError
from .labels import Irregular, kept_sequence, pruned_sizes


class _Rewriter:
    def __init__(self, analysis: Analysis, keep: torch.Tensor):
        self.a = analysis
        self.gm = analysis.gm
        self.keep = keep  # keep[id] for every unit id
        self.modules = dict(self.gm.named_modules())
        self.graph = fx.Graph()
        self.graph._codegen = copy.deepcopy(self.gm.graph._codegen)  # keeps pytree in/out (torch.export)
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, object] = {}
        self.skip: set[fx.Node] = set()
        self.fused: set[fx.Node] = set()  # fused-qkv reshapes replaced by per-slot parts
        self.ragged: dict[str, int | None] = {}  # node -> its ragged channel dim (see ragged_of)

    # ---- sizes ---------------------------------------------------------------
    def new_sizes(self, lab: torch.Tensor, shape, dims=None, ragged=None) -> list[int]:
        return pruned_sizes(lab, shape, self.keep, dims, ragged)

    def ragged_of(self, node: fx.Node):
        """The channel dim of ``node``'s tensor that keeps per-slice choices: the innermost, as a
        reshape splitting heads leaves it, carried along by permutes and elementwise ops (NesT
        moves it outwards).  Which dim it is cannot be read off the keep pattern alone."""
        if node.name in self.ragged:
            return self.ragged[node.name]
        lab, shape = self.a.labels.get(node.name), self.a.shapes.get(node.name)
        r = None
        if isinstance(lab, torch.Tensor) and isinstance(shape, tuple) and L.varying_dims(lab):
            r = len(shape) - lab.dim() + L.varying_dims(lab)[-1]
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            key = ops.op_key(node, self.modules) if node.op.startswith("call_") else None
            src_shape = self.a.shapes.get(src.name) if src is not None else None
            if key is not None and isinstance(src_shape, tuple) and len(L.varying_dims(lab)) > 1:
                rs = self.ragged_of(src)
                if rs is not None and key == "permute":
                    r = _perm_args(node).index(rs) if len(src_shape) == len(shape) else r
                elif rs is not None and key == "transpose":
                    a, b = [x % len(shape) for x in node.args[1:3]]
                    r = b if rs == a else a if rs == b else rs
                elif rs is not None and len(src_shape) == len(shape) and (
                        key in ("contiguous", "clone") or ops.kind_of(key) in ("unary", "binary", "like")):
                    r = rs
        self.ragged[node.name] = r
        return r

    def check_layout(self, node: fx.Node):
        """Every tensor must keep a regular layout: whole slices on all channel dims but one, which
        may keep different indices per slice (the same count).  Where that dim is not the innermost
        (NesT), flattening reorders channels: ``restore_order`` gathers them back."""
        lab, shape = self.a.labels.get(node.name), self.a.shapes.get(node.name)
        for lab_i, shape_i in zip(*((lab, shape) if isinstance(lab, (list, tuple)) else ((lab,), (shape,)))):
            if isinstance(lab_i, torch.Tensor) and isinstance(shape_i, tuple) and len(L.varying_dims(lab_i)) > 1:
                self.new_sizes(lab_i, shape_i, ragged=self.ragged_of(node) if lab_i is lab else None)

    def sizes_of(self, node: fx.Node):
        return self.new_sizes(self.a.labels[node.name], self.a.shapes[node.name], ragged=self.ragged_of(node))

    # ---- parameters ----------------------------------------------------------
    def slice_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        out = t.detach()
        for d, m in enumerate(self.a.dim_masks(name, t.shape, self.keep)):
            if not bool(m.all()):
                out = out.index_select(d, m.nonzero().flatten().to(out.device))
        out = out.clone()
        if isinstance(t, nn.Parameter):
            return nn.Parameter(out, requires_grad=t.requires_grad)
        return out

    def prune_module(self, target: str, node: fx.Node) -> nn.Module:
        mod = copy.deepcopy(self.modules[target])
        for pname, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, self.slice_tensor(f"{target}.{pname}", p))
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod._buffers[bname] = self.slice_tensor(f"{target}.{bname}", b)
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = w.shape
        elif isinstance(mod, nn.LayerNorm):
            n_in = self.sizes_of(node.args[0])[-1]
            mod.normalized_shape = (n_in,)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            mod.out_channels = w.shape[0]
            mod.in_channels = w.shape[0] if depthwise else w.shape[1] * mod.groups
            if depthwise:
                mod.groups = w.shape[0]
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)):  # weight (in, out / groups, k...)
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            mod.in_channels = w.shape[0]
            mod.out_channels = w.shape[0] if depthwise else w.shape[1] * mod.groups
            if depthwise:
                mod.groups = w.shape[0]
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.num_features = mod.running_mean.shape[0] if mod.running_mean is not None else w.shape[0]
        elif isinstance(mod, nn.GroupNorm):
            mod.num_channels = w.shape[0] if w is not None else self.sizes_of(node.args[0])[1]
        elif isinstance(mod, nn.Embedding):
            mod.embedding_dim = w.shape[1]
        return mod

    # ---- graph ---------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], lambda n: self.env[n]))
                continue
            new = self.graph.node_copy(node, lambda n: self.env[n])
            self.env[node] = new
            try:
                self.fix(node, new)
                if node not in self.skip and node not in self.fused:
                    self.check_layout(node)
            except Irregular as e:
                raise RewriteError(f"cannot rewrite node `{node.name}` ({node.format_node()}): {e}",
                                   node=node.name) from None
        gm = fx.GraphModule(self.attrs, self.graph, class_name=self.gm.__class__.__name__)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        gm.meta = dict(getattr(self.gm, "meta", {}))
        return gm

    def fix(self, node: fx.Node, new: fx.Node):
        if node.op == "get_attr":
            t = _get_attr(self.gm, node.target)
            self.attrs[node.target] = self.slice_tensor(node.target, t) if isinstance(t, torch.Tensor) else t
            return
        if node.op == "call_module":
            self.attrs[node.target] = self.prune_module(node.target, node)
            return
        if node.op not in ("call_function", "call_method"):
            return
        key = ops.op_key(node, self.modules)
        lab = self.a.labels.get(node.name)
        if node.name in self.a.gathered:
            self.gather_operands(node, new)
        if key in ("reshape", "view", "_unsafe_view", "flatten"):
            if key != "flatten":
                self.fix_sizes(node, new, key)
            if node not in self.fused:
                self.restore_order(node, new)
        elif key in ops.SIZE_ARGS:
            self.fix_sizes(node, new, key)
        elif key == "layer_norm":
            n_in = self.sizes_of(node.args[0])
            k = len(node.args[1]) if len(node.args) > 1 else len(node.kwargs["normalized_shape"])
            _set_arg(new, 1, "normalized_shape", tuple(n_in[-k:]))
        elif key in ("split", "split_with_sizes", "chunk") and isinstance(lab, (list, tuple)):
            self.fix_split(node, new, key)
        elif key in ("index_select", "gather"):
            x = node.args[0]
            lab, shape = self.a.labels[x.name], self.a.shapes[x.name]
            d = node.args[1] % len(shape)
            if d in L.varying_dims(lab) and self.count_kept(lab, shape, d, 0, shape[d]) != shape[d]:
                if key != "index_select" or not self.remap_index(node, lab, d):
                    raise Irregular(f"`{key}` along a pruned dim")
        elif key == "narrow":
            self.fix_narrow(node, new)
        elif key in ("slice", "select") and isinstance(self.a.labels.get(getattr(node.args[0], "name", None)),
                                                         torch.Tensor):
            self.fix_slice_select(node, new, key)
        elif key == "index":
            x = node.args[0]
            lab, shape = self.a.labels[x.name], self.a.shapes[x.name]
            for d, ix in enumerate(node.args[1]):
                if ix is not None and d in L.varying_dims(lab) and \
                        self.count_kept(lab, shape, d, 0, shape[d]) != shape[d]:
                    raise Irregular("advanced indexing along a pruned dim")
        elif key == "getitem" and isinstance(self.a.labels.get(getattr(node.args[0], "name", None)), torch.Tensor):
            self.fix_getitem(node, new)
        elif key == "scaled_dot_product_attention":
            self.fix_sdpa(node, new)
        elif key in ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "convolution"):
            pos = 8 if key == "convolution" else 6
            groups = node.args[pos] if len(node.args) > pos else node.kwargs.get("groups", 1)
            if groups != 1 and groups == self.a.shapes[node.name][1]:  # depthwise: one group per kept channel
                _set_arg(new, pos, "groups", self.sizes_of(node)[1])

    def gather_operands(self, node, new):
        """Cut buffer-derived operands (rotary cos/sin tables) to this op's kept positions.

        The operand is expanded over the output's channel dims (heads keep different
        indices), those dims are flattened and index_select-ed in row-major order, which
        is the order the pruned output keeps them in.
        """
        lab, shape = self.a.labels[node.name], list(self.a.shapes[node.name])
        rank = len(shape)
        sizes = self.sizes_of(node)
        if sizes == shape:
            return
        lab = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
        chan = [d for d in range(rank) if lab.shape[d] > 1]
        kept = torch.where(lab >= 0, self.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
        flat_idx = kept.reshape([lab.shape[d] for d in chan]).flatten().nonzero().flatten()
        rest = [d for d in range(rank) if d not in chan]
        perm = rest + chan
        inverse = [perm.index(d) for d in range(rank)]
        g = self.graph
        for i, name in enumerate(self.a.gathered[node.name]):
            src = next(a for a in node.all_input_nodes if a.name == name)
            op_shape = list(self.a.shapes[name])
            if all(op_shape[d - rank + len(op_shape)] == 1 for d in range(rank)
                   if sizes[d] != shape[d] and d - rank + len(op_shape) >= 0):
                continue  # broadcast along every pruned dim: fits as it is
            attr = f"_snp_gather_{node.name}_{i}"
            self.attrs[attr] = flat_idx.clone()
            with g.inserting_before(new):
                t = self.env[src]
                if len(op_shape) < rank:
                    t = g.call_function(operator.getitem, (t, (None,) * (rank - len(op_shape)) + (Ellipsis,)))
                t = g.call_method("expand", (t, *[shape[d] if d in chan else -1 for d in range(rank)]))
                t = g.call_method("permute", (t, *perm))
                t = g.call_method("flatten", (t, len(rest)))
                t = g.call_function(torch.index_select, (t, -1, g.get_attr(attr)))
                t = g.call_method("unflatten", (t, -1, tuple(sizes[d] for d in chan)))
                t = g.call_method("permute", (t, *inverse))
            old = self.env[src]
            new.args = fx.node.map_arg(new.args, lambda n, old=old, t=t: t if n is old else n)
            new.kwargs = fx.node.map_arg(new.kwargs, lambda n, old=old, t=t: t if n is old else n)

    # reshape / view / expand / unflatten ---------------------------------------
    def fix_sizes(self, node, new, key):
        lab = self.a.labels[node.name]
        shape = self.a.shapes[node.name]
        if not isinstance(lab, torch.Tensor) or not L.varying_dims(lab):
            return
        try:
            sizes = self.new_sizes(lab, shape)
        except Irregular:
            if key in ("reshape", "view", "unflatten") and self.split_fused(node, new, key):
                return
            raise
        if key == "unflatten":
            dim = node.args[1] % (len(shape) - len(node.args[2]) + 1)  # a dim of the input
            orig, mapped = list(node.args[2]), list(new.args[2])
            out_dims = range(dim, dim + len(orig))
            new_list = [self.size_arg(new, m, o, sizes[d], shape[d], lab.shape[d] > 1)
                        for m, o, d in zip(mapped, orig, out_dims)]
            new.args = (new.args[0], node.args[1], tuple(new_list))
            return
        orig, setter = _size_list(node)
        if len(orig) == 1 and isinstance(orig[0], fx.Node) and len(shape) != 1:
            # reshape(y, x.shape): right as it is when x keeps the sizes y gets
            base = _shape_source(orig[0])
            if base is not None and isinstance(self.a.labels.get(base.name), torch.Tensor) \
                    and self.sizes_of(base) == sizes:
                return
            raise Irregular(f"{key} to the shape of another tensor that is pruned differently")
        if len(orig) != len(shape):
            raise Irregular(f"{key} with {len(orig)} sizes for a {len(shape)}-d result")
        mapped, _ = _size_list(new)
        new_list = [self.size_arg(new, m, o, sizes[d], shape[d], lab.shape[d] > 1)
                    for d, (m, o) in enumerate(zip(mapped, orig))]
        setter(new, new_list)

    def remap_index(self, node, lab, d) -> bool:
        """index_select along a pruned dim with a stored index (the gather ``restore_order``
        left in a model pruned before): keep the kept outputs, renumbered in the pruned input."""
        idx_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
        if not (isinstance(idx_node, fx.Node) and idx_node.op == "get_attr") or len(L.varying_dims(lab)) != 1:
            return False
        index = _get_attr(self.gm, idx_node.target)
        ids = lab.reshape(-1)
        kept_in = self.keep[ids.clamp(min=0)] | (ids < 0)
        rank = torch.cumsum(kept_in.long(), 0) - 1  # position of each kept input in the pruned input
        kept_out = kept_in[index]
        self.attrs[idx_node.target] = rank[index[kept_out]].to(index.dtype)
        return True

    def restore_order(self, node, new):
        """Flattening channel dims whose pruned order is not the original one (NesT's heads
        inside the head dim) gathers the result back into the order every consumer's
        weights are sliced in."""
        x = node.args[0]
        lab_in, lab_out = self.a.labels.get(getattr(x, "name", None)), self.a.labels.get(node.name)
        if not (isinstance(lab_in, torch.Tensor) and isinstance(lab_out, torch.Tensor)) or \
                len(L.varying_dims(lab_in)) < 2:
            return
        shape_in = self.a.shapes[x.name]
        ragged = self.ragged_of(x)
        if ragged == len(shape_in) - lab_in.dim() + L.varying_dims(lab_in)[-1]:
            return  # the head dim innermost: kept channels stay in their original order
        var_out = L.varying_dims(lab_out)
        if len(var_out) != 1:
            raise Irregular("channels reordered by pruning are reshaped into several channel dims")
        seq = kept_sequence(lab_in, shape_in, self.keep, ragged)
        out = lab_out.reshape(-1)
        canon = out[self.keep[out.clamp(min=0)] | (out < 0)]
        if torch.equal(seq, canon):
            return
        if seq.numel() != canon.numel() or torch.unique(seq).numel() != seq.numel() or \
                not torch.equal(torch.sort(seq).values, torch.sort(canon).values):
            raise Irregular("channels reordered by pruning cannot be put back in order")
        order = torch.argsort(seq)
        name, i = f"snp_order_{node.name}", 0
        while name in self.attrs or hasattr(self.gm, name):  # a model pruned before has its own
            name, i = f"snp_order_{node.name}_{i}", i + 1
        self.attrs[name] = order[torch.searchsorted(seq[order], canon)]
        index = self.graph.get_attr(name)
        self.env[node] = self.graph.call_function(torch.index_select, (new, var_out[0] - lab_out.dim(), index))

    def size_arg(self, new, arg, orig, new_size, old_size, varying):
        """The size for one output dim: ``arg`` in the new graph, ``orig`` in the analysed one."""
        if isinstance(orig, fx.Node):
            if self.a.taint.get(orig.name) is not None:
                # read from a channel dim: at run time it gives that dim's pruned
                # width, which need not be this dim's; the literal is exact
                return new_size
        if not varying or new_size == old_size:
            return arg
        if isinstance(arg, int):
            return -1 if arg == -1 else new_size
        if isinstance(arg, fx.Node):
            with self.graph.inserting_before(new):  # scale a dynamic size (e.g. batch * heads)
                m = self.graph.call_function(operator.mul, (arg, new_size))
                return self.graph.call_function(operator.floordiv, (m, old_size))
        raise Irregular(f"size argument {arg!r} on a pruned dim")

    def split_fused(self, node, new, key) -> bool:
        """Fused qkv whose slots keep different widths: split before the reshape / unflatten.

        Follows the slot dim through permute / transpose / (un)squeeze / contiguous up to
        where the slots are taken apart (unbind, or one select / [i] per slot) and rebuilds
        that chain once per slot.
        """
        lab = self.a.labels[node.name]
        shape = list(self.a.shapes[node.name])
        var = L.varying_dims(lab)
        slot = var[0]
        src = node.args[0]
        src_lab = self.a.labels[src.name]
        if len(L.varying_dims(src_lab)) != 1 or len(var) < 2:
            return False
        src_dim = L.varying_dims(src_lab)[0] - src_lab.dim()  # the channel dim, from the end
        chain, cur, pos, rank = [], node, slot, len(shape)
        while True:
            users = list(cur.users)
            takes = [self._slot_index(u, pos, rank) for u in users]
            if users and all(t is not None for t in takes):
                break  # one select / [i] per slot
            if len(users) != 1:
                return False
            (user,) = users
            ukey = ops.op_key(user, self.modules)
            if ukey == "unbind" and (user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)) % rank == pos:
                takes = []
                for g in user.users:
                    if ops.op_key(g, self.modules) != "getitem":
                        raise Irregular("unbind of a fused qkv used other than by indexing")
                    takes.append(g.args[1])
                users = list(user.users)
                self.skip.add(user)
                break
            moved = _track_dim(ukey, user, pos, rank)
            if moved is None and ukey in ("reshape", "view"):  # a reshape that leaves the slot dim alone
                before, after = self.a.shapes[cur.name], self.a.shapes[user.name]
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
            sz = self.new_sizes(sub, shape[:slot] + [1] + shape[slot + 1:], dims=var[1:])
            part_shapes.append(sz)
            part_sizes.append(math.prod(sz[d] for d in var[1:]))
        self.graph.erase_node(new)
        x = self.env[src]
        split = self.graph.call_function(torch.split, (x, part_sizes, src_dim))
        if key == "unflatten":
            dim = node.args[1] % len(self.a.shapes[src.name])  # a dim of the input
            n_out = len(node.args[2])
        else:
            orig_sizes, _ = _size_list(node)
            mapped = [fx.node.map_arg(a, lambda n: self.env[n]) for a in orig_sizes]
        outs = []
        for i in range(n_slots):
            part = self.graph.call_function(operator.getitem, (split, i))
            if key == "unflatten":
                cur_new = self.graph.call_method("unflatten", (part, dim, tuple(
                    part_shapes[i][d] for d in range(dim, dim + n_out))))
            else:
                sizes = [part_shapes[i][d] if d in var else mapped[d] for d in range(len(shape))]
                cur_new = self.graph.call_method("reshape", (part, *sizes))
            for c in chain:
                rest = fx.node.map_arg((c.args[1:], dict(c.kwargs)), self.early)
                cur_new = self.graph.create_node(c.op, c.target, (cur_new, *rest[0]), rest[1])
                if ops.op_key(c, self.modules) in ("reshape", "view"):
                    self.slot_sizes(c, cur_new, pos, i)
            outs.append(self.graph.call_method("squeeze", (cur_new, pos)))
        self.env[node] = split
        self.fused.add(node)
        self.skip.update(chain)
        for user, i in zip(users, takes):
            self.env[user] = outs[i]
            self.skip.add(user)
        return True

    def early(self, n: fx.Node) -> fx.Node:
        """``n`` in the new graph, copied ahead of its turn if it is size arithmetic
        (``B * heads``) that a rebuilt chain needs before the graph reaches it."""
        if n in self.env:
            return self.env[n]
        if n.op not in ("call_function", "call_method") or self.a.shapes.get(n.name) is not None:
            raise Irregular(f"fused qkv chain needs `{n.name}` before it is computed")
        self.env[n] = self.graph.node_copy(n, self.early)
        self.skip.add(n)
        return self.env[n]

    def slot_sizes(self, node, new, pos, i):
        """Sizes of a reshape in a fused-qkv chain, rebuilt for slot ``i`` alone."""
        lab = self.a.labels[node.name].narrow(pos, i, 1) if self.a.labels[node.name].shape[pos] > 1 \
            else self.a.labels[node.name]
        shape = list(self.a.shapes[node.name])
        shape[pos] = 1
        sizes = self.new_sizes(lab, shape)
        orig, setter = _size_list(node)
        if len(orig) != len(shape):
            raise Irregular(f"reshape with {len(orig)} sizes for a {len(shape)}-d result")
        mapped = [fx.node.map_arg(a, self.early) for a in orig]
        old = self.a.shapes[node.name]
        setter(new, [1 if d == pos else self.size_arg(new, m, o, sizes[d], old[d], lab.shape[d] > 1)
                     for d, (m, o) in enumerate(zip(mapped, orig))])

    def _slot_index(self, user, pos, rank):
        """i if ``user`` takes slot i of dim ``pos`` (select(pos, i) or x[i] at pos 0), else None."""
        ukey = ops.op_key(user, self.modules)
        if ukey == "select" and user.args[1] % rank == pos and isinstance(user.args[2], int):
            return user.args[2]
        if ukey == "getitem" and pos == 0 and isinstance(user.args[1], int):
            return user.args[1]
        return None

    # split / narrow / getitem ----------------------------------------------------
    def fix_split(self, node, new, key):
        outs = self.a.labels[node.name]
        out_shapes = self.a.shapes[node.name]
        x = node.args[0]
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(self.a.shapes[x.name])
        if dim not in L.varying_dims(self.a.labels[x.name]):
            return
        sizes = [self.new_sizes(lab, shp, dims=[d for d in range(len(shp)) if lab.shape[d] > 1] or [dim])[dim]
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

    def count_kept(self, lab, shape, dim, start, stop) -> int:
        sub = lab.narrow(dim, start, stop - start)
        shp = list(shape)
        shp[dim] = stop - start
        dims = [d for d in range(len(shp)) if lab.shape[d] > 1]
        return self.new_sizes(sub, shp, dims=dims)[dim] if stop > start else 0

    def strided_slice(self, lab, shape, dim, start, stop, step) -> slice:
        """The slice of the pruned dim that selects what ``start:stop:step`` kept (x[..., 1::2] of
        interleaved rotary pairs): the same arithmetic progression in every row, or Irregular."""
        lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
        var = [d for d in range(len(shape)) if lab.shape[d] > 1]
        kept = torch.where(lab >= 0, self.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
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

    def fix_narrow(self, node, new):
        x = node.args[0]
        lab, shape = self.a.labels[x.name], self.a.shapes[x.name]
        dim, start, length = node.args[1] % len(shape), node.args[2], node.args[3]
        if dim not in L.varying_dims(lab):
            return
        s = self.count_kept(lab, shape, dim, 0, start)
        n = self.count_kept(lab, shape, dim, start, start + length)
        new.args = (new.args[0], node.args[1], s, n)

    def fix_slice_select(self, node, new, key):
        """ATen slice(x, dim, start, end, step) and select(x, dim, index) on a pruned dim."""
        x = node.args[0]
        lab, shape = self.a.labels[x.name], self.a.shapes[x.name]
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
        if dim not in L.varying_dims(lab):
            return
        if key == "select":
            i = node.args[2] % shape[dim]
            if self.count_kept(lab, shape, dim, i, i + 1) == 0:
                raise Irregular("selects a removed channel")
            new.args = (new.args[0], node.args[1], self.count_kept(lab, shape, dim, 0, i))
            return
        args = list(node.args) + [None] * (5 - len(node.args))
        start, end, step = args[2], args[3], args[4]
        if any(isinstance(v, fx.Node) for v in (start, end, step)):
            raise Irregular("a dynamic slice of a pruned dim")
        if step not in (None, 1):
            sl = self.strided_slice(lab, shape, dim, *slice(start, end, step).indices(shape[dim]))
            new.args = (new.args[0], node.args[1], sl.start, sl.stop, sl.step)
            return
        start, end, _ = slice(start, end).indices(shape[dim])
        s0 = self.count_kept(lab, shape, dim, 0, start)
        new.args = (new.args[0], node.args[1], s0, s0 + self.count_kept(lab, shape, dim, start, end))

    def fix_getitem(self, node, new):
        x = node.args[0]
        lab, shape = self.a.labels[x.name], self.a.shapes[x.name]
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
            is_tensor = isinstance(it, fx.Node) and isinstance(self.a.shapes.get(it.name), tuple)
            if d in var and (isinstance(it, fx.Node) and not is_tensor or isinstance(it, slice) and any(
                    isinstance(b, fx.Node) for b in (it.start, it.stop, it.step))):
                raise Irregular("dynamic index into a pruned dim")
            if d in var and is_tensor:
                if self.count_kept(lab, shape, d, 0, shape[d]) != shape[d]:
                    raise Irregular("gathers with an index tensor along a pruned dim")
                out.append(it)
            elif d in var and isinstance(it, slice) and it.step not in (None, 1):
                out.append(self.strided_slice(lab, shape, d, *it.indices(shape[d])))
            elif d in var and isinstance(it, slice):
                start, stop, _ = it.indices(shape[d])
                s = self.count_kept(lab, shape, d, 0, start)
                out.append(slice(s, s + self.count_kept(lab, shape, d, start, stop)))
            elif d in var and isinstance(it, int):
                i = it % shape[d]
                if self.count_kept(lab, shape, d, i, i + 1) == 0:
                    raise Irregular("indexes a removed channel")
                out.append(self.count_kept(lab, shape, d, 0, i))
            else:
                out.append(it)
            d += 1
        new_idx = fx.node.map_arg(tuple(out), lambda n: self.env[n])
        new.args = (new.args[0], new_idx if isinstance(node.args[1], tuple) else new_idx[0])

    def fix_sdpa(self, node, new):
        q = node.args[0] if node.args else node.kwargs["query"]
        old_e = self.a.shapes[q.name][-1]
        new_e = self.sizes_of(q)[-1]
        if new_e == old_e:
            return
        if len(node.args) > 6 or node.kwargs.get("scale") is not None:
            return  # an explicit scale stays as it is
        kw = dict(new.kwargs)
        kw["scale"] = old_e ** -0.5
        new.kwargs = kw


def _get_attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_arg(node, pos, name, value):
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        kw = dict(node.kwargs)
        kw[name] = value
        node.kwargs = kw


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
        return _perm_args(node).index(pos), rank
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


def _perm_args(node):
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return list(node.args[1:]) or list(node.kwargs.get("dims", ()))


def rewrite(analysis: Analysis, keep: torch.Tensor) -> fx.GraphModule:
    return _Rewriter(analysis, keep).run()
