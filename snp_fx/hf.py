"""Write a pruned Hugging Face model as a standard Hugging Face folder.

``to_hf(pruned, original, directory)``: the original's config with the pruned sizes (hidden size,
intermediate size, attention heads, key/value heads) and the pruned weights as safetensors, under
the original's parameter names, so ``AutoModelForCausalLM.from_pretrained(directory)`` loads it with
no custom code.  The written model is loaded back and run on the pruning's example inputs: it must
reproduce the pruned GraphModule, else nothing is left written.

Standard configs state one width per kind for every layer and one head dim: plan with
``uniform=True`` (snp_fx.plan).  The sizes are read off the pruned weights by the table below, for
the families whose layers are named like Llama's (Llama, Mistral, Qwen2, Qwen3, Gemma, ...).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import fx

from .errors import SNPError
from .trace import model_device_dtype
from .verify import relative_error

# config attribute -> (parameter name suffix in every layer, dim, divided by the head dim)
SIZES = {
    "hidden_size": ("embed_tokens.weight", 1, False),
    "intermediate_size": ("mlp.up_proj.weight", 0, False),
    "num_attention_heads": ("self_attn.q_proj.weight", 0, True),
    "num_key_value_heads": ("self_attn.k_proj.weight", 0, True),
}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # other dtypes: 1e-2


def to_hf(pruned: fx.GraphModule, original: torch.nn.Module, directory) -> None:
    """Write ``pruned`` (from snp_fx.prune / apply of the Hugging Face model ``original``) to
    ``directory`` as a Hugging Face model folder (config.json + model.safetensors)."""
    config = getattr(original, "config", None)
    if config is None or not hasattr(original, "save_pretrained"):
        raise SNPError(f"to_hf writes Hugging Face models; {type(original).__name__} has no config / save_pretrained")
    if not isinstance(pruned, fx.GraphModule) or "snp_plan" not in getattr(pruned, "meta", {}):
        raise SNPError("to_hf expects the GraphModule snp_fx.prune / apply made from `original`")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SNPError(f"'{directory}' is a file, not a folder: give a folder name (it is created if missing)")
    state = pruned.state_dict()
    wanted = original.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise SNPError(f"the pruned model lacks the original's parameters {missing[:3]}: to_hf needs a model "
                       "pruned through the torch.export front-end (frontend='export'), which keeps their names")
    sizes = _sizes(config, state)
    new = type(config).from_dict({**config.to_dict(), **sizes})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(new, "head_dim", None) is None and new.hidden_size // new.num_attention_heads != head_dim:
        new.head_dim = head_dim  # hidden size pruned, heads whole: the head dim no longer follows from them
    quiet = _progress_bars_off()
    tmp = tempfile.mkdtemp(prefix=".snp_fx_hf_", dir=os.path.dirname(os.path.abspath(directory)) or ".")
    try:
        model = type(original)(new).to(model_device_dtype(pruned)[1])
        try:
            model.load_state_dict({k: state[k] for k in wanted}, strict=True)
        except RuntimeError as e:
            raise SNPError(f"the pruned weights do not fit a {type(original).__name__} with {sizes}: "
                           f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}; "
                           "plan with uniform=True so every layer keeps the same widths") from None
        model.save_pretrained(tmp)
        _check(pruned, type(original).from_pretrained(tmp).eval())
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        quiet()
    with open(os.path.join(directory, "snp_fx_plan.json"), "w") as f:
        f.write(pruned.meta["snp_plan"])


def _progress_bars_off():
    """Hold back transformers' progress bars while writing and reading back; returns the undo."""
    from transformers.utils import logging
    if not logging.is_progress_bar_enabled():
        return lambda: None
    logging.disable_progress_bar()
    return logging.enable_progress_bar


def _sizes(config, state: dict) -> dict:
    """The config's sizes read off the pruned weights; one value per attribute or an error."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out = {}
    for attr, (suffix, dim, per_head) in SIZES.items():
        if not hasattr(config, attr):
            continue
        values = {k: v.shape[dim] // (head_dim if per_head else 1) for k, v in state.items() if k.endswith(suffix)}
        if not values:
            continue
        if per_head and any(v.shape[dim] % head_dim for k, v in state.items() if k.endswith(suffix)):
            raise SNPError(f"{attr}: the pruned model's head dim is not the original {head_dim} (q/k or v widths "
                           "were pruned per head); a standard config has one head dim: plan with uniform=True")
        if len(set(values.values())) > 1:
            raise SNPError(f"{attr} differs between layers ({sorted(set(values.values()))}); a standard config "
                           "has one: plan with uniform=True")
        out[attr] = values.popitem()[1]
    return out


@torch.no_grad()
def _check(pruned: fx.GraphModule, loaded: torch.nn.Module) -> None:
    """The loaded model reproduces the pruned one on the example inputs (logits compared)."""
    inputs = pruned.meta.get("snp_example_inputs")
    if not isinstance(inputs, dict):
        raise SNPError("to_hf needs the keyword example inputs the model was pruned with (recorded by apply)")
    got, ref = loaded(**inputs), pruned(**inputs)
    got, ref = getattr(got, "logits", got), getattr(ref, "logits", ref)
    err = relative_error(got, ref)
    tol = TOLERANCE.get(ref.dtype, 1e-2)
    if not err < tol:
        raise SNPError(f"the written model does not reproduce the pruned one (relative error {err:.2e}, "
                       f"tolerance {tol:.0e}): its architecture cannot express this plan; plan with uniform=True")


__all__ = ["to_hf"]
