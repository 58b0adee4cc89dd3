"""Attention contractions: matmul / bmm / einsum / scaled_dot_product_attention.

A contraction of two channel operands pairs their contracted channels: q @ k^T makes an
attention site (q/k pairs, one dependent unit per score row: a head exists while any of its
channels does); the scores contracted with a third operand name the site's values.  A small
parameter contracted with q (a relative-position table shared by the heads) couples its
columns with q's channels in every head.
"""
from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx as fx

from .. import labels as L
from ..analysis.groups import Site
from ..kernels import padded_sdpa
from ..labels import FROZEN, NONE
from .experts import expert_bmm
from .movement import perm_args
from .registry import Args, OpFamily, op_key, register


def contract(p, n, la, lb, out_rank):
    """Labels of A @ B for reduced labels A (..., I, K), B (..., K, J)."""
    r = max(la.dim(), lb.dim(), 2)
    la = la.reshape((1,) * (r - la.dim()) + tuple(la.shape))
    lb = lb.reshape((1,) * (r - lb.dim()) + tuple(lb.shape))
    a_vk, b_vk = la.shape[-1] > 1, lb.shape[-2] > 1
    table = table_side(p, la, lb) if a_vk and b_vk else None
    if table is not None:
        return contract_table(p, la, lb, table == "a", out_rank)
    if a_vk and b_vk:
        if la.shape[-2] > 1 or lb.shape[-1] > 1:
            p.freeze_all(n, f"{n.name}: contraction of channels that also vary along free dims")
            return L.constant(FROZEN, out_rank)
        q, k = la[..., 0, :], lb[..., :, 0]
        qb, kb = torch.broadcast_tensors(q, k)
        p.space.union(qb, kb)
        site = _site_of_pairs(p, qb)
        if site is None:
            site = Site(node=n.name, kind="matmul", q=q, k=k, producers_before=len(p.producers))
            p.sites.append(site)
        flat_q = qb.reshape(-1, qb.shape[-1])
        flat_k = kb.reshape(-1, kb.shape[-1])
        dep = p.space.dependent([torch.cat([a, b]) for a, b in zip(flat_q, flat_k)])
        for d in dep.tolist():
            p.dep_site[d] = site
        out = dep.reshape(qb.shape[:-1] + (1, 1))
        return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))
    if a_vk or b_vk:
        p.space.freeze(la if a_vk else lb,
                          f"{n.name}: channels contracted against an operand without channels")
        ca = L.constant(NONE, r) if a_vk else la[..., :, :1]
        cb = L.constant(NONE, r) if b_vk else lb[..., :1, :]
    else:
        ca, cb = la[..., :, :1], lb[..., :1, :]
    # a constant of one unit (XLNet's one-hot segment matrix, made from token ids) names no
    # channels: contracted with scores it is not their values, and the scores stay per head
    ca, cb = (L.constant(NONE, t.dim()) if t.numel() == 1 and p.space.is_soft(t) else t for t in (ca, cb))
    ca, cb = torch.broadcast_tensors(ca, cb)
    dep_a = p.space.is_dependent(ca)
    dep_b = p.space.is_dependent(cb)
    if bool(dep_a.any()):
        m = dep_a & (cb > 0)
        p.space.add_support(ca[m], cb[m])
        _note_v(p, n, ca[dep_a], cb, lb[..., 0, :])  # attn @ v: v is (..., tokens, E)
    if bool(dep_b.any()):
        m = dep_b & (ca > 0)
        p.space.add_support(cb[m], ca[m])
        _note_v(p, n, cb[dep_b], ca, la[..., :, 0])  # v @ attn^T: v is (..., E, tokens)
    both = (ca >= 0) & (cb >= 0) & ~dep_a & ~dep_b
    if bool(both.any()):
        p.space.freeze(ca[both], f"{n.name}: product of two channel tensors")
        p.space.freeze(cb[both], f"{n.name}: product of two channel tensors")
    out = torch.where(dep_a | (ca < 0), cb, ca)
    return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))


def _site_of_pairs(p, q):
    """The site whose q/k pairs these are already (DeBERTa's position terms q @ pos_key^T and
    k @ pos_query^T pair the same channels per head as q @ k^T): one more term of its scores."""
    mine = L.rows(p.space.canon(q))
    if not p.sites or bool((mine <= 0).any()) or torch.unique(mine).numel() != mine.numel():
        return None  # only channels of their own (not frozen to an input, not shared by heads)
    mine = {tuple(r) for r in mine.tolist()}
    for site in reversed(p.sites):
        if {tuple(r) for r in L.rows(p.space.canon(site.q)).tolist()} == mine:
            return site
    return None


def _note_v(p, n, dep, other, v):
    """The values of the site whose scores ``dep`` are: the channels ``v`` of the other operand."""
    roots = p.space.roots()
    site_of = {int(roots[k]): s for k, s in p.dep_site.items()}
    for d in torch.unique(dep).tolist():
        site = site_of.get(int(roots[d]))
        if site is not None and site.v is None and bool((other > 0).any()):
            site.v = v
            site.av_node = n.name


def is_table(p, lab: torch.Tensor) -> bool:
    """Labels that are all elements of one small parameter, still uncoupled (a relative-position table)."""
    if not any(bool(((lab >= lo) & (lab < hi)).all()) for lo, hi in p.tables):
        return False
    roots = p.space.roots()
    return bool((torch.bincount(roots, minlength=roots.numel())[lab] == 1).all())  # coupled to nothing yet


def table_side(p, la, lb):
    """"a" or "b" if that operand is a parameter table the q/k pairing cannot take: it varies
    along its own free dim (one row per relative position) or the heads share it."""
    for side, tab, act, free in (("b", lb, la, -1), ("a", la, lb, -2)):
        if is_table(p, tab) and (tab.shape[free] > 1 or any(
                act.shape[d] > 1 and tab.shape[d] == 1 for d in range(act.dim() - 2))):
            return side
    return None


def contract_table(p, la, lb, a_table, out_rank):
    """A @ B where one side is a parameter table shared by the heads (q @ rel_pos^T).

    The contracted dim is one dense dim of both, so each of its positions is one
    channel everywhere: a table column is coupled with that q channel of every head
    (the heads keep the same q/k channels).  Each output row exists while its
    activation row has channels, like attention scores.
    """
    act = lb.transpose(-1, -2) if a_table else la          # (..., rows, K)
    tab = la if a_table else lb.transpose(-1, -2)          # (..., cols, K)
    p.space.union(act.unsqueeze(-2), tab.unsqueeze(-3))  # every (row, col) pair shares the K channel
    rows = act.reshape(-1, act.shape[-1])
    dep = p.space.dependent(list(rows)).reshape(act.shape[:-1] + (1,))
    out = dep.transpose(-1, -2) if a_table else dep
    return L.reduce(out.reshape((1,) * (out_rank - out.dim()) + tuple(out.shape)))


def weight_operand(p, node):
    """(name, parameter, transposed) if ``node`` is a 2-d parameter, as stored or transposed
    (``x @ self.weight.T``: Falcon's linear layers), else None."""
    transposed = False
    while isinstance(node, fx.Node) and node.op != "get_attr":
        key = op_key(node, p.modules) if node.op.startswith("call_") else None
        key = node.args[1] if key == "getattr" else key  # fx's w.T
        if key not in ("numpy_T", "T", "t", "transpose", "permute") or len(p.shapes.get(node.name) or ()) != 2 or \
                key == "permute" and perm_args(node) != [1, 0] or \
                key == "transpose" and (len(node.args) < 3 or node.args[1] % 2 == node.args[2] % 2):
            return None
        transposed, node = not transposed, node.args[0]
    if not isinstance(node, fx.Node):
        return None
    w = operator.attrgetter(node.target)(p.module)
    return (node.target, w, transposed) if isinstance(w, torch.nn.Parameter) and w.dim() == 2 else None


class Matmul(OpFamily):
    """matmul / bmm / mm: q @ k^T makes a site, attn @ v names its values; x @ W with W a
    parameter (stored or transposed) is a linear layer."""
    kind = "matmul"

    def propagate(self, p, n, key, args, kwargs, result):
        a, b = args[0], args[1]
        if a.dim() < 2 or b.dim() < 2:
            return p.refuse(n, f"{n.name}: matmul with a vector", result)
        experts = expert_bmm(p, n, args, result)  # MoE weights gathered per token (snp_fx/ops/experts.py)
        if experts is not None:
            return experts
        w, x_lab = weight_operand(p, n.args[1]), p.lab(n.args[0])
        # one output column (x @ w_g, w_g (D, 1): SwiftFormer's additive attention) is a per-token
        # score, paired with x's channels like q @ k^T (a site), not a layer with one output channel
        if w is not None and w[1].shape[0 if w[2] else 1] > 1 and len(L.varying_dims(x_lab)) <= 1 \
                and x_lab.shape[:-1].numel() == 1:
            name, weight, transposed = w
            ids = p.pids(name, weight)
            k_ids, out_ids = (ids[1], ids[0]) if transposed else (ids[0], ids[1])
            p.space.union(k_ids, x_lab.reshape(-1))
            p.producers.append((name, out_ids))
            if not transposed:
                p.producer_dim[name] = 1
            return out_ids.reshape((1,) * (result.dim() - 1) + (-1,))
        out = contract(p, n, x_lab, p.lab(n.args[1]), result.dim())
        _set_operands(p, n, lambda args, kwargs: (args[0], args[1].transpose(-1, -2)))
        return out

    def macs(self, c, n, key):
        # the contracted width from both operands: MoE expert weights gathered per token carry no
        # labels (their dense width), the activations they meet do (snp_fx/ops/experts.py)
        k = c.new(n.args[0].name)[-1]
        b = c.new(n.args[1].name) if isinstance(n.args[1], fx.Node) and isinstance(c.shapes.get(n.args[1].name), tuple) else []
        return math.prod(c.new(n.name)) * (min(k, b[-2]) if len(b) >= 2 else k)


class Baddbmm(Matmul):
    """baddbmm(input, b1, b2, beta, alpha) = beta * input + alpha * b1 @ b2 (Bloom: ALiBi + q @ k^T)."""
    kind = "baddbmm"

    def propagate(self, p, n, key, args, kwargs, result):
        a = Args(n, args, kwargs)
        out = contract(p, n, p.lab(a["batch1"]), p.lab(a["batch2"]), result.dim())
        _set_operands(p, n, lambda args, kwargs: (Args(n, args, kwargs).value("batch1"),
                                                  Args(n, args, kwargs).value("batch2").transpose(-1, -2)))
        bias = p.lab(a["input"])
        if isinstance(bias, torch.Tensor):
            out = p.elementwise([(out, tuple(result.shape)), (bias, tuple(a.value("input").shape))],
                                tuple(result.shape))
        return out

    def macs(self, c, n, key):
        return math.prod(c.new(n.name)) * c.new(Args(n)["batch1"].name)[-1]


def _einsum_parts(n):
    """(equation without spaces, operand nodes) of an einsum node."""
    nodes = n.args[1:] if not isinstance(n.args[1], (list, tuple)) else n.args[1]
    return n.args[0].replace(" ", ""), list(nodes)


def einsum_weight(n, root) -> dict | None:
    """The form of an einsum applying a parameter as a linear map, else None.

    ``'ibh,hnd->ibnd'`` (XLNet's q/k/v: h contracted, n and d made) and ``'ibnd,hnd->ibh'`` (its
    output projection: two contracted letters).  Each letter of the parameter is either contracted
    with the activation (not in the output) or made by it (not in the activation); the other letters
    of the activation pass through.  The parameter is labelled as a matrix: its contracted dims
    merged into one dim, its made dims into another (each run of letters adjacent), so the kept
    channels may differ per head (the same count) as they do for a Linear's weight.
    Returns {"w": operand index, "name", "sx", "sw", "so", "view": [dims, dims], "in": index of the
    contracted dims in ``view``}."""
    if n.op != "call_function" or op_key(n, {}) != "einsum" or not isinstance(n.args[0], str):
        return None
    eq, nodes = _einsum_parts(n)
    m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)", eq)
    if not m or len(nodes) != 2:
        return None
    for w in (1, 0):
        node = nodes[w]
        if not isinstance(node, fx.Node) or node.op != "get_attr" or nodes[1 - w] is node:
            continue
        try:
            t = operator.attrgetter(node.target)(root)
        except AttributeError:
            continue
        if not isinstance(t, torch.nn.Parameter):
            continue
        sx, sw, so = m.group(2 - w), m.group(1 + w), m.group(3)
        con = [c for c in sw if c in sx and c not in so]
        made = [c for c in sw if c not in sx and c in so]
        if len(set(sx)) != len(sx) or len(set(sw)) != len(sw) or len(set(so)) != len(so) or \
                not con or not made or len(con) + len(made) != len(sw) or \
                sorted(so) != sorted([c for c in sx if c not in sw] + made):
            return None
        dims_in = [sw.index(c) for c in con]
        dims_out = [sw.index(c) for c in made]
        if any(b - a != 1 for dims in (dims_in, dims_out) for a, b in zip(dims, dims[1:])):
            return None
        view = sorted([dims_in, dims_out])
        return {"w": w, "name": node.target, "sx": sx, "sw": sw, "so": so, "view": view,
                "in": view.index(dims_in), "con": con, "made": made}
    return None


class Einsum(OpFamily):
    kind = "einsum"

    def propagate(self, p, n, key, args, kwargs, result):
        """A parameter applied as a linear map (``einsum_weight``); else a two-operand einsum as a
        broadcast matmul: shared letters are batch dims, one contracted letter; free letters of
        one operand beyond the last are batch dims the other operand broadcasts over."""
        form = einsum_weight(n, p.module)
        if form is not None:
            return self.linear(p, n, form, args, result)
        eq = args[0].replace(" ", "")
        ops_ = args[1:] if not isinstance(args[1], (list, tuple)) else args[1]
        nodes = n.args[1:] if not isinstance(n.args[1], (list, tuple)) else n.args[1]
        m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]*)", eq)
        sa, sb, so = m.groups() if m else ("", "", "")
        con = [c for c in sa if c in sb and c not in so]
        fa = [c for c in sa if c not in sb]
        fb = [c for c in sb if c not in sa]
        if not m or len(ops_) != 2 or len(con) != 1 or not fa or not fb or sorted(so) != sorted(
                [c for c in sa if c in sb and c in so] + fa + fb) or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
            return p.refuse(n, f"{n.name}: einsum '{eq}' form not supported", result)
        batch = [c for c in so if c in sa and c in sb] + fa[:-1] + fb[:-1]
        order_a = batch + fa[-1:] + con  # A as (batch..., I, K)
        order_b = batch + fb[-1:] + con  # B as (batch..., J, K)

        def arrange(t, letters, order):  # permute to ``order``, size-1 dims for letters it lacks
            t = t.permute([letters.index(c) for c in order if c in letters])
            shape = iter(t.shape)
            return t.reshape([next(shape) if c in letters else 1 for c in order])
        la = arrange(L.expand(p.lab(nodes[0]), ops_[0].shape), sa, order_a)
        lb = arrange(L.expand(p.lab(nodes[1]), ops_[1].shape), sb, order_b)
        out = contract(p, n, L.reduce(la), L.reduce(lb.transpose(-1, -2)), len(so))
        _set_operands(p, n, lambda args, kwargs: tuple(
            arrange(t, s, o) for t, s, o in zip(args[1:] if not isinstance(args[1], (list, tuple)) else args[1],
                                                (sa, sb), (order_a, order_b))))
        order = batch + fa[-1:] + fb[-1:]
        return L.reduce(out.permute([order.index(c) for c in so]))

    def linear(self, p, n, form, args, result):
        """Labels of a parameter applied as a linear map: the activation's channels (only along the
        contracted letters) couple with the parameter's contracted dims; the made dims are the
        output's channels."""
        ops_ = args[1:] if not isinstance(args[1], (list, tuple)) else args[1]
        _, nodes = _einsum_parts(n)
        x_node, x, w = nodes[1 - form["w"]], ops_[1 - form["w"]], ops_[form["w"]]
        sx, sw, so, con = form["sx"], form["sw"], form["so"], form["con"]
        x_lab = p.lab(x_node)
        if not isinstance(x_lab, torch.Tensor):
            return p.refuse(n, f"{n.name}: einsum of a parameter with an operand without labels", result)
        x_lab = L.expand(x_lab, x.shape)
        if any(sx[d] not in con for d in L.varying_dims(L.reduce(x_lab))):
            return p.refuse(n, f"{n.name}: einsum input carries channels outside its contracted dims", result)
        ids = p.pids(form["name"], w, view=form["view"])
        if ids is None:
            return p.refuse(n, f"{n.name}: parameter `{form['name']}` is used with two layouts", result)
        # the activation's labels over the contracted letters, in the parameter's order
        at = x_lab[tuple(slice(None) if c in con else 0 for c in sx)]
        kept = [c for c in sx if c in con]
        p.space.union(ids[form["in"]], at.permute([kept.index(c) for c in con]).reshape(-1))
        out_ids = ids[1 - form["in"]]
        p.producers.append((form["name"], out_ids))
        p.producer_dim[form["name"]] = 1 - form["in"]
        made = form["made"]
        lab = out_ids.reshape([w.shape[sw.index(c)] for c in made])
        lab = lab.permute([made.index(c) for c in so if c in made])  # the output's order of them
        return lab.reshape([w.shape[sw.index(c)] if c in made else 1 for c in so])

    def consumer(self, n, key, modules):
        """A parameter applied as a linear map whose contracted letters end the input, in the
        parameter's order (``'ibnd,hnd->ibh'``): the input read as (rows, n * d) meets the weight
        as a matrix (its ``in`` dim: the contracted dims merged)."""
        form = einsum_weight(n, modules.get(""))
        if form is None or not form["sx"].endswith("".join(form["con"])):
            return None
        x = 1 - form["w"]
        return form["name"], None, form["in"], (1, x) if isinstance(n.args[1], (list, tuple)) else 1 + x

    def macs(self, c, n, key):
        eq, nodes = _einsum_parts(n)
        if len(nodes) != 2:  # one operand: a permutation or a sum ('ijbn->bnij'), no products
            return 0
        a, b = eq.split("->")[0].split(",")
        out = eq.split("->")[1]
        # the contracted sizes of an operand computed in the graph (a parameter's get_attr keeps its
        # dense shape in the estimator)
        i = 1 if nodes[0].op == "get_attr" and nodes[1].op != "get_attr" else 0
        letters, sa = (a, b)[i], c.new(nodes[i].name)
        other = (b, a)[i]
        return math.prod(c.new(n.name)) * math.prod(sa[letters.index(x)] for x in letters
                                                     if x in other and x not in out)


class SDPA(OpFamily):
    """scaled_dot_product_attention: q/k pairs, v, grouped-query heads, masks; the pruned call keeps
    the original scale."""
    kind = "sdpa"

    def propagate(self, p, n, key, args, kwargs, result):
        a = Args(n, args, kwargs)
        q, k, v = a.value("query"), a.value("key"), a.value("value")
        lq, lk, lv = (p.lab(a[x]) for x in ("query", "key", "value"))
        lk = L.expand(lk, k.shape)
        lv = L.expand(lv, v.shape)
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            lk = lk.repeat_interleave(rep, dim=-3)
            lv = lv.repeat_interleave(rep, dim=-3)
        scores = contract(p, n, lq, L.reduce(lk.transpose(-2, -1)), q.dim())

        def sdpa_operands(args, kwargs):
            got = Args(n, args, kwargs)
            qq, kk = got.value("query"), got.value("key")
            if qq.dim() >= 3 and kk.shape[-3] != qq.shape[-3]:
                kk = kk.repeat_interleave(qq.shape[-3] // kk.shape[-3], dim=-3)
            return qq, kk
        _set_operands(p, n, sdpa_operands)
        site = p.sites[-1] if p.sites and p.sites[-1].node == n.name else None
        if site is not None:
            site.kind = "sdpa"
        mask_lab = p.lab(a["attn_mask"])
        if isinstance(mask_lab, torch.Tensor) and bool((mask_lab >= 0).any()):
            s_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
            scores = p.elementwise([(scores, s_shape), (mask_lab, a.value("attn_mask").shape)], s_shape)
        return contract(p, n, scores, L.reduce(lv), result.dim())

    def rewrite(self, r, node, new, key):
        a = Args(node)
        q, v = a["query"], a["value"]
        old_e, new_e = r.a.shapes[q.name][-1], r.sizes_of(q)[-1]
        if new_e != old_e and a["scale"] is None:  # an explicit scale stays as it is
            a.set(new, "scale", old_e ** -0.5)
        if _padded(key, (old_e, r.a.shapes[v.name][-1]), (new_e, r.sizes_of(v)[-1])):
            new.target = padded_sdpa  # unequal q/k and v widths: zero-padded onto the fused kernel

    def macs(self, c, n, key):
        a = Args(n)
        q, k, v = (c.new(a[x].name) for x in ("query", "key", "value"))
        old = (c.shapes[a["query"].name][-1], c.shapes[a["value"].name][-1])
        width = 2 * max(q[-1], v[-1]) if _padded(key, old, (q[-1], v[-1])) else q[-1] + v[-1]
        return math.prod(q[:-1]) * k[-2] * width  # what runs: padded widths count


def _padded(key, old: tuple, new: tuple) -> bool:
    """Whether the pruned call pads: its q/k and v head widths (``new``) differ, and pruning changed
    them or the call pads already.  A model built with unequal widths keeps its own call."""
    return new[0] != new[1] and (key == "padded_sdpa" or new != old)


def _set_operands(p, n, fn):
    """What calibration reads at a site: ``fn(args, kwargs) -> (Q, K)``, both (..., tokens, E)."""
    if p.sites and p.sites[-1].node == n.name and p.sites[-1].operands is None:
        p.sites[-1].operands = fn


register(Matmul(), names=["matmul", "bmm", "mm"])
register(Baddbmm(), names=["baddbmm"])
register(Einsum(), names=["einsum"])
register(SDPA(), names=["scaled_dot_product_attention", "padded_sdpa"])
