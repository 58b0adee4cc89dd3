"""Mixture-of-experts FFNs: expert weights stored as one 3-d parameter (experts, out, in), each
token multiplied by the expert its router chose.  Two forms (transformers' experts
implementations):

* ``grouped_mm``: tokens sorted by expert id, one grouped matmul with per-expert offsets
  (``aten._grouped_mm``, or ``transformers::grouped_mm_fallback`` where that op cannot run);
* ``batched_mm``: the weights gathered by expert id (``w[expert_ids]``: one (out, in) matrix per
  token), then ``bmm``.

Both are a linear layer per expert: the input's channels couple with the weight's in-dim, the
output's channels are its out-dim.  The expert dim is never a channel dim of the activations:
which expert a token row uses is data (routing).  The router's outputs, the experts, are never
pruned (topk over them refuses).  The ops on expert ids (sort, histc, index_put of the inverse
permutation) carry no channels.

Each expert's own hidden neurons (``split_experts``, after propagation).  During propagation a
hidden column j of the activations between an expert's GEMMs is one unit for all experts (a
*slot*).  Like the head dim of q/k, the hidden units of an expert weight are really (expert,
neuron) pairs: row r of the activations holds expert e(r)'s neuron j.  Where that reading is
exact, each slot class becomes one unit per expert, and the experts' hidden neurons form one
FFN group of classes (experts, width) that the planner prunes like q/k heads: the SAME COUNT in
every expert (a 3-d weight stays rectangular for grouped_mm / bmm), each expert choosing its
own neurons by its own scores.  Truly ragged widths (expert e keeping k_e neurons) cannot be
held by one 3-d tensor without zero padding, which saves nothing, so they are not planned.
The rewrite gathers each expert's kept rows / columns of the 3-d weights (constants: a gather
at rewrite time, no graph op); after the rewrite, activation column s is each row's expert's
s-th kept neuron, so the slots keep their first ``k`` (``planning.keep_mask``).  It is exact
when the slot class holds only expert-weight columns (no bias, norm or constant meets it),
every op between the GEMMs keeps the token rows and treats columns alike (element-wise ops,
chunk / split along the channels, (un)squeeze, dtype casts: SiLU(gate) * up), and every GEMM
on it routes its rows by the same expert ids (the same offsets / gather index).  Otherwise the
slot stays one unit and every expert keeps the same neurons (one 1-d FFN group, as before).

aten's ``_grouped_mm`` kernel takes rows of a multiple of 16 bytes only: the groups through it
get that width step (``Group.step``), which the planner rounds to.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx

from .. import labels as L
from .registry import OpFamily, family_of, op_key, register


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


def _gathers_experts(node):
    """w[idx] / w.index_select(0, idx): whole experts picked by an index tensor: the index node
    (the token rows' expert ids), else None."""
    key = op_key(node, {})
    if key == "index" and len(node.args) >= 2:
        idx = node.args[1]
        ok = isinstance(idx, (list, tuple)) and len(idx) == 1 and isinstance(idx[0], fx.Node)
        return idx[0] if ok else None
    if key == "index_select" and len(node.args) >= 3:
        return node.args[2] if node.args[1] == 0 and isinstance(node.args[2], fx.Node) else None
    if key == "getitem" and len(node.args) >= 2:
        return node.args[1] if isinstance(node.args[1], fx.Node) else None  # fx: w[idx]
    return None


def expert_weight(module, node):
    """(parameter name, parameter, transposed, gathered) when ``node`` is a 3-d parameter
    (experts, a, b) as stored, with its last two dims swapped (``transposed``) and / or gathered
    by expert id along dim 0 (``gathered``: the index node, one matrix per token; else None);
    else None."""
    transposed, gathered = False, None
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if node.op not in ("call_function", "call_method"):
            return None
        if _swaps_last_two(node, 3):
            transposed = not transposed
        elif _gathers_experts(node) is not None and gathered is None:  # (commutes with the swap)
            gathered = _gathers_experts(node)
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
            elif _gathers_experts(u) is not None and u.args[0] is cur and not gathered:
                todo.append((u, True))
            else:
                return False
    return found


@dataclasses.dataclass
class ExpertUse:
    """One expert GEMM: ``node`` multiplies the token rows of ``x`` by parameter ``param``'s
    expert matrices, contracting its dim ``k_dim``, making its dim ``out_dim``; ``route``: the node
    saying which expert each row takes (grouped_mm's offsets, batched_mm's gather index)."""
    node: str
    param: str
    x: str
    route: str
    k_dim: int
    out_dim: int


def _link(p, n, x_node, x_dim, x_rank, name, w, k_dim, out_dim, route):
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
    p.expert_uses.append(ExpertUse(n.name, name, x_node.name, route.name if isinstance(route, fx.Node) else n.name + ":unrouted", k_dim, out_dim))
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
        out = _link(p, n, n.args[0], -1, 2, name, w, k_dim, out_dim, offs)
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
        name, w, transposed, route = ew
        used = (2, 1) if transposed else (1, 2)  # parameter dims of the gathered matrices' dims -2, -1
        # W @ x: W's last dim is contracted, its rows are the output's dim -2; x @ W: the reverse
        k_dim, out_dim = (used[1], used[0]) if side == 0 else (used[0], used[1])
        x_dim = -2 if side == 0 else -1
        out = _link(p, n, n.args[1 - side], x_dim, 3, name, w, k_dim, out_dim, route)
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


# ops between two expert GEMMs that keep the token rows and treat every column alike (besides the
# element-wise families); chunk / split / (un)squeeze only off the row dim (checked in _row_wise)
ROW_WISE = ("chunk", "split", "split_with_sizes", "squeeze", "unsqueeze", "getitem", "contiguous", "clone",
            "alias", "detach")


def _row_wise(p, n, modules) -> bool:
    """Whether ``n`` keeps its input's token rows (dim 0) and treats every column alike."""
    if n.op not in ("call_function", "call_method"):
        return False
    key, fam = family_of(n, modules)
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    if src is None:
        return False
    if key == "getitem":  # a part of a chunk / split
        return isinstance(p.labels.get(src.name), (list, tuple)) and isinstance(n.args[1], int)
    if not (fam.elementwise or key in ROW_WISE):
        return False
    shapes = p.shapes.get(n.name)
    shapes = list(shapes) if isinstance(shapes, list) or (isinstance(shapes, tuple) and shapes and
                                                          isinstance(shapes[0], tuple)) else [shapes]
    rows = p.shapes.get(src.name)
    if not isinstance(rows, tuple) or not rows or any(not isinstance(s, tuple) or not s or s[0] != rows[0]
                                                      for s in shapes):
        return False
    if key in ("chunk", "split", "split_with_sizes", "squeeze", "unsqueeze"):
        dim = n.args[2] if key != "squeeze" and key != "unsqueeze" and len(n.args) > 2 else \
            n.args[1] if key in ("squeeze", "unsqueeze") and len(n.args) > 1 else n.kwargs.get("dim", 0)
        rank = len(shapes[0]) if key == "unsqueeze" else len(rows)
        return isinstance(dim, int) and dim % rank != 0
    return True


def split_experts(p) -> None:
    """After propagation: make each expert's hidden neurons its own units where that is exact (see
    the module doc).  Fills ``p.expert_dims`` (param -> {dim: unit ids (experts, n)}: column j of
    expert e) and ``p.expert_slots`` (slot unit -> its (experts,) units)."""
    uses = p.expert_uses
    if not uses:
        return
    roots = p.space.roots().clone()
    n_ids = roots.numel()
    experts = {u.param: operator.attrgetter(u.param)(p.module).shape[0] for u in uses}
    cols = {(u.param, d): p.param_ids[u.param][d] for u in uses for d in (u.k_dim, u.out_dim)}
    # a slot class holds columns of expert weights only: nothing else (a bias, a norm) meets it
    every = torch.cat(list(cols.values()))
    ok = torch.bincount(roots, minlength=n_ids) == torch.bincount(roots[every], minlength=n_ids)
    ok[0] = False
    for ids, _ in p.space.frozen + p.space.sensitive + p.space.rescaled:
        ok[roots[ids]] = False
    for lab in p.summed:
        ok[roots[lab[lab > 0]]] = False
    # every GEMM on a slot routes its rows alike (the same expert ids, the same expert count)
    routes: dict[int, set] = {}
    for u in uses:
        for d in (u.k_dim, u.out_dim):
            for r in torch.unique(roots[cols[(u.param, d)]]).tolist():
                routes.setdefault(r, set()).add((u.route, experts[u.param]))
    for r, rs in routes.items():
        if len(rs) != 1:
            ok[r] = False
    # every op carrying a slot keeps the rows and treats columns alike; its other operands carry no
    # channels, and what consumes it carries the slot on or is an expert GEMM's input
    gemms = {u.node: u for u in uses}
    inputs = {(u.node, u.x) for u in uses}
    modules = dict(p.module.named_modules())

    def slots_in(name):
        out = set()
        for lab in L.flat_labels(p.labels.get(name)):
            v = lab[lab > 0]
            if v.numel():
                out.update(torch.unique(roots[v]).tolist())
        return out

    carried = {n.name: {r for r in slots_in(n.name) if ok[r]} for n in p.module.graph.nodes}
    for n in p.module.graph.nodes:
        mine = carried[n.name]
        if not mine:
            continue
        good = n.name in gemms or _row_wise(p, n, modules)
        if good and n.name not in gemms:
            for a in n.all_input_nodes:
                for lab in L.flat_labels(p.labels.get(a.name)):
                    v = lab[lab > 0] if L.varying_dims(lab) else lab[:0]
                    if v.numel() and not bool(ok[roots[v]].all()):
                        good = False
        for u in n.users:  # (checks with no output, such as export's metadata asserts, read nothing)
            if not (carried.get(u.name, set()) & mine) and (u.name, n.name) not in inputs and \
                    not (u.op.startswith("call_") and family_of(u, modules)[1].kind == "ignore"):
                good = False
        if not good:
            ok[torch.tensor(sorted(mine))] = False
    # whole weight dims: a dim splits per expert only if all its slots do (and so all dims sharing them)
    while True:
        changed = False
        for ids in cols.values():
            r = roots[ids]
            if bool(ok[r].any()) and not bool(ok[r].all()):
                ok[r] = False
                changed = True
        if not changed:
            break
    per_slot: dict[int, torch.Tensor] = {}
    for (name, d), ids in cols.items():
        r = roots[ids]
        if not bool(ok[r].all()):
            continue
        for s in torch.unique(r).tolist():
            if s not in per_slot:
                per_slot[s] = p.space.new(experts[name])
        p.expert_dims.setdefault(name, {})[d] = torch.stack([per_slot[s] for s in r.tolist()], 1)
    p.expert_slots.update(per_slot)


def expert_slice(t: torch.Tensor, d: int, keep: torch.Tensor) -> torch.Tensor:
    """``t`` (experts, ...) with expert e's kept indices along dim ``d`` (``keep``: (experts, n)
    bool, the same count in every expert) gathered, in order."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"experts keep different counts along dim {d}: {sorted(set(counts.tolist()))}")
    idx = keep.nonzero()[:, 1].reshape(keep.shape[0], -1).to(t.device)
    shape = [1] * t.dim()
    shape[0], shape[d] = idx.shape
    return torch.take_along_dim(t, idx.reshape(shape), dim=d)


GROUPED = ("grouped_mm", "_grouped_mm", "grouped_mm_fallback")
register(GroupedMM(), names=list(GROUPED))
register(Counts(), names=["histc", "bincount"])
register(IndexPut(), names=["index_put", "index_put_"])
