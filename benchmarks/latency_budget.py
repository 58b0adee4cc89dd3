"""Latency budgets: the predicted latency of latency-planned models next to their measured latency.

    python benchmarks/latency_budget.py [--model deit_tiny_patch16_224] [--batch 8] [--threads 1]
                                        [--fractions 0.6 0.4] [--repeats 10] [--heads] [--round-to 8]
                                        [--hardware cpu] [--runs 1]

The model (timm, random init) is planned with ``target_latency`` = each fraction of its dense
latency (snp_fx.latency: op latencies timed on this machine, cached in ~/.cache/snp_fx or
$SNP_FX_CACHE; then the planned model timed against the dense one and re-planned until the
measured fraction is met), pruned, then timed in turns with the dense model
(snp_fx.latency.compare).  ``--runs``: plan each fraction that many times, to see how far apart
plans made on the same budget land (the planner's feedback timing is noisy like any other).
fp32, eval, inference_mode.  Prints the load average: on a shared machine the absolute times
move with it; the speedups less.  With more threads than idle cores, small ops wait on
descheduled threads: use --threads 1 on a busy machine.
Writes benchmarks/results/latency_budget.json.
"""
import argparse
import itertools
import os
import time

import timm
import torch

import snp_fx
from snp_fx import latency

from common import keep_freed_memory, report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.6])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--heads", action="store_true", help="let whole heads go")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--hardware", default=None, help="plan with hardware= (then --round-to and importance are its)")
    ap.add_argument("--runs", type=int, default=1, help="plans per fraction")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    a = snp_fx.analyze(dense, x)
    t = time.perf_counter()
    model = latency.latency_model(a, heads=args.heads)
    rest = model.rest_fixed + model.rest_per_element
    print(f"latency table: {time.perf_counter() - t:.1f} s, {model.measured} grid points timed for "
          f"{len(model.ops)} nodes; dense {model.dense * 1e3:.2f} ms of which the rest {rest * 1e3:.2f} ms "
          f"({model.rest_fixed * 1e3:.2f} ms fixed); table scale {model.scale:.2f}")
    rows = []
    options = {"hardware": args.hardware} if args.hardware else {"importance": "l2", "round_to": args.round_to}
    for f, run in itertools.product(args.fractions, range(args.runs)):
        t = time.perf_counter()
        p = snp_fx.plan(a, target_latency=f, heads=args.heads, progress=False, **options)
        seconds = time.perf_counter() - t
        pruned = snp_fx.apply(a, p)
        r = latency.compare(a, pruned, repeats=args.repeats)
        fraction = r["measured"] / r["dense_measured"]
        rows.append({"model": args.model, "batch": args.batch, "threads": args.threads, "fraction": f,
                     "run": run, "plan_seconds": seconds, "loop_fraction": p.meta.get("measured_fraction"),
                     "measured_fraction": fraction, "fraction_error": fraction / f - 1,
                     "target_ms": p.meta["target_latency"] * 1e3, "predicted_ms": r["predicted"] * 1e3,
                     "measured_ms": r["measured"] * 1e3, "error": r["measured"] / r["predicted"] - 1,
                     "speedup_error": r["predicted_speedup"] / r["measured_speedup"] - 1,
                     "dense_table_ms": r["dense_predicted"] * 1e3, "dense_now_ms": r["dense_measured"] * 1e3,
                     "predicted_speedup": r["predicted_speedup"], "measured_speedup": r["measured_speedup"],
                     "load": os.getloadavg()[0]})
    report("latency_budget", [("model", "model", ""), ("batch", "batch", "d"), ("threads", "threads", "d"),
                              ("fraction", "fraction", ".3f"), ("run", "run", "d"), ("plan s", "plan_seconds", ".0f"),
                              ("fraction measured by plan", "loop_fraction", ".3f"),
                              ("fraction measured after", "measured_fraction", ".3f"),
                              ("measured / asked - 1", "fraction_error", "+.1%"),
                              ("predicted ms", "predicted_ms", ".2f"),
                              ("measured ms", "measured_ms", ".2f"), ("error", "error", "+.1%"),
                              ("dense ms (table)", "dense_table_ms", ".2f"), ("dense ms (now)", "dense_now_ms", ".2f"),
                              ("speedup pred.", "predicted_speedup", ".2f"),
                              ("speedup meas.", "measured_speedup", ".2f"), ("speedup error", "speedup_error", "+.1%"),
                              ("load (1 min)", "load", ".2f")], rows)


if __name__ == "__main__":
    main()
