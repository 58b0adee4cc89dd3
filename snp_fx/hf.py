"""Write a pruned Hugging Face model as a standard Hugging Face folder.

``to_hf(pruned, original, directory)``: the original's config with the pruned sizes (hidden size,
intermediate size, attention heads, key/value heads) and the pruned weights as safetensors, under
the original's parameter names, so ``AutoModelForCausalLM.from_pretrained(directory)`` loads it with
no custom code.  The written model is loaded back and run on the pruning's example inputs: it must
reproduce the pruned GraphModule, else nothing is left written.

Standard configs state one width per kind for every layer and one head dim: plan with
``uniform=True`` (snp_fx.plan).  The sizes are read off the pruned weights by the table below, for
the families whose layers are named like Llama's (Llama, Mistral, Qwen2, Qwen3, Gemma, ...).

Any plan (per-layer widths, q/k apart from v) generates with a KV cache through ``StaticCacheLM``:
the decoder wrapped as transformers exports it for on-device use, its static cache held as buffers
written in place.  Pruned, the cache buffers keep the kept k / v channels of their layer
(snp_fx/ops/cache.py); ``generate`` runs the greedy loop, one new token per call.
"""
from __future__ import annotations

import copy
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


class StaticCacheLM(torch.nn.Module):
    """A Hugging Face decoder with a static KV cache held as buffers (transformers'
    ``TorchExportableModuleWithStaticCache``, the form it exports decoders in for on-device use).

    ``forward(input_ids, cache_position)``: the logits of the given tokens, at positions
    ``cache_position`` (``torch.arange(n)`` for a prompt of n tokens, then one position per new
    token); their keys and values are written into the cache, and attention reads the cache up
    to them.  Prune it like any model (``snp_fx.prune(StaticCacheLM(model, 128),
    StaticCacheLM.inputs(prompt))``; batch and length stay dynamic up to ``max_len``) and
    generate with ``generate``.  ``model`` is not modified; the wrapper shares its weights."""

    def __init__(self, model: torch.nn.Module, max_len: int, batch: int = 1):
        super().__init__()
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache
        config = getattr(getattr(model, "generation_config", None), "to_dict", None)
        if config is None or not hasattr(model, "config"):
            raise SNPError(f"StaticCacheLM wraps a Hugging Face decoder (e.g. LlamaForCausalLM); "
                           f"{type(model).__name__} has no config / generation_config")
        if not (isinstance(max_len, int) and max_len > 0 and isinstance(batch, int) and batch > 0):
            raise SNPError(f"max_len and batch must be positive ints, got {max_len!r} and {batch!r}")
        own = model.generation_config
        model.generation_config = copy.deepcopy(own)  # the wrapper reads its cache settings from here
        model.generation_config.use_cache, model.generation_config.cache_implementation = True, "static"
        try:
            self.inner = TorchExportableModuleWithStaticCache(model, batch_size=batch, max_cache_len=max_len)
        finally:
            model.generation_config = own
        self.max_len = max_len

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] > self.max_len:
            raise SNPError(f"{input_ids.shape[-1]} tokens do not fit the cache of {self.max_len} positions")
        return self.inner(input_ids=input_ids, cache_position=cache_position)

    @staticmethod
    def inputs(input_ids: torch.Tensor) -> dict:
        """Keyword inputs for a prompt: the tokens at positions 0..n-1."""
        return {"input_ids": input_ids, "cache_position": torch.arange(input_ids.shape[1], device=input_ids.device)}

    def snp_dynamic_shapes(self, args, kwargs) -> dict:
        """torch.export's dynamic shapes (snp_fx.trace): the length, up to the cache's; the batch is the cache's."""
        from torch.export import Dim
        length = Dim("length", min=1, max=self.max_len)
        return {"input_ids": {1: length}, "cache_position": {0: length}}


def _max_len(model) -> int | None:
    if isinstance(model, StaticCacheLM):
        return model.max_len
    dims = getattr(model, "meta", {}).get("snp_input_shapes", {}).get("input_ids")
    return dims[1][2] if dims and isinstance(dims[1], list) else None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens (prompt + ``max_new_tokens``) from a ``StaticCacheLM`` or the GraphModule
    pruned from one: the prompt in one call, then one call per new token, which attends to the
    keys and values in the cache (the prefix is not recomputed)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise SNPError("input_ids must be a (batch, length) tensor of token ids")
    n, longest = input_ids.shape[1], _max_len(model)
    if longest is not None and n + max_new_tokens - 1 > longest:
        raise SNPError(f"{n} prompt + {max_new_tokens} new tokens do not fit the cache of {longest} positions")
    logits = model(input_ids=input_ids, cache_position=torch.arange(n, device=input_ids.device))
    out = [input_ids, logits[:, -1:].argmax(-1)]
    for i in range(max_new_tokens - 1):
        pos = torch.tensor([n + i], device=input_ids.device)
        out.append(model(input_ids=out[-1], cache_position=pos)[:, -1:].argmax(-1))
    return torch.cat(out, 1)


__all__ = ["to_hf", "StaticCacheLM", "generate"]
