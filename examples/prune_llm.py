"""Prune a Llama-architecture decoder to a standard Hugging Face model and generate with its KV cache.

    python examples/prune_llm.py                                # a small random-init Llama
    python examples/prune_llm.py --model path/to/hf_folder      # any local Llama / Qwen2 checkpoint
    python examples/prune_llm.py --target-params 0.6 --tokens 64
    python examples/prune_llm.py --any-plan                     # a default SNP plan, static KV cache

The plan is uniform (``uniform=True``: the same head count, FFN and hidden widths in every layer), so
``snp_fx.to_hf`` writes a folder ``AutoModelForCausalLM.from_pretrained`` loads with no custom code;
its KV cache then has the pruned key/value widths.  Prints the sizes before and after, the greedy
tokens of both, and the time per generated token with the cache (flat in position) and without it
(recomputing the whole prefix: growing with position), dense and pruned, measured in turns.

With ``--any-plan`` the plan is SNP's default (each layer its own widths, q/k apart from v), which no
standard config states: the decoder is pruned wrapped with a static KV cache
(``snp_fx.hf.StaticCacheLM``, as transformers exports decoders for on-device use), whose cache
buffers take each layer's kept key / value channels, and ``snp_fx.hf.generate`` decodes one token
per call through it.  Prints the widths and cache shapes per layer, the greedy tokens of the pruned model
(and whether the masked dense model generates the same), and the time per token of the pruned
graph with its cache and recomputing the whole prefix.
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


@torch.no_grad()
def per_token_ms_static(lm, prompt, n_tokens: int, use_cache: bool) -> list[float]:
    """Milliseconds per generated token (greedy) of a StaticCacheLM or the graph pruned from one:
    one new token per call through its cache, or the whole prefix each time (no cache)."""
    times, ids = [], prompt
    for i in range(n_tokens):
        t = time.perf_counter()
        n = ids.shape[1]
        if use_cache and i:
            logits = lm(input_ids=ids[:, -1:], cache_position=torch.tensor([n - 1]))
        else:
            logits = lm(input_ids=ids, cache_position=torch.arange(n))
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
        times.append(1e3 * (time.perf_counter() - t))
    return times


def any_plan(model, args, g):
    """A default SNP plan (widths per layer) pruned with a static KV cache of the pruned widths."""
    from snp_fx.hf import StaticCacheLM, generate
    from snp_fx.planning import keep_mask
    from snp_fx.verify import masked_reference
    vocab = model.config.vocab_size
    lm = StaticCacheLM(model, max(args.prompt + args.tokens, 32))  # 32: the calibration's length
    calib = [StaticCacheLM.inputs(torch.randint(0, vocab, (1, 32), generator=g)) for _ in range(4)]
    a = snp_fx.analyze(lm, calib[0])
    plan = snp_fx.plan(a, target_params=args.target_params, calibration=calib, progress=False)
    pruned = snp_fx.apply(a, plan)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"parameters: {count(model) / 1e6:.2f} M -> {count(pruned) / 1e6:.2f} M "
          f"({count(pruned) / count(model):.1%}), residual {len(plan.groups['residual']['keep'])} of "
          f"{model.config.hidden_size}")
    print("| layer | q/k pairs per head (rotary) | v per head | FFN | key cache | value cache |\n|---|---|---|---|---|---|")
    buffers = dict(pruned.named_buffers())
    writes = {a.state[name]: tuple(buffers[name].shape) for name in a.state}  # write node -> cache shape
    caches = [writes[n.name] for n in a.gm.graph.nodes if n.name in writes]  # in graph order: k, v per layer
    for i in range(model.config.num_hidden_layers):
        e = {k.split(".")[-1]: v for k, v in plan.groups.items() if f"layers.{i}." in k}
        print(f"| {i} | {[len(h) for h in e['qk']['keep']]} | {[len(h) for h in e['v']['keep']]} | "
              f"{len(e['gate_proj']['keep'])} | {caches[2 * i]} | {caches[2 * i + 1]} |")
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g)
    tokens = generate(pruned, prompt, args.tokens)[0, args.prompt:].tolist()
    print(f"\ngreedy tokens, pruned (static cache): {tokens}")
    # the oracle: the dense graph with the removed slices zeroed (norms over the kept channels), its own cache
    reference = masked_reference(a, keep_mask(a, plan), exact_norms=True)
    same = generate(reference, prompt, args.tokens)[0, args.prompt:].tolist() == tokens
    print(f"the masked dense model generates the same tokens: {same}")
    rows = {}
    for _ in range(3):  # in turns, so both see the same machine load
        for cache in (True, False):
            t = per_token_ms_static(pruned, prompt, args.tokens, cache)
            best = rows.get(cache)
            rows[cache] = t if best is None else [min(x, y) for x, y in zip(best, t)]
    q = max(1, args.tokens // 4)
    print(f"\nms per generated token of the pruned graph (best of 3) after a {args.prompt}-token prompt, first {q} "
          f"and last {q} tokens, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("| KV cache | first | last | last / first |\n|---|---|---|---|")
    for cache, t in rows.items():
        first, last = sum(t[1:q + 1]) / q, sum(t[-q:]) / q  # token 0 (the prompt) left out
        print(f"| {'yes (static, pruned widths)' if cache else 'no (whole prefix)'} | {first:.2f} | {last:.2f} | "
              f"{last / first:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local Hugging Face Llama / Qwen2 folder (default: a small random-init Llama)")
    ap.add_argument("--target-params", type=float, default=0.7, help="fraction of the parameters kept")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--out", default=None, help="folder for the pruned model (default: a temporary one)")
    ap.add_argument("--any-plan", action="store_true",
                    help="a default SNP plan (widths per layer) generating through a static KV cache of the pruned "
                         "widths (snp_fx.hf.StaticCacheLM), instead of a uniform plan written by to_hf")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = small_llama() if args.model is None else \
        transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    g = torch.Generator().manual_seed(0)
    if args.any_plan:
        return any_plan(model, args, g)
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
