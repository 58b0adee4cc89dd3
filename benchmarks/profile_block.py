"""Where the time goes, per op: dense, pruned (padded attention), pruned with the unpadded
math-path attention and torch-pruning at the same MACs, side by side (torch.profiler self CPU time
per op, ms per forward; every op here runs once per block, so / 12 is one block of a DeiT).

    python benchmarks/profile_block.py [--model deit_small_patch16_224] [--config DeiT_s] [--batch 16]

The pruned model is snp_fx's with the authors' config (or --target-macs with hardware="cpu"); "unpadded" swaps its padded_sdpa calls back
to plain scaled_dot_product_attention (what snp_fx emitted before snp_fx/kernels.py);
"torch-pruning" is benchmarks/latency.py's recipe bisected to the same MACs (--no-tp skips it).
Self CPU time per op, averaged over --repeats forwards; the models are profiled in turns, round
after round, so a load change hits them alike.  Writes results/profile_block.json.
"""
import argparse

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import snp_fx
from snp_fx.cost import count_macs
from snp_fx.kernels import unpadded

from common import keep_freed_memory, report


def op_profile(model, x):
    """{op name: self CPU ms} of one forward of ``model`` on ``x``."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--config", default="DeiT_s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target-macs", type=float, help="GMACs: snp_fx target_macs with hardware=\"cpu\" instead of --config")
    ap.add_argument("--no-tp", action="store_true", help="leave out torch-pruning")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False).eval()
    x1 = torch.randn(1, 3, 224, 224)
    if args.target_macs:
        pruned = snp_fx.prune(dense, x1, target_macs=args.target_macs * 1e9, hardware="cpu", progress=False)
    else:
        pruned = snp_fx.prune(dense, x1, ratios=args.config, progress=False)
    x = torch.randn(args.batch, 3, 224, 224)
    models = {"dense": dense, "pruned, padded attention": pruned, "pruned, unpadded (math path)": unpadded(pruned)}
    if not args.no_tp:
        from latency import tp_matching
        models["torch-pruning, same MACs"] = tp_matching(dense, x1, count_macs(pruned, (x1,)))[0]
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):
                model(x)
    profiles = {name: {} for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            for k, v in op_profile(model, x).items():
                profiles[name][k] = profiles[name].get(k, 0.0) + v
    ops = sorted({k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values()))
    rows = [{"op": k, **{n: profiles[n].get(k, 0.0) / args.repeats for n in profiles}} for k in ops[:18]]
    rows.append({"op": "total (all ops)", **{n: sum(profiles[n].values()) / args.repeats for n in profiles}})
    report("profile_block", [("op", "op", "s")] + [(f"{n} (ms per forward)", n, ".1f") for n in profiles], rows)


if __name__ == "__main__":
    main()
