"""`snp-fx` command: prune or inspect a timm model (or any `pkg.module:factory`).

`snp-fx prune MODEL --out DIR` prints a report (widths per block, params, MACs,
latency) and writes the pruned model, plan.json, report.md, widths.png and
attention.png into DIR.  Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time

import torch

from .errors import RewriteError, SNPError

DEFAULT_RATIOS = "qk=0.5,v=0.25,ffn=0.3"


def _status(msg: str) -> None:
    """Progress lines go to stderr, so stdout is the report alone."""
    print(f"[snp-fx] {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def load_model(spec: str, pretrained: bool = False, checkpoint: str | None = None) -> tuple[torch.nn.Module, tuple]:
    """A timm model name, or `pkg.module:factory` returning a module; then an optional state dict."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SNPError(f"checkpoint '{checkpoint}' not found")
    if ":" in spec:
        mod_name, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn)
        except (ImportError, AttributeError) as e:
            raise SNPError(f"cannot import '{spec}': {e}") from e
        try:
            model = factory()
        except Exception as e:
            raise SNPError(f"'{spec}' failed when called without arguments: {_first_line(e)}") from e
        if not isinstance(model, torch.nn.Module):
            raise SNPError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
        size = tuple(getattr(model, "input_size", (3, 224, 224)))
    else:
        import timm
        if spec not in timm.list_models() and spec not in timm.list_pretrained():
            close = timm.list_models(f"*{spec.split('_')[0]}*")[:5]
            raise SNPError(f"unknown timm model '{spec}'" + (f"; did you mean {close}?" if close else ""))
        try:
            model = timm.create_model(spec, pretrained=pretrained)
        except Exception as e:  # no network, no cached weights, ...
            raise SNPError(f"could not create '{spec}' (pretrained={pretrained}): {_first_line(e)}; "
                           "without network access use --checkpoint FILE") from e
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval(), size


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state dict: .safetensors, or a torch.save file (.pt/.pth, tensors only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SNPError(f"cannot read checkpoint '{path}': {_first_line(e)}") from e
    # training scripts often wrap the weights: {"model": ...} / {"state_dict": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SNPError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SNPError(f"checkpoint '{path}' does not fit the model: "
                       f"{' '.join(str(e).split())[:300]}") from e


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


# ---------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Images under a folder (flat, or ImageFolder-style class subfolders), read with PIL."""

    def __init__(self, root: str, transform, limit: int | None = None, seed: int = 0):
        from torchvision.datasets.folder import IMG_EXTENSIONS
        if not os.path.isdir(root):
            raise SNPError(f"calibration folder '{root}' does not exist")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise SNPError(f"no images in '{root}' (looked for {', '.join(IMG_EXTENSIONS)}, in subfolders too)")
        if limit and limit < len(files):  # a seeded subset, so every class folder is represented
            files = sorted(random.Random(seed).sample(files, limit))
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert("RGB"))
        except OSError as e:
            raise SNPError(f"cannot read image '{self.files[i]}': {e}") from e


def image_transform(model: torch.nn.Module, size: tuple):
    """timm's evaluation transform for the model (resize, center crop, normalise)."""
    import timm.data
    cfg = timm.data.resolve_data_config({}, model=model)
    if tuple(cfg["input_size"]) != tuple(size):  # a model without a timm config: its own input size
        cfg["input_size"] = tuple(size)
    return timm.data.create_transform(**cfg)


def calibration_batches(args, model, size) -> list | torch.utils.data.DataLoader | None:
    if args.calib and args.calib_random:
        raise SNPError("give --calib DIR or --calib-random N, not both")
    if args.calib_batch < 1:
        raise SNPError(f"--calib-batch must be >= 1, got {args.calib_batch}")
    if args.calib:
        ds = ImageFiles(args.calib, image_transform(model, size), args.calib_max, args.seed)
        _status(f"calibration: {len(ds)} images from {args.calib}")
        return torch.utils.data.DataLoader(ds, batch_size=args.calib_batch)
    if args.calib_random:
        g = torch.Generator().manual_seed(args.seed)
        n, b = args.calib_random, args.calib_batch
        return [torch.randn(min(b, n - i), *size, generator=g) for i in range(0, n, b)]
    return None


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def _budget(args) -> dict:
    given = [o for o, v in (("--ratios", args.ratios), ("--config", args.config), ("--target-macs", args.target_macs),
                            ("--target-params", args.target_params)) if v]
    if len(given) > 1:
        raise SNPError(f"give one budget, not {' and '.join(given)}")
    if args.target_macs:
        return {"target_macs": parse_count(args.target_macs)}
    if args.target_params:
        return {"target_params": parse_count(args.target_params)}
    if args.config:
        return {"ratios": args.config}
    return {"ratios": parse_ratios(args.ratios or DEFAULT_RATIOS)}




def cmd_prune(args) -> int:
    from . import api
    from .io import save
    from .cost import count_macs, count_params
    from .report import prune_report, time_interleaved
    budget = _budget(args)
    _status(f"loading {args.model}")
    model, size = load_model(args.model, args.pretrained, args.checkpoint)
    calib = calibration_batches(args, model, size)
    # the example input (trace, verify, MACs, latency, attention plot): one calibration input if any
    x = next(iter(calib))[:1] if calib is not None else torch.randn(1, *size, generator=torch.Generator().manual_seed(args.seed))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    t = time.perf_counter()
    _status("analyzing")
    analysis = api.analyze(model, x)
    _status(f"scoring ({args.importance}) and planning")
    plan = api.plan(analysis, importance=args.importance, seed=args.seed,
                    calibration=calib, gamma=args.gamma, round_to=args.round_to, heads=args.heads, **budget)
    _status("rewriting and verifying")
    pruned = api.apply(model, plan, x, analysis=analysis)
    elapsed = time.perf_counter() - t
    _status("counting MACs")
    stats = {"params": (count_params(model), count_params(pruned)),
             "macs": (count_macs(model, (x,)), count_macs(pruned, (x,))), "elapsed": elapsed}
    if not args.no_latency:
        _status(f"timing dense vs pruned (batch 1, {args.repeats} interleaved runs each)")
        lat = time_interleaved({"dense": model, "pruned": pruned}, (x,), repeats=args.repeats)
        stats["latency"] = (lat["dense"], lat["pruned"])
        stats["latency_note"] = (f"Latency: median of {args.repeats} interleaved forward passes, batch 1, "
                                 f"{torch.get_num_threads()} CPU threads, this machine")
    outputs = {}
    if args.out:
        from . import plots
        _status(f"writing to {args.out}")
        save(pruned, args.out, (x,))  # writes plan.json too
        outputs["pruned model (snp_fx.load(DIR, model))"] = os.path.join(args.out, "model.safetensors")
        outputs["plan"] = os.path.join(args.out, "plan.json")
        plots.plot_widths(analysis, plan, os.path.join(args.out, "widths.png"), title=args.model)
        outputs["widths plot"] = os.path.join(args.out, "widths.png")
        if plots.plot_attention(analysis, plan, pruned, analysis.inputs, os.path.join(args.out, "attention.png")):
            outputs["attention maps"] = os.path.join(args.out, "attention.png")
        outputs["this report"] = os.path.join(args.out, "report.md")
    text = prune_report(f"snp-fx prune {args.model}", analysis, plan, stats, outputs)
    if args.out:
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


def cmd_inspect(args) -> int:
    from . import api
    model, size = load_model(args.model, args.pretrained, args.checkpoint)
    print(api.analyze(model, torch.randn(1, *size)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snp-fx", description="Structured neuron-level pruning of transformers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune", help="prune a model, print a report, write the pruned model and plots",
                       description="Prune MODEL (a timm model name, or pkg.module:factory returning a module). "
                                   f"Budget: --ratios (default {DEFAULT_RATIOS}), --config, --target-macs or "
                                   "--target-params.")
    p.add_argument("model", help="timm model name or pkg.module:factory")
    p.add_argument("--ratios", help="fraction removed per kind (qk, v, ffn, residual, heads) or per group name, "
                                    f"e.g. qk=0.5,v=0.3,ffn=0.3,residual=0.2,heads=0 (default {DEFAULT_RATIOS})")
    p.add_argument("--config", help="the authors' ratio file (JSON), or DeiT_t / DeiT_s / DeiT_s_small / DeiT_b")
    p.add_argument("--target-macs", help="MACs budget: 2.0G, or a fraction of the dense model such as 0.45")
    p.add_argument("--target-params", help="parameter budget: 12M, or a fraction such as 0.5")
    p.add_argument("--heads", action="store_true", help="with a target: let whole heads go too")
    p.add_argument("--round-to", type=int, default=1, help="kept widths are multiples of this")
    p.add_argument("--importance", default="snp", help="channel scores: snp, l1, l2, gm, random, reverse")
    p.add_argument("--gamma", type=int, default=2, help="singular components in the SNP q/k score")
    p.add_argument("--calib", metavar="DIR", help="calibrate on the images in DIR (flat, or class subfolders)")
    p.add_argument("--calib-max", type=int, metavar="N", help="use a seeded random subset of N images of --calib")
    p.add_argument("--calib-random", type=int, default=0, metavar="N",
                   help="calibrate on N random inputs (default: one example input)")
    p.add_argument("--calib-batch", type=int, default=16, metavar="B", help="calibration batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    p.add_argument("--checkpoint", metavar="FILE", help="load a state dict (.safetensors, .pt, .pth)")
    p.add_argument("--no-latency", action="store_true", help="skip timing dense vs pruned")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    p.add_argument("--out", metavar="DIR",
                   help="write the pruned model, plan.json, report.md, widths.png and attention.png here")
    p.set_defaults(fn=cmd_prune)
    i = sub.add_parser("inspect", help="print the analysis: attention sites, groups, what is unprunable")
    i.add_argument("model", help="timm model name or pkg.module:factory")
    i.add_argument("--pretrained", action="store_true")
    i.add_argument("--checkpoint", metavar="FILE", help="load a state dict (.safetensors, .pt, .pth)")
    i.set_defaults(fn=cmd_inspect)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SNPError as e:
        print(f"snp-fx: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except RewriteError as e:  # not the user's fault: say so in one line, exit 1
        print(f"snp-fx: internal error: {e}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
