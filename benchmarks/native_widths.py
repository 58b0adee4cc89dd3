"""What speedup / MACs a DeiT gets on this machine with no pruner involved: timm models built directly
at smaller widths, timed in turns with the dense one.

    python benchmarks/native_widths.py [--models deit_tiny_patch16_224 ...] [--repeats 8] [--threads 2]

Issue 12 asks for speedup / MACs >= 0.90 at batch 16 and >= 0.80 at batch 1.  That ratio depends on
where the MACs are, not only on how a pruned graph is emitted: attention MACs (the fused SDPA kernel)
run at about half the rate of GEMM MACs on this CPU, and small GEMMs below their big-GEMM rate.  Per
model, rows of timm's own architecture at other widths, no pruning, no FX:
  * "heads of 64": embed_dim E (a multiple of 64), E / 64 heads of width 64, FFN 4E: fewer heads, the
    widths kernels like;
  * "all heads": embed_dim E with the dense model's head count (head width E / heads), FFN 4E: the
    shape a uniform pruner without head removal (torch-pruning's timm recipe) produces.
E for each is the one nearest the MACs of each SNP config (benchmarks/latency.py's budgets).
fp32, eval + inference_mode, 224x224; speedup = dense time / model time, ratio = speedup / (dense
MACs / model MACs).  Writes results/native_widths.json.
"""
import argparse
import os

import timm
import torch

from snp_fx.cost import count_macs
from snp_fx.report import time_interleaved

from common import keep_freed_memory, report
from latency import CONFIGS, HEADS_BUDGET


def nearest(name, heads_of, budget, x):
    """(E, model) of the timm ``name`` built at the embed_dim whose MACs are nearest ``budget`` GMACs."""
    best = None
    for e in range(64, 1024, 8):
        h = heads_of(e)
        if h is None:
            continue
        model = timm.create_model(name, pretrained=False, embed_dim=e, num_heads=h).eval()
        macs = count_macs(model, (x,)) / 1e9
        if best is None or abs(macs - budget) < abs(best[2] - budget):
            best = (e, model, macs)
        if macs > budget * 1.5:
            break
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=8, help="timed turns at batch 16 (3x at batch 1)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False).eval()
        x1 = torch.randn(1, 3, 224, 224)
        dense_macs = count_macs(dense, (x1,)) / 1e9
        dense_heads = dense.blocks[0].attn.num_heads
        budgets = [g for _, g in CONFIGS[name]] + ([HEADS_BUDGET[name]] if name in HEADS_BUDGET else [])
        models = {}
        for g in budgets:
            for label, heads_of in (("heads of 64", lambda e: e // 64 if e % 64 == 0 else None),
                                    ("all heads", lambda e: dense_heads if e % dense_heads == 0 else None)):
                e, model, macs = nearest(name, heads_of, g, x1)
                models[f"{label}: embed {e}, {model.blocks[0].attn.num_heads} heads"] = (g, macs, model)
        timed = {"dense": dense, **{k: m for k, (_, _, m) in models.items()}}
        with torch.inference_mode():
            t1 = time_interleaved(timed, (x1,), repeats=3 * args.repeats)
            t16 = time_interleaved(timed, (torch.randn(16, 3, 224, 224),), repeats=args.repeats)
        for label, (g, macs, _) in models.items():
            r = dense_macs / macs
            rows.append({"model": name, "budget_gmacs": g, "variant": label, "gmacs": macs, "macs_ratio": r,
                         "speedup_b1": t1["dense"] / t1[label], "speedup_b16": t16["dense"] / t16[label],
                         "ratio_b1": t1["dense"] / t1[label] / r, "ratio_b16": t16["dense"] / t16[label] / r,
                         "load": os.getloadavg()[0]})
            print(f"{name} | {label}: {macs:.3f} GMACs, ratio b1 {rows[-1]['ratio_b1']:.2f}, "
                  f"b16 {rows[-1]['ratio_b16']:.2f}", flush=True)
    report("native_widths", [("model", "model", ""), ("budget (G)", "budget_gmacs", ".2f"), ("built as", "variant", ""),
                             ("MACs (G)", "gmacs", ".3f"), ("MACs ratio", "macs_ratio", ".2f"),
                             ("b1 speedup", "speedup_b1", ".2f"), ("b1 / MACs", "ratio_b1", ".2f"),
                             ("b16 speedup", "speedup_b16", ".2f"), ("b16 / MACs", "ratio_b16", ".2f"),
                             ("load", "load", ".1f")], rows)


if __name__ == "__main__":
    main()
