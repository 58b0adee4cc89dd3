"""Speed of pruned DeiTs on CPU, dense and pruned timed side by side, and torch-pruning at equal MACs.

    python benchmarks/latency.py [--models deit_tiny_patch16_224 ...] [--repeats 8] [--threads 2] [--quick]
                                 [--compile] [--device cuda --dtype float16 --big-batch 64] [--normalise kind]

Per model (timm, random init) the rows are:
  (a) snp_fx with the SNP authors' config ("DeiT_t", "DeiT_s", "DeiT_s_small", "DeiT_b"),
  (a') the same ratios with hardware="cpu" (every kept width rounded to the nearest multiple of 8),
  (b) snp_fx with target_macs = the same GMACs, hardware="cpu" (round_to 8, and q/k and v of one
      head width where the fused kernel would otherwise pad),
  (c) the same with whole heads allowed (heads=True),
  (d) snp_fx with target_latency = the config's MACs fraction of the dense latency, planned on this
      machine's latency table at the big batch (hardware="cpu"): asked vs measured fraction, in
      the table's turns and again timed in pairs with the dense model alone (as the planner times it),
  (e) DeiT-B only: target_macs=3.5e9 with whole heads allowed (heads=True), hardware="cpu",
  (f) torch-pruning (PyPI) with its timm ViT recipe (examples/transformers/prune_timm_vit.py:
      BasePruner, L1 GroupMagnitudeImportance, uniform ratio, head dims pruned, classifier
      ignored), its ratio bisected to the MACs of the row it is timed against: row (a) against the
      recipe as published (round_to 1, within 1%), the hardware="cpu" rows against it with
      torch-pruning's round_to=8 (its widths in multiples of 8 too, within 2%: the steps are
      coarse); a torch-pruning row serves every row whose MACs are within 2% of its own,
  (g) snp_fx at each torch-pruning row's own widths (head width, residual and FFN width read off its
      model, as per-kind ratios; SNP scores pick the channels), timed against that row: the same
      shapes, so the difference is the implementation alone (FX graph, padded attention, rewrite).
fp32, 2 threads (--threads), eval + inference_mode, batch 1 and 16 (--big-batch) at 224x224; --compile
also times every model under torch.compile; --device cuda --dtype float16 runs the rows on a GPU.
The dense model and every pruned variant of it are timed in turns in one process (snp_fx.report.time_turns), so
the speedups (dense time / pruned time) hold even when the machine is shared; "time / TP's" is the median of
the per-turn ratios to the torch-pruning row, with their quartiles in brackets.  The load average before
and after the timing is printed and saved.
Writes benchmarks/results/latency.json (latency_normalise_kind.json with --normalise kind).
"""
import argparse
import copy
import os
import statistics

import timm
import torch
import torch_pruning as tp
from timm.models.vision_transformer import Attention

import snp_fx
from snp_fx.cost import count_macs
from snp_fx.planning import NORMALISE
from snp_fx.report import time_turns
from torch.profiler import ProfilerActivity, profile

from common import keep_freed_memory, report

# The authors' configs per model, with the GMACs they are published at.
CONFIGS = {
    "deit_tiny_patch16_224": [("DeiT_t", 0.64)],
    "deit_small_patch16_224": [("DeiT_s", 2.04), ("DeiT_s_small", 1.27)],
    "deit_base_patch16_224": [("DeiT_b", 6.32)],
}
HEADS_BUDGET = {"deit_base_patch16_224": 3.5}  # row (e): whole heads may go
# Speedups the SNP paper reports on a server CPU (Xeon 4210R), by (model, GMACs).
PAPER = {("deit_small_patch16_224", 2.04): 1.38, ("deit_small_patch16_224", 1.27): 1.60,
         ("deit_base_patch16_224", 6.32): 1.89, ("deit_base_patch16_224", 3.5): 2.65}


def tp_prune(dense, x, ratio, round_to=1):
    """torch-pruning's timm ViT recipe at one uniform pruning ratio (a pruned copy of ``dense``).

    ``round_to``: torch-pruning's own option, kept widths in multiples of it (the recipe's default 1).
    """
    model = copy.deepcopy(dense)
    num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), global_pruning=False,
        pruning_ratio=ratio, ignored_layers=[model.head], num_heads=num_heads,
        prune_num_heads=False, prune_head_dims=True, round_to=round_to)
    for group in pruner.step(interactive=True):
        group.prune()
    # The recipe then fixes the heads' bookkeeping.  It also replaces Attention.forward, because
    # old timm reshaped to the input width; timm >= 1.0 reshapes to self.attn_dim (and Block now
    # passes attn_mask=, which the recipe's forward(self, x) would reject), so setting attn_dim
    # is the equivalent.  Like the recipe, self.scale is left at the dense 1/sqrt(head_dim), but
    # the fused path calls SDPA without scale=, so it uses 1/sqrt(pruned head_dim): a changed
    # softmax temperature (an accuracy matter only, the cost is the same).
    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.num_heads * m.head_dim
    return model.eval()


def tp_widths(dense, model) -> dict:
    """Per-kind ratios that give snp_fx the widths of torch-pruning's ``model`` (uniform over blocks)."""
    def widths(m):
        attn = [b.attn for b in m.blocks]
        return {"qk": {a.head_dim for a in attn}, "ffn": {b.mlp.fc1.out_features for b in m.blocks},
                "residual": {m.patch_embed.proj.out_channels}}
    dense_w, w = widths(dense), widths(model)
    if any(len(v) != 1 for v in w.values()):
        raise RuntimeError(f"torch-pruning's widths differ between blocks: {w}")
    ratios = {k: 1 - next(iter(w[k])) / next(iter(dense_w[k])) for k in w}
    return {**ratios, "v": ratios["qk"]}


def tp_matching(dense, x, target, tol=0.01, round_to=1):
    """Bisect torch-pruning's ratio until count_macs is within ``tol`` of ``target`` (else the nearest)."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(20):
        r = (lo + hi) / 2
        model = tp_prune(dense, x, r, round_to)
        macs = count_macs(model, (x,))
        if best is None or abs(macs - target) < abs(best[1] - target):
            best = (model, macs, r)
        if abs(macs / target - 1) <= tol:
            break
        lo, hi = (r, hi) if macs > target else (lo, r)
    return best


@torch.inference_mode()
def fused_attention(model, x):
    """"k/n": how many of the n attention calls run torch's fused CPU kernel.

    The fused kernels (CPU flash; CUDA flash / memory-efficient / cuDNN) need q, k and v of one
    head width; otherwise SDPA falls back to its unfused math path (bmm, softmax, and copies of
    q, k, v and the output).  snp_fx pads pruned calls to one width (snp_fx/kernels.py).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        model(x)
    names = [e.name for e in prof.events()]
    fused = sum(1 for n in names if n.startswith("aten::_scaled_dot_product_") and "math" not in n)
    return f"{fused}/{names.count('aten::scaled_dot_product_attention')}"


def variants(name, dense, x, quick, big, normalise="group"):
    """[(label, budget, pruned model, paper speedup or None, latency fraction asked or None,
    label of the torch-pruning row it is timed against or None)] for one dense model."""
    out = []
    configs = CONFIGS[name][:1] if quick else CONFIGS[name]
    dense_macs = count_macs(dense, (x,))
    tps = []  # (round_to, MACs, label) of the torch-pruning rows made so far
    suffix = "" if normalise == "group" else f", normalise {normalise}"  # of the target rows' labels

    def torch_pruning(pruned, round_to, pending):
        """Label of a torch-pruning row with ``round_to`` within 2% of ``pruned``'s MACs; made if none is."""
        macs = count_macs(pruned, (x,))
        for rt, m, label in tps:
            if rt == round_to and abs(m / macs - 1) <= 0.02:
                return label
        model, m, r = tp_matching(dense, x, macs, tol=0.01 if round_to == 1 else 0.02, round_to=round_to)
        label = f"torch-pruning L1 uniform r={r:.3f}" + (f", round_to {round_to}" if round_to > 1 else "")
        tps.append((round_to, m, label))
        pending.append((label, None, model, None, None, None))
        # (g) snp_fx at exactly these widths: the implementation against torch-pruning's, shapes equal
        twin = snp_fx.prune(dense, x, ratios=tp_widths(dense, model), round_to=round_to, progress=False)
        twin_macs = count_macs(twin, (x,))
        if abs(twin_macs / m - 1) > 1e-3:
            raise RuntimeError(f"snp_fx at {label}'s widths: {twin_macs:.4g} MACs, not {m:.4g}")
        pending.append((f"snp_fx at the widths of {label}", None, twin, None, None, label))
        return label

    def snp(label, budget, pruned, round_to, pending, asked=None):
        versus = None if asked is not None else torch_pruning(pruned, round_to, pending)
        out.append((label, budget, pruned, PAPER.get((name, budget)), asked, versus))

    for cfg, g in configs:
        pending = []  # this budget's torch-pruning rows, listed after its snp_fx rows
        a = snp_fx.prune(dense, x, ratios=cfg, progress=False)
        snp(f"snp_fx `{cfg}` config", g, a, 1, pending)
        # the same per-layer ratios with widths the CPU likes (round_to 8, to the nearest multiple)
        snp(f"snp_fx `{cfg}` config, hardware cpu", g,
            snp_fx.prune(dense, x, ratios=cfg, hardware="cpu", progress=False), 8, pending)
        b = snp_fx.prune(dense, x, target_macs=g * 1e9, hardware="cpu", normalise=normalise, progress=False)
        snp(f"snp_fx target {g}G, hardware cpu{suffix}", g, b, 8, pending)
        if not quick:  # whole heads may go too: the shapes attention runs fastest in (native_widths.py)
            h = snp_fx.prune(dense, x, target_macs=g * 1e9, hardware="cpu", heads=True, normalise=normalise,
                             progress=False)
            snp(f"snp_fx target {g}G + heads, hardware cpu{suffix}", g, h, 8, pending)
            # a latency budget: the config's MACs fraction of the dense latency at the big batch
            # (the latency table is measured at the example's batch)
            frac = round(count_macs(a, (x,)) / dense_macs, 3)
            xb = torch.randn(big, *x.shape[1:])
            try:
                d = snp_fx.prune(dense, xb, target_latency=frac, hardware="cpu", normalise=normalise, progress=False)
            except snp_fx.SNPError as e:  # the latency table is measured here: a loaded machine can upset it
                print(f"{name} | target_latency {frac}: {e}", flush=True)
            else:
                snp(f"snp_fx target_latency {frac} (b{big}), hardware cpu{suffix}", g, d, 8, pending, asked=frac)
        out += pending
    if name in HEADS_BUDGET and not quick:
        g, pending = HEADS_BUDGET[name], []
        c = snp_fx.prune(dense, x, target_macs=g * 1e9, hardware="cpu", heads=True, normalise=normalise,
                         progress=False)
        snp(f"snp_fx target {g}G + heads, hardware cpu{suffix}", g, c, 8, pending)
        torch_pruning(c, 1, pending)  # and the recipe as published, for the speedup columns
        out += pending
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CONFIGS))
    ap.add_argument("--repeats", type=int, default=8, help="timed turns at batch 16 (3x at batch 1)")
    ap.add_argument("--quick", action="store_true", help="first config per model, no heads row, 2 repeats")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="timing dtype (pruning runs in float32, then the models are converted)")
    ap.add_argument("--big-batch", type=int, default=16, help="the second batch size timed (e.g. 64 on a GPU)")
    ap.add_argument("--normalise", choices=NORMALISE, default="group",
                    help="how the target rows compare scores across groups (snp_fx.plan's normalise=)")
    args = ap.parse_args()
    keep_freed_memory()
    if args.quick:
        args.repeats = 2
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        if name not in CONFIGS:
            raise SystemExit(f"--models: {name} has no SNP config; choose from {list(CONFIGS)}")
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False).eval()
        x1 = torch.randn(1, 3, 224, 224)
        vs = variants(name, dense, x1, args.quick, args.big_batch, args.normalise)
        dense_macs = count_macs(dense, (x1,))
        models = {"dense": dense, **{i: v[2] for i, v in enumerate(vs)}}
        with torch.inference_mode():
            for i, (label, _, m, *_) in enumerate(vs):
                y = m(x1)
                if y.shape != (1, 1000) or not torch.isfinite(y).all():
                    raise RuntimeError(f"{name} / {label}: bad output {tuple(y.shape)}")
        models = {k: m.to(device, dtype) for k, m in models.items()}
        big = args.big_batch
        load_before = os.getloadavg()[0]  # 1-minute load: this benchmark's own threads count in it
        times, turns = {}, {}  # (compiled?, batch) -> {model: median seconds}, {model: seconds per turn}
        for compiled in (False, True) if args.compile else (False,):
            timed = {k: torch.compile(m) for k, m in models.items()} if compiled else models
            for batch, reps in ((1, 3 * args.repeats), (big, args.repeats)):
                xb = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                turns[compiled, batch] = time_turns(timed, (xb,), repeats=reps, warmup=3 if compiled else 2)
                times[compiled, batch] = {k: statistics.median(v) for k, v in turns[compiled, batch].items()}
        load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"
        print(f"{name}: load average {load} while timing", flush=True)
        index = {v[0]: i for i, v in enumerate(vs)}
        x1 = x1.to(device, dtype)
        for i, (label, budget, m, paper, asked, tp_label) in enumerate(vs):
            macs = count_macs(m, (x1,))
            ratio = dense_macs / macs
            row = {"model": name, "variant": label, "budget_gmacs": budget, "dense_gmacs": dense_macs / 1e9,
                   "pruned_gmacs": macs / 1e9, "macs_ratio": ratio, "big_batch": big, "device": args.device,
                   "dtype": args.dtype, "fused_attention": fused_attention(m, x1), "threads": args.threads,
                   "paper_speedup": paper, "paper": "-" if paper is None else f"{paper:.2f}x",
                   "timed_against": tp_label or "-", "load": load}
            tp_row = index.get(tp_label)  # torch-pruning at equal MACs (none for a latency budget's row)
            for compiled in (False, True) if args.compile else (False,):
                tag = "_compiled" if compiled else ""
                for batch, b in ((1, "b1"), (big, "bN")):
                    t = times[compiled, batch]
                    row[f"dense_ms_{b}{tag}"], row[f"pruned_ms_{b}{tag}"] = t["dense"] * 1e3, t[i] * 1e3
                    row[f"speedup_{b}{tag}"] = t["dense"] / t[i]
                    row[f"speedup_over_macs_{b}{tag}"] = t["dense"] / t[i] / ratio
                    # against torch-pruning: the median of the per-turn ratios (the two ran back to back
                    # in every turn), and the quartiles of those ratios: how far one turn's reading moves
                    vs_tp, spread = None, None
                    if tp_row is not None:
                        ratios = [a / b for a, b in zip(turns[compiled, batch][i], turns[compiled, batch][tp_row])]
                        q = statistics.quantiles(ratios, n=4)
                        vs_tp, spread = statistics.median(ratios), (q[0], q[2])
                    row[f"time_vs_tp_{b}{tag}"], row[f"time_vs_tp_quartiles_{b}{tag}"] = vs_tp, spread
                    row[f"vs_tp_{b}{tag}"] = "-" if vs_tp is None else f"{vs_tp:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"
            # a latency budget: the fraction of the dense latency asked for vs the one measured here,
            # eager, at the big batch: in the table's turns (every variant), and timed in pairs with
            # the dense model alone, as the budget is defined and planned (median per-turn ratio)
            measured = times[False, big][i] / times[False, big]["dense"]
            row["latency_asked_fraction"] = asked
            row["latency_error"] = "-" if asked is None else f"{measured / asked - 1:+.1%}"
            row["latency_error_pairs"] = "-"
            if asked is not None:
                xb = torch.randn(big, 3, 224, 224, device=device, dtype=dtype)
                t = time_turns({"dense": models["dense"], "pruned": models[i]}, (xb,), repeats=2 * args.repeats)
                pair = statistics.median(q / d for d, q in zip(t["dense"], t["pruned"]))
                row["latency_measured_fraction_pairs"] = pair
                row["latency_error_pairs"] = f"{pair / asked - 1:+.1%}"
            rows.append(row)
            print(f"{name} | {label}: {macs / 1e9:.3f} GMACs, speedup b1 {row['speedup_b1']:.2f}x, "
                  f"b{big} {row['speedup_bN']:.2f}x", flush=True)
    big = args.big_batch
    columns = [("model", "model", ""), ("variant", "variant", ""), ("MACs pruned (G)", "pruned_gmacs", ".3f"),
               ("MACs ratio", "macs_ratio", ".2f")]
    for tag, what in [("", "")] + ([("_compiled", "compiled ")] if args.compile else []):
        columns += [(f"{what}speedup b1", f"speedup_b1{tag}", ".2f"),
                    (f"{what}b1 / MACs ratio", f"speedup_over_macs_b1{tag}", ".2f"),
                    (f"{what}b1 time / TP's", f"vs_tp_b1{tag}", ""),
                    (f"{what}speedup b{big}", f"speedup_bN{tag}", ".2f"),
                    (f"{what}b{big} / MACs ratio", f"speedup_over_macs_bN{tag}", ".2f"),
                    (f"{what}b{big} time / TP's", f"vs_tp_bN{tag}", "")]
    columns += [("TP's = ", "timed_against", ""), ("latency measured / asked - 1", "latency_error", ""),
                ("the same, timed in pairs", "latency_error_pairs", ""), ("fused attention", "fused_attention", ""),
                ("paper (Xeon 4210R)", "paper", ""), ("load while timed", "load", "")]
    name = "latency" if args.device == "cpu" else f"latency_{args.device}_{args.dtype}"
    report(name + ("" if args.normalise == "group" else f"_normalise_{args.normalise}"), columns, rows)


if __name__ == "__main__":
    main()
