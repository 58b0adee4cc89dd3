"""Front-end: turn a model into an fx.GraphModule the analysis can run.

``fx.symbolic_trace`` with timm's leaf-module and autowrap lists when timm is
installed.  The caller's model is never modified: tracing builds a new graph
whose GraphModule refers to the same submodules, and nothing downstream
writes to them.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import sys
import warnings

import torch
import torch.fx as fx

from .errors import SNPError, TraceError, brief, verbose
from .kernels import padded_sdpa


def _timm_lists():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except Exception:  # timm missing or older: plain fx
        return (), ()


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules=()):
        mods, fns = _timm_lists()
        super().__init__(autowrap_functions=tuple(fns) + (padded_sdpa,))  # a pruned graph's attention: one node
        self.leaf_types = tuple(mods) + tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m, qualname):
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


FRONTENDS = ("auto", "fx", "export")


def trace(model: torch.nn.Module, leaf_modules=(), example_inputs=None, frontend: str = "auto") -> fx.GraphModule:
    """Trace ``model`` (or copy the graph of a GraphModule).

    ``frontend``: "fx" (torch.fx.symbolic_trace, torch-level ops), "export"
    (torch.export, ATen-level ops, needs ``example_inputs``), or "auto": fx,
    and torch.export where fx cannot trace the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise SNPError(f"expected a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise SNPError(f"unknown frontend '{frontend}'; use one of {list(FRONTENDS)}")
    if frontend == "export":
        return export(model, example_inputs)
    if isinstance(model, fx.GraphModule):
        graph = fx.Graph()
        graph._codegen = copy.deepcopy(model.graph._codegen)
        out = graph.graph_copy(model.graph, {})
        graph.output(out)
        return fx.GraphModule(model, graph, class_name=type(model).__name__)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        advice = ("mark the module that fails as a leaf (leaf_modules=[ModuleClass]; leaf modules are left "
                  "unpruned) or make data-dependent control flow static (torch.cond)")
        if frontend == "auto" and example_inputs is not None:
            try:
                return export(model, example_inputs)
            except TraceError as e2:
                raise TraceError(f"torch.fx could not trace {type(model).__name__} ({brief(e)}) and "
                                 f"{e2.reason}; {advice}") from e
        raise TraceError(f"torch.fx could not trace {type(model).__name__}: {brief(e)}; {advice}") from e
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, class_name=name)
    if frontend == "auto" and example_inputs is not None and not leaf_modules and _opaque_leaves(gm):
        # leaves the op table cannot see into (nn.MultiheadAttention, timm's notrace blocks):
        # torch.export traces through them, down to ATen ops it knows
        try:
            return export(model, example_inputs)
        except TraceError:
            pass
    return gm


def _opaque_leaves(gm: fx.GraphModule) -> list[str]:
    from .ops import UNKNOWN, family_of
    mods = dict(gm.named_modules())
    return [n.target for n in gm.graph.nodes if n.op == "call_module"
            and family_of(n, mods)[1] is UNKNOWN and any(True for _ in mods[n.target].parameters())]


def export(model: torch.nn.Module, example_inputs, dynamic: bool = True) -> fx.GraphModule:
    """torch.export (non-strict) and unlift: an ATen graph whose parameters are get_attr nodes.

    ``dynamic``: batch and sequence length stay symbolic where the model allows (see
    ``dynamic_shapes``); where that export fails, the graph is exported for the example's
    shapes alone, with a warning.  ``gm.meta["snp_input_shapes"]`` says what the graph takes."""
    if example_inputs is None:
        raise SNPError("the export frontend needs example_inputs")
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    ep, why_static = None, None
    if dynamic:
        try:
            ds = dynamic_shapes(model, args, kwargs)
            with _quiet():  # traced on inputs of size 2 where the example has 1: export keeps size 1 static
                ep = torch.export.export(model, _widen(args, ds), _widen(kwargs, ds), strict=False,
                                         dynamic_shapes=ds)
        except Exception as e:  # the model (or its inputs) cannot be dynamic: the example's shapes then
            why_static = brief(e)
    if ep is None:
        try:
            with _quiet():
                ep = torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:
            reason = f"torch.export could not export {type(model).__name__}: {brief(e)}"
            err = TraceError(f"{reason}; decoder models export with use_cache=False, data-dependent branches "
                             "need torch.cond or static shapes")
            err.reason = reason
            raise err from e
        if why_static is not None:
            warnings.warn(f"snp_fx: {type(model).__name__} exported for the example inputs' shapes only "
                          f"(with dynamic batch / length torch.export failed: {why_static})", stacklevel=3)
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # its input-spec check rejects positional calls; the graph flattens anyway
    gm.meta["snp_frontend"] = "export"
    gm.meta["snp_input_shapes"] = input_shapes(gm, ep.range_constraints)
    if why_static is not None:
        gm.meta["snp_static_reason"] = why_static
    if isinstance(getattr(gm, "_guards_fn", None), torch.nn.Module):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        gm._guards_fn = ShapeGuard(gm._guards_fn, gm.meta["snp_input_shapes"], names)
    return gm


# integer inputs of two dims are tokens (input_ids, attention_mask, token_type_ids, position_ids):
# batch and length; every other tensor input: batch only (images keep their size, as do channels)
def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """torch.export ``dynamic_shapes`` for ``model``'s inputs, by argument name: ``Dim.AUTO`` (dynamic
    unless the model's code needs the example's size) on the batch dim of every tensor input and on
    the length dim of 2-d integer (token) inputs, up to ``config.max_position_embeddings`` where the
    model has one."""
    from torch.export import Dim
    own = getattr(model, "snp_dynamic_shapes", None)
    if callable(own):  # a wrapper that knows its inputs (snp_fx.hf.StaticCacheLM: the cache fixes the batch)
        return own(args, kwargs)
    # a Hugging Face model's position table bounds the length (GPT-2 reads past it, raising IndexError)
    cfg = getattr(model, "config", None)
    longest = next((v for v in (getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions"))
                    if isinstance(v, int) and v > 1), None)
    length = Dim.AUTO if longest is None else Dim.AUTO(max=longest)

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        tokens = x.dim() == 2 and not x.is_floating_point() and not x.is_complex()
        return {0: Dim.AUTO, 1: length} if tokens else {0: Dim.AUTO}

    out, params = {}, list(inspect.signature(model.forward).parameters.values())
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL:  # forward(self, *args): one tuple of specs
            out[p.name] = tuple(spec(a) for a in args[i:])
            break
        if i < len(args):
            out[p.name] = spec(args[i])
    out.update({k: spec(v) for k, v in kwargs.items()})
    return out


def _widen(inputs, ds: dict):
    """``inputs`` with every dynamic dim of size 1 repeated to size 2 (torch.export specialises an
    example's size 1, as it does 0; the analysis still runs on the example itself)."""
    def widen(x, spec):
        if not isinstance(x, torch.Tensor) or not spec:
            return x
        reps = [2 if d in spec and x.shape[d] == 1 else 1 for d in range(x.dim())]
        return x.repeat(reps) if 2 in reps else x
    if isinstance(inputs, dict):
        return {k: widen(v, ds.get(k)) for k, v in inputs.items()}
    specs = [x for v in ds.values() for x in (v if isinstance(v, tuple) else (v,))]  # *args: a tuple
    return tuple(widen(x, spec) for x, spec in zip(inputs, specs))


def input_shapes(gm: fx.GraphModule, ranges) -> dict:
    """Per tensor input of an exported graph, per dim: its size, or a symbol's range as
    ``[name, low, high]`` (high None: unbounded) for a dim that stayed dynamic."""
    out = {}
    for n in gm.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = []
        for s in val.shape:
            if isinstance(s, int):
                dims.append(s)
                continue
            expr = s.node.expr
            r = ranges.get(expr)
            lo, hi = (int(r.lower), None if r.upper.is_infinite or r.upper > sys.maxsize else int(r.upper)) \
                if r is not None else (0, None)
            # export's own lower bound 2 is not checked (its guards neither): size 1 runs as well
            dims.append([str(expr), lo if lo > 2 else min(lo, 1), hi])
        out[n.target] = dims
    return out


def describe_shapes(shapes: dict) -> str:
    """``input_ids (d0, d1<=512), pixel_values (d2, 3, 32, 32)``: what an exported graph takes
    (``d``: a dynamic size; inputs that share one share its name)."""
    names, parts = {}, []
    for name, dims in shapes.items():
        ds = []
        for d in dims:
            if isinstance(d, int):
                ds.append(str(d))
                continue
            sym = names.setdefault(d[0], f"d{len(names)}")
            ds.append(sym if d[2] is None else f"{sym}<={d[2]}")
        parts.append(f"{name} ({', '.join(ds)})")
    return ", ".join(parts)


class ShapeGuard(torch.nn.Module):
    """torch.export's input check (``_guards_fn``: one ``torch._assert`` per guard, raising
    AssertionError "Guard failed: input_ids.size()[0] == 8"), with a one-line SNPError that says
    which shapes the graph was exported for."""

    def __init__(self, guards: torch.nn.Module, shapes: dict, names: list):
        super().__init__()
        self.guards = guards
        self.shapes = shapes
        self.names = names  # of the graph's inputs, in order
        self._is_impure = True  # a check with no users: dead-code elimination must keep it

    def forward(self, *args):
        try:
            self.guards(*args)
        except AssertionError as e:
            got = ", ".join(f"{n} {tuple(a.shape)}" for n, a in zip(self.names, args) if isinstance(a, torch.Tensor))
            raise SNPError(f"inputs of shape {got} do not fit the graph, exported for {describe_shapes(self.shapes)} "
                           f"({brief(e).replace('AssertionError: ', '')})") from None


@contextlib.contextmanager
def _quiet():
    """torch.export prints graph dumps and symbolic-shape warnings on stderr when it fails: keep them
    back, and pass them on when it succeeds (or always, with SNP_FX_VERBOSE=1)."""
    if verbose():
        yield
        return
    held = io.StringIO()
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        logging.getLogger("torch").setLevel(level)
    sys.stderr.write(held.getvalue())  # reached only on success


def normalize_inputs(gm: fx.GraphModule, example_inputs) -> tuple:
    """Positional inputs for the graph's placeholders from a tensor, tuple or dict."""
    if example_inputs is None:
        raise SNPError("example_inputs are required, e.g. torch.randn(1, 3, 224, 224)")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (list, tuple)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise SNPError(f"example_inputs must be a tensor, a tuple of tensors or a dict, "
                       f"got {type(example_inputs).__name__}")
    if len(args) > len(placeholders):
        raise SNPError(f"{len(args)} example inputs given but the model takes {len(placeholders)}")
    names = [p.target for p in placeholders]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise SNPError(f"unknown input names {unknown}; the model takes {names}")
    out = list(args)
    for p in placeholders[len(args):]:
        if p.target in kwargs:
            out.append(kwargs.pop(p.target))
        elif p.args:
            out.append(p.args[0])
        else:
            raise SNPError(f"no example input for the model's argument `{p.target}`")
    return tuple(out)


def model_device_dtype(model: torch.nn.Module):
    for p in model.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


__all__ = ["trace", "normalize_inputs", "model_device_dtype", "inspect"]
