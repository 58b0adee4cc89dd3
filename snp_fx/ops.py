"""Op semantics table: how channel labels flow through every op we know.

Ops are keyed by a normalised name (``op_key``) so torch functions, tensor
methods, ``operator`` builtins and ATen overloads share one entry.  Each entry
is a *kind*; the analysis (analysis.py) implements one rule per kind:

  move       pure data movement, executed on the label tensors themselves
  unary      elementwise on one tensor (activations, dropout, casts, ...)
  binary     elementwise with broadcasting (couples the channels it aligns)
  reduce     reduction over ``dim`` (sum is linear; mean/var/max are not)
  softmax    normalisation over ``dim`` (not equivalent to zeroing if a channel dim)
  like       zeros_like & co: new tensor shaped like the input
  factory    new tensor from literal sizes (frozen: sizes are baked in)
  linear / layer_norm / group_norm / batch_norm / conv / conv_transpose / embedding
  matmul / bmm / einsum / sdpa   contractions
  shape      x.shape / x.size(): python ints (tracked for channel taint)
  pad        padding (only along dims without channels)
  ignore     assertions that touch no sizes

Anything not listed is *unknown*: every channel it touches is frozen and the
reason is reported.  ``SIZE_ARGS`` says which ops take literal sizes that the
rewrite must fix.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn

MOVE = {
    "reshape", "view", "permute", "transpose", "t", "flatten", "unflatten", "squeeze",
    "unsqueeze", "contiguous", "expand", "expand_as", "view_as", "reshape_as", "getitem",
    "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "cat", "concat",
    "concatenate", "stack", "roll", "flip", "index_select", "gather", "repeat",
    "repeat_interleave", "movedim", "swapaxes", "swapdims", "clone", "_unsafe_view",
    "slice", "alias", "tile", "index",
}
UNARY = {
    "gelu", "relu", "relu_", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish",
    "elu", "leaky_relu", "softplus", "relu6", "hardtanh", "dropout", "dropout_", "identity",
    "float", "half", "bfloat16", "double", "to", "type", "type_as", "detach", "neg",
    "exp", "sqrt", "rsqrt", "abs", "bitwise_not", "logical_not", "sin", "cos", "erf", "square", "reciprocal", "clamp",
    "clamp_", "clip", "_to_copy", "native_dropout", "lift_fresh_copy", "pow_scalar",
    "contiguous_", "log", "sign", "floor", "round", "nan_to_num",
    "normalize",  # x / ||x|| over a dim: a removed (zero) channel adds nothing to the norm
}
BINARY = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv",
    "div", "div_", "itruediv", "pow", "maximum", "minimum", "where", "masked_fill",
    "addcmul", "lerp", "floordiv", "mod", "eq", "ne", "lt", "gt", "le", "ge", "and_", "or_",
    "__and__", "__or__", "bitwise_and", "bitwise_or", "logical_and", "logical_or",
}
# checks with no output that touch no sizes: nothing to follow
IGNORE = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
          "module:GuardsFn", "_assert"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod", "all", "any",
          "linalg_vector_norm"}
# reductions a zero channel does not change: removing a channel equals zeroing it
ZERO_NEUTRAL_REDUCE = {"sum", "norm", "linalg_vector_norm"}
SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax"}
LIKE = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros_like"}
FACTORY = {"zeros", "ones", "empty", "full", "arange", "rand", "randn", "new_zeros", "new_ones",
           "new_empty", "new_full", "tensor", "linspace", "eye", "tril", "triu", "ones_like_"}
CONTRACT = {"matmul": "matmul", "bmm": "matmul", "mm": "matmul", "einsum": "einsum",
            "scaled_dot_product_attention": "sdpa"}
SHAPE = {"size", "dim", "numel"}

FUNCTION_KINDS = {
    "linear": "linear", "layer_norm": "layer_norm", "group_norm": "group_norm",
    "batch_norm": "batch_norm", "_native_batch_norm_legit_no_training": "batch_norm",
    "conv1d": "conv", "conv2d": "conv", "conv_transpose1d": "conv_transpose", "conv_transpose2d": "conv_transpose",
    "convolution": "convolution",  # core ATen: one op for both, ``transposed`` says which
    "embedding": "embedding",
    "pad": "pad", "constant_pad_nd": "pad", "addmm": "addmm",
    "avg_pool2d": "pool", "max_pool2d": "pool", "adaptive_avg_pool2d": "pool", "adaptive_avg_pool1d": "pool",
    "avg_pool1d": "pool", "_adaptive_avg_pool2d": "pool",
}

MODULE_KINDS: list[tuple[type, str]] = [
    (nn.Linear, "linear"), (nn.LayerNorm, "layer_norm"), (nn.GroupNorm, "group_norm"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"),
    (nn.ConvTranspose1d, "conv_transpose"), (nn.ConvTranspose2d, "conv_transpose"),
    (nn.Embedding, "embedding"), (nn.Softmax, "softmax"), (nn.Flatten, "move"),
    (nn.Unflatten, "move"),
]
UNARY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.GELU, nn.ReLU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.ReLU6,
    nn.Hardtanh,
)
# spatial pooling acts on free dims only; channels pass through untouched
POOL_MODULES = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d)

# which positional arg holds the dim (for reduce/softmax/split/...)
OPERATOR_NAMES = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul",
                  operator.truediv: "truediv", operator.floordiv: "floordiv", operator.matmul: "matmul",
                  operator.getitem: "getitem", operator.neg: "neg", operator.pow: "pow", operator.mod: "mod"}


def op_key(node, modules) -> str:
    """A normalised name for the op a node runs (module ops: their kind)."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        return module_kind(modules[node.target])
    t = node.target
    if t in OPERATOR_NAMES:
        return OPERATOR_NAMES[t]
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def module_kind(mod: nn.Module) -> str:
    for cls, kind in MODULE_KINDS:
        if isinstance(mod, cls):
            return kind
    if isinstance(mod, UNARY_MODULES) or type(mod).__name__ in ("GELUTanh", "QuickGELU", "Swish", "GELU"):
        return "unary"
    if isinstance(mod, POOL_MODULES):
        return "pool"
    return "module:" + type(mod).__name__


def kind_of(key: str) -> str:
    if key.endswith("_") and not key.startswith("_") and key[:-1] in UNARY | BINARY:
        key = key[:-1]  # in-place variant (x.silu_(), x.mul_(y)): the same labels
    if key in FUNCTION_KINDS:
        return FUNCTION_KINDS[key]
    if key in CONTRACT:
        return CONTRACT[key]
    for kind, names in (("ignore", IGNORE), ("move", MOVE), ("unary", UNARY), ("binary", BINARY), ("reduce", REDUCE),
                        ("softmax", SOFTMAX), ("like", LIKE), ("factory", FACTORY), ("shape", SHAPE)):
        if key in names:
            return kind
    if key in ("linear", "layer_norm", "group_norm", "batch_norm", "conv", "conv_transpose", "embedding", "pool", "unary",
               "softmax", "move", "addmm"):
        return key
    return "unknown"


# ops whose arguments are literal sizes tied to output dims: the rewrite fixes them
SIZE_ARGS = {"reshape", "view", "expand", "unflatten", "_unsafe_view"}
