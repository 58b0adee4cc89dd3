"""What filling the attention padding costs in quality: top-1 on the digits ViT at equal MACs.

    python benchmarks/fill_padding.py [--fractions 0.3 0.4 0.5 0.6 0.7 0.8]

``hardware=`` plans give q/k and v of a fused-attention site one head width: where the rewrite
would zero-pad the narrower side for the fused kernel, that side keeps its next best channels, and
the MACs budget takes the projection rows back elsewhere (snp_fx.planning.plan_for_target,
``fill_padding``).  Speed at equal MACs is benchmarks/latency.py's ("hardware cpu" rows).  Here:
the trained 4-block timm ViT of benchmarks/digits.py, SNP scores from 64 training images (the same
for both plans), ``target_macs`` = each fraction with ``round_to=8`` against ``hardware="cpu"``
(round_to 8 and the fill), with the residual stream left alone and pruned too; top-1 on the 397
test images.  Writes results/fill_padding.json.
"""
import argparse
import os
import sys

import torch

import snp_fx
from snp_fx.importance import compute_scores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report  # noqa: E402
from digits import accuracy, data, trained_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = trained_model()
    (xtr, _), (xte, yte) = data()
    rows = []
    for residual in ("kept", "pruned"):
        a = snp_fx.analyze(model, xte[:64])
        if residual == "kept":
            a.groups["residual"].prunable = False
            a.groups["residual"].reason = "left alone by this benchmark"
        scores = compute_scores(a, "snp", list(xtr[:64].split(16)), progress=False)
        for f in args.fractions:
            top1 = {}
            for label, kw in (("round_to 8", {"round_to": 8}), ("hardware cpu", {"hardware": "cpu"})):
                plan = snp_fx.plan(a, target_macs=f, scores=scores, **kw)
                top1[label] = accuracy(snp_fx.apply(a, plan), xte, yte)
            rows.append({"residual": residual, "macs": f, "plain": top1["round_to 8"], "filled": top1["hardware cpu"],
                         "difference": top1["hardware cpu"] - top1["round_to 8"]})
            print(rows[-1], flush=True)
    report("fill_padding", [("residual stream", "residual", ""), ("MACs fraction", "macs", ".2f"),
                            ("top-1, round_to 8", "plain", ".3f"), ("top-1, hardware cpu (filled)", "filled", ".3f"),
                            ("difference", "difference", "+.3f")], rows)


if __name__ == "__main__":
    main()
