"""Latency-planned vs MACs-planned at equal measured latency: top-1 on the digits ViT.

    python benchmarks/quality_latency.py [--fractions 0.7 0.5 0.35] [--batch 256] [--threads 1]

Issue 12, item 3: at equal measured latency a model planned with ``target_latency`` should be at
least as good as one planned with ``target_macs``.  The trained 4-block timm ViT of
benchmarks/digits.py; SNP scores from 64 training images (the same scores for both planners);
q/k, v and FFN pruned, the residual stream left alone (as in quality_digits.py).  The latency is
for one batch of ``--batch`` test images on this CPU.  Per fraction f: ``plan(target_latency=f)``
(latency table + measured feedback); then MACs plans on a grid of MACs fractions, each timed in
turns with the dense model; an affine fit of measured latency against MACs over that grid (one
timing swings with the load, the fit less) gives the MACs fraction a MACs plan needs for the
latency plan's measured latency, and the MACs plans' top-1 there is interpolated between the grid
plans on either side (both are listed).  That interpolation is noisy (the fit moves with the load,
and top-1 is not linear between grid plans); the exact comparison is the last two columns:
``plan(target_macs=)`` asked for the latency plan's own MACs, whether it is the same plan (both
planners walk one score threshold; the budget only says where to stop), and its top-1.
Timings are medians of ``--repeats`` interleaved turns at ``--threads`` threads; the load average
is printed.  Writes results/quality_latency.json.
"""
import argparse
import os
import sys

import torch

import snp_fx
from snp_fx.cost import estimate_macs
from snp_fx.importance import compute_scores
from snp_fx.planning import keep_mask
from snp_fx.report import time_interleaved

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import keep_freed_memory, report  # noqa: E402
from digits import accuracy, data, trained_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    ap.add_argument("--batch", type=int, default=256, help="images per timed forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--round-to", type=int, default=8)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model = trained_model()
    (xtr, _), (xte, yte) = data()
    xb = xte[:args.batch]
    a = snp_fx.analyze(model, xb)
    a.groups["residual"].prunable = False  # q/k, v and FFN only, as quality_digits.py
    a.groups["residual"].reason = "left alone by this benchmark"
    scores = compute_scores(a, "snp", list(xtr[:64].split(16)), progress=False)
    full = torch.ones(a.channels.num_units, dtype=torch.bool)
    dense_macs = estimate_macs(a, full)

    def measure(plan, label):
        pruned = snp_fx.apply(a, plan)
        with torch.inference_mode():
            t = time_interleaved({"dense": a.gm, "pruned": pruned}, (xb,), repeats=args.repeats)
        return {"planner": label, "latency": t["pruned"] / t["dense"], "top1": accuracy(pruned, xte, yte),
                "macs": estimate_macs(a, keep_mask(a, plan)) / dense_macs, "load": os.getloadavg()[0],
                "model": pruned, "plan": plan}

    grid = []
    for g in (0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        try:
            grid.append(measure(snp_fx.plan(a, target_macs=g, scores=scores, round_to=args.round_to), f"macs {g:.2f}"))
        except snp_fx.SNPError as e:  # below one channel per group and head
            print(f"macs {g:.2f}: {e}", flush=True)
    for r in grid:
        print(f"{r['planner']}: MACs {r['macs']:.3f} latency {r['latency']:.3f} top-1 {r['top1']:.3f}", flush=True)
    # measured latency vs MACs fraction, fitted over the whole grid (least squares, affine): one
    # timing swings with the load, the fit much less; top-1 over MACs needs no timing
    n = len(grid)
    mx, my = sum(r["macs"] for r in grid) / n, sum(r["latency"] for r in grid) / n
    k = sum((r["macs"] - mx) * (r["latency"] - my) for r in grid) / sum((r["macs"] - mx) ** 2 for r in grid)
    by_macs = sorted(grid, key=lambda r: r["macs"])
    rows = []
    for f in args.fractions:
        lat = measure(snp_fx.plan(a, target_latency=f, scores=scores, round_to=args.round_to), f"latency {f:.2f}")
        macs = mx + (lat["latency"] - my) / k  # the MACs plan the fit puts at this latency
        lo = max((r for r in by_macs if r["macs"] <= macs), key=lambda r: r["macs"], default=None)
        hi = min((r for r in by_macs if r["macs"] > macs), key=lambda r: r["macs"], default=None)
        if lo is None or hi is None:
            print(f"latency {f}: measured {lat['latency']:.3f} is outside the MACs grid; skipped", flush=True)
            continue
        top1 = lo["top1"] + (macs - lo["macs"]) / (hi["macs"] - lo["macs"]) * (hi["top1"] - lo["top1"])
        # the exact comparison, no timing: the MACs plan asked for the latency plan's own MACs
        same_macs = snp_fx.plan(a, target_macs=lat["macs"], scores=scores, round_to=args.round_to)
        same = {k: g["keep"] for k, g in same_macs.groups.items()} == {k: g["keep"] for k, g in lat["plan"].groups.items()}
        rows.append({"asked": f, **{key: lat[key] for key in ("latency", "top1", "macs", "load")},
                     "same_plan": "yes" if same else "no",
                     "same_macs_top1": lat["top1"] if same else accuracy(snp_fx.apply(a, same_macs), xte, yte),
                     "macs_top1": top1, "macs_macs": macs, "gain": lat["top1"] - top1,
                     "bracket": f"{lo['planner']} ({lo['top1']:.3f}) / {hi['planner']} ({hi['top1']:.3f})"})
        print({k: v for k, v in rows[-1].items() if k != "plan"}, flush=True)
    print(f"fit: latency = {my - k * mx:.3f} + {k:.3f} x MACs fraction (MACs plans, {n} points)")
    print(f"dense top-1 {accuracy(model, xte, yte):.3f}; batch {args.batch}, {args.threads} thread(s)")
    report("quality_latency", [("asked", "asked", ".2f"), ("measured latency", "latency", ".3f"),
                               ("latency plan MACs", "macs", ".3f"), ("latency plan top-1", "top1", ".3f"),
                               ("MACs plan MACs (interp.)", "macs_macs", ".3f"),
                               ("MACs plan top-1 (interp.)", "macs_top1", ".3f"), ("top-1 gain", "gain", "+.3f"),
                               ("MACs plans on either side (top-1)", "bracket", "s"),
                               ("target_macs at the latency plan's MACs: same plan?", "same_plan", "s"),
                               ("its top-1", "same_macs_top1", ".3f"),
                               ("load", "load", ".1f")], rows)


if __name__ == "__main__":
    main()
