"""Convolutions (channels on dim 1): dense, depthwise and grouped, plain and transposed —
modules, F.conv*d and ATen (``aten.convolution`` says ``transposed`` in an argument) — and
spatial pooling, which leaves channels alone."""
from __future__ import annotations

import math

import torch.nn as nn

from .. import labels as L
from ..labels import Irregular
from .registry import Args, OpFamily, register


class Conv(OpFamily):
    """Weight (out, in / groups, k...) — transposed: (in, out / groups, k...), dim 1 makes the channels."""
    kind = "conv"
    makes_channels = True
    transposed = False

    def is_transposed(self, n, args=None, kwargs=None) -> bool:
        return self.transposed

    def params(self, p, n, args, kwargs):
        """(weight name, weight, bias name, bias, groups), or None if computed in the graph."""
        if n.op == "call_module":
            mod = p.modules[n.target]
            return n.target + ".weight", mod.weight, n.target + ".bias", mod.bias, mod.groups
        a = Args(n, args, kwargs)
        if not a.param("weight") or a.param("bias") is False:
            return None
        return a.param("weight"), a.value("weight"), a.param("bias"), a.value("bias"), a.value("groups", 1)

    def propagate(self, p, n, key, args, kwargs, result):
        transposed = self.is_transposed(n, args, kwargs)
        what = "conv_transpose" if transposed else "conv"
        params = self.params(p, n, args, kwargs)
        if params is None:
            return p.refuse(n, f"{n.name}: {what} with computed parameters", result)
        w_name, w, b_name, b, groups = params
        depthwise = groups > 1 and groups == args[0].shape[1] == w.shape[0] and w.shape[1] == 1
        if groups != 1 and not depthwise and transposed:
            return p.refuse(n, f"{n.name}: grouped conv_transpose ({groups} groups)", result)
        x_lab = p.lab(n.args[0])
        if any(d != 1 for d in L.varying_dims(x_lab)):
            return p.refuse(n, f"{n.name}: {what} input carries channels outside dim 1", result)
        ids = p.pids(w_name, w)
        x_ch = L.expand(x_lab, x_lab.shape).movedim(1, -1).reshape(-1, x_lab.shape[1])[0]
        if depthwise:  # channel i -> channel i: dim 0 names the channels, dim 1 (size 1) is the kernel's
            p.space.union(ids[0], x_ch)
            p.space.freeze(ids[1], "depthwise kernel dim")
            out_ids = ids[0]
        elif groups == 1:
            p.space.union(ids[0 if transposed else 1], x_ch)
            out_ids = ids[1 if transposed else 0]
            if transposed:
                p.producer_dim[w_name] = 1
        else:
            # grouped (SqueezeBERT's 1 x 1 convs): weight column j reads input channel j of every
            # group, so those channels are one (removed together, every group keeps the same
            # inputs); each group's outputs are its own, kept in the same count in every group
            # (the pruned conv keeps its groups: none may go empty)
            p.space.union(ids[1].unsqueeze(0), x_ch.expand(args[0].shape[1]).reshape(groups, -1))
            out_ids = ids[0]
            p.width_blocks.append((out_ids.reshape(groups, -1), f"{n.name}: grouped conv ({groups} groups)"))
        if b is not None:
            p.space.union(p.pids(b_name, b)[0], out_ids)
        p.producers.append((w_name, out_ids))
        return out_ids.reshape((1, -1) + (1,) * (result.dim() - 2))

    def rewrite(self, r, node, new, key):
        a = Args(node)
        groups = a.get("groups", 1)
        if groups != 1 and groups == r.a.shapes[node.name][1]:  # depthwise: one group per kept channel
            a.set(new, "groups", r.sizes_of(node)[1])
        elif groups != 1:
            _check_groups(r, a["weight"].target, r.a.shapes[a["weight"].name], groups)

    def prune_module(self, r, mod, node):
        if mod.groups > 1 and not (mod.groups == mod.in_channels == mod.out_channels):
            _check_groups(r, node.target + ".weight", r.modules[node.target].weight.shape, mod.groups)
        w = mod.weight
        depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
        inner = w.shape[0] if depthwise else w.shape[1] * mod.groups
        if self.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], inner
        else:
            mod.out_channels, mod.in_channels = w.shape[0], inner
        if depthwise:
            mod.groups = w.shape[0]

    def macs(self, c, n, key):
        x = n.args[0]
        if n.op == "call_module" and not self.transposed:
            mod = c.modules[n.target]
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            return math.prod(c.new(n.name)) * (1 if depthwise else c.new(x.name)[1] // mod.groups) * \
                math.prod(mod.kernel_size)
        # what FlopCounterMode counts: batch * spatial size (of the input if transposed) * weight size
        if n.op == "call_module":
            w_name, w_shape = f"{n.target}.weight", c.modules[n.target].weight.shape
        else:
            w = Args(n)["weight"]
            w_name, w_shape = w.target, c.shapes[w.name]
        out = c.shapes[x.name] if self.is_transposed(n) else c.shapes[n.name]
        return out[0] * math.prod(out[2:]) * c.kept(w_name, w_shape)


def _check_groups(r, w_name, shape, groups):
    """A grouped conv keeps its groups: every group the same (non-zero) count of outputs."""
    counts = r.a.channels.dim_masks(w_name, shape, r.keep)[0].reshape(groups, -1).sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise Irregular(f"a grouped conv's {groups} groups keep {counts.tolist()} outputs: "
                        "each must keep the same count")


class ConvTranspose(Conv):
    kind = "conv_transpose"
    transposed = True


class Convolution(Conv):
    """Core ATen convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)."""
    kind = "convolution"

    def is_transposed(self, n, args=None, kwargs=None) -> bool:
        a = Args(n, args, kwargs)
        return bool(a.value("transposed") if args is not None else a["transposed"])


class Pool(OpFamily):
    """Spatial pooling acts on free dims only; channels pass through untouched."""
    kind = "pool"

    def propagate(self, p, n, key, args, kwargs, result):
        lab = p.lab(n.args[0])
        if any(d >= 2 for d in L.varying_dims(lab)):
            return p.refuse(n, f"{n.name}: pooling over a channel dim", result)
        return L.reduce(lab[..., :1, :1] if lab.dim() >= 4 else lab)


register(Conv(), names=["conv1d", "conv2d"], modules=[nn.Conv1d, nn.Conv2d])
register(ConvTranspose(), names=["conv_transpose1d", "conv_transpose2d"],
         modules=[nn.ConvTranspose1d, nn.ConvTranspose2d])
register(Convolution(), names=["convolution"])
register(Pool(), names=["avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool1d",
                        "_adaptive_avg_pool2d", "pool"],
         modules=[nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d, nn.AvgPool1d])
