"""Rewrite: emit a new, physically smaller GraphModule for a keep mask.

Every parameter and buffer is sliced on its pruned dims (parameter dims carry unit ids from
the analysis); each node is then fixed by its op family (snp_fx/ops: literal sizes, split
sections, fused qkv, the attention scale).  Every tensor must keep a regular layout.  The
input GraphModule and its modules are never modified.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from . import labels as L
from . import ops
from .analysis import Analysis
from .errors import RewriteError
from .labels import Irregular, pruned_sizes
from .ops.movement import perm_args


class _Rewriter:
    """Copies the graph node by node; families fix the copies (``fix``).  What families use:
    ``a`` (the analysis), ``keep``, ``graph`` / ``env`` / ``attrs`` (the new graph, old node ->
    new node, new attributes), ``sizes_of`` / ``new_sizes`` (pruned shapes)."""

    def __init__(self, analysis: Analysis, keep: torch.Tensor):
        self.a = analysis
        self.gm = analysis.gm
        self.keep = keep  # keep[id] for every unit id
        self.modules = dict(self.gm.named_modules())
        self.graph = fx.Graph()
        self.graph._codegen = copy.deepcopy(self.gm.graph._codegen)  # keeps pytree in/out (torch.export)
        self.env: dict[fx.Node, fx.Node] = {}
        self.attrs: dict[str, object] = {}
        self.skip: set[fx.Node] = set()
        self.fused: set[fx.Node] = set()  # fused-qkv reshapes replaced by per-slot parts
        self.ragged: dict[str, int | None] = {}  # node -> its ragged channel dim (see ragged_of)

    # ---- sizes ---------------------------------------------------------------
    def new_sizes(self, lab: torch.Tensor, shape, dims=None, ragged=None) -> list[int]:
        return pruned_sizes(lab, shape, self.keep, dims, ragged)

    def ragged_of(self, node: fx.Node):
        """The channel dim of ``node``'s tensor that keeps per-slice choices: the innermost, as a
        reshape splitting heads leaves it, carried along by permutes and elementwise ops (NesT
        moves it outwards).  Which dim it is cannot be read off the keep pattern alone."""
        if node.name in self.ragged:
            return self.ragged[node.name]
        lab, shape = self.a.labels.get(node.name), self.a.shapes.get(node.name)
        r = None
        if isinstance(lab, torch.Tensor) and isinstance(shape, tuple) and L.varying_dims(lab):
            r = len(shape) - lab.dim() + L.varying_dims(lab)[-1]
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            key, fam = ops.family_of(node, self.modules) if node.op.startswith("call_") else (None, None)
            src_shape = self.a.shapes.get(src.name) if src is not None else None
            if key is not None and isinstance(src_shape, tuple) and len(L.varying_dims(lab)) > 1:
                rs = self.ragged_of(src)
                if rs is not None and key == "permute":
                    r = perm_args(node).index(rs) if len(src_shape) == len(shape) else r
                elif rs is not None and key == "transpose":
                    a, b = [x % len(shape) for x in node.args[1:3]]
                    r = b if rs == a else a if rs == b else rs
                elif rs is not None and len(src_shape) == len(shape) and (
                        key in ("contiguous", "clone") or fam.elementwise):
                    r = rs
        self.ragged[node.name] = r
        return r

    def check_layout(self, node: fx.Node):
        """Every tensor must keep a regular layout: whole slices on all channel dims but one, which
        may keep different indices per slice (the same count).  Where that dim is not the innermost
        (NesT), flattening reorders channels: ``restore_order`` gathers them back."""
        lab, shape = self.a.labels.get(node.name), self.a.shapes.get(node.name)
        for lab_i, shape_i in zip(*((lab, shape) if isinstance(lab, (list, tuple)) else ((lab,), (shape,)))):
            if isinstance(lab_i, torch.Tensor) and isinstance(shape_i, tuple) and len(L.varying_dims(lab_i)) > 1:
                self.new_sizes(lab_i, shape_i, ragged=self.ragged_of(node) if lab_i is lab else None)

    def sizes_of(self, node: fx.Node):
        return self.new_sizes(self.a.labels[node.name], self.a.shapes[node.name], ragged=self.ragged_of(node))

    # ---- parameters ----------------------------------------------------------
    def slice_tensor(self, name: str, t: torch.Tensor) -> torch.Tensor:
        ch = self.a.channels
        out = ch.as_view(name, t.detach())  # merged dims (an einsum's weight) sliced as one
        experts = ch.expert_masks(name, self.keep)  # MoE weights: each expert its own neurons
        for d, m in enumerate(ch.dim_masks(name, t.shape, self.keep)):
            if not bool(m.all()) and d not in experts:
                out = out.index_select(d, m.nonzero().flatten().to(out.device))
        for d, m in experts.items():
            try:
                out = ops.experts.expert_slice(out, d, m)
            except ValueError as e:
                raise RewriteError(f"cannot slice `{name}`: {e}") from None
        if name in ch.views:
            out = out.reshape(ch.pruned_shape(name, t.shape, self.keep))
        out = out.clone()
        if isinstance(t, nn.Parameter):
            return nn.Parameter(out, requires_grad=t.requires_grad)
        return out

    def prune_module(self, target: str, node: fx.Node) -> nn.Module:
        mod = copy.deepcopy(self.modules[target])
        for pname, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, pname, self.slice_tensor(f"{target}.{pname}", p))
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None:
                mod._buffers[bname] = self.slice_tensor(f"{target}.{bname}", b)
        return ops.family_of(node, self.modules)[1].prune_module(self, mod, node) or mod  # or a replacement

    # ---- graph ---------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], lambda n: self.env[n]))
                continue
            new = self.graph.node_copy(node, lambda n: self.env[n])
            self.env[node] = new
            try:
                self.fix(node, new)
                if node not in self.skip and node not in self.fused:
                    self.check_layout(node)
            except Irregular as e:
                raise RewriteError(f"cannot rewrite node `{node.name}` ({node.format_node()}): {e}",
                                   node=node.name) from None
        self.drop_noop_modules()
        gm = fx.GraphModule(self.attrs, self.graph, class_name=self.gm.__class__.__name__)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        gm.meta = dict(getattr(self.gm, "meta", {}))
        gm.meta["snp_source_nodes"] = {new.name: old.name for old, new in self.env.items()}  # for errors
        return gm

    def drop_noop_modules(self):
        """Calls of ``nn.Identity`` and ``Dropout(p=0)`` pass their input through in train and eval
        mode alike: bypass them.  timm's blocks hold ~10 each, and at batch 1 a module call's Python
        overhead (attribute walk, ``__call__``, hooks check) is a visible part of a pruned forward."""
        for node in list(self.graph.nodes):
            if node.op != "call_module" or node.kwargs or len(node.args) != 1:
                continue
            mod = self.attrs.get(node.target)
            noop = type(mod) is nn.Identity or (
                isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p == 0)
            hooked = mod._forward_hooks or mod._forward_pre_hooks
            if noop and not hooked and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)

    def fix(self, node: fx.Node, new: fx.Node):
        if node.op == "get_attr":
            t = operator.attrgetter(node.target)(self.gm)
            if node.target in self.a.state:  # a KV cache: the channels of what is written into it
                self.attrs[node.target] = ops.cache.pruned_state(self, node.target, t)
            else:
                self.attrs[node.target] = self.slice_tensor(node.target, t) if isinstance(t, torch.Tensor) else t
        elif node.op == "call_module":
            self.attrs[node.target] = self.prune_module(node.target, node)
        elif node.op in ("call_function", "call_method"):
            key, family = ops.family_of(node, self.modules)
            family.rewrite(self, node, new, key)


def rewrite(analysis: Analysis, keep: torch.Tensor) -> fx.GraphModule:
    """The pruned GraphModule: ``keep[id]`` for every unit id (snp_fx.planning.keep_mask)."""
    return _Rewriter(analysis, keep).run()
