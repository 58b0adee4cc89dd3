"""One-shot pruning quality on a small vision transformer: top-1 on scikit-learn's load_digits.

    python benchmarks/quality_digits.py [--quick]

The 4-block timm ViT of benchmarks/digits.py (4 heads of 32, dim 128, FFN 512; cached model).
The same budgets and criteria as quality_minilm.py: q/k alone, v alone, q/k + v together
(with torch-pruning's magnitude criterion), and q/k + v + FFN at 70/50/35% of the MACs (the
residual stream left alone).  Calibration: 64 training images; metrics on the 397 test
images: top-1 and the relative error of the pre-softmax attention scores (mean over layers).
Writes results/quality_digits.json and results/quality_digits_*.png.
"""
import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

import snp_fx
from snp_fx.compensate import collect_stats, compensate, find_consumers
from snp_fx.importance import Scores, compute_scores
from snp_fx.planning import keep_mask, make_plan, plan_for_target
from snp_fx.cost import count_macs, estimate_macs
from snp_fx.report import attention_scores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report  # noqa: E402
from digits import accuracy, data, trained_model  # noqa: E402
from quality_minilm import criterion_sweeps, plots  # noqa: E402

warnings.filterwarnings("ignore")


def score_error(dense_scores, pruned_scores):
    return statistics.mean(float((p - d).norm() / d.norm()) for d, p in zip(dense_scores, pruned_scores))


def tp_prune(model, example, ratio, ffn: bool):
    """torch-pruning 1.6 MagnitudeImportance(p=2) on head dims of the fused qkv (q, k, v lose the same
    indices) and, with ``ffn``, the FFN neurons; the residual stream is left alone."""
    import torch_pruning as tp
    m = copy.deepcopy(model)
    heads, ignored = {}, [m.head, m.patch_embed]
    for blk in m.blocks:
        heads[blk.attn.qkv] = blk.attn.num_heads
        ignored += [blk.attn.proj, blk.mlp.fc2] + ([] if ffn else [blk.mlp.fc1])
    tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                         num_heads=heads, prune_head_dims=True, prune_num_heads=False, ignored_layers=ignored,
                         root_module_types=[torch.nn.Linear]).step()
    for blk in m.blocks:  # timm reshapes with these; the explicit path keeps the dense scale
        blk.attn.head_dim = blk.attn.qkv.out_features // (3 * blk.attn.num_heads)
        blk.attn.attn_dim = blk.attn.head_dim * blk.attn.num_heads
        blk.attn.fused_attn = False
    return m.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ratios = [0.3, 0.5, 0.7] if args.quick else [float(r) for r in args.ratios.split(",")]
    seeds = (0,) if args.quick else (0, 1, 2)
    t0 = time.perf_counter()
    model = trained_model()
    (xtr, _), (xte, yte) = data()
    cal = list(xtr[:64].split(16))
    x_att = xte[:128]
    a = snp_fx.analyze(model, cal[0])
    a.groups["residual"].prunable = False  # this benchmark prunes q/k, v and FFN only
    a.groups["residual"].reason = "left alone by this benchmark"
    dense_top1 = accuracy(model, xte, yte)
    dense_scores = attention_scores(a.gm, (x_att,))
    snp = compute_scores(a, "snp", cal, gamma=2, progress=False, selection="exact")
    snp_plain, exact = Scores(snp.classes, snp.heads), snp
    snp4 = compute_scores(a, "snp", cal, gamma=4, progress=False)
    l2, gm = compute_scores(a, "l2"), compute_scores(a, "gm")
    rnd = {s: compute_scores(a, "random", seed=s) for s in seeds}
    reverse = Scores(-snp.classes, {k: -v for k, v in snp.heads.items()})
    consumers, _ = find_consumers(a, [g.name for g in a.prunable() if g.kind in ("v", "ffn")])
    stats = collect_stats(a, consumers, cal, progress=False)
    dense_macs = estimate_macs(a, torch.ones(a.channels.num_units, dtype=torch.bool))
    rows = []

    def record(sweep, budget, label, pruned, macs):
        s = attention_scores(pruned, (x_att,))
        rows.append({"sweep": sweep, "budget": budget, "criterion": label, "macs": macs,
                     "cosine": accuracy(pruned, xte, yte),  # the plots' y value: top-1 here
                     "score_rel_err": score_error(dense_scores, s) if len(s) == len(dense_scores) else float("nan"),
                     "spearman": float("nan")})
        print(f"{sweep:<5} {budget:<5} {label:<26} top-1 {rows[-1]['cosine']:.3f} "
              f"err {rows[-1]['score_rel_err']:.3f} macs {macs:.3f}", flush=True)

    def measure(sweep, budget, label, plan, comp=False):
        keep = keep_mask(a, plan)
        pruned = snp_fx.apply(model, plan, None, analysis=a)
        if comp:
            compensate(a, keep, pruned, None, stats=stats, progress=False)
        record(sweep, budget, label, pruned, estimate_macs(a, keep) / dense_macs)

    base = [("snp (g=2)", snp_plain), ("l2", l2), ("gm", gm)] + \
        [(f"random s{s}", r) for s, r in rnd.items()] + [("reverse", reverse)]
    criterion_sweeps(a, measure, ratios, base, snp4, exact, base[:4])
    for r in [x for x in ratios if x in (0.3, 0.5, 0.7)]:
        measure("qk+v", r, "snp (g=2)", make_plan(a, {"qk": r, "v": r}, snp_plain))
        measure("qk+v", r, "l2", make_plan(a, {"qk": r, "v": r}, l2))
        measure("qk+v", r, "exact +comp (best)", make_plan(a, {"qk": r, "v": r}, exact), comp=True)
        m = tp_prune(model, cal[0], r, ffn=False)
        record("qk+v", r, "torch-pruning magnitude", m, count_macs(m, (cal[0],)) / count_macs(model, (cal[0],)))
    dense_count = count_macs(model, (cal[0],))
    for frac in (0.7, 0.5, 0.35):
        for label, sc, comp in [(lab, s, False) for lab, s in base if lab != "reverse"] + [
                ("exact", exact, False), ("exact +comp (best)", exact, True),
                ("l2 +exact +comp", Scores(l2.classes, {}, exact.pair_grams), True)]:
            measure("macs", frac, label, plan_for_target(a, sc, target_macs=frac), comp=comp)
        probe = 0.5  # torch-pruning: one uniform ratio, secant steps to the same MACs
        for _ in range(4):
            m = tp_prune(model, cal[0], probe, ffn=True)
            f = count_macs(m, (cal[0],)) / dense_count
            if abs(f - frac) < 0.01:
                break
            probe = min(0.95, probe * (1 - frac) / max(1 - f, 1e-6))
        record("macs", frac, f"torch-pruning magnitude (r={probe:.2f})", m, f)
    print(f"\nDense top-1 {dense_top1:.3f} on {len(yte)} test digits; {time.perf_counter() - t0:.0f}s\n")
    report("quality_digits", [("sweep", "sweep", "s"), ("budget", "budget", ".2f"), ("criterion", "criterion", "s"),
                              ("MACs", "macs", ".3f"), ("top-1", "cosine", ".3f"),
                              ("score rel. err", "score_rel_err", ".3f")], rows)
    plots(rows, "quality_digits", f"digits ViT: top-1 (dense {dense_top1:.3f})", ylabel="top-1")


if __name__ == "__main__":
    main()
