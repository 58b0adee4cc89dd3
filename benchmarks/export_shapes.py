"""What dynamic batch / length costs the analysis of an exported model: torch.export with the example's
shapes only vs with dynamic batch and length (snp_fx.trace.export), then the propagation; and the
pruned models' forward time at the example's shape (dynamic graphs carry sym_size nodes and shape
arithmetic).

    python benchmarks/export_shapes.py [--repeats 3]

The tiny Hugging Face models of tests/hf_models.py (llama, bert); medians of interleaved repeats.
Writes benchmarks/results/export_shapes.json.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

import torch

import snp_fx
from snp_fx.api import _analyze
from snp_fx.trace import export
from common import report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from hf_models import MODELS  # noqa: E402

warnings.filterwarnings("ignore")


def one(model, inputs, dynamic):
    t0 = time.perf_counter()
    gm = export(model, inputs, dynamic=dynamic)
    t1 = time.perf_counter()
    a = _analyze(gm, inputs, ())
    t2 = time.perf_counter()
    pruned = snp_fx.apply(a, snp_fx.plan(a, ratios={"qk": 0.5, "ffn": 0.5}, importance="l2"), verify=False)
    with torch.inference_mode():
        pruned(**inputs)
        t3 = time.perf_counter()
        for _ in range(20):
            pruned(**inputs)
        t4 = time.perf_counter()
    return {"export_s": t1 - t0, "propagate_s": t2 - t1, "forward_ms": (t4 - t3) / 20 * 1e3,
            "nodes": len(gm.graph.nodes)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in ("llama", "bert"):
        torch.manual_seed(0)
        model, inputs = MODELS[name]()
        model.eval()
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for dynamic in (False, True):  # interleaved: a busy machine slows both alike
                runs[dynamic].append(one(model, inputs, dynamic))
        for dynamic, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            rows.append({"model": name, "shapes": "dynamic" if dynamic else "static", **med,
                         "analysis_s": med["export_s"] + med["propagate_s"]})
    report("export_shapes", [("model", "model", ""), ("shapes", "shapes", ""), ("graph nodes", "nodes", ".0f"),
                             ("export (s)", "export_s", ".2f"), ("propagate (s)", "propagate_s", ".2f"),
                             ("analysis (s)", "analysis_s", ".2f"), ("pruned forward (ms)", "forward_ms", ".2f")],
           rows)


if __name__ == "__main__":
    main()
