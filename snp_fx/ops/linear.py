"""Channel producers on the last dim: Linear (module, F.linear, ATen), addmm (HF Conv1D: the
weight stored (in, out)) and Embedding (its dim 1 makes the channels).

A linear's weight may be rows of a parameter taken by slicing (nn.MultiheadAttention as
cross-attention: ``in_proj_weight`` split into w_q and w_kv): the parameter's get_attr is then
labelled by its rows (``sliced_weight_rows``), the slicing ops carry those labels, and the
output channels are the parameter rows the slice took; the rewrite prunes the rows and the
slicing ops renumber their bounds from the labels (indexing.py)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import labels as L
from ..labels import FROZEN
from .registry import Args, OpFamily, op_key, register

ROW_SLICES = ("getitem", "split", "split_with_sizes", "chunk", "narrow", "slice")  # taking rows of a weight


def _takes_rows(user, node) -> bool:
    """``user`` takes rows (dim 0) of ``node``'s tensor (a tuple of pieces: getitem picks one)."""
    key = op_key(user, {})
    if user.op not in ("call_function", "call_method") or key not in ROW_SLICES or user.args[0] is not node:
        return False
    if key == "getitem":
        idx = user.args[1]
        return isinstance(idx, (int, slice)) or isinstance(idx, tuple) and len(idx) >= 1 and \
            isinstance(idx[0], slice) and all(i == slice(None) for i in idx[1:])
    dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", 0)
    return dim == 0 if key != "narrow" and key != "slice" else (user.args[1] if len(user.args) > 1 else 0) == 0


def sliced_weight_rows(node) -> bool:
    """Whether a get_attr reaches a linear's weight only through slices of its rows."""
    found, todo = False, [node]
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if op_key(u, {}) == "linear" and u.op == "call_function" and Args(u)["weight"] is cur:
                found = found or cur is not node
            elif _takes_rows(u, cur):
                todo.append(u)
            else:
                return False
    return found


def _param_rows(p, w_node, w):
    """(parameter name, its row ids) when the weight ``w_node`` is rows of a 2-d parameter taken by
    slicing (whole rows, labelled by ``sliced_weight_rows``), else None."""
    src = w_node
    while src.op != "get_attr":
        if src.op not in ("call_function", "call_method") or not src.args or not hasattr(src.args[0], "op"):
            return None
        src = src.args[0]
    ids = p.param_ids.get(src.target)
    lab = p.lab(w_node)
    if ids is None or len(ids) != 2 or not isinstance(lab, torch.Tensor) or lab.dim() != 2 or \
            lab.shape[1] != 1 or w.shape[1] != ids[1].numel():
        return None
    rows = L.expand(lab, (w.shape[0], 1)).reshape(-1)
    return (src.target, rows) if bool(torch.isin(rows, ids[0]).all()) else None


def _last_dim_input(p, n, x_lab, what, in_ids):
    """The input's labels along its last dim, coupled with the weight's input channels ``in_ids``.

    An input whose labels vary along other dims too is frozen, but for a small parameter still
    coupled to nothing (one unit per element: DeBERTa's relative position embeddings fed to the
    projections): each of its columns joins its input channel, so no row goes on its own."""
    from .attention import is_table
    if any(d != x_lab.dim() - 1 for d in L.varying_dims(x_lab)):
        if x_lab.shape[-1] == in_ids.numel() and is_table(p, x_lab):
            p.space.union(x_lab, in_ids)
        x_lab = L.reduce(p.space.canon(x_lab))
        if any(d != x_lab.dim() - 1 for d in L.varying_dims(x_lab)):
            p.freeze_all(n, f"{n.name}: {what} input carries channels outside its last dim")
            return L.constant(FROZEN, 1)
    return x_lab.reshape(-1)


class Linear(OpFamily):
    kind = "linear"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        rows = None
        if n.op == "call_module":
            mod = p.modules[n.target]
            w_name, w, b = n.target + ".weight", mod.weight, mod.bias
        else:
            a = Args(n, args, kwargs)
            w_name, w, b = a.param("weight"), a.value("weight"), a.value("bias")
            rows = None if w_name else _param_rows(p, a["weight"], w)
            if not w_name and rows is None:
                return p.refuse(n, f"{n.name}: linear with a computed weight", result)
        if rows is not None:  # rows of a parameter: its row ids are this weight's output channels
            w_name, out_ids = rows
            in_ids = p.param_ids[w_name][1]
        else:
            out_ids, in_ids = p.pids(w_name, w)
        p.space.union(in_ids, _last_dim_input(p, n, p.lab(n.args[0]), "linear", in_ids))
        if b is not None and n.op == "call_module":
            p.space.union(p.pids(n.target + ".bias", b)[0], out_ids)
        elif b is not None:  # a bias node, a parameter or computed (BEiT's cat of q/k/v biases): align it
            p.space.union(L.expand(p.lab(a["bias"]), b.shape).reshape(-1), out_ids)
        p.producers.append((w_name, out_ids))
        return out_ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def prune_module(self, r, mod, node):
        mod.out_features, mod.in_features = mod.weight.shape

    def macs(self, c, n, key):
        return math.prod(c.new(n.name)) * c.new(n.args[0].name)[-1]

    def consumer(self, n, key, modules):
        if n.op == "call_module":
            bias = n.target + ".bias" if modules[n.target].bias is not None else None
            return n.target + ".weight", bias, 1, 0
        a = Args(n)
        bias = a.param("bias")
        return a.param("weight") or None, "computed" if bias is False else bias, 1, 0


class Addmm(OpFamily):
    """addmm(bias, x, W) with W (in, out): HF Conv1D and friends."""
    kind = "addmm"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        a = Args(n, args, kwargs)
        if not a.param("mat2"):
            return p.refuse(n, f"{n.name}: addmm with a computed weight", result)
        w_name = a.param("mat2")
        in_ids, out_ids = p.pids(w_name, a.value("mat2"))
        p.space.union(in_ids, _last_dim_input(p, n, p.lab(a["mat1"]), "addmm", in_ids))
        bias, b_name = a.value("input"), a.param("input")
        if b_name:
            p.space.union(p.pids(b_name, bias)[0], out_ids)
        elif isinstance(p.lab(a["input"]), torch.Tensor):
            p.space.union(L.expand(p.lab(a["input"]), bias.shape).reshape(-1), out_ids)
        p.producers.append((w_name, out_ids))
        p.producer_dim[w_name] = 1
        return out_ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def macs(self, c, n, key):
        return math.prod(c.new(n.name)) * c.new(Args(n)["mat1"].name)[-1]

    def consumer(self, n, key, modules):
        if n.op != "call_function":
            return None
        a = Args(n)
        bias = a.param("input")
        return a.param("mat2") or None, "computed" if bias is False else bias, 0, a.pos("mat1")


class Embedding(OpFamily):
    kind = "embedding"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        if n.op == "call_module":
            w_name, w = n.target + ".weight", p.modules[n.target].weight
        else:
            a = Args(n, args, kwargs)
            if not a.param("weight"):
                return p.refuse(n, f"{n.name}: embedding with a computed weight", result)
            w_name, w = a.param("weight"), a.value("weight")
        ids = p.pids(w_name, w)[1]
        p.producers.append((w_name, ids))
        p.producer_dim[w_name] = 1
        return ids.reshape((1,) * (result.dim() - 1) + (-1,))

    def prune_module(self, r, mod, node):
        mod.embedding_dim = mod.weight.shape[1]


register(Linear(), names=["linear"], modules=[nn.Linear])
register(Addmm(), names=["addmm"])
register(Embedding(), names=["embedding"], modules=[nn.Embedding])
