"""Wall time of calibration + SNP scoring vs one plain forward pass over the same images.

    python benchmarks/scoring_cost.py [--images 64] [--batch 16] [--models deit_small_patch16_224 ...]

Dense forward and scoring run interleaved in one process (2 threads); the table reports
medians and their ratio.  Writes benchmarks/results/scoring_cost.json.
"""
import argparse
import statistics
import time

import timm
import torch

import snp_fx
from snp_fx.importance import compute_scores

from common import report


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
    report("scoring_cost", [("model", "model", ""), ("images", "images", "d"), ("forward (s)", "forward_s", ".2f"),
                            ("calibration + scoring (s)", "calibration_and_scoring_s", ".2f"),
                            ("ratio", "ratio", ".2f"), ("added", "overhead", "+.0%")], rows)

if __name__ == "__main__":
    main()
