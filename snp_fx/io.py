"""Save and load pruned models without pickle.

A pruned model is its plan applied to the original architecture, plus its
weights.  ``save`` writes a directory:

* ``model.safetensors``  the pruned GraphModule's state_dict (shared tensors once, aliases in its metadata)
* ``plan.json``          the PruningPlan that made it
* ``inputs.safetensors`` the example inputs (tensors; plain values go into the manifest)
* ``outputs.safetensors`` the model's outputs on them, to check the rebuild
* ``snp_fx.json``        the manifest: format version, trace frontend and leaf modules, the form of
                         the inputs, the original's parameter names and shapes, file checksums

``load(directory, model)`` re-traces the original ``model``, re-applies the plan (no verification:
the outputs are checked against the saved ones instead) and loads the weights.  Nothing is
unpickled: JSON and safetensors only, so a saved directory runs no code when loaded.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import fx
from torch.utils._pytree import tree_leaves

from . import api
from .errors import RewriteError, SNPError
from .planning import PruningPlan
from .precision import lowest
from .verify import FALLBACK_EPS, NOISE_FACTOR, relative_error

FORMAT = "snp_fx.saved/1"
MANIFEST = "snp_fx.json"
FILES = ("model.safetensors", "plan.json", "inputs.safetensors", "outputs.safetensors")
TOLERANCE = 1e-4  # outputs of the rebuilt model vs the saved ones (other machines may round differently)


def _tolerance(outputs) -> float:
    """``TOLERANCE``; for float16 / bfloat16 outputs, two roundings of that dtype apart, by the
    self-check's rule with its fallback rounding error (snp_fx.verify: 3 x 4 eps)."""
    low = lowest(outputs)
    return TOLERANCE if low is None else max(TOLERANCE, NOISE_FACTOR * FALLBACK_EPS * torch.finfo(low).eps)


class SavedModelError(SNPError):
    """A saved snp_fx model could not be saved or loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------

def save(pruned: fx.GraphModule, directory, example_inputs=None) -> None:
    """Write ``pruned`` (from ``snp_fx.prune`` / ``apply`` / ``load``) to ``directory`` without pickle.

    ``example_inputs``: the inputs the model was pruned with (default: those ``apply`` recorded);
    a tensor, a tuple of tensors, or a dict of keyword inputs (kept in that form).
    """
    meta = getattr(pruned, "meta", None)
    if not isinstance(pruned, fx.GraphModule) or not isinstance(meta, dict) or "snp_plan" not in meta:
        raise SavedModelError(f"save expects a GraphModule made by snp_fx.prune / apply / load, got "
                              f"{type(pruned).__name__} without a recorded plan (torch.load does not keep "
                              "GraphModule.meta); prune the model with snp_fx, or snp_fx.load it, then save")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SavedModelError(f"'{directory}' is a file, not a folder: give a folder name (it is created if missing)")
    if example_inputs is None:
        example_inputs = meta.get("snp_example_inputs")
    if example_inputs is None:
        raise SavedModelError("no example inputs recorded with this model: pass save(..., example_inputs=...)")
    if "snp_source_shapes" not in meta:
        raise SavedModelError("this GraphModule does not record its original model's parameter shapes "
                              "(made by an older snp_fx?): re-apply its plan with snp_fx.apply, then save")
    form, entries, tensors = _pack_inputs(example_inputs)
    leaves = [_leaf_entry(m) for m in meta.get("snp_leaf_modules", ())]
    device = _device(pruned)
    outputs = _run(pruned, form, _unpack_inputs(form, entries, tensors, device))
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)
    save_model(pruned, path("model.safetensors"), metadata={"format": "pt"})  # shared tensors stored once
    with open(path("plan.json"), "w") as f:
        f.write(meta["snp_plan"])
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path("inputs.safetensors"))
    save_file({str(i): t.detach().cpu().contiguous() for i, t in enumerate(outputs)}, path("outputs.safetensors"))
    manifest = {
        "format": FORMAT,
        "frontend": meta.get("snp_frontend", "fx"),
        "leaf_modules": leaves,
        "inputs": {"form": form, "entries": entries},
        "training": pruned.training,
        "source_shapes": meta["snp_source_shapes"],
        "sha256": {name: _sha256(path(name)) for name in FILES},
        "versions": {"torch": torch.__version__, "snp_fx": _version()},
    }
    with open(path(MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def _pack_inputs(example_inputs):
    """(form, entries, tensors): how the inputs are passed, JSON-able entries, tensors by key."""
    if isinstance(example_inputs, torch.Tensor):
        form, items = "tensor", [("0", example_inputs)]
    elif isinstance(example_inputs, dict):
        form, items = "dict", [(str(k), v) for k, v in example_inputs.items()]
    elif isinstance(example_inputs, (tuple, list)):
        form, items = "tuple", [(str(i), v) for i, v in enumerate(example_inputs)]
    else:
        raise SavedModelError(f"example inputs must be a tensor, a tuple of tensors or a dict, "
                              f"got {type(example_inputs).__name__}")
    entries, tensors = [], {}
    for key, v in items:
        if isinstance(v, torch.Tensor):
            entries.append({"name": key, "tensor": True})
            tensors[key] = v
        elif v is None or isinstance(v, (bool, int, float, str)):  # e.g. use_cache=False
            entries.append({"name": key, "value": v})
        else:
            raise SavedModelError(f"example input '{key}' is a {type(v).__name__}, which cannot be saved "
                                  "without pickle; pass tensors and plain values (bool, int, float, str, None)")
    return form, entries, tensors


def _unpack_inputs(form, entries, tensors, device):
    values = [(e["name"], tensors[e["name"]].to(device) if e.get("tensor") else e.get("value")) for e in entries]
    if form == "tensor":
        return values[0][1]
    if form == "dict":
        return dict(values)
    return tuple(v for _, v in values)


@torch.no_grad()
def _run(gm, form, inputs) -> list[torch.Tensor]:
    """The model's output tensors, flattened, in eval mode (no dropout)."""
    training = gm.training
    gm.eval()
    try:
        out = gm(inputs) if form == "tensor" else gm(**inputs) if form == "dict" else gm(*inputs)
    finally:
        gm.train(training)
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _class_name(t) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _leaf_entry(m) -> dict:
    """A leaf module given by qualified name ("blocks.0.attn") or by class (stored as its import path)."""
    if isinstance(m, str):
        return {"module": m}
    if isinstance(m, type):
        return {"class": _class_name(m)}
    raise SavedModelError(f"leaf module {m!r} is neither a module name nor a class; cannot save it")


# ---------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------

def load(directory, model) -> fx.GraphModule:
    """Rebuild a model saved by ``snp_fx.save``: re-apply its plan to ``model``, load its weights.

    ``model``: the original (dense) module the pruned one was made from, or a zero-argument
    function returning it (e.g. ``lambda: timm.create_model("deit_small_patch16_224")``); its
    weights do not matter, only its architecture.  Returns the pruned GraphModule, with outputs
    checked against the saved ones.  Nothing is unpickled.
    """
    manifest = _read_manifest(directory)
    path = lambda name: os.path.join(directory, name)
    for name in FILES:  # any edit after saving (plan indices, weights, inputs) is caught here
        if _sha256(path(name)) != manifest["sha256"].get(name):
            raise SavedModelError(f"{path(name)} was changed after it was saved (its checksum differs from "
                                  f"{MANIFEST}); restore the saved file, or save the model again with snp_fx.save")
    try:
        with open(path("plan.json")) as f:
            plan = PruningPlan.from_json(f.read())
    except (SNPError, KeyError, TypeError) as e:
        raise SavedModelError(f"{path('plan.json')} is not a valid plan ({e}); restore the saved file, "
                              "or save the model again") from e

    if not isinstance(model, torch.nn.Module) and callable(model):
        model = model()
    if not isinstance(model, torch.nn.Module):
        raise SavedModelError(f"load needs the original model (a torch.nn.Module or a function returning "
                              f"one), got {type(model).__name__}")
    _check_source(model, manifest["source_shapes"])
    _check_dtype(model, path("model.safetensors"))

    device = _device(model)
    inputs = _unpack_inputs(manifest["inputs"]["form"], manifest["inputs"]["entries"],
                            load_file(path("inputs.safetensors")), device)
    leaves = _resolve_leaves(model, manifest["leaf_modules"])
    try:
        a = api.analyze(model, inputs, leaf_modules=leaves, frontend=manifest["frontend"])
        gm = api.apply(model, plan, inputs, verify=False, analysis=a)
    except SNPError as e:
        raise SavedModelError(f"the saved plan does not apply to this model: {e}") from e
    except RewriteError as e:
        raise SavedModelError(f"the saved plan could not be re-applied to this model: {e}; "
                              "pass the same original model, with the same snp_fx and torch versions "
                              f"as when it was saved ({manifest.get('versions')})") from e
    _load_weights(gm, path("model.safetensors"), device)
    gm.train(bool(manifest.get("training", False)))

    saved = load_file(path("outputs.safetensors"), device=str(device))
    expected = [saved[str(i)] for i in range(len(saved))]
    got = _run(gm, manifest["inputs"]["form"], inputs)
    err = relative_error(got, expected)
    if not err <= _tolerance(expected):
        raise SavedModelError(f"the rebuilt model's outputs differ from the saved ones (relative error {err:.2e}): "
                              "the model passed to load has the original's parameter shapes but computes "
                              "something else (another config or activation?); pass the model it was pruned from")
    return gm


def _read_manifest(directory) -> dict:
    if not os.path.isdir(directory):
        raise SavedModelError(f"no saved model at '{directory}': not a directory; pass the directory "
                              "written by snp_fx.save")
    missing = [n for n in (MANIFEST,) + FILES if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise SavedModelError(f"'{directory}' is missing {missing}; an snp_fx.save directory holds "
                              f"{[MANIFEST, *FILES]}: copy the whole directory, or save the model again")
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise SavedModelError(f"{MANIFEST} in '{directory}' is not valid JSON ({e}); save the model again") from e
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt != FORMAT:
        raise SavedModelError(f"{MANIFEST} has format {fmt!r}; this snp_fx reads {FORMAT!r}. Load it with the "
                              "snp_fx version that saved it, or save the model again")
    keys = ("frontend", "leaf_modules", "inputs", "source_shapes", "sha256")
    if any(k not in manifest for k in keys):
        raise SavedModelError(f"{MANIFEST} lacks {[k for k in keys if k not in manifest]}; save the model again")
    return manifest


def _check_source(model, expected: dict) -> None:
    """The original's parameter names and shapes must be those the pruned model was made from."""
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    wrong = [f"{k}: {got[k]} (saved from {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or extra or wrong:
        parts = [f"{label} {xs[:4]}{' ...' if len(xs) > 4 else ''}"
                 for label, xs in (("missing", missing), ("unexpected", extra), ("different shapes", wrong)) if xs]
        raise SavedModelError(f"the model passed to load is not the architecture this pruned model was made from "
                              f"({type(model).__name__}: {'; '.join(parts)}); pass the original dense model "
                              "(same class and config)")


def _check_dtype(model, filename) -> None:
    """A model saved after .half() / .double() is rebuilt from the original converted the same way."""
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    with safe_open(filename, framework="pt") as f:
        saved = {names.get(f.get_slice(k).get_dtype()) for k in f.keys()} - {None}
    have = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(saved) == 1 and len(have) == 1 and saved != have:
        (want,), (got,) = saved, have
        raise SavedModelError(f"the saved weights are {want}, the model passed to load is {got}: convert the "
                              f"original model the same way first (model.to({want}))")


def _resolve_leaves(model, entries):
    """Leaf modules as recorded; classes are looked up among the model's own submodules (nothing is
    imported).  A class no submodule has cannot have changed the trace, so it is skipped."""
    types = {_class_name(type(m)): type(m) for m in model.modules()}
    out = []
    for e in entries:
        if "module" in e:
            out.append(e["module"])
        elif e.get("class") in types:
            out.append(types[e["class"]])
    return tuple(out)


def _load_weights(gm, filename, device) -> None:
    """Strict: every name and shape must match the rebuilt graph."""
    with safe_open(filename, framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        aliases = {k: v for k, v in (f.metadata() or {}).items() if v in shapes and k not in shapes}
    state = gm.state_dict()
    problems = [f"{k}: missing from the file" for k in state if k not in shapes and aliases.get(k) not in shapes]
    problems += [f"{k}: not in the rebuilt model" for k in [*shapes, *aliases] if k not in state]
    for k, t in state.items():
        s = shapes.get(k, shapes.get(aliases.get(k)))
        if s is not None and s != list(t.shape):
            problems.append(f"{k}: {s} in the file, {list(t.shape)} in the rebuilt model")
    if problems:
        raise SavedModelError(f"model.safetensors does not fit the graph rebuilt from plan.json ({len(problems)} "
                              f"tensors: {problems[:4]}); the two files come from different saves or were edited: "
                              "restore the directory written by snp_fx.save")
    state = load_file(filename, device=str(device))
    for k in aliases:  # a tensor the saved model shared under two names; the rebuilt one may hold two copies
        state[k] = state[aliases[k]]
    gm.load_state_dict(state, strict=True)


def _device(module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _sha256(filename) -> str:
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from . import __version__
    return __version__
