"""Oracles: check a pruned GraphModule against an independent reference.

* identity: pruning nothing gives the same outputs;
* mask equivalence: q/k, v, FFN and head pruning equal the *original* graph
  with the removed weight slices zeroed (the reference is built from the
  original graph and parameters, not from the rewrite).

Usable from users' own tests: ``snp_fx.verify.mask_equivalence(...)``, and
``check(...)`` for the error with the tolerance ``snp_fx.apply`` holds it to (``tolerance``:
1e-4 in float32; from the measured rounding error in float16 / bfloat16).
"""
from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from . import ops
from .analysis import Analysis
from .errors import brief
from .precision import lowest

# The self-check's tolerance: the largest relative error between the pruned model and the masked
# original (see ``tolerance``).
TOLERANCE = 1e-4   # float32 and wider: many times the rounding error of the models measured (1e-7..1e-6)
NOISE_FACTOR = 3   # narrower dtypes: this many times the reference's own rounding error
FALLBACK_EPS = 4   # that rounding error when it cannot be measured: this many eps of the dtype


def _zeroed(analysis, name, t: torch.Tensor, keep) -> torch.Tensor:
    out = t.detach().clone()
    removed, _, _ = _removed(analysis, name, t, keep)
    view = analysis.channels.as_view(name, out)  # merged dims (an einsum's weight): a view of ``out``
    for d, idx in removed:
        view.index_fill_(d, idx, 0) if d is not None else view.masked_fill_(idx, 0)
    return out


def masked_reference(analysis: Analysis, keep: torch.Tensor, exact_norms: bool = False,
                     dtype: torch.dtype | None = None) -> fx.GraphModule:
    """The original graph with every removed parameter slice set to zero.

    With ``exact_norms``, LayerNorms and channel means over partly removed
    channels are replaced by versions that count kept channels only: then
    residual pruning is exactly equivalent too.  Raises ValueError when some
    other op normalises over removed channels.  ``dtype``: the reference computes
    in that floating dtype (its parameters, buffers and the dtypes the graph names).

    Graph attributes (get_attr: torch.export graphs) are converted and zeroed as the reference
    runs, each right before its first use, so it holds no second copy of the weights (and never
    touches the analysed model's, which it shares); module parameters (fx graphs) are zeroed copies.
    """
    gm = analysis.gm
    attrs, lazy = {}, {}  # lazy: get_attr node -> (dim, removed indices) to zero as the reference runs
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = operator.attrgetter(node.target)(gm)
            attrs[node.target] = t
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                lazy[node.name] = _removed(analysis, node.target, t, keep)
            elif isinstance(t, torch.Tensor):
                attrs[node.target] = _zeroed(analysis, node.target, t, keep)
            elif isinstance(t, nn.Module):
                attrs[node.target] = copy.deepcopy(t).to(dtype) if dtype is not None else t
        elif node.op == "call_module":
            mod = copy.deepcopy(gm.get_submodule(node.target))
            for name, p in list(mod.named_parameters(recurse=False)):
                setattr(mod, name, nn.Parameter(_zeroed(analysis, f"{node.target}.{name}", p, keep),
                                                requires_grad=p.requires_grad))
            attrs[node.target] = mod.to(dtype) if dtype is not None else mod
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    _zero_as_used(graph, env, lazy, attrs, dtype)
    if exact_norms:
        _mask_norms(analysis, keep, gm, graph, env, attrs)
    if dtype is not None:
        def cast(v):
            return dtype if isinstance(v, torch.dtype) and v.is_floating_point else v
        for n in graph.nodes:
            n.args, n.kwargs = fx.node.map_aggregate(n.args, cast), fx.node.map_aggregate(n.kwargs, cast)
    return fx.GraphModule(attrs, graph)


def _zero_as_used(graph: fx.Graph, env: dict, lazy: dict, attrs: dict, dtype) -> None:
    """Convert (to ``dtype``) and zero the removed slices of each lazily handled attribute right before
    its first use: exported graphs fetch every weight at the top, and zeroed there all the copies
    would be alive at once; fx frees each after its last use."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for old, new in list(env.items()):
        if old.name not in lazy or not new.users:
            continue
        removed, view, shape = lazy[old.name]
        if not removed and dtype is None:
            continue
        users = list(new.users)
        with graph.inserting_before(min(users, key=order.__getitem__)):
            # a copy always (copy=True: a tensor already in ``dtype`` is not zeroed in place)
            out = graph.call_method("to", (new, dtype), {"copy": True}) if dtype is not None else new
            copied = out is not new
            if view is not None and removed:  # merged dims (an einsum's weight) zeroed as one
                out = graph.call_method("reshape", (out, view))
            for d, idx in removed:
                name = f"_snp_removed_{len(attrs)}"
                attrs[name] = idx
                index = graph.get_attr(name)
                # the first zeroing copies (unless the conversion did), the others work in place;
                # d None: a mask (MoE experts' own neurons)
                args = (out, d, index, 0.0) if d is not None else (out, index, 0.0)
                fn, method = (torch.index_fill, "index_fill_") if d is not None else (torch.masked_fill, "masked_fill_")
                out = graph.call_method(method, args) if copied else graph.call_function(fn, args)
                copied = True
            if view is not None and removed:
                out = graph.call_method("reshape", (out, shape))
        for u in users:
            u.replace_input_with(new, out)
        env[old] = out


def _removed(analysis, name, t: torch.Tensor, keep):
    """([(dim, indices removed along it)] for every dim of ``t`` with removed channels, or (None, mask
    of the removed elements) for each dim of an MoE expert weight pruned per expert (each expert its
    own); the view those dims are of (merged dims: an einsum's weight; else None); ``t``'s shape)."""
    experts = analysis.channels.expert_masks(name, keep)
    masks = analysis.channels.dim_masks(name, t.shape, keep)
    removed = [(d, (~m).nonzero().flatten().to(t.device)) for d, m in enumerate(masks)
               if not bool(m.all()) and d not in experts]
    for d, m in experts.items():
        if not bool(m.all()):
            shape = [1] * t.dim()
            shape[0], shape[d] = m.shape
            removed.append((None, (~m).reshape(shape).to(t.device)))
    view = analysis.channels.view_shape(name, t.shape) if name in analysis.channels.views else None
    return removed, view, tuple(t.shape)


class _Masker:
    """Turns the reference's normalisations over partly removed channels into ones that count
    kept channels only; each op family does its own (``OpFamily.masked``)."""

    def __init__(self, analysis, keep, graph, env, attrs):
        self.a, self.keep, self.graph, self.env, self.attrs = analysis, keep, graph, env, attrs
        self.device = next((p.device for p in analysis.gm.parameters()), torch.device("cpu"))
        self.n_masks = 0

    def shape_of(self, node):
        return self.a.shapes[node.name]

    def kept(self, lab: torch.Tensor) -> torch.Tensor:
        return torch.where(lab >= 0, self.keep[lab.clamp(min=0)], torch.ones_like(lab, dtype=torch.bool))

    def last_dim_mask(self, node):
        """Keep mask of the input's last dim where it has partly removed channels, else None;
        ValueError if positions remove different channels."""
        x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        lab = self.a.labels.get(x.name) if x is not None else None
        if not isinstance(lab, torch.Tensor) or lab.dim() == 0 or lab.shape[-1] == 1:
            return None
        kept = self.kept(lab)
        if bool(kept.all()):
            return None
        last = kept.reshape(-1, kept.shape[-1])
        if not bool((last == last[:1]).all()):
            raise ValueError(f"`{node.name}` normalises channels removed differently per position")
        return last[0].to(self.device)

    def add_mask(self, node, mask) -> fx.Node:
        """A get_attr of ``mask`` in the reference graph, before ``node``'s copy."""
        name = f"_snp_keep_{self.n_masks}"
        self.n_masks += 1
        self.attrs[name] = mask
        with self.graph.inserting_before(self.env[node]):
            return self.graph.get_attr(name)


def _mask_norms(analysis, keep, gm, graph, env, attrs):
    m = _Masker(analysis, keep, graph, env, attrs)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            key, family = ops.family_of(node, modules)
            family.masked(m, node, key)


def relative_error(a, b) -> float:
    """Largest relative L2 error over the tensors of two (nested) outputs."""
    la = [x for x in tree_leaves(a) if isinstance(x, torch.Tensor)]
    lb = [x for x in tree_leaves(b) if isinstance(x, torch.Tensor)]
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return float("inf")
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        x, y = x.double(), y.double()
        worst = max(worst, float((x - y).norm() / (y.norm() + 1e-12)))
    return worst


@torch.no_grad()
def mask_equivalence(analysis: Analysis, keep: torch.Tensor, pruned: nn.Module, inputs: tuple,
                     exact_norms: bool = False) -> float:
    """Relative error between ``pruned`` and the masked original on ``inputs``.

    ``exact_norms``: normalisations count kept channels only (needed when the
    residual stream is pruned; see ``masked_reference``).
    """
    ref = masked_reference(analysis, keep, exact_norms).eval()
    return relative_error(seeded(pruned, inputs), seeded(ref, inputs))


def seeded(model, inputs):
    """``model(*inputs)`` with the random generators seeded the same for every call (and restored
    after): a model that samples (ViTMAE's random patch masking) draws the same numbers in the
    pruned model as in the reference, where the draw does not depend on the pruned widths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model(*inputs)


def _cast(inputs, dtype):
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, inputs)


@torch.no_grad()
def tolerance(analysis: Analysis, keep: torch.Tensor, inputs: tuple, exact_norms: bool = False,
              expected=None) -> float:
    """The largest relative error ``check`` (and ``snp_fx.apply``'s self-check) lets through.

    float32 and wider: ``TOLERANCE`` (1e-4).  A model or inputs in float16 / bfloat16: the
    pruned model and the masked reference round differently (other matrix sizes, other
    summation orders), each by about the reference's own rounding error, measured here: the
    relative error of the masked reference in the model's dtype (``expected``, its outputs on
    ``inputs`` if given) against the same reference in float32.  The tolerance is
    ``NOISE_FACTOR`` (3) times that, and at least ``TOLERANCE``.  Measured on timm ViTs and
    Llamas (2-12 layers, random plans, float16 and bfloat16): pruned vs reference 0-1.4 times
    the rounding error; one kept q/k unit swapped for a removed one in sharp attention: 5-200
    times (tests/test_dtypes.py).
    """
    low = lowest(analysis.gm, inputs)
    if low is None:
        return TOLERANCE
    if expected is None:
        expected = seeded(masked_reference(analysis, keep, exact_norms).eval(), inputs)
    try:
        wide = masked_reference(analysis, keep, exact_norms, dtype=torch.float32).eval()
        noise = relative_error(expected, seeded(wide, _cast(inputs, torch.float32)))
    except Exception as e:  # noqa: BLE001  (say, an op with no float32 kernel: fall back to the dtype's eps)
        noise = FALLBACK_EPS * torch.finfo(low).eps
        warnings.warn(f"snp_fx: the check's float32 reference does not run ({brief(e)}); the rounding "
                      f"error of {low} is taken as {noise:.1e}", stacklevel=3)
    return max(TOLERANCE, NOISE_FACTOR * noise)


@torch.no_grad()
def check(analysis: Analysis, keep: torch.Tensor, pruned: nn.Module, inputs: tuple,
          exact_norms: bool = False) -> tuple[float, float]:
    """(error, tolerance): ``mask_equivalence``'s relative error on ``inputs`` and the largest one
    that passes (``tolerance``: 1e-4 in float32, from the rounding error in float16 / bfloat16)."""
    ref = masked_reference(analysis, keep, exact_norms).eval()
    expected = seeded(ref, inputs)
    del ref
    err = relative_error(seeded(pruned, inputs), expected)
    return err, tolerance(analysis, keep, inputs, exact_norms, expected)
