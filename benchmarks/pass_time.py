"""Wall time of the pass itself: analyze, plan (SNP scores on the example input), rewrite + verify.

    python benchmarks/pass_time.py

DeiT-B at 12 layers and the same architecture at 24 layers, to show how it grows with depth.
Writes benchmarks/results/pass_time.json.
"""
import time

import timm
import torch

import snp_fx
from common import report


def main():
    torch.set_num_threads(2)
    rows = []
    for name, depth in (("deit_base_patch16_224", 12), ("deit_base_patch16_224", 24)):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, depth=depth).eval()
        x = torch.randn(1, 3, 224, 224)
        ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.2}
        t0 = time.perf_counter()
        a = snp_fx.analyze(model, x)
        t1 = time.perf_counter()
        plan = snp_fx.plan(model, x, ratios=ratios, analysis=a, progress=False)
        t2 = time.perf_counter()
        snp_fx.apply(model, plan, x, analysis=a)
        t3 = time.perf_counter()
        rows.append({"model": name, "depth": depth, "nodes": len(a.gm.graph.nodes), "analyze_s": t1 - t0,
                     "plan_s": t2 - t1, "rewrite_verify_s": t3 - t2, "total_s": t3 - t0})
    report("pass_time", [("model", "model", ""), ("depth", "depth", "d"), ("graph nodes", "nodes", "d"),
                         ("analyze (s)", "analyze_s", ".1f"), ("plan (s)", "plan_s", ".1f"),
                         ("rewrite + verify (s)", "rewrite_verify_s", ".1f"), ("total (s)", "total_s", ".1f")], rows)

if __name__ == "__main__":
    main()
