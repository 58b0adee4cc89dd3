"""Channel producers on the last dim: Linear (module, F.linear, ATen), addmm (HF Conv1D: the
weight stored (in, out)) and Embedding (its dim 1 makes the channels)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import labels as L
from ..labels import FROZEN
from .registry import Args, OpFamily, register


def _last_dim_input(p, n, x_lab, what):
    """The input's labels along its last dim; frozen if it carries channels elsewhere."""
    if any(d != x_lab.dim() - 1 for d in L.varying_dims(x_lab)):
        p.freeze_all(n, f"{n.name}: {what} input carries channels outside its last dim")
        return L.constant(FROZEN, 1)
    return x_lab.reshape(-1)


class Linear(OpFamily):
    kind = "linear"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        if n.op == "call_module":
            mod = p.modules[n.target]
            w_name, w, b = n.target + ".weight", mod.weight, mod.bias
        else:
            a = Args(n, args, kwargs)
            if not a.param("weight"):
                return p.refuse(n, f"{n.name}: linear with a computed weight", result)
            w_name, w, b = a.param("weight"), a.value("weight"), a.value("bias")
        out_ids, in_ids = p.pids(w_name, w)
        p.space.union(in_ids, _last_dim_input(p, n, p.lab(n.args[0]), "linear"))
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
        p.space.union(in_ids, _last_dim_input(p, n, p.lab(a["mat1"]), "addmm"))
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
