"""The op registry: one ``OpFamily`` object per family of ops, covering every phase.

A family says, in one place, how its ops behave for

* **analysis**  ``propagate``: the channel labels of the result (and the couplings it makes);
* **rewrite**   ``rewrite``: how the copied node is fixed for the pruned graph (literal sizes,
                arguments); ``prune_module``: the attributes of a pruned module;
* **cost**      ``macs``: multiply-accumulates of the pruned node;
* **verify**    ``masked``: the masked reference's form of a normalisation over partly removed
                channels (residual pruning);
* **compensation** ``consumer``: the weight a node applies to its input channels, if it is a
                linear map whose input a pruned group could be.

Ops are found by their target (a function, an ATen overload or packet, a tensor-method
name, a module class) or, failing that, by a normalised name (``op_key``), so torch
functions, tensor methods, ``operator`` builtins and ATen overloads share one entry.
An op no family claims is *unknown*: every channel it touches is frozen, with the reason.

Users teach the pass an op of their own with ``snp_fx.register_op(target, family)``.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn as nn


class OpFamily:
    """Base class: a family of ops and what each phase does with them.

    ``kind`` names the family in reports; ``makes_channels``: the op creates channels from
    its own parameters, so it is followed even when its input has none (a Linear on
    token ids' embeddings, a conv on the image).  ``elementwise``: the output has the
    input's layout (the rewrite carries per-slice choices through it).
    """

    kind = "op"
    makes_channels = False
    elementwise = False
    sizes_ok = False  # channel counts among its arguments are sizes (reshape, x.size(d)), not values: they pin nothing

    def propagate(self, p, n: fx.Node, key: str, args, kwargs, result):
        """Labels of ``result`` (reduced label tensors, same structure).  ``p`` is the
        propagator (snp_fx.analysis.propagate): ``p.lab(node)``, ``p.space`` (unions),
        ``p.refuse(n, reason, result)`` for what the family cannot follow."""
        raise NotImplementedError

    def rewrite(self, r, node: fx.Node, new: fx.Node, key: str) -> None:
        """Fix ``new`` (the copy of ``node`` in the pruned graph).  ``r`` is the rewriter
        (snp_fx.rewrite): ``r.sizes_of(node)`` gives a node's pruned shape."""

    def prune_module(self, r, mod: nn.Module, node: fx.Node) -> None:
        """Update a module's attributes after its parameters were sliced (in place, on a copy), or
        return a module to run instead."""

    def macs(self, c, n: fx.Node, key: str) -> int:
        """MACs of the pruned node, as FlopCounterMode counts them.  ``c``: snp_fx.cost's
        estimator (``c.new(name)`` pruned shape, ``c.shapes``, ``c.kept(param, shape)``)."""
        return 0

    def masked(self, m, node: fx.Node, key: str) -> None:
        """Make the masked reference exact for a normalisation over partly removed channels
        (``m``: snp_fx.verify's masker); raise ValueError if it cannot be."""

    def consumer(self, n: fx.Node, key: str, modules) -> tuple | None:
        """(weight, bias, in_dim, x_pos) when ``n`` applies a weight to its input's channels:
        weight / bias as parameter names (bias: a name, None, or "computed"), ``in_dim`` the
        weight dim of the input channels, ``x_pos`` the argument holding the input."""
        return None


class Unknown(OpFamily):
    kind = "unknown"


UNKNOWN = Unknown()

# target (function, OpOverload(Packet), method name) -> family; module class -> family; name -> family
_BY_TARGET: dict[object, OpFamily] = {}
_BY_MODULE: list[tuple[type, OpFamily]] = []
_BY_NAME: dict[str, OpFamily] = {}

OPERATOR_NAMES = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul",
                  operator.truediv: "truediv", operator.floordiv: "floordiv", operator.matmul: "matmul",
                  operator.getitem: "getitem", operator.neg: "neg", operator.pow: "pow", operator.mod: "mod"}


def register(family: OpFamily, names=(), modules=(), targets=()) -> OpFamily:
    """Enter a family under op names (``op_key``), module classes and exact targets."""
    for name in names:
        _BY_NAME[name] = family
    for cls in modules:
        _BY_MODULE.insert(0, (cls, family))  # later registrations win (a subclass after its base)
    for t in targets:
        _BY_TARGET[t] = family
    return family


def register_op(target, family: OpFamily) -> None:
    """Teach snp_fx an op: ``target`` is a function (fx ``call_function``; wrap a python
    function with ``torch.fx.wrap`` so it stays one node), an ATen overload or packet, a
    tensor-method name (``"my_method"``) or an ``nn.Module`` class (kept a leaf when traced).
    ``family``: an ``OpFamily`` — one of snp_fx.ops' (``Unary()``, ``Linear()``, ...) or a
    subclass of your own.  Registrations override the built-in table."""
    if not isinstance(family, OpFamily):
        raise TypeError(f"family must be an snp_fx.ops.OpFamily instance, got {type(family).__name__}")
    if isinstance(target, type) and issubclass(target, nn.Module):
        register(family, modules=[target])
    elif isinstance(target, str):
        register(family, names=[target])
    elif callable(target) or isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        register(family, targets=[target])
    else:
        raise TypeError(f"cannot register {target!r}: give a function, an ATen op, a method name or a module class")


def op_key(node: fx.Node, modules) -> str:
    """A normalised name for the op a node runs (module ops: their family's kind)."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        fam = module_family(modules[node.target])
        return fam.kind if fam is not None else "module:" + type(modules[node.target]).__name__
    t = node.target
    if t in OPERATOR_NAMES:
        return OPERATOR_NAMES[t]
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def module_family(mod: nn.Module) -> OpFamily | None:
    for cls, fam in _BY_MODULE:
        if isinstance(mod, cls):
            return fam
    return None


def family_of(node: fx.Node, modules) -> tuple[str, OpFamily]:
    """(op_key, family) of a call node; the family is ``UNKNOWN`` for ops nobody registered."""
    key = op_key(node, modules)
    if node.op == "call_module":  # by class, else by class name ("module:GELUTanh")
        return key, module_family(modules[node.target]) or family_of_key(key)
    target = node.target
    try:
        fam = _BY_TARGET.get(target)
        if fam is None and isinstance(target, torch._ops.OpOverload):
            fam = _BY_TARGET.get(target.overloadpacket)
    except TypeError:  # an unhashable target
        fam = None
    if fam is not None:
        return key, fam
    return key, family_of_key(key)


def family_of_key(key: str) -> OpFamily:
    if key in _BY_NAME:
        return _BY_NAME[key]
    if key.endswith("_") and not key.startswith("_") and key[:-1] in _BY_NAME and \
            _BY_NAME[key[:-1]].elementwise:
        return _BY_NAME[key[:-1]]  # in-place variant (x.silu_(), x.mul_(y)): the same labels
    return UNKNOWN


def kind_of(node: fx.Node, modules) -> str:
    return family_of(node, modules)[1].kind


# ---------------------------------------------------------------------------
# Arguments by name: one signature per op, from ATen's schema or python's
# ---------------------------------------------------------------------------

_SIGNATURES: dict[object, list[str]] = {}


def signature(target) -> list[str]:
    """Argument names of a call_function target, in positional order.

    ATen ops: their schema; python functions: ``inspect``; torch builtins (``F.linear``,
    ``torch.conv2d``): the schema of the ATen op of the same name, which they mirror."""
    try:
        return _SIGNATURES[target]
    except (KeyError, TypeError):
        pass
    names: list[str] = []
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target.default
    if isinstance(target, torch._ops.OpOverload):
        names = [a.name for a in target._schema.arguments]
    else:
        try:
            names = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            aten = getattr(torch.ops.aten, getattr(target, "__name__", ""), None)
            if aten is not None and hasattr(aten, "default"):
                names = [a.name for a in aten.default._schema.arguments]
    names = ["input" if x == "self" else x for x in names]  # aten.addmm(self, ...) and kin
    try:
        _SIGNATURES[target] = names
    except TypeError:
        pass
    return names


class Args:
    """A call's arguments by name: ``a["weight"]`` (the fx argument: a Node or a literal),
    ``a.value("weight")`` (its real value, when real args were given), ``a.pos("groups")``."""

    def __init__(self, node: fx.Node, args=None, kwargs=None):
        self.node = node
        self.names = signature(node.target) if node.op == "call_function" else []
        self._args, self._kwargs = args, kwargs

    def pos(self, name: str) -> int:
        return self.names.index(name) if name in self.names else -1

    def _get(self, args, kwargs, name, default):
        i = self.pos(name)
        if 0 <= i < len(args):
            return args[i]
        return kwargs.get(name, default)

    def __getitem__(self, name: str):
        return self._get(self.node.args, self.node.kwargs, name, None)

    def get(self, name: str, default=None):
        return self._get(self.node.args, self.node.kwargs, name, default)

    def value(self, name: str, default=None):
        return self._get(self._args, self._kwargs, name, default)

    def param(self, name: str):
        """The parameter name of a get_attr argument; None if absent; False if computed in the graph."""
        a = self[name]
        if a is None:
            return None
        return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else False

    def set(self, new: fx.Node, name: str, value) -> None:
        """Set argument ``name`` of ``new`` (where ``node`` had it: positional or keyword)."""
        i = self.pos(name)
        if 0 <= i < len(new.args):
            args = list(new.args)
            args[i] = value
            new.args = tuple(args)
        else:
            new.kwargs = {**new.kwargs, name: value}
