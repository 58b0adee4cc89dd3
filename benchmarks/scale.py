"""Memory and time of pruning a Llama-shape decoder, stage by stage.

    python benchmarks/scale.py [--layers 4 --hidden 1024 --heads 16 --kv-heads 4 --ffn 2816 --vocab 32000]
                               [--dtype float32|bfloat16] [--calib 8 --seq 512] [--preset best]

Random init (no weights can be downloaded); TinyLlama-1.1B's shape is ``--layers 22 --hidden 2048
--heads 32 --kv-heads 4 --ffn 5632``.  Example inputs: one sequence of 16 tokens (what is traced
and checked; the exported graph keeps the length dynamic); calibration: ``--calib`` sequences of ``--seq`` tokens, one per batch.  Peak RSS per stage is
the process's high-water mark (reset before each stage through /proc/self/clear_refs), in GB and as a
multiple of the weights' bytes.  Writes benchmarks/results/scale.json.
"""
import argparse
import os
import time
import warnings

import torch
import transformers

import snp_fx
from common import report


def rss_gb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--calib", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seq", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--preset", default=None, choices=(None, "best", "paper"))
    ap.add_argument("--target", type=float, default=0.7, help="target_params, fraction of the dense model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    rows = []

    def stage(name, fn):
        reset_peak()
        t = time.perf_counter()
        out = fn()
        rows.append({"stage": name, "seconds": time.perf_counter() - t, "peak_gb": rss_gb(),
                     "after_gb": rss_gb("VmRSS")})
        print(f"{name}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_gb']:.2f} GB", flush=True)
        return out

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   intermediate_size=args.ffn, vocab_size=args.vocab, use_cache=False,
                                   max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = stage("build model", lambda: transformers.LlamaForCausalLM(cfg).to(dtype).eval())
    n_params = sum(p.numel() for p in model.parameters())
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, args.vocab, (1, 16), generator=g), "use_cache": False}
    calib = [{"input_ids": torch.randint(0, args.vocab, (1, args.seq), generator=g), "use_cache": False}
             for _ in range(args.calib)]
    a = stage("analyze", lambda: snp_fx.analyze(model, x))
    p = stage("plan (scores over the calibration set)",
              lambda: snp_fx.plan(a, target_params=args.target, calibration=calib, preset=args.preset, progress=False))
    pruned = stage("apply (rewrite + check)" + (" + compensation" if args.preset == "best" else ""),
                   lambda: snp_fx.apply(a, p, compensate=args.preset == "best", calibration=calib, progress=False))
    kept = sum(q.numel() for q in pruned.parameters())
    total = sum(r["seconds"] for r in rows[1:])
    peak = max(r["peak_gb"] for r in rows[1:])
    rows.append({"stage": "prune (all but build)", "seconds": total, "peak_gb": peak, "after_gb": rss_gb("VmRSS")})
    for r in rows:
        r["peak_x_weights"] = r["peak_gb"] / weight_gb
    print(f"\n{n_params / 1e9:.3f} B parameters, {args.dtype}, weights {weight_gb:.2f} GB; "
          f"pruned to {kept / 1e9:.3f} B ({kept / n_params:.1%}, target {args.target:.0%}); "
          f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, FFN {args.ffn}, "
          f"vocab {args.vocab}; calibration {args.calib} x {args.seq} tokens; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    report("scale", [("stage", "stage", ""), ("time (s)", "seconds", ".1f"), ("peak RSS (GB)", "peak_gb", ".2f"),
                     ("peak / weights", "peak_x_weights", ".2f"), ("RSS after (GB)", "after_gb", ".2f")], rows)


if __name__ == "__main__":
    main()
