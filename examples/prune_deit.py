"""Prune timm's DeiT-S with SNP: analyze, prune to the SNP authors' config (or a MACs target), and
print the kept widths per block, params, MACs and latency before and after.

    python examples/prune_deit.py                          # the authors' DeiT_s config (2.04 GMACs)
    python examples/prune_deit.py --target-macs 0.5 --round-to 8
    python examples/prune_deit.py --hardware cpu           # the config, widths rounded to what the CPU runs fastest
    python examples/prune_deit.py --pretrained             # timm's ImageNet weights, when you have them
    python examples/prune_deit.py --model deit_tiny_patch16_224 --img-size 64 --calib 4   # a quick run

Random-init weights unless --pretrained; calibration on random images (use the `snp-fx prune
--calib DIR` command to calibrate on real images).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import snp_fx
from snp_fx.cost import count_macs, count_params
from snp_fx.report import prune_report, time_interleaved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224", help="a timm model name")
    ap.add_argument("--config", default="DeiT_s", help="the authors' config: DeiT_t, DeiT_s, DeiT_s_small, DeiT_b")
    ap.add_argument("--target-macs", type=float, help="instead of --config: MACs budget, absolute or a fraction < 1")
    ap.add_argument("--round-to", type=int, default=1, help="with --target-macs: widths are multiples of this")
    ap.add_argument("--hardware", choices=("cpu", "cuda"),
                    help="kept widths in the steps this hardware runs fastest (snp_fx.plan's hardware=)")
    ap.add_argument("--calib", type=int, default=8, help="random calibration images")
    ap.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs them cached)")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution (timm resizes the position embedding)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=args.pretrained, img_size=args.img_size).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size)
    calib = [torch.randn(4, 3, args.img_size, args.img_size) for _ in range(max(args.calib // 4, 1))]

    t = time.perf_counter()
    analysis = snp_fx.analyze(model, x)  # attention sites, coupled groups, what cannot be pruned and why
    print(f"{args.model}: {len(analysis.sites)} attention sites, {len(analysis.prunable())} prunable groups "
          f"({time.perf_counter() - t:.1f} s)")
    budget = {"target_macs": args.target_macs, "round_to": args.round_to} if args.target_macs else {"ratios": args.config}
    budget["hardware"] = args.hardware
    plan = snp_fx.plan(model, x, analysis=analysis, calibration=calib, **budget)
    pruned = snp_fx.apply(model, plan, x, analysis=analysis)  # checked against the masked original
    elapsed = time.perf_counter() - t

    lat = time_interleaved({"dense": model, "pruned": pruned}, (x,), repeats=10)
    stats = {"params": (count_params(model), count_params(pruned)),
             "macs": (count_macs(model, (x,)), count_macs(pruned, (x,))),
             "latency": (lat["dense"], lat["pruned"]), "elapsed": elapsed,
             "latency_note": f"Latency: median of 10 interleaved passes, batch 1, {torch.get_num_threads()} threads"}
    print(prune_report(f"{args.model} pruned with SNP", analysis, plan, stats))

    # the result is an ordinary GraphModule: it compiles, exports and trains like any module
    with torch.inference_mode():
        print("pruned output:", tuple(pruned(x).shape), "- same as dense:", tuple(model(x).shape))


if __name__ == "__main__":
    main()
