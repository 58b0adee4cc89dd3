"""Latency-planned vs MACs-planned at equal measured latency: top-1 on the digits ViT.

    python benchmarks/quality_latency.py [--fractions 0.7 0.5 0.35] [--batch 256] [--threads 1]

Issue 12, item 3: at equal measured latency a model planned with ``target_latency`` should be at
least as good as one planned with ``target_macs``.  The trained 4-block timm ViT of
benchmarks/digits.py; SNP scores from 64 training images (the same scores for both planners);
q/k, v and FFN pruned, the residual stream left alone (as in quality_digits.py).  The latency is
for one batch of ``--batch`` test images on this CPU.  Per fraction f: ``plan(target_latency=f)``
(latency table + measured feedback); then MACs plans on a grid of MACs fractions, each timed in
turns with the dense model; the two grid plans measured on either side of the latency plan are
timed again together with it (interleaved, the dense model too) and the MACs plans' top-1 at the
latency plan's measured latency is interpolated between them (both are listed).
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
from common import report  # noqa: E402
from digits import accuracy, data, trained_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    ap.add_argument("--batch", type=int, default=256, help="images per timed forward")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--round-to", type=int, default=8)
    args = ap.parse_args()
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
                "model": pruned}

    grid = []
    for g in (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
        try:
            grid.append(measure(snp_fx.plan(a, target_macs=g, scores=scores, round_to=args.round_to), f"macs {g:.2f}"))
        except snp_fx.SNPError as e:  # below one channel per group and head
            print(f"macs {g:.2f}: {e}", flush=True)
    for r in grid:
        print(f"{r['planner']}: MACs {r['macs']:.3f} latency {r['latency']:.3f} top-1 {r['top1']:.3f}", flush=True)
    rows = []
    for f in args.fractions:
        lat = measure(snp_fx.plan(a, target_latency=f, scores=scores, round_to=args.round_to), f"latency {f:.2f}")
        below = max((r for r in grid if r["latency"] <= lat["latency"]), key=lambda r: r["latency"], default=None)
        above = min((r for r in grid if r["latency"] > lat["latency"]), key=lambda r: r["latency"], default=None)
        if below is None or above is None:
            print(f"latency {f}: measured {lat['latency']:.3f} is outside the MACs grid; skipped", flush=True)
            continue
        # the three timed again together, in turns with the dense model: the load moves between rounds
        with torch.inference_mode():
            t = time_interleaved({"dense": a.gm, "lat": lat["model"], "below": below["model"],
                                  "above": above["model"]}, (xb,), repeats=2 * args.repeats)
        lat_t, lo, hi = (t[k] / t["dense"] for k in ("lat", "below", "above"))
        w = (lat_t - lo) / (hi - lo) if hi != lo else 0.5  # beyond [0, 1]: extrapolated, said in the row
        top1 = below["top1"] + w * (above["top1"] - below["top1"])
        macs = below["macs"] + w * (above["macs"] - below["macs"])
        rows.append({"asked": f, "latency": lat_t, "top1": lat["top1"], "macs": lat["macs"],
                     "load": os.getloadavg()[0], "macs_top1": top1, "macs_macs": macs, "gain": lat["top1"] - top1,
                     "bracket": f"{below['planner']} ({lo:.3f}, {below['top1']:.3f}) / "
                                f"{above['planner']} ({hi:.3f}, {above['top1']:.3f})"
                                + ("" if 0 <= w <= 1 else " (extrapolated)")})
        print(rows[-1], flush=True)
    print(f"dense top-1 {accuracy(model, xte, yte):.3f}; batch {args.batch}, {args.threads} thread(s)")
    report("quality_latency", [("asked", "asked", ".2f"), ("measured latency", "latency", ".3f"),
                               ("latency plan MACs", "macs", ".3f"), ("latency plan top-1", "top1", ".3f"),
                               ("MACs plan MACs (interp.)", "macs_macs", ".3f"),
                               ("MACs plan top-1 (interp.)", "macs_top1", ".3f"), ("top-1 gain", "gain", "+.3f"),
                               ("MACs plans on either side (latency, top-1)", "bracket", "s"),
                               ("load", "load", ".1f")], rows)


if __name__ == "__main__":
    main()
