"""How many singular components (gamma) the SNP q/k score should use — measured.

    python benchmarks/gamma.py

On a ViT trained on load_digits (benchmarks/digits.py), prune q/k pairs alone at
30/50/70% with the SNP score for several gamma, and with the baselines; report
the relative error of the pre-softmax attention scores (mean over layers, test
images) and top-1 accuracy, one-shot (no fine-tuning).  Writes results/gamma.json.
"""
import json
import os
import statistics

import torch

import snp_fx
from snp_fx.report import attention_scores

from digits import HERE, accuracy, data, trained_model


def score_error(dense_scores, pruned_scores):
    errs = [float((p - d).norm() / d.norm()) for d, p in zip(dense_scores, pruned_scores)]
    return statistics.mean(errs)


def main():
    torch.set_num_threads(2)
    model = trained_model()
    (xtr, ytr), (xte, yte) = data()
    calib = list(xtr[:64].split(16))
    x_eval = xte[:128]
    a = snp_fx.analyze(model, calib[0])
    dense_scores = attention_scores(a.gm, (x_eval,))
    dense_acc = accuracy(model, xte, yte)
    head_dim = a.groups["blocks.0.attn.qk"].width
    gammas = [g for g in (1, 2, 4, 8, 16, 32) if g <= head_dim]
    criteria = [(f"snp gamma={g}", "snp", {"gamma": g}) for g in gammas]
    criteria += [("l2", "l2", {}), ("reverse (gamma=4)", "reverse", {"gamma": 4})]
    criteria += [(f"random seed={s}", "random", {"seed": s}) for s in range(3)]
    rows = []
    for ratio in (0.3, 0.5, 0.7):
        for label, imp, kw in criteria:
            plan = snp_fx.plan(model, None, ratios={"qk": ratio}, importance=imp, analysis=a, calibration=calib,
                               progress=False, **kw)
            pruned = snp_fx.apply(model, plan, None, analysis=a)
            rows.append({"qk_removed": ratio, "criterion": label,
                         "score_rel_error": score_error(dense_scores, attention_scores(pruned, (x_eval,))),
                         "top1": accuracy(pruned, xte, yte)})
            print(rows[-1], flush=True)
    print(f"\nDense top-1: {dense_acc:.3f}; q/k head dim {head_dim}; 64 calibration images, "
          f"{len(yte)} test images (scores on {len(x_eval)})\n")
    print("| q/k removed | criterion | score rel. error | top-1 |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['qk_removed']:.0%} | {r['criterion']} | {r['score_rel_error']:.3f} | {r['top1']:.3f} |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "gamma.json"), "w") as f:
        json.dump({"dense_top1": dense_acc, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
