"""Analysis: run the traced graph once and propagate channel labels.

The result (``Analysis``) holds, for every node, its real shape and its
reduced label tensor, the coupled classes of units (union-find), the
attention sites found and the prunable groups, with the reason for every
group that is not prunable.
"""
from __future__ import annotations

import dataclasses
import re

import networkx as nx
import torch
import torch.fx as fx

from . import labels as L
from . import ops
from .errors import RewriteError
from .labels import FROZEN, NONE

# get_attr tensors up to this size get one unit id per element
ELEMENT_ID_LIMIT = 1 << 18


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

    @property
    def heads(self) -> int:
        return self.classes.shape[0] if self.classes.dim() == 2 else 1

    @property
    def width(self) -> int:
        return self.classes.shape[-1]


def _shape(v):
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _map_struct(v, fn):
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        return (list if isinstance(v, list) else tuple)(_map_struct(x, fn) for x in v)
    return fn(v)


class _Propagator(fx.Interpreter):
    """Executes the graph on real inputs and, alongside, on channel labels."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.space = L.UnitSpace()
        self.modules = dict(gm.named_modules())
        self.labels: dict[str, object] = {}
        self.shapes: dict[str, object] = {}
        self.taint: dict[str, object] = {}
        self.param_ids: dict[str, list[torch.Tensor]] = {}
        self.elem_ids: dict[str, torch.Tensor] = {}
        self.producers: list[tuple[str, torch.Tensor]] = []
        self.producer_dim: dict[str, int] = {}  # which weight dim makes the channels (0 but embeddings)
        self.sites: list[Site] = []
        self.dep_site: dict[int, Site] = {}
        self.unknown: dict[str, str] = {}
        self.gathered: dict[str, list[str]] = {}  # elementwise node -> operands the rewrite gathers
        self.tables: list[tuple[int, int]] = []  # id ranges of small parameters (one unit per element)
        self.summed: list[torch.Tensor] = []  # channels two computed tensors are added on (a residual stream)

    # ---- helpers -------------------------------------------------------------
    def pids(self, name: str, t: torch.Tensor, soft: bool = False) -> list[torch.Tensor]:
        """Unit ids along every dim of a parameter or buffer (allocated once)."""
        if name not in self.param_ids:
            self.param_ids[name] = [self.space.new(s, soft) for s in t.shape]
        return self.param_ids[name]

    def lab(self, a):
        if isinstance(a, fx.Node):
            return self.labels.get(a.name)
        if isinstance(a, (list, tuple)):
            return [self.lab(x) for x in a]
        return None

    def tainted(self, a) -> list[torch.Tensor]:
        out = []
        if isinstance(a, fx.Node):
            t = self.taint.get(a.name)
            if isinstance(t, torch.Tensor):
                out.append(t)
            elif isinstance(t, (list, tuple)):
                out += [x for x in t if isinstance(x, torch.Tensor)]
        elif isinstance(a, (list, tuple)):
            for x in a:
                out += self.tainted(x)
        elif isinstance(a, dict):
            for x in a.values():
                out += self.tainted(x)
        return out

    def freeze_all(self, node, reason):
        for a in list(node.args) + list(node.kwargs.values()):
            for lab in _flat_labels(self.lab(a)):
                self.space.freeze(lab, reason)
            for t in self.tainted(a):
                self.space.freeze(t, reason)

    def frozen_output(self, result, reason, soft=False):
        """Labels for the result of an op we do not follow: one fresh, frozen unit
        (``soft`` for tensor factories: a constant, gathered where it meets channels)."""
        def one(r):
            if not isinstance(r, torch.Tensor):
                return None
            u = self.space.new(1, soft)
            self.space.freeze(u, reason)
            return u.reshape((1,) * r.dim()) if r.dim() else u.reshape(())
        return _map_struct(result, one)

    def full(self, value, result):
        return _map_struct(result, lambda r: L.constant(value, r.dim()) if isinstance(r, torch.Tensor) else None)

    # ---- interpreter hooks ---------------------------------------------------
    def run_node(self, n):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        if n.op == "output":
            for lab in _flat_labels(self.lab(n.args[0])):
                self.space.freeze(lab, "it feeds the model output")
            return result
        self.shapes[n.name] = _map_struct(result, _shape)
        lab = self.rule(n, args, kwargs, result)
        self.labels[n.name] = _map_struct(
            lab, lambda t: L.reduce(self.space.canon(t)) if isinstance(t, torch.Tensor) else t)
        return result

    def rule(self, n, args, kwargs, result):
        if n.op == "placeholder":
            return self.full(FROZEN, result)
        if n.op == "get_attr":
            if isinstance(result, torch.Tensor) and result.is_floating_point() and result.dim() > 0:
                soft = not isinstance(result, torch.nn.Parameter)  # a buffer or constant
                if result.numel() <= ELEMENT_ID_LIMIT:
                    # one unit per element: the couplings decide which dim gets sliced
                    if n.target not in self.elem_ids:
                        self.elem_ids[n.target] = self.space.new(result.numel(), soft).reshape(result.shape)
                        if not soft:
                            self.tables.append((int(self.elem_ids[n.target].min()), self.space.next_id))
                    return self.elem_ids[n.target]
                ids = self.pids(n.target, result, soft)
                d = max([d for d in range(result.dim()) if result.shape[d] > 1] or [result.dim() - 1])
                shape = [1] * result.dim()
                shape[d] = result.shape[d]
                return ids[d].reshape(shape)
            return self.full(NONE, result)
        key = ops.op_key(n, self.modules)
        kind = ops.kind_of(key)
        in_labs = [x for x in _flat_labels(self.lab(list(n.args) + list(n.kwargs.values())))]
        if not in_labs and kind not in ("linear", "embedding", "conv", "conv_transpose", "convolution", "layer_norm",
                                        "batch_norm", "group_norm", "addmm"):
            # pure python / shape arithmetic, or tensor factories
            if kind == "factory" and isinstance(result, torch.Tensor):
                return self.frozen_output(result, f"{n.name}: `{key}` makes a tensor of literal size", soft=True)
            if isinstance(result, torch.Tensor):
                return self.full(NONE, result)
            t = self.tainted(list(n.args) + list(n.kwargs.values()))
            if t:
                self.taint[n.name] = torch.cat([x.reshape(-1) for x in t])
            if key == "getitem" and isinstance(n.args[0], fx.Node) and isinstance(self.taint.get(n.args[0].name), list):
                idx = n.args[1]
                tl = self.taint[n.args[0].name]
                self.taint[n.name] = tl[idx] if isinstance(idx, int) and -len(tl) <= idx < len(tl) else None
            return None
        if key == "getattr":  # x.shape, x.dtype, ...
            if n.args[1] == "shape":
                self.taint[n.name] = self.dim_taint(n.args[0])
            return None
        if kind == "shape":
            t = self.dim_taint(n.args[0])
            if key == "size" and len(args) > 1:
                self.taint[n.name] = t[args[1]]
            elif key == "size":
                self.taint[n.name] = t
            elif key == "numel" and any(x is not None for x in t):
                self.freeze_all(n, f"{n.name}: numel() of a tensor with channels")
            return None
        # tainted channel counts used as values (not as sizes) pin those channels
        if key not in ops.SIZE_ARGS:
            for t in self.tainted(list(n.args) + list(n.kwargs.values())):
                self.space.freeze(t, f"{n.name}: a channel count is used as a value by `{key}`")
        fn = getattr(self, "rule_" + kind, None)
        if fn is None and n.op == "call_function" and _moves_data_only(n.target, args, kwargs):
            fn = self.rule_wrapped
        if fn is None:
            reason = f"{n.name}: op `{key}` is not in the op table"
            self.unknown[n.name] = reason
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        return fn(n, key, args, kwargs, result)

    def dim_taint(self, node_arg):
        lab = self.lab(node_arg)
        if not isinstance(lab, torch.Tensor):
            return None
        out = []
        for d in range(lab.dim()):
            if lab.shape[d] > 1:
                out.append(lab.movedim(d, 0).reshape(lab.shape[d], -1)[:, 0].clone())
            else:
                out.append(None)
        return out

    # ---- rules ---------------------------------------------------------------
    def rule_unary(self, n, key, args, kwargs, result):
        return _first_label(self.lab(n.args[0]) if n.args else None, result)

    rule_like = rule_unary

    def rule_ignore(self, n, key, args, kwargs, result):
        if kwargs.get("size") is not None or kwargs.get("stride") is not None:
            self.freeze_all(n, f"{n.name}: `{key}` asserts literal sizes")
        return None

    def rule_factory(self, n, key, args, kwargs, result):
        return self.frozen_output(result, f"{n.name}: `{key}` makes a tensor of literal size", soft=True)

    def rule_pool(self, n, key, args, kwargs, result):
        lab = self.lab(n.args[0])
        if any(d >= 2 for d in L.varying_dims(lab)):
            reason = f"{n.name}: pooling over a channel dim"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        return L.reduce(lab[..., :1, :1] if lab.dim() >= 4 else lab)

    def rule_binary(self, n, key, args, kwargs, result):
        real = [a for a in list(args) + list(kwargs.values())]
        labs = [self.lab(a) for a in list(n.args) + list(n.kwargs.values())]
        nodes = list(n.args) + list(n.kwargs.values())
        keep = [i for i, (lab, r) in enumerate(zip(labs, real))
                if isinstance(lab, torch.Tensor) and isinstance(r, torch.Tensor)]
        soft = [i for i in keep if self.space.is_soft(labs[i]) or bool((labs[i] < 0).all())]
        if soft and len(soft) < len(keep):
            # an operand of no parameter's channels (a rotary table shared by every head and
            # layer, a computed constant) is gathered per use by the rewrite, not coupled
            self.gathered[n.name] = [nodes[i].name for i in soft]
            keep = [i for i in keep if i not in soft]
        computed = [i for i in keep if nodes[i].op != "get_attr" and bool((labs[i] > 0).any())]
        if key.rstrip("_") in ("add", "iadd", "sub", "isub", "rsub") and \
                len({tuple(torch.unique(labs[i][labs[i] > 0]).tolist()) for i in computed}) > 1:
            # x + f(x), f's channels made apart (not gelu's x + c x^3): a residual stream, whatever its norm
            self.summed += [labs[i] for i in computed]
        return self.elementwise([(labs[i], real[i].shape) for i in keep], tuple(result.shape))

    def elementwise(self, pairs, out_shape):
        """Labels of an elementwise op over (labels, real shape) operands; couples what aligns.

        An operand broadcast (real size 1) along a dim where another's channels
        vary, and constant along all of them, is shared by those channels: it
        does not couple them (a mask over heads, a scalar gain).
        """
        rank = len(out_shape)
        fulls, bcast = [], []
        for lab, shape in pairs:
            f = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
            shape = (1,) * (rank - len(shape)) + tuple(shape)
            bcast.append({d for d in range(rank) if shape[d] == 1 and out_shape[d] > 1})
            fulls.append(L.reduce(f))
        # work at the size where some labels vary, not the real size (attention scores are big)
        work = torch.broadcast_shapes(*[f.shape for f in fulls])
        out = L.expand(fulls[0], work)
        out_b = bcast[0]
        for f, b in zip(fulls[1:], bcast[1:]):
            other = L.expand(f, work)
            var_out = set(L.varying_dims(L.reduce(out)))
            var_f = set(L.varying_dims(f))
            other_shared = bool(b & var_out) and not (var_f & var_out)
            out_shared = bool(out_b & var_f) and not (var_out & var_f)
            if other_shared or out_shared:  # a broadcast operand neither couples nor names channels
                out = other if out_shared else out
                out_b = b if out_shared else out_b
                continue
            self.space.union(out, other)
            out = torch.where(out >= 0, out, other)
            out_b = out_b & b
        return L.reduce(out)

    def rule_reduce(self, n, key, args, kwargs, result):
        lab = self.lab(n.args[0])
        x = args[0]
        first = 2 if key in ("norm", "linalg_vector_norm") else 1  # norm(x, p, dim, keepdim)
        dim = kwargs.get("dim", args[first] if len(args) > first and not isinstance(args[first], bool) else None)
        keepdim = kwargs.get("keepdim", args[first + 1] if len(args) > first + 1 and isinstance(args[first + 1], bool)
                             else False)
        dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        dims = [d % x.dim() for d in dims]
        var = L.varying_dims(lab)
        reduced_var = [d for d in dims if d in var]
        if reduced_var:
            if any(d not in dims for d in var):
                reason = f"{n.name}: `{key}` over some channel dims but not others"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
            if key not in ops.ZERO_NEUTRAL_REDUCE:
                self.space.mark_sensitive(lab, f"{n.name}: `{key}` over channels")
            out = L.constant(NONE, lab.dim())
        else:
            out = lab
        if not keepdim:
            for d in sorted(dims, reverse=True):
                out = out.squeeze(d) if out.dim() > d else out
        return _map_struct(result, lambda r: L.reduce(out.reshape((1,) * (r.dim() - out.dim()) + tuple(out.shape)))
                           if isinstance(r, torch.Tensor) and r.dim() >= out.dim() else None)

    def rule_softmax(self, n, key, args, kwargs, result):
        lab = self.lab(n.args[0])
        if n.op == "call_module":
            dim = self.modules[n.target].dim
        else:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if dim is None or (dim % lab.dim()) in L.varying_dims(lab):
            self.space.mark_sensitive(lab, f"{n.name}: softmax over channels")
        return lab

    def rule_pad(self, n, key, args, kwargs, result):
        lab = self.lab(n.args[0])
        pad = args[1]
        for i in range(0, len(pad), 2):
            d = lab.dim() - 1 - i // 2
            if (pad[i] or pad[i + 1]) and d in L.varying_dims(lab):
                reason = f"{n.name}: padding a channel dim"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
        return lab

    def rule_move(self, n, key, args, kwargs, result):
        data_args = list(args)
        labs = [self.lab(a) for a in n.args]
        if key in ("cat", "concat", "concatenate", "stack"):
            seq = args[0]
            seq_labs = labs[0]
            data_args[0] = [L.expand(lb, t.shape) for lb, t in zip(seq_labs, seq)]
        elif key == "getitem" and isinstance(args[0], (list, tuple)):
            return labs[0][args[1]]
        elif isinstance(args[0], torch.Tensor):
            lab0 = labs[0]
            if not self.indexing_ok(n, key, args, kwargs, lab0):
                reason = f"{n.name}: `{key}` gathers along a channel dim"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
            data_args[0] = L.expand(lab0, args[0].shape)
        else:
            return self.full(NONE, result)
        if key in ("view", "_unsafe_view") and not isinstance(data_args[1], torch.dtype):
            fn = lambda: data_args[0].reshape(*data_args[1:], **kwargs)  # noqa: E731 - labels need not be contiguous
        elif n.op == "call_method":
            fn = lambda: getattr(data_args[0], n.target)(*data_args[1:], **kwargs)  # noqa: E731
        elif n.op == "call_module":
            fn = lambda: self.modules[n.target](data_args[0])  # noqa: E731
        else:
            fn = lambda: n.target(*data_args, **kwargs)  # noqa: E731
        return self.on_labels(n, key, fn, result)

    def rule_wrapped(self, n, key, args, kwargs, result):
        """A python function that only moves data (probed): run it on the labels of every tensor."""
        data_args = [L.expand(self.lab(a), x.shape) if isinstance(x, torch.Tensor) else x
                     for a, x in zip(n.args, args)]
        return self.on_labels(n, key, lambda: n.target(*data_args, **kwargs), result)

    def on_labels(self, n, key, fn, result):
        """Labels of the result of ``fn`` (the op run on label tensors); frozen if it cannot run."""
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any failure means we do not understand it
            reason = f"{n.name}: `{key}` could not be followed on labels ({e})"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        return _map_struct(out, lambda t: L.reduce(t) if isinstance(t, torch.Tensor) else None)

    def indexing_ok(self, n, key, args, kwargs, lab):
        var = set(L.varying_dims(lab))
        if key == "getitem":
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            d = 0
            for it in idx:
                if it is Ellipsis:
                    d = lab.dim() - (len(idx) - 1 - idx.index(Ellipsis)) + 0
                    d = lab.dim() - sum(1 for j in idx[idx.index(Ellipsis) + 1:] if j is not None)
                    continue
                if it is None:
                    continue
                if isinstance(it, slice) and d in var and it.step is not None and it.step < 1:
                    return False
                d += 1
            return True
        if key in ("roll", "flip", "repeat", "tile", "repeat_interleave"):
            dims = kwargs.get("dims", args[2] if key == "roll" and len(args) > 2 else None)
            if key in ("repeat", "tile", "repeat_interleave"):
                return not var or key == "repeat" and all(
                    r == 1 for i, r in enumerate(args[1:]) if (i + lab.dim() - len(args[1:])) in var)
            if dims is None:
                return not var
            dims = [dims] if isinstance(dims, int) else dims
            return not any(d % lab.dim() in var for d in dims)
        return True

    def rule_linear(self, n, key, args, kwargs, result):
        if n.op == "call_module":
            mod = self.modules[n.target]
            w_name, w = n.target + ".weight", mod.weight
            b_name, b = (n.target + ".bias", mod.bias) if mod.bias is not None else (None, None)
        else:
            wn = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            bn = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if not (isinstance(wn, fx.Node) and wn.op == "get_attr"):
                reason = f"{n.name}: linear with a computed weight"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
            w_name, w = wn.target, args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
        x_lab = self.lab(n.args[0])
        out_ids, in_ids = self.pids(w_name, w)
        if any(d != x_lab.dim() - 1 for d in L.varying_dims(x_lab)):
            self.freeze_all(n, f"{n.name}: linear input carries channels outside its last dim")
            x_last = L.constant(FROZEN, 1)
        else:
            x_last = x_lab.reshape(-1)
        self.space.union(in_ids, x_last)
        if b is not None:
            if n.op == "call_module":
                self.space.union(self.pids(b_name, b)[0], out_ids)
            else:  # a bias node, a parameter or computed (BEiT's cat of q/k/v biases): align it
                self.space.union(L.expand(self.lab(bn), b.shape).reshape(-1), out_ids)
        self.producers.append((w_name, out_ids))
        return out_ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def rule_embedding(self, n, key, args, kwargs, result):
        if n.op == "call_module":
            w_name, w = n.target + ".weight", self.modules[n.target].weight
        else:
            w_pos = 0 if isinstance(n.target, torch._ops.OpOverload) else 1  # aten: (weight, indices)
            wn = n.args[w_pos]
            if not (isinstance(wn, fx.Node) and wn.op == "get_attr"):
                reason = f"{n.name}: embedding with a computed weight"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
            w_name, w = wn.target, args[w_pos]
        ids = self.pids(w_name, w)[1]
        self.producers.append((w_name, ids))
        self.producer_dim[w_name] = 1
        return ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def _affine(self, n, names_tensors, x_lab, axis):
        """Couple per-channel parameters with the input's channel axis."""
        along = L.expand(x_lab, x_lab.shape)
        axis_labels = along.movedim(axis, -1)
        for name, t in names_tensors:
            if t is None:
                continue
            ids = self.pids(name, t)[0] if name else None
            if ids is not None:
                self.space.union(axis_labels, ids)

    def rule_layer_norm(self, n, key, args, kwargs, result):
        x_lab = self.lab(n.args[0])
        if n.op == "call_module":
            mod = self.modules[n.target]
            shape, w, b = mod.normalized_shape, mod.weight, mod.bias
            wn, bn = n.target + ".weight", n.target + ".bias"
        else:
            shape = args[1]
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            b = args[3] if len(args) > 3 else kwargs.get("bias")
            wnode = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            bnode = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
            wn = wnode.target if isinstance(wnode, fx.Node) and wnode.op == "get_attr" else None
            bn = bnode.target if isinstance(bnode, fx.Node) and bnode.op == "get_attr" else None
            if (w is not None and wn is None) or (b is not None and bn is None):
                reason = f"{n.name}: layer_norm with computed affine parameters"
                self.freeze_all(n, reason)
                return self.frozen_output(result, reason)
        if len(shape) != 1:
            reason = f"{n.name}: layer_norm over {len(shape)} dims"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        self._affine(n, [(wn, w), (bn, b)], x_lab, x_lab.dim() - 1)
        if x_lab.dim() - 1 in L.varying_dims(x_lab):
            self.space.mark_sensitive(x_lab, f"{n.name}: layer_norm")
        return x_lab

    def rule_group_norm(self, n, key, args, kwargs, result):
        x_lab = self.lab(n.args[0])
        mod = self.modules.get(n.target) if n.op == "call_module" else None
        groups = mod.num_groups if mod is not None else args[1] if len(args) > 1 else kwargs.get("num_groups")
        if groups != 1 or any(d != 1 for d in L.varying_dims(x_lab)):
            reason = f"{n.name}: group_norm with {groups} groups"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        if mod is not None:
            pairs = [(n.target + ".weight", mod.weight), (n.target + ".bias", mod.bias)]
        else:  # F / aten group_norm(x, num_groups, weight, bias, eps, ...)
            pairs = []
            for i, k in ((2, "weight"), (3, "bias")):
                node = n.args[i] if len(n.args) > i else n.kwargs.get(k)
                if node is None:
                    continue
                if not (isinstance(node, fx.Node) and node.op == "get_attr"):
                    reason = f"{n.name}: group_norm with computed `{k}`"
                    self.freeze_all(n, reason)
                    return self.frozen_output(result, reason)
                pairs.append((node.target, args[i] if len(args) > i else kwargs[k]))
        self._affine(n, pairs, x_lab, 1)
        self.space.mark_sensitive(x_lab, f"{n.name}: group_norm")
        return x_lab

    def rule_batch_norm(self, n, key, args, kwargs, result):
        x_lab = self.lab(n.args[0])
        if any(d != 1 for d in L.varying_dims(x_lab)):
            reason = f"{n.name}: batch_norm input carries channels outside dim 1"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        if n.op == "call_module":
            mod = self.modules[n.target]
            pairs = [(f"{n.target}.{k}", getattr(mod, k)) for k in ("weight", "bias", "running_mean", "running_var")]
        else:
            # F.batch_norm(x, running_mean, running_var, weight, bias, ...); torch / aten batch_norm and
            # _native_batch_norm_legit_no_training(x, weight, bias, running_mean, running_var, ...)
            names = ["running_mean", "running_var", "weight", "bias"] if n.target is torch.nn.functional.batch_norm \
                else ["weight", "bias", "running_mean", "running_var"]
            pairs = []
            for i, k in enumerate(names, start=1):
                node = n.args[i] if len(n.args) > i else n.kwargs.get(k)
                if node is None:
                    continue
                if not (isinstance(node, fx.Node) and node.op == "get_attr"):
                    reason = f"{n.name}: batch_norm with computed `{k}`"
                    self.freeze_all(n, reason)
                    return self.frozen_output(result, reason)
                pairs.append((node.target, args[i] if len(args) > i else kwargs[k]))
        # per-channel statistics and affine: every channel on dim 1 stands alone
        self._affine(n, [(k, t) for k, t in pairs if isinstance(t, torch.Tensor)], x_lab, 1)
        if isinstance(result, (tuple, list)):  # the native form returns (out, save_mean, save_invstd)
            return (x_lab,) + tuple(L.constant(NONE, r.dim()) if isinstance(r, torch.Tensor) else None
                                    for r in result[1:])
        return x_lab

    def conv_params(self, n, key, args, kwargs):
        """(weight name, weight, bias name, bias, groups) of a conv module or of a functional /
        aten conv whose parameters are get_attr nodes; None if they are computed."""
        if n.op == "call_module":
            mod = self.modules[n.target]
            return n.target + ".weight", mod.weight, n.target + ".bias", mod.bias, mod.groups
        # F.conv2d / aten.conv2d(x, weight, bias, ..., groups), conv_transpose2d, aten.convolution
        wn = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        bn = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not (isinstance(wn, fx.Node) and wn.op == "get_attr") or (
                bn is not None and not (isinstance(bn, fx.Node) and bn.op == "get_attr")):
            return None
        b_name, b = (bn.target, args[2]) if bn is not None else (None, None)
        return wn.target, args[1], b_name, b, _conv_groups(key, args, kwargs)

    def rule_conv(self, n, key, args, kwargs, result):
        x_lab = self.lab(n.args[0])
        params = self.conv_params(n, key, args, kwargs)
        if params is None:
            reason = f"{n.name}: conv with computed parameters"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        w_name, w, b_name, b, groups = params
        depthwise = groups > 1 and groups == args[0].shape[1] == w.shape[0] and w.shape[1] == 1
        if groups != 1 and not depthwise and n.op != "call_module":
            reason = f"{n.name}: grouped functional conv ({groups} groups of {w.shape[1]} channels)"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        if any(d != 1 for d in L.varying_dims(x_lab)):
            reason = f"{n.name}: conv input carries channels outside dim 1"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        out_ids, in_ids = self.pids(w_name, w)[:2]
        x_ch = L.expand(x_lab, x_lab.shape).movedim(1, -1).reshape(-1, x_lab.shape[1])[0]
        if groups == 1:
            self.space.union(in_ids, x_ch)
        elif depthwise:  # channel i -> channel i (the rewrite sets groups to the kept count)
            self.space.union(out_ids, x_ch)
            self.space.freeze(in_ids, "depthwise kernel dim")
        else:  # a grouped module: its channels stay, it still makes them
            self.freeze_all(n, f"{n.name}: grouped conv")
            self.space.freeze(out_ids, f"{n.name}: grouped conv")
        if b is not None:
            self.space.union(self.pids(b_name, b)[0], out_ids)
        self.producers.append((w_name, out_ids))
        return out_ids.reshape((1, -1) + (1,) * (result.dim() - 2))

    def rule_convolution(self, n, key, args, kwargs, result):
        """Core ATen convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
        rule = self.rule_conv_transpose if args[6] else self.rule_conv
        return rule(n, key, args, kwargs, result)

    def rule_conv_transpose(self, n, key, args, kwargs, result):
        """ConvTranspose / conv_transpose{1,2}d: weight (in, out / groups, k...), dim 1 makes the channels."""
        x_lab = self.lab(n.args[0])
        params = self.conv_params(n, key, args, kwargs)
        if params is None:
            reason = f"{n.name}: conv_transpose with computed parameters"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        w_name, w, b_name, b, groups = params
        depthwise = groups > 1 and groups == args[0].shape[1] == w.shape[0] and w.shape[1] == 1
        if groups != 1 and not depthwise:
            reason = f"{n.name}: grouped conv_transpose ({groups} groups)"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        if any(d != 1 for d in L.varying_dims(x_lab)):
            reason = f"{n.name}: conv_transpose input carries channels outside dim 1"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        in_ids, out_ids = self.pids(w_name, w)[:2]
        x_ch = L.expand(x_lab, x_lab.shape).movedim(1, -1).reshape(-1, x_lab.shape[1])[0]
        self.space.union(in_ids, x_ch)
        if depthwise:  # channel i -> channel i: dim 0 names the channels, dim 1 (size 1) is the kernel's
            self.space.freeze(out_ids, "depthwise kernel dim")
            out_ids = in_ids
        else:
            self.producer_dim[w_name] = 1
        if b is not None:
            self.space.union(self.pids(b_name, b)[0], out_ids)
        self.producers.append((w_name, out_ids))
        return out_ids.reshape((1, -1) + (1,) * (result.dim() - 2))

    # ---- contractions ------------------------------------------------------------
    def contract(self, n, la, lb, out_rank):
        """Labels of A @ B for reduced labels A (..., I, K), B (..., K, J)."""
        r = max(la.dim(), lb.dim(), 2)
        la = la.reshape((1,) * (r - la.dim()) + tuple(la.shape))
        lb = lb.reshape((1,) * (r - lb.dim()) + tuple(lb.shape))
        a_vk, b_vk = la.shape[-1] > 1, lb.shape[-2] > 1
        table = self.table_side(la, lb) if a_vk and b_vk else None
        if table is not None:
            return self.contract_table(la, lb, table == "a", out_rank)
        if a_vk and b_vk:
            if la.shape[-2] > 1 or lb.shape[-1] > 1:
                self.freeze_all(n, f"{n.name}: contraction of channels that also vary along free dims")
                return L.constant(FROZEN, out_rank)
            q, k = la[..., 0, :], lb[..., :, 0]
            qb, kb = torch.broadcast_tensors(q, k)
            self.space.union(qb, kb)
            site = Site(node=n.name, kind="matmul", q=q, k=k, producers_before=len(self.producers))
            self.sites.append(site)
            flat_q = qb.reshape(-1, qb.shape[-1])
            flat_k = kb.reshape(-1, kb.shape[-1])
            dep = self.space.dependent([torch.cat([a, b]) for a, b in zip(flat_q, flat_k)])
            for d in dep.tolist():
                self.dep_site[d] = site
            out = dep.reshape(qb.shape[:-1] + (1, 1))
            return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))
        if a_vk or b_vk:
            self.space.freeze(la if a_vk else lb,
                              f"{n.name}: channels contracted against an operand without channels")
            ca = L.constant(NONE, r) if a_vk else la[..., :, :1]
            cb = L.constant(NONE, r) if b_vk else lb[..., :1, :]
        else:
            ca, cb = la[..., :, :1], lb[..., :1, :]
        ca, cb = torch.broadcast_tensors(ca, cb)
        dep_a = self.space.is_dependent(ca)
        dep_b = self.space.is_dependent(cb)
        if bool(dep_a.any()):
            m = dep_a & (cb > 0)
            self.space.add_support(ca[m], cb[m])
            self._note_v(n, ca[dep_a], cb, lb[..., 0, :])  # attn @ v: v is (..., tokens, E)
        if bool(dep_b.any()):
            m = dep_b & (ca > 0)
            self.space.add_support(cb[m], ca[m])
            self._note_v(n, cb[dep_b], ca, la[..., :, 0])  # v @ attn^T: v is (..., E, tokens)
        both = (ca >= 0) & (cb >= 0) & ~dep_a & ~dep_b
        if bool(both.any()):
            self.space.freeze(ca[both], f"{n.name}: product of two channel tensors")
            self.space.freeze(cb[both], f"{n.name}: product of two channel tensors")
        out = torch.where(dep_a | (ca < 0), cb, ca)
        return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))

    def _note_v(self, n, dep, other, v):
        """The values of the site whose scores ``dep`` are: the channels ``v`` of the other operand."""
        roots = self.space.roots()
        site_of = {int(roots[k]): s for k, s in self.dep_site.items()}
        for d in torch.unique(dep).tolist():
            site = site_of.get(int(roots[d]))
            if site is not None and site.v is None and bool((other > 0).any()):
                site.v = v
                site.av_node = n.name

    def is_table(self, lab: torch.Tensor) -> bool:
        """Labels that are all elements of one small parameter, still uncoupled (a relative-position table)."""
        if not any(bool(((lab >= lo) & (lab < hi)).all()) for lo, hi in self.tables):
            return False
        roots = self.space.roots()
        return bool((torch.bincount(roots, minlength=roots.numel())[lab] == 1).all())  # coupled to nothing yet

    def table_side(self, la, lb):
        """"a" or "b" if that operand is a parameter table the q/k pairing cannot take: it varies
        along its own free dim (one row per relative position) or the heads share it."""
        for side, tab, act, free in (("b", lb, la, -1), ("a", la, lb, -2)):
            if self.is_table(tab) and (tab.shape[free] > 1 or any(
                    act.shape[d] > 1 and tab.shape[d] == 1 for d in range(act.dim() - 2))):
                return side
        return None

    def contract_table(self, la, lb, a_table, out_rank):
        """A @ B where one side is a parameter table shared by the heads (q @ rel_pos^T).

        The contracted dim is one dense dim of both, so each of its positions is one
        channel everywhere: a table column is coupled with that q channel of every head
        (the heads keep the same q/k channels).  Each output row exists while its
        activation row has channels, like attention scores.
        """
        act = lb.transpose(-1, -2) if a_table else la          # (..., rows, K)
        tab = la if a_table else lb.transpose(-1, -2)          # (..., cols, K)
        self.space.union(act.unsqueeze(-2), tab.unsqueeze(-3))  # every (row, col) pair shares the K channel
        rows = act.reshape(-1, act.shape[-1])
        dep = self.space.dependent(list(rows)).reshape(act.shape[:-1] + (1,))
        out = dep.transpose(-1, -2) if a_table else dep
        return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))

    def rule_addmm(self, n, key, args, kwargs, result):
        """addmm(bias, x, W): HF Conv1D and friends, W stored (in, out)."""
        bn, xn, wn = n.args[0], n.args[1], n.args[2]
        if not (isinstance(wn, fx.Node) and wn.op == "get_attr"):
            reason = f"{n.name}: addmm with a computed weight"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        in_ids, out_ids = self.pids(wn.target, args[2])
        x_lab = self.lab(xn)
        if any(d != x_lab.dim() - 1 for d in L.varying_dims(x_lab)):
            reason = f"{n.name}: addmm input carries channels outside its last dim"
            self.freeze_all(n, reason)
            x_lab = L.constant(FROZEN, 1)
        self.space.union(in_ids, x_lab.reshape(-1))
        if isinstance(bn, fx.Node) and bn.op == "get_attr":
            self.space.union(self.pids(bn.target, args[0])[0], out_ids)
        else:
            bl = self.lab(bn)
            if isinstance(bl, torch.Tensor):
                self.space.union(L.expand(bl, args[0].shape).reshape(-1), out_ids)
        self.producers.append((wn.target, out_ids))
        self.producer_dim[wn.target] = 1
        return out_ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def rule_matmul(self, n, key, args, kwargs, result):
        a, b = args[0], args[1]
        if a.dim() < 2 or b.dim() < 2:
            reason = f"{n.name}: matmul with a vector"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        out = self.contract(n, self.lab(n.args[0]), self.lab(n.args[1]), result.dim())
        self._set_operands(n, lambda args, kwargs: (args[0], args[1].transpose(-1, -2)))
        return out

    def _set_operands(self, n, fn):
        if self.sites and self.sites[-1].node == n.name and self.sites[-1].operands is None:
            self.sites[-1].operands = fn

    def rule_einsum(self, n, key, args, kwargs, result):
        """Two-operand einsum as a broadcast matmul: shared letters are batch dims, one
        contracted letter; free letters of one operand beyond the last are batch dims
        the other operand broadcasts over."""
        eq = args[0].replace(" ", "")
        ops_ = args[1:] if not isinstance(args[1], (list, tuple)) else args[1]
        nodes = n.args[1:] if not isinstance(n.args[1], (list, tuple)) else n.args[1]
        m = re.fullmatch(r"([a-z]+),([a-z]+)->([a-z]*)", eq)
        sa, sb, so = m.groups() if m else ("", "", "")
        con = [c for c in sa if c in sb and c not in so]
        fa = [c for c in sa if c not in sb]
        fb = [c for c in sb if c not in sa]
        if not m or len(ops_) != 2 or len(con) != 1 or not fa or not fb or sorted(so) != sorted(
                [c for c in sa if c in sb and c in so] + fa + fb) or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
            reason = f"{n.name}: einsum '{eq}' form not supported"
            self.freeze_all(n, reason)
            return self.frozen_output(result, reason)
        batch = [c for c in so if c in sa and c in sb] + fa[:-1] + fb[:-1]
        order_a = batch + fa[-1:] + con  # A as (batch..., I, K)
        order_b = batch + fb[-1:] + con  # B as (batch..., J, K)

        def arrange(t, letters, order):  # permute to ``order``, size-1 dims for letters it lacks
            t = t.permute([letters.index(c) for c in order if c in letters])
            shape = iter(t.shape)
            return t.reshape([next(shape) if c in letters else 1 for c in order])
        la = arrange(L.expand(self.lab(nodes[0]), ops_[0].shape), sa, order_a)
        lb = arrange(L.expand(self.lab(nodes[1]), ops_[1].shape), sb, order_b)
        out = self.contract(n, L.reduce(la), L.reduce(lb.transpose(-1, -2)), len(so))
        self._set_operands(n, lambda args, kwargs: tuple(
            arrange(t, s, o) for t, s, o in zip(args[1:] if not isinstance(args[1], (list, tuple)) else args[1],
                                                (sa, sb), (order_a, order_b))))
        order = batch + fa[-1:] + fb[-1:]
        return L.reduce(out.permute([order.index(c) for c in so]))

    def rule_sdpa(self, n, key, args, kwargs, result):
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        nodes = dict(zip(names, n.args))
        nodes.update(n.kwargs)
        real = dict(zip(names, args))
        real.update(kwargs)
        q, k, v = real["query"], real["key"], real["value"]
        lq, lk, lv = (self.lab(nodes[x]) for x in ("query", "key", "value"))
        lk = L.expand(lk, k.shape)
        lv = L.expand(lv, v.shape)
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            lk = lk.repeat_interleave(rep, dim=-3)
            lv = lv.repeat_interleave(rep, dim=-3)
        scores = self.contract(n, lq, L.reduce(lk.transpose(-2, -1)), q.dim())

        def sdpa_operands(args, kwargs):
            got = dict(zip(names, args))
            got.update(kwargs)
            qq, kk = got["query"], got["key"]
            if qq.dim() >= 3 and kk.shape[-3] != qq.shape[-3]:
                kk = kk.repeat_interleave(qq.shape[-3] // kk.shape[-3], dim=-3)
            return qq, kk
        self._set_operands(n, sdpa_operands)
        site = self.sites[-1] if self.sites and self.sites[-1].node == n.name else None
        if site is not None:
            site.kind = "sdpa"
        mask_lab = self.lab(nodes.get("attn_mask"))
        if isinstance(mask_lab, torch.Tensor) and bool((mask_lab >= 0).any()):
            s_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
            scores = self.elementwise([(scores, s_shape), (mask_lab, real["attn_mask"].shape)], s_shape)
        return self.contract(n, scores, L.reduce(lv), result.dim())


def _moves_data_only(fn, args, kwargs) -> bool:
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


def _conv_groups(key, args, kwargs) -> int:
    """The groups argument: position 8 of aten.convolution, 6 of conv{1,2}d / conv_transpose{1,2}d."""
    pos = 8 if key == "convolution" else 6
    return args[pos] if len(args) > pos else kwargs.get("groups", 1)


def _flat_labels(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        out = []
        for y in x:
            out += _flat_labels(y)
        return out
    return []


def _first_label(lab, result):
    if isinstance(lab, torch.Tensor):
        if isinstance(result, torch.Tensor) and lab.dim() != result.dim():
            return L.constant(FROZEN, result.dim())
        return lab
    return _map_struct(result, lambda r: L.constant(NONE, r.dim()) if isinstance(r, torch.Tensor) else None)


# ---------------------------------------------------------------------------
# From propagated labels to groups
# ---------------------------------------------------------------------------

class Analysis:
    """What ``snp_fx.analyze`` returns: groups, attention sites, reasons."""

    def __init__(self, gm: fx.GraphModule, prop: _Propagator, inputs: tuple):
        self.gm = gm
        self.inputs = inputs
        self.labels = prop.labels
        self.shapes = prop.shapes
        self.taint = prop.taint
        self.param_ids = prop.param_ids
        self.elem_ids = prop.elem_ids
        self.producers = [(name, prop.producer_dim.get(name, 0)) for name, _ in prop.producers]
        self.space = prop.space
        self.sites = prop.sites
        self.unknown_ops = prop.unknown
        self.gathered = prop.gathered
        self._summed = prop.summed
        self.class_of = prop.space.components()
        self.class_size = torch.bincount(self.class_of, minlength=self.class_of.numel())
        canon = lambda t: L.reduce(self.classes(t)) if isinstance(t, torch.Tensor) else t  # noqa: E731
        self.labels = {k: _map_struct(v, canon) for k, v in prop.labels.items()}
        self._build_groups(prop)

    # parameters -----------------------------------------------------------------
    def dim_masks(self, name: str, shape, keep: torch.Tensor) -> list[torch.Tensor]:
        """Per-dim keep masks of a parameter/buffer; raises RewriteError if not a block."""
        masks = [torch.ones(s, dtype=torch.bool) for s in shape]
        for d, ids in enumerate(self.param_ids.get(name, [])):
            masks[d] &= keep[ids]
        e = self.elem_ids.get(name)
        if e is not None:
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

    # classes --------------------------------------------------------------------
    def classes(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids >= 0, self.class_of[ids.clamp(min=0)], ids)

    def _class_reasons(self):
        reasons: dict[int, str] = {int(self.class_of[0]): "tied to a model input"}
        for ids, why in self.space.frozen:
            for c in torch.unique(self.class_of[ids]).tolist():
                reasons.setdefault(c, why)
        sens: dict[int, str] = {}
        for ids, why in self.space.sensitive:
            for c in torch.unique(self.class_of[ids]).tolist():
                sens.setdefault(c, why)
        self.summed_classes = set()
        for lab in self._summed:
            self.summed_classes.update(torch.unique(self.class_of[lab[lab > 0]]).tolist())
        dep = set()
        if self.space.support:
            dep = set(self.class_of[torch.tensor(sorted(self.space.support))].tolist())
        self.support: dict[int, set[int]] = {}
        for k, v in self.space.support.items():
            members = self.class_of[torch.tensor(sorted(v), dtype=torch.long)].tolist() if v else []
            self.support.setdefault(int(self.class_of[k]), set()).update(members)
        return reasons, sens, dep

    def _build_groups(self, prop: _Propagator):
        frozen, sensitive, dependent = self._class_reasons()
        self.frozen_classes = frozen
        self.sensitive_classes = sensitive
        self.dependent_classes = dependent
        producer_cls = [(name, self.classes(ids)) for name, ids in prop.producers]
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
            flat = torch.unique(g.classes)
            for c in flat.tolist():
                if c in frozen:
                    g.prunable, g.reason = False, frozen[c]
                    return
                if c in dependent:
                    g.prunable, g.reason = False, "its channels exist only through others"
                    return
                if c in sensitive and not allow_sensitive:
                    g.prunable, g.reason = False, f"normalised over ({sensitive[c]}): removing is not exact"
                    return
                if c in used:
                    g.prunable, g.reason = False, f"shares channels with {used[c]}"
                    return
            if g.classes.dim() == 2 and torch.unique(g.classes).numel() != g.classes.numel():
                g.prunable, g.reason = False, "channels of different heads are coupled"

        seen_names: dict[str, int] = {}
        for site in self.sites:
            qk = _rows(self.classes(site.q))
            pairs = [_unique_ordered(row) for row in qk]  # rotary embeddings pair index i with i + d/2
            if len({p.numel() for p in pairs}) == 1:
                qk = torch.stack(pairs)
            mod = owner_module(torch.unique(qk), site.producers_before) or site.node
            mod = mod if mod.rsplit(".", 1)[-1] not in ("qkv", "query", "q", "q_proj", "c_attn", "in_proj") \
                else mod.rsplit(".", 1)[0] if "." in mod else mod
            if mod in seen_names:
                seen_names[mod] += 1
                mod = f"{mod}#{seen_names[mod]}"
            else:
                seen_names[mod] = 0
            site.name = mod
            g = Group(f"{mod}.qk", "qk", qk, site=mod)
            check(g, allow_sensitive=False)
            groups.append(g)
            for c in torch.unique(qk).tolist():
                used.setdefault(c, g.name)
            if site.v is None:
                continue
            v = _rows(self.classes(site.v))
            g = Group(f"{mod}.v", "v", v, site=mod)
            check(g, allow_sensitive=False)  # v is pruned per head on its own (GQA: per kv head)
            if g.prunable and any(c in self.summed_classes for c in torch.unique(v).tolist()):
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
            cls = torch.cat([producer_cls[i][1] for i in members])
            cls = _unique_ordered(cls)
            cls = cls[~torch.isin(cls, torch.tensor(sorted(used) or [-5]))]
            if cls.numel() == 0:
                continue
            is_res = any(c in sensitive or c in self.summed_classes for c in cls.tolist())
            name = producer_cls[members[0]][0].rsplit(".", 1)[0]
            g = Group(name, "residual" if is_res else "ffn", cls)
            pending.append(g)
            residual_count += is_res
        r = 0
        for g in pending:
            if g.kind == "residual":
                g.name = "residual" if residual_count == 1 else f"residual.{r}"
                r += 1
            check(g, allow_sensitive=g.kind == "residual")
            groups.append(g)
        self.groups = {g.name: g for g in groups}

    def refuse(self, node_name: str, reason: str) -> list[str]:
        """Mark every group with channels at ``node_name`` (or its inputs) unprunable."""
        node = next(n for n in self.gm.graph.nodes if n.name == node_name)
        touched = set()
        for n in [node] + [a for a in node.all_input_nodes]:
            for lab in _flat_labels(self.labels.get(n.name)):
                touched.update(torch.unique(lab[lab >= 0]).tolist())
        refused = []
        for g in self.groups.values():
            if g.prunable and touched & set(torch.unique(g.classes).tolist()):
                g.prunable, g.reason = False, reason
                refused.append(g.name)
        return refused

    # reporting ----------------------------------------------------------------
    def prunable(self, kind: str | None = None) -> list[Group]:
        return [g for g in self.groups.values() if g.prunable and (kind is None or g.kind == kind)]

    def __str__(self) -> str:
        lines = ["snp_fx analysis", "", "Attention sites:",
                 f"  {'site':<34} {'heads':>5} {'q/k width':>9} {'v width':>7}  op"]
        for s in self.sites:
            qk = self.groups.get(f"{s.name}.qk")
            v = self.groups.get(f"{s.name}.v")
            lines.append(f"  {s.name:<34} {qk.heads:>5} {qk.width:>9} {v.width if v else '-':>7}  {s.kind}")
        for kind, title in (("ffn", "FFN groups"), ("residual", "Residual groups")):
            gs = [g for g in self.groups.values() if g.kind == kind]
            lines += ["", f"{title}:"]
            for g in gs:
                lines.append(f"  {g.name:<40} width {g.width:>5}" + ("" if g.prunable else "  (unprunable)"))
        bad = [g for g in self.groups.values() if not g.prunable]
        lines += ["", "Unprunable:"]
        lines += [f"  {g.name:<40} {g.reason}" for g in bad] or ["  (none)"]
        if self.unknown_ops:
            lines += ["", "Ops not understood (channels through them are left alone):"]
            lines += [f"  {r}" for r in list(self.unknown_ops.values())[:20]]
        return "\n".join(lines)

    __repr__ = __str__


def _rows(lab: torch.Tensor) -> torch.Tensor:
    """(heads, width) array of a per-head label tensor, deduplicated over batch positions."""
    lab = L.reduce(lab)
    flat = lab.reshape(-1, lab.shape[-1]) if lab.dim() else lab.reshape(1, 1)
    return _unique_ordered_rows(flat)


def _unique_ordered(t: torch.Tensor) -> torch.Tensor:
    seen, out = set(), []
    for x in t.tolist():
        if x not in seen:
            seen.add(x)
            out.append(x)
    return torch.tensor(out, dtype=torch.long)


def _unique_ordered_rows(t: torch.Tensor) -> torch.Tensor:
    seen, out = set(), []
    for row in t.tolist():
        key = tuple(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return torch.tensor(out, dtype=torch.long)


def propagate(gm: fx.GraphModule, inputs: tuple) -> Analysis:
    prop = _Propagator(gm)
    with torch.no_grad():
        prop.run(*inputs)
    return Analysis(gm, prop, inputs)
