"""Mixture-of-experts FFNs: expert weights stored as one 3-d parameter (experts, out, in), each
token multiplied by the expert its router chose.  Two forms (transformers' experts
implementations):

* ``grouped_mm``: tokens sorted by expert id, one grouped matmul with per-expert offsets
  (``aten._grouped_mm``, or ``transformers::grouped_mm_fallback`` where that op cannot run);
* ``batched_mm``: the weights gathered by expert id (``w[expert_ids]``: one (out, in) matrix per
  token), then ``bmm``.

Both are a linear layer per expert: the input's channels couple with the weight's in-dim, the
output's channels are its out-dim.  The expert dim is never a channel dim: which expert a token
uses is data (routing), so every expert keeps the same neuron indices (one FFN group per MoE
layer, planned like a dense FFN; the router's outputs, the experts, are never pruned: topk over
them refuses).  The ops on expert ids (sort, histc, index_put of the inverse permutation) carry
no channels.  aten's ``_grouped_mm`` kernel takes rows of a multiple of 16 bytes only: the groups
through it get that width step (``Group.step``), which the planner rounds to.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .. import labels as L
from .registry import OpFamily, op_key, register


def _parent(node):
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _swaps_last_two(node, rank) -> bool:
    """transpose(x, -2, -1) (either order) of a rank-``rank`` tensor."""
    key = op_key(node, {})
    if key in ("transpose", "swapaxes") and len(node.args) >= 3:
        return sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    if key in ("mT",) or key == "getattr" and node.args[1] == "mT":
        return True
    return False


def _gathers_experts(node) -> bool:
    """w[idx] / w.index_select(0, idx): whole experts picked by an index tensor."""
    key = op_key(node, {})
    if key == "index" and len(node.args) >= 2:
        idx = node.args[1]
        return isinstance(idx, (list, tuple)) and len(idx) == 1 and isinstance(idx[0], fx.Node)
    if key == "index_select" and len(node.args) >= 3:
        return node.args[1] == 0 and isinstance(node.args[2], fx.Node)
    if key == "getitem" and len(node.args) >= 2:
        return isinstance(node.args[1], fx.Node)  # fx: w[idx]
    return False


def expert_weight(module, node):
    """(parameter name, parameter, transposed, gathered) when ``node`` is a 3-d parameter
    (experts, a, b) as stored, with its last two dims swapped (``transposed``) and / or gathered
    by expert id along dim 0 (``gathered``, one matrix per token); else None."""
    transposed, gathered = False, False
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if node.op not in ("call_function", "call_method"):
            return None
        if _swaps_last_two(node, 3):
            transposed = not transposed
        elif _gathers_experts(node) and not gathered:  # (commutes with the swap)
            gathered = True
        else:
            return None
        node = _parent(node)
    if not isinstance(node, fx.Node):
        return None
    w = operator.attrgetter(node.target)(module)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 3:
        return None
    return node.target, w, transposed, gathered


def applies_experts(node) -> bool:
    """Whether every use of a get_attr is as expert weights (what ``expert_weight`` reads: whole for
    grouped_mm, gathered per token for bmm): its labels then carry nothing, as the consumers take
    the parameter's own dims."""
    todo, found = [(node, False)], False
    while todo:
        cur, gathered = todo.pop()
        for u in cur.users:
            key = op_key(u, {})
            if u.op not in ("call_function", "call_method"):
                return False
            if not gathered and key in GROUPED and len(u.args) > 1 and u.args[1] is cur and u.args[0] is not cur or \
                    gathered and key in ("bmm", "matmul") and cur in u.args[:2] and u.args[0] is not u.args[1]:
                found = True
            elif _swaps_last_two(u, 3) and u.args[0] is cur:
                todo.append((u, gathered))
            elif _gathers_experts(u) and u.args[0] is cur and not gathered:
                todo.append((u, True))
            else:
                return False
    return found


def _link(p, n, x_node, x_dim, x_rank, name, w, k_dim, out_dim):
    """Couple the input's channels (along ``x_dim`` only) with the weight's ``k_dim``; the output
    channels are its ``out_dim`` ids.  None when the input has channels elsewhere."""
    x_lab = p.lab(x_node)
    if not isinstance(x_lab, torch.Tensor):
        return None
    x_lab = x_lab.reshape((1,) * (x_rank - x_lab.dim()) + tuple(x_lab.shape))
    if any(d != x_dim % x_rank for d in L.varying_dims(x_lab)):
        return None
    ids = p.pids(name, w)
    p.space.union(ids[k_dim], x_lab.movedim(x_dim, -1).reshape(-1))
    p.producers.append((name, ids[out_dim]))
    p.producer_dim[name] = out_dim
    return ids[out_dim]


class GroupedMM(OpFamily):
    """grouped_mm(x (tokens, in), w (experts, in, out), offs): token rows offs[e-1]:offs[e] times
    expert e's matrix (tokens sorted by expert)."""
    kind = "grouped_mm"
    makes_channels = True

    def propagate(self, p, n, key, args, kwargs, result):
        ew = expert_weight(p.module, n.args[1]) if len(n.args) > 1 else None
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        if ew is None or ew[3] or args[0].dim() != 2 or bias is not None:
            return p.refuse(n, f"{n.name}: `{key}` other than tokens (2-d) times expert weights "
                               f"(a 3-d parameter) without bias", result)
        name, w, transposed, _ = ew
        offs = n.args[2] if len(n.args) > 2 else n.kwargs.get("offs")
        if isinstance(p.lab(offs), torch.Tensor):  # where each expert's rows end: data, never channels
            p.space.freeze(p.lab(offs), f"{n.name}: `{key}` offsets")
        k_dim, out_dim = (2, 1) if transposed else (1, 2)  # weight as used: (experts, in, out)
        out = _link(p, n, n.args[0], -1, 2, name, w, k_dim, out_dim)
        if out is None:
            return p.refuse(n, f"{n.name}: `{key}` input carries channels outside its last dim", result)
        if key != "grouped_mm_fallback":  # aten's kernel takes rows of a multiple of 16 bytes only
            step = max(1, 16 // w.element_size())
            p.width_steps += [(p.param_ids[name][k_dim], step), (out, step)]
        return out.reshape(1, -1)

    def macs(self, c, n, key):
        return math.prod(c.new(n.name)) * c.new(n.args[0].name)[-1]


def expert_bmm(p, n, args, result):
    """Labels of bmm / matmul with one operand expert weights gathered per token (batched_mm:
    ``w[expert_ids] @ x[..., None]``, or ``x[:, None] @ w[expert_ids]`` for weights stored
    (experts, in, out)); None if neither operand is."""
    if len(n.args) < 2 or result.dim() != 3:
        return None
    for side in (0, 1):
        ew = expert_weight(p.module, n.args[side])
        if ew is None or not ew[3]:
            continue
        name, w, transposed, _ = ew
        used = (2, 1) if transposed else (1, 2)  # parameter dims of the gathered matrices' dims -2, -1
        # W @ x: W's last dim is contracted, its rows are the output's dim -2; x @ W: the reverse
        k_dim, out_dim = (used[1], used[0]) if side == 0 else (used[0], used[1])
        x_dim = -2 if side == 0 else -1
        out = _link(p, n, n.args[1 - side], x_dim, 3, name, w, k_dim, out_dim)
        if out is None:
            return p.refuse(n, f"{n.name}: expert weights times an input with channels outside "
                               f"the contracted dim", result)
        return out.reshape(1, -1, 1) if side == 0 else out.reshape(1, 1, -1)
    return None


class Counts(OpFamily):
    """histc / bincount: counts of values (tokens per expert); an input with channels is refused."""
    kind = "counts"

    def propagate(self, p, n, key, args, kwargs, result):
        lab = p.lab(n.args[0])
        if isinstance(lab, torch.Tensor) and L.varying_dims(lab):
            return p.refuse(n, f"{n.name}: `{key}` counts values over channels", result)
        return lab.reshape(-1)[:1].reshape((1,) * result.dim())


class IndexPut(OpFamily):
    """x[indices] = values (index_put / index_put_; the inverse of a sort's permutation):
    followed where no operand has channels varying (positions are data), else refused."""
    kind = "index_put"

    def propagate(self, p, n, key, args, kwargs, result):
        x, values = n.args[0], n.args[2] if len(n.args) > 2 else n.kwargs.get("values")
        idx = n.args[1] if len(n.args) > 1 else n.kwargs.get("indices")
        labs = [p.lab(a) for a in [x, values, *(idx or [])] if isinstance(a, fx.Node)]
        if any(isinstance(lab, torch.Tensor) and L.varying_dims(lab) for lab in labs):
            return p.refuse(n, f"{n.name}: `{key}` writes positions of a tensor with channels", result)
        # the result holds x's and the values' elements: joined as an elementwise op would join them
        labs = [lab for lab in labs[:2] if isinstance(lab, torch.Tensor)]
        return p.elementwise([(lab, ()) for lab in labs], tuple(result.shape))


GROUPED = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")
register(GroupedMM(), names=list(GROUPED))
register(Counts(), names=["histc", "bincount"])
register(IndexPut(), names=["index_put", "index_put_"])
