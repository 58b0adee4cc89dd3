"""Prune a Llama-architecture decoder to a standard Hugging Face model and generate with its KV cache.

    python examples/prune_llm.py                                # a small random-init Llama
    python examples/prune_llm.py --model path/to/hf_folder      # any local Llama / Qwen2 checkpoint
    python examples/prune_llm.py --target-params 0.6 --tokens 64

The plan is uniform (``uniform=True``: the same head count, FFN and hidden widths in every layer), so
``snp_fx.to_hf`` writes a folder ``AutoModelForCausalLM.from_pretrained`` loads with no custom code;
its KV cache then has the pruned key/value widths.  Prints the sizes before and after, the greedy
tokens of both, and the time per generated token with the cache (flat in position) and without it
(recomputing the whole prefix: growing with position), dense and pruned, measured in turns.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

import snp_fx


def small_llama(seed: int = 0):
    """A random-init Llama (no weights can be downloaded here), initialised sharply enough that its
    greedy tokens depend on every layer."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=768, vocab_size=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return model


@torch.no_grad()
def per_token_ms(model, prompt, n_tokens: int, use_cache: bool) -> list[float]:
    """Milliseconds for each generated token (greedy), with or without the KV cache."""
    times, ids, past = [], prompt, None
    for _ in range(n_tokens):
        t = time.perf_counter()
        if use_cache:
            out = model(input_ids=ids if past is None else ids[:, -1:], cache=past, use_cache=True)
            past = out.cache
        else:
            out = model(input_ids=ids, use_cache=False)
        ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
        times.append(1e3 * (time.perf_counter() - t))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local Hugging Face Llama / Qwen2 folder (default: a small random-init Llama)")
    ap.add_argument("--target-params", type=float, default=0.7, help="fraction of the parameters kept")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--out", default=None, help="folder for the pruned model (default: a temporary one)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = small_llama() if args.model is None else \
        transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    calib = [{"input_ids": torch.randint(0, vocab, (2, 32), generator=g), "use_cache": False} for _ in range(4)]
    pruned = snp_fx.prune(model, calib[0], target_params=args.target_params, uniform=True, calibration=calib,
                          progress=False)
    out = args.out or os.path.join(tempfile.mkdtemp(), "pruned")
    snp_fx.to_hf(pruned, model, out)
    small = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    c0, c1 = model.config, small.config
    print(f"written to {out}: a {type(small).__name__} loaded with from_pretrained")
    print("| | dense | pruned |\n|---|---|---|")
    print(f"| parameters | {count(model) / 1e6:.2f} M | {count(small) / 1e6:.2f} M ({count(small) / count(model):.1%}) |")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        print(f"| {key} | {getattr(c0, key)} | {getattr(c1, key)} |")
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    opts = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    print(f"\ngreedy tokens, dense:  {model.generate(prompt, **opts)[0, args.prompt:].tolist()}")
    print(f"greedy tokens, pruned: {small.generate(prompt, **opts)[0, args.prompt:].tolist()}")
    rows = {}
    for _ in range(3):  # in turns: dense and pruned, cached and not, see the same machine load
        for name, m in (("dense", model), ("pruned", small)):
            for cache in (True, False):
                t = per_token_ms(m, prompt, args.tokens, cache)
                best = rows.get((name, cache))
                rows[(name, cache)] = t if best is None else [min(a, b) for a, b in zip(best, t)]
    q = max(1, args.tokens // 4)
    print(f"\nms per generated token (best of 3) after a {args.prompt}-token prompt, first {q} and last {q} "
          f"tokens, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| model | KV cache | first | last | last / first |\n|---|---|---|---|---|")
    for (name, cache), t in rows.items():
        first, last = sum(t[1:q + 1]) / q, sum(t[-q:]) / q  # token 0 (the prompt) left out
        print(f"| {name} | {'yes' if cache else 'no'} | {first:.2f} | {last:.2f} | {last / first:.2f} |")


if __name__ == "__main__":
    main()
