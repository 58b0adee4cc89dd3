"""`snp-fx` command: prune or inspect a timm model (or any `pkg.module:factory`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

from .errors import SNPError


def load_model(spec: str, pretrained: bool = False) -> tuple[torch.nn.Module, tuple]:
    """A timm model name, or `pkg.module:factory` returning a module."""
    if ":" in spec:
        mod_name, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn)
        except (ImportError, AttributeError) as e:
            raise SNPError(f"cannot import '{spec}': {e}") from e
        model = factory()
        size = getattr(model, "input_size", (3, 224, 224))
        return model.eval(), tuple(size)
    import timm
    if spec not in timm.list_models() and spec not in timm.list_pretrained():
        close = timm.list_models(f"*{spec.split('_')[0]}*")[:5]
        raise SNPError(f"unknown timm model '{spec}'" + (f"; did you mean {close}?" if close else ""))
    model = timm.create_model(spec, pretrained=pretrained)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model.eval(), tuple(size)


def parse_ratios(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(val)
        except ValueError:
            raise SNPError(f"bad ratio '{part}': write KIND=FRACTION, e.g. qk=0.5,v=0.25,ffn=0.3") from None
    return out


def parse_count(text: str) -> float:
    """'2.0G', '500M', '0.5' (a fraction of the dense model) -> number."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1)
    try:
        return float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise SNPError(f"bad target '{text}': write e.g. 2.0G, 500M or 0.5 (a fraction of the dense model)") from None


def _summary(model, pruned, x) -> list[str]:
    from .report import count_macs, count_params
    p0, p1 = count_params(model), count_params(pruned)
    m0, m1 = count_macs(model, (x,)), count_macs(pruned, (x,))
    return [f"params  {p0 / 1e6:8.2f} M -> {p1 / 1e6:8.2f} M  ({p1 / p0:.1%})",
            f"MACs    {m0 / 1e9:8.3f} G -> {m1 / 1e9:8.3f} G  ({m1 / m0:.1%})"]


def cmd_prune(args) -> int:
    from . import api
    model, size = load_model(args.model, args.pretrained)
    x = torch.randn(1, *size)
    t = time.perf_counter()
    analysis = api.analyze(model, x)
    budget = {}
    if args.target_macs:
        budget["target_macs"] = parse_count(args.target_macs)
    elif args.target_params:
        budget["target_params"] = parse_count(args.target_params)
    elif args.config:
        budget["ratios"] = args.config
    else:
        budget["ratios"] = parse_ratios(args.ratios)
    calib = [torch.randn(1, *size) for _ in range(args.calib_random)] if args.calib_random else None
    plan = api.plan(model, x, importance=args.importance, analysis=analysis, seed=args.seed,
                    calibration=calib, gamma=args.gamma, round_to=args.round_to, heads=args.heads, **budget)
    pruned = api.apply(model, plan, x, analysis=analysis)
    elapsed = time.perf_counter() - t
    from .report import widths_table
    print(f"pruned {args.model} in {elapsed:.1f} s (analyze + plan + rewrite + verify)\n")
    print(widths_table(analysis, plan))
    print()
    print("\n".join(_summary(model, pruned, x)))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plan.save(os.path.join(args.out, "plan.json"))
        print(f"\nwrote {os.path.join(args.out, 'plan.json')}")
    return 0


def cmd_inspect(args) -> int:
    from . import api
    model, size = load_model(args.model, args.pretrained)
    print(api.analyze(model, torch.randn(1, *size)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="snp-fx", description="Structured neuron-level pruning of transformers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model and print what was removed")
    p.add_argument("model", help="timm model name or pkg.module:factory")
    p.add_argument("--ratios", default="qk=0.5,v=0.25,ffn=0.3",
                   help="fraction removed per kind (qk, v, ffn, residual, heads) or per group name")
    p.add_argument("--config", help="the authors' ratio file (JSON), or DeiT_t / DeiT_s / DeiT_s_small / DeiT_b")
    p.add_argument("--target-macs", help="MACs budget: 2.0G, or a fraction of the dense model such as 0.45")
    p.add_argument("--target-params", help="parameter budget: 12M, or a fraction such as 0.5")
    p.add_argument("--heads", action="store_true", help="with a target: let whole heads go too")
    p.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    p.add_argument("--importance", default="snp", help="channel scores: snp, l1, l2, gm, random, reverse")
    p.add_argument("--gamma", type=int, default=2, help="singular components in the SNP q/k score")
    p.add_argument("--calib-random", type=int, default=0, metavar="N",
                   help="calibrate on N random inputs (default: one example input)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    p.add_argument("--out", help="directory for plan.json")
    p.set_defaults(fn=cmd_prune)
    i = sub.add_parser("inspect", help="print the analysis: attention sites, groups, what is unprunable")
    i.add_argument("model")
    i.add_argument("--pretrained", action="store_true")
    i.set_defaults(fn=cmd_inspect)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except SNPError as e:
        print(f"snp-fx: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
