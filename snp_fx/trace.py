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


def export(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    """torch.export (non-strict) and unlift: an ATen graph whose parameters are get_attr nodes."""
    if example_inputs is None:
        raise SNPError("the export frontend needs example_inputs")
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    try:
        with _quiet():
            ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        reason = f"torch.export could not export {type(model).__name__}: {brief(e)}"
        err = TraceError(f"{reason}; decoder models export with use_cache=False, data-dependent branches "
                         "need torch.cond or static shapes")
        err.reason = reason
        raise err from e
    gm = ep.module()
    gm._forward_pre_hooks.clear()  # its input-spec check rejects positional calls; the graph flattens anyway
    gm.meta["snp_frontend"] = "export"
    return gm


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
