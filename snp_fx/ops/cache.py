"""A static KV cache written in place: ``cache.index_copy_(dim, positions, k)``.

Decoders exported for on-device generation (transformers' executorch integration) hold their
keys and values in buffers of shape (batch, kv heads, max length, head dim) and write each
step's k (after RoPE) / v into them at ``cache_position``; attention then reads the whole
buffer.  The buffer's channel dims are the written tensor's channels (a hard coupling): its
labels are the source's, and the rewrite gives the buffer the source's kept channels (per
head, as the source keeps them).  Anything else (a buffer read elsewhere, written along a
channel dim, of other sizes) is refused: its channels frozen, with the reason.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import labels as L
from ..errors import RewriteError
from .registry import OpFamily, register


class CacheWrite(OpFamily):
    """``buffer.index_copy_(dim, index, source)`` (and ``index_copy``) into a buffer this op alone uses."""
    kind = "cache_write"

    def propagate(self, p, n, key, args, kwargs, result):
        def arg(i, name, given):  # the same order for the ATen op, torch.index_copy and the tensor method
            return given[0][i] if i < len(given[0]) else given[1].get(name)
        buf, src = arg(0, "input", (n.args, n.kwargs)), arg(3, "source", (n.args, n.kwargs))
        real_buf, dim, real_src = (arg(i, k, (args, kwargs)) for i, k in ((0, "input"), (1, "dim"), (3, "source")))
        lab = p.lab(src)
        why = None
        if not (isinstance(buf, fx.Node) and buf.op == "get_attr"):
            why = "it writes into a computed tensor, not a buffer"
        elif len(buf.users) != 1 or any(u.op == "get_attr" and u.target == buf.target
                                        for u in n.graph.nodes if u is not buf):
            why = f"its buffer `{buf.target}` is used elsewhere too"
        elif not (isinstance(real_src, torch.Tensor) and isinstance(lab, torch.Tensor) and isinstance(dim, int)):
            why = "its source has no channel labels"
        elif real_src.dim() != real_buf.dim() or any(
                real_src.shape[d] != real_buf.shape[d] for d in range(real_buf.dim()) if d != dim % real_buf.dim()):
            why = "its source and buffer differ in sizes other than the written dim"
        else:
            lab = lab.reshape((1,) * (real_src.dim() - lab.dim()) + tuple(lab.shape))
            if lab.shape[dim % real_buf.dim()] > 1:
                why = "it writes along a channel dim"
        if why is not None:
            return p.refuse(n, f"{n.name}: `{key}` {why}", result)
        # the buffer holds nothing but what is written into it: its channels are the source's
        p.state[buf.target] = n.name
        return L.reduce(lab)


def pruned_state(r, target: str, t: torch.Tensor) -> torch.Tensor:
    """The buffer ``target`` written by a CacheWrite node: its elements on the source's kept
    channels, laid out as the pruned source (each head's kept entries in order on the last
    channel dim, which may keep other indices per head)."""
    node = next(x for x in r.gm.graph.nodes if x.name == r.a.state[target])
    lab, shape = r.a.labels[node.name], list(t.shape)
    sizes = r.sizes_of(node)
    ragged = r.ragged_of(node)
    lab = lab.reshape((1,) * (len(shape) - lab.dim()) + tuple(lab.shape))
    if ragged is not None and ragged != L.varying_dims(lab)[-1]:
        raise RewriteError(f"the kept channels of `{target}` are not in the order of its last channel dim")
    k = torch.where(lab >= 0, r.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))
    k = k.expand(shape).to(t.device)
    return t.detach()[k].reshape(sizes).clone()


class CopyInto(OpFamily):
    """``dst.copy_(src)``: dst takes src's values (broadcast), so their channels are one (coupled);
    the wrapper resets its cache length this way (``cumulative_length.copy_(cache_position[0])``)."""
    kind = "copy_into"

    def propagate(self, p, n, key, args, kwargs, result):
        labs = [p.lab(x) for x in n.args[:2]]
        if not all(isinstance(x, torch.Tensor) for x in args[:2]) or not all(isinstance(x, torch.Tensor) for x in labs):
            return p.refuse(n, f"{n.name}: `{key}` of something not a tensor", result)
        return p.elementwise([(labs[0], args[0].shape), (labs[1], args[1].shape)], tuple(result.shape))


register(CacheWrite(), names=["index_copy_", "index_copy"])
register(CopyInto(), names=["copy_"])
