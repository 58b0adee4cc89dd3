"""Wall time of calibration + SNP scoring vs one plain forward pass over the same images.

    python benchmarks/scoring_cost.py [--images 64] [--batch 16] [--models deit_small_patch16_224 ...]

Dense forward and scoring run interleaved in one process (2 threads); the table reports
medians and their ratio.  Writes benchmarks/results/scoring_cost.json.
"""
import argparse
import json
import os
import statistics
import time

import timm
import torch

import snp_fx
from snp_fx.importance import compute_scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gamma", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        images = torch.randn(args.images, 3, 224, 224)
        batches = list(images.split(args.batch))
        a = snp_fx.analyze(model, batches[0])
        fwd, score = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    model(b)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            compute_scores(a, "snp", batches, gamma=args.gamma, progress=False)
            score.append(time.perf_counter() - t)
        f, s = statistics.median(fwd), statistics.median(score)
        rows.append({"model": name, "images": args.images, "batch": args.batch, "forward_s": f,
                     "calibration_and_scoring_s": s, "ratio": s / f, "overhead": s / f - 1})
    print("| model | images | forward (s) | calibration + scoring (s) | ratio | added |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['images']} | {r['forward_s']:.2f} | {r['calibration_and_scoring_s']:.2f} | "
              f"{r['ratio']:.2f} | {r['overhead']:+.0%} |")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "scoring_cost.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
