"""Elementwise ops (activations, casts, arithmetic with broadcasting), tensor factories,
shape queries and checks that touch no sizes."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .. import labels as L
from ..labels import FROZEN, NONE, map_struct
from .registry import OpFamily, op_key, register


def _first_label(lab, result):
    if isinstance(lab, torch.Tensor):
        if isinstance(result, torch.Tensor) and lab.dim() != result.dim():
            return L.constant(FROZEN, result.dim())
        return lab
    return map_struct(result, lambda r: L.constant(NONE, r.dim()) if isinstance(r, torch.Tensor) else None)


class Unary(OpFamily):
    """One tensor in, the same channels out (activations, dropout, casts, x / ||x||, ...)."""
    kind = "unary"
    elementwise = True

    def propagate(self, p, n, key, args, kwargs, result):
        return _first_label(p.lab(n.args[0]) if n.args else None, result)


class Like(Unary):
    """zeros_like & co: a new tensor laid out like its input."""
    kind = "like"


class Binary(OpFamily):
    """Elementwise with broadcasting: couples the channels it aligns.  An operand made of no
    parameter's channels (a rotary table shared by every head) is gathered per use instead."""
    kind = "binary"
    elementwise = True

    def propagate(self, p, n, key, args, kwargs, result):
        real = list(args) + list(kwargs.values())
        labs = [p.lab(a) for a in list(n.args) + list(n.kwargs.values())]
        nodes = list(n.args) + list(n.kwargs.values())
        keep = [i for i, (lab, r) in enumerate(zip(labs, real))
                if isinstance(lab, torch.Tensor) and isinstance(r, torch.Tensor)]
        soft = [i for i in keep if p.space.is_soft(labs[i]) or bool((labs[i] < 0).all())]
        inputs = [labs[i] for i in keep if nodes[i].name in p.dynamic]
        if key.rstrip("_") in ("mul", "imul") and inputs:
            soft += [i for i in keep if i not in soft and _position_table(p, nodes[i], labs[i], real[i], inputs)]
        if soft and len(soft) < len(keep):
            # an operand of no parameter's channels (a rotary table shared by every head and
            # layer, a computed constant) is gathered per use by the rewrite, not coupled
            p.gathered[n.name] = [nodes[i].name for i in soft]
            keep = [i for i in keep if i not in soft]
        computed = [i for i in keep if nodes[i].op != "get_attr" and bool((labs[i] > 0).any())]
        if key.rstrip("_") in ("add", "iadd", "sub", "isub", "rsub") and \
                len({tuple(torch.unique(labs[i][labs[i] > 0]).tolist()) for i in computed}) > 1:
            # x + f(x), f's channels made apart (not gelu's x + c x^3): a residual stream, whatever its norm
            p.summed += [labs[i] for i in computed]
        return p.elementwise([(labs[i], real[i].shape) for i in keep], tuple(result.shape))

    def rewrite(self, r, node, new, key):
        if node.name in r.a.gathered:
            gather_operands(r, node, new)


def _position_table(p, node, lab, real, inputs) -> bool:
    """Whether a product's operand is a constant table over positions made from parameters
    (RoFormer's sinusoidal embedding of arange, MLCD's learned class-token angles): computed from no
    model input (``inputs``: the labels of the operands that are), with values along a dim where
    those inputs have no channels (positions).  Shared by every layer's q/k, it is gathered per use
    like a buffer's table, which is exact for a product (a removed channel is zero either way); its
    own units are pinned so that nothing slices what the gathers index."""
    if node.name in p.dynamic or not bool((lab > 0).any()):
        return False
    rank = max([real.dim()] + [x.dim() for x in inputs])
    shape = (1,) * (rank - real.dim()) + tuple(real.shape)
    if not any(shape[d] > 1 and all(d < rank - x.dim() or x.shape[d - rank + x.dim()] == 1 for x in inputs)
               for d in range(rank)):
        return False  # a per-channel scale (LayerScale, a norm's weight): sliced with the channels
    p.space.freeze(lab, f"{node.name}: a position table gathered per use")
    return True


def gather_operands(r, node, new):
    """Cut buffer-derived operands (rotary cos/sin tables) to this op's kept positions.

    The operand is expanded over the output's channel dims (heads keep different
    indices), those dims are flattened and index_select-ed in row-major order, which
    is the order the pruned output keeps them in.
    """
    lab, shape = r.a.labels[node.name], list(r.a.shapes[node.name])
    rank = len(shape)
    sizes = r.sizes_of(node)
    if sizes == shape:
        return
    lab = lab.reshape((1,) * (rank - lab.dim()) + tuple(lab.shape))
    chan = [d for d in range(rank) if lab.shape[d] > 1]
    kept = torch.where(lab >= 0, r.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
    flat_idx = kept.reshape([lab.shape[d] for d in chan]).flatten().nonzero().flatten()
    rest = [d for d in range(rank) if d not in chan]
    perm = rest + chan
    inverse = [perm.index(d) for d in range(rank)]
    g = r.graph
    for i, name in enumerate(r.a.gathered[node.name]):
        src = next(a for a in node.all_input_nodes if a.name == name)
        op_shape = list(r.a.shapes[name])
        if all(op_shape[d - rank + len(op_shape)] == 1 for d in range(rank)
               if sizes[d] != shape[d] and d - rank + len(op_shape) >= 0):
            continue  # broadcast along every pruned dim: fits as it is
        if _expanded_to_fit(r, src, shape, sizes):
            continue
        attr = f"_snp_gather_{node.name}_{i}"
        r.attrs[attr] = flat_idx.clone()
        with g.inserting_before(new):
            t = r.env[src]
            if len(op_shape) < rank:
                t = g.call_function(operator.getitem, (t, (None,) * (rank - len(op_shape)) + (Ellipsis,)))
            t = g.call_method("expand", (t, *[shape[d] if d in chan else -1 for d in range(rank)]))
            t = g.call_method("permute", (t, *perm))
            t = g.call_method("flatten", (t, len(rest)))
            t = g.call_function(torch.index_select, (t, -1, g.get_attr(attr)))
            t = g.call_method("unflatten", (t, -1, tuple(sizes[d] for d in chan)))
            t = g.call_method("permute", (t, *inverse))
        old = r.env[src]
        new.args = fx.node.map_arg(new.args, lambda n, old=old, t=t: t if n is old else n)
        new.kwargs = fx.node.map_arg(new.kwargs, lambda n, old=old, t=t: t if n is old else n)


def _expanded_to_fit(r, src, shape, sizes) -> bool:
    """Whether ``src`` is ``x.expand_as(other)`` with ``x`` of size 1 along every pruned dim and
    ``other`` pruned as the output: in the pruned graph it already has the output's sizes, and
    its values are the same along those dims (F.normalize's norm, expanded over q's channels)."""
    if src.op != "call_function" or op_key(src, r.modules) != "expand_as" or \
            not all(isinstance(a, fx.Node) for a in src.args[:2]):
        return False
    x, other = r.a.shapes.get(src.args[0].name), r.a.shapes.get(src.args[1].name)
    if not isinstance(x, tuple) or not isinstance(other, tuple) or len(other) != len(shape) or \
            not isinstance(r.a.labels.get(src.args[1].name), torch.Tensor):
        return False
    new_other = r.sizes_of(src.args[1])
    x = (1,) * (len(shape) - len(x)) + tuple(x)
    return all(x[d] == 1 and new_other[d] == sizes[d] for d in range(len(shape)) if sizes[d] != shape[d])


class Ignore(OpFamily):
    """Checks with no output that touch no sizes: nothing to follow."""
    kind = "ignore"

    def propagate(self, p, n, key, args, kwargs, result):
        if kwargs.get("size") is not None or kwargs.get("stride") is not None:
            p.freeze_all(n, f"{n.name}: `{key}` asserts literal sizes")
        return None


class Factory(OpFamily):
    """A new tensor of literal sizes: frozen (its sizes are baked in), soft (a constant)."""
    kind = "factory"

    def propagate(self, p, n, key, args, kwargs, result):
        return p.frozen_output(result, f"{n.name}: `{key}` makes a tensor of literal size", soft=True)


class Meshgrid(Factory):
    """meshgrid of position ranges (Pixtral's patch positions): a constant like ``arange``'s; of
    channels it is refused."""
    kind = "meshgrid"

    def propagate(self, p, n, key, args, kwargs, result):
        tensors = n.args[0] if n.args and isinstance(n.args[0], (list, tuple)) else n.args
        labs = [p.lab(t) for t in tensors if isinstance(t, fx.Node)]
        if any(isinstance(lab, torch.Tensor) and not (p.space.is_soft(lab) or bool((lab < 0).all())) for lab in labs):
            return p.refuse(n, f"{n.name}: `{key}` of channels", result)
        return super().propagate(p, n, key, args, kwargs, result)


class Shape(OpFamily):
    """x.size() / x.dim() / x.numel(): python ints, tracked for the channels they are read from."""
    kind = "shape"
    sizes_ok = True

    def propagate(self, p, n, key, args, kwargs, result):
        t = p.dim_taint(n.args[0])
        if key in ("size", "sym_size") and len(args) > 1:  # sym_size: torch.export's dynamic x.size(d)
            p.taint[n.name] = t[args[1]]
        elif key == "size":
            p.taint[n.name] = t
        elif key in ("numel", "sym_numel") and any(x is not None for x in t):
            p.freeze_all(n, f"{n.name}: numel() of a tensor with channels")
        return None


UNARY = register(Unary(), names=[
    "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish",
    "elu", "leaky_relu", "softplus", "relu6", "hardtanh", "dropout", "dropout_", "identity",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "detach", "data", "neg",
    "exp", "sqrt", "rsqrt", "abs", "bitwise_not", "logical_not", "sin", "cos", "erf", "square", "reciprocal",
    "_to_copy", "native_dropout", "lift_fresh_copy", "pow_scalar",
    "contiguous_", "log", "sign", "floor", "round", "nan_to_num",
    "normalize",  # x / ||x|| over a dim: a removed (zero) channel adds nothing to the norm
    "unary",      # module kind
    "module:GELUTanh", "module:QuickGELU", "module:Swish", "module:GELU",  # timm's, by class name
], modules=[nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.GELU, nn.ReLU, nn.SiLU, nn.Sigmoid,
            nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.ReLU6,
            nn.Hardtanh])
register(Like(), names=["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
                        "new_zeros_like",
                        "zero_", "fill_", "zero", "fill"])  # x.zero_(), x.fill_(v): x's layout, new values
register(Binary(), names=[
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "multiply", "truediv",
    "clamp", "clamp_", "clip", "clamp_min", "clamp_max",  # bounds may be tensors
    "div", "div_", "itruediv", "pow", "maximum", "minimum", "where", "masked_fill",
    "addcmul", "lerp", "floordiv", "floor_divide", "mod", "eq", "ne", "lt", "gt", "le", "ge", "and_", "or_",
    "__and__", "__or__", "bitwise_and", "bitwise_or", "logical_and", "logical_or"])
register(Ignore(), names=["_assert_tensor_metadata", "_assert_async", "_assert_scalar",
                          "sym_constrain_range_for_size", "module:GuardsFn", "module:ShapeGuard", "_assert"])
register(Factory(), names=["zeros", "ones", "empty", "full", "arange", "rand", "randn", "new_zeros", "new_ones",
                           "new_empty", "new_full", "tensor", "linspace", "eye", "tril", "triu", "ones_like_"])
register(Shape(), names=["size", "dim", "numel", "sym_size", "sym_numel"])
register(Meshgrid(), names=["meshgrid"])
