"""Zoo coverage: one variant per timm model family (and the HF model classes), pruned with a random
plan, checked exactly.

    python benchmarks/zoo.py [--max-params 100e6] [--families vision_transformer swin_transformer ...] [--no-hf]

For each family (timm module) the first model under the parameter limit is built (random init),
analysed (torch.fx, else torch.export), pruned with q/k 0.5, v 0.25, FFN 0.3 on a random plan and
compared with the masked original.  A family counts as a transformer when its graph has attention sites or a softmax / SDPA
(attention the analysis missed); the rest (CNNs, MLPs) are listed apart.
Outcome per family: exact (every site's q/k and v pruned), partial (some groups left, with the
reason), refused (nothing prunable or untraceable, with the reason), wrong (outputs differ: a bug).
Prints a markdown table and writes benchmarks/results/zoo.json.
"""
import argparse
import json
import os
import signal
import time
import traceback
import warnings

import timm
import torch

import snp_fx
from snp_fx.planning import keep_mask, make_plan
from snp_fx.rewrite import rewrite
from snp_fx.verify import mask_equivalence

warnings.filterwarnings("ignore")


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout()


def pick(module, max_params):
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
            if sum(p.numel() for p in m.parameters()) <= max_params:
                return name
        except Exception:  # noqa: BLE001 - some entrypoints need extra arguments
            continue
    return None


def timm_builder(name):
    model = timm.create_model(name, pretrained=False).eval()
    return model, torch.randn(1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))


def run(build, seconds):
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    t = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, x = build()
        model.eval()
        try:
            a = snp_fx.analyze(model, x)
        except snp_fx.SNPError as e:
            return {"outcome": "refused", "why": str(e).splitlines()[0][:160]}
        if not a.sites:
            attention_like = any(n.op != "placeholder" and any(
                k in str(n.target) for k in ("softmax", "scaled_dot_product")) for n in a.gm.graph.nodes)
            # a contraction the analysis refused says more than the first unknown op
            refused = sorted({why for _, why in a.channels.space.frozen
                              if any(w in why for w in ("contraction", "product of", "einsum"))})
            why = "; ".join((refused or list(a.unknown_ops.values()))[:2])[:160]
            return {"outcome": "missed" if attention_like else "no attention", "why": why}
        ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.3}
        scores = torch.rand(a.channels.num_units, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for _ in range(len(a.groups)):  # as snp_fx.prune does: set aside groups the rewrite cannot realise
            plan = make_plan(a, ratios, scores)
            keep = keep_mask(a, plan)
            try:
                pruned = rewrite(a, keep)
                break
            except snp_fx.RewriteError as e:
                if not (e.node and a.refuse(e.node, f"not rewritable at `{e.node}`")):
                    return {"outcome": "refused", "why": str(e)[:160]}
        err = mask_equivalence(a, keep, pruned, a.inputs)
        left = [g for g in a.groups.values() if g.kind in ("qk", "v") and not g.prunable]
        out = {"sites": len(a.sites), "error": err, "seconds": time.perf_counter() - t}
        if not err < 1e-4:
            out.update(outcome="wrong", why=f"relative error {err:.2e}")
        elif not plan.groups:
            out.update(outcome="refused", why="; ".join(sorted({g.reason for g in left}))[:160])
        elif left:
            out.update(outcome="partial", why=f"{len(left)} q/k|v groups left: " +
                       "; ".join(sorted({g.reason for g in left}))[:140])
        else:
            out.update(outcome="exact", why="")
        return out
    except Timeout:
        return {"outcome": "timeout", "why": f"over {seconds} s"}
    except Exception as e:  # noqa: BLE001 - record, never stop the sweep
        return {"outcome": "error", "why": f"{type(e).__name__}: {str(e)[:140]}",
                "trace": traceback.format_exc()[-600:]}
    finally:
        signal.alarm(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--seconds", type=int, default=240)
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model classes")
    args = ap.parse_args()
    torch.set_num_threads(2)
    families = args.families if args.families is not None else sorted(timm.list_modules())
    todo = []
    for fam in families:
        name = pick(fam, args.max_params)
        if name is not None:
            todo.append((fam, name, lambda name=name: timm_builder(name)))
    if not args.no_hf:
        import sys
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from hf_models import MODELS  # small configs of every HF class the tests cover
        for key, fn in MODELS.items():
            todo.append(("hf:" + key, fn.__name__, lambda fn=fn: fn()))
    rows = []
    for fam, name, build in todo:
        r = {"family": fam, "model": name, **run(build, args.seconds)}
        rows.append(r)
        print(f"{fam:28s} {name:45s} {r['outcome']:12s} {r['why'][:100]}", flush=True)
    print("\n| family | model | outcome | why |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['model']} | {r['outcome']} | {r['why']} |")
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    transformers = [r for r in rows if r["outcome"] not in ("no attention", "refused", "timeout", "error")]
    exact = sum(r["outcome"] == "exact" for r in transformers)
    print(f"transformer families that trace: {len(transformers)}; pruned exactly: {exact} "
          f"({exact / max(1, len(transformers)):.0%}); wrong: {counts.get('wrong', 0)}")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "zoo.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
