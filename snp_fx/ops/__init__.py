"""The op table: every op snp_fx understands, one family per file, every phase in one place.

    registry.py     OpFamily (the per-phase hooks), lookup, register_op, arguments by name
    elementwise.py  activations, casts, arithmetic with broadcasting, factories, shape queries
    movement.py     reshape / permute / cat / flatten ..., probed python helpers, pad
    indexing.py     getitem / slice / select / narrow / split / index_select ...
    reduction.py    sum / mean / ... over a dim, topk / sort / cumsum, softmax
    linear.py       Linear, addmm (Conv1D), Embedding
    conv.py         convolutions (dense, depthwise, grouped, transposed), pooling
    norms.py        LayerNorm, GroupNorm, BatchNorm
    attention.py    matmul / bmm / baddbmm / einsum / scaled_dot_product_attention
    cache.py        a static KV cache written in place (index_copy_), copy_
    experts.py      mixture-of-experts weights (3-d): grouped_mm, bmm of weights gathered by expert
                    id, histc / index_put on expert ids

Adding an op is one family (or one ``register`` line) in one of these files, or a new file here
(every module of this package is imported, so its ``register`` calls run), plus one row in
tests/test_ops.py.  Users add their own with ``snp_fx.register_op``.
"""
import importlib
import pkgutil

from .registry import (UNKNOWN, Args, OpFamily, family_of, family_of_key, kind_of, module_family, op_key,
                       register, register_op, signature)
from .elementwise import Binary, Factory, Ignore, Like, Meshgrid, Shape, Unary  # noqa: E402 - registers on import
from .movement import WRAPPED, Flatten, Move, Pad, Reshape, Wrapped, moves_data_only  # noqa: E402
from .indexing import Index  # noqa: E402
from .reduction import Reduce, Softmax, AlongDim  # noqa: E402
from .linear import Addmm, Embedding, Linear  # noqa: E402
from .conv import Conv, Convolution, ConvTranspose, Pool  # noqa: E402
from .norms import BatchNorm, GroupNorm, LayerNorm  # noqa: E402
from .attention import SDPA, Baddbmm, Einsum, Matmul  # noqa: E402

for _m in pkgutil.iter_modules(__path__):  # families in files of their own (rms_norm.py, ...)
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["OpFamily", "register_op", "register", "family_of", "family_of_key", "kind_of", "module_family",
           "op_key", "signature", "Args", "UNKNOWN", "WRAPPED", "moves_data_only",
           "Unary", "Like", "Binary", "Ignore", "Factory", "Meshgrid", "Shape", "Move", "Reshape", "Flatten", "Index",
           "Wrapped", "Pad", "Reduce", "Softmax", "AlongDim", "Linear", "Addmm", "Embedding", "Conv", "ConvTranspose",
           "Convolution", "Pool", "LayerNorm", "GroupNorm", "BatchNorm", "Matmul", "Baddbmm", "Einsum", "SDPA"]
