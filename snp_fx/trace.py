"""Front-end: turn a model into an fx.GraphModule the analysis can run.

``fx.symbolic_trace`` with timm's leaf-module and autowrap lists when timm is
installed.  The caller's model is never modified: tracing builds a new graph
whose GraphModule refers to the same submodules, and nothing downstream
writes to them.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx as fx

from .errors import SNPError, TraceError


def _timm_lists():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except Exception:  # timm missing or older: plain fx
        return (), ()


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules=()):
        mods, fns = _timm_lists()
        super().__init__(autowrap_functions=fns)
        self.leaf_types = tuple(mods) + tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_names = {n for n in leaf_modules if isinstance(n, str)}

    def is_leaf_module(self, m, qualname):
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module, leaf_modules=()) -> fx.GraphModule:
    """Trace ``model`` (or copy the graph of a GraphModule)."""
    if not isinstance(model, torch.nn.Module):
        raise SNPError(f"expected a torch.nn.Module or fx.GraphModule, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        graph = fx.Graph()
        out = graph.graph_copy(model.graph, {})
        graph.output(out)
        return fx.GraphModule(model, graph, class_name=type(model).__name__)
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "Mark the module that fails as a leaf (prune(..., leaf_modules=[ModuleClass])), or make the "
            "data-dependent control flow static; leaf modules are left unpruned.") from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, class_name=name)


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
