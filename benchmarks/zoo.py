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
import sys
import time
import traceback
import warnings

import timm
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's snp_fx
import snp_fx  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from oracles import sharpen, swapped_keep  # noqa: E402 - shared with the tests
from snp_fx.api import _failing_node
from snp_fx.planning import keep_mask, make_plan
from snp_fx.rewrite import rewrite
from snp_fx.verify import mask_equivalence

warnings.filterwarnings("ignore")


class Timeout(Exception):
    pass


class Skip(Exception):
    """A model outside the sweep's scope, found while building it."""


def _alarm(*_):
    raise Timeout()


def _timed_out(e) -> bool:
    """Whether the alarm fired inside ``e``'s chain (snp_fx wraps what a model or a rule raises)."""
    while e is not None:
        if isinstance(e, Timeout) or "Timeout" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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


SCORES = ("matmul", "bmm", "einsum", "baddbmm")


def _attention_like(node, shapes) -> bool:
    """SDPA, or a softmax over scores: (batch, heads, queries, keys), or 3-d from a product of two
    computed tensors a few ops up.  A mixture-of-experts router's softmax is over (tokens, experts)
    from a Linear: not attention."""
    target = str(node.target)
    if node.op == "placeholder" or "scaled_dot_product" in target:
        return node.op != "placeholder"
    shape = shapes.get(node.name)
    if "softmax" not in target or not isinstance(shape, tuple) or len(shape) < 3:
        return False
    if len(shape) >= 4:
        return True
    todo, seen = list(node.all_input_nodes), set()
    while todo and len(seen) < 40:
        n = todo.pop(0)
        seen.add(n)
        if any(k in str(n.target) for k in SCORES) and sum(a.op.startswith("call_") for a in n.all_input_nodes) >= 2:
            return True
        todo += [a for a in n.all_input_nodes if a not in seen]
    return False


def run(build, seconds, frontend="auto"):
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    t = time.perf_counter()
    try:
        torch.manual_seed(0)
        try:
            model, x = build()
        except Timeout:
            raise
        except Skip as e:
            return {"outcome": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - a config or model this sweep cannot build
            return {"outcome": "build failed", "why": f"{type(e).__name__}: {str(e).splitlines()[0][:140]}",
                    "trace": traceback.format_exc()[-600:]}
        model.eval()
        try:
            a = snp_fx.analyze(model, x, frontend=frontend)
        except snp_fx.SNPError as e:
            if _timed_out(e):
                raise Timeout() from None
            return {"outcome": "refused", "why": str(e).splitlines()[0][:160]}
        if not a.sites:
            attention_like = any(_attention_like(n, a.shapes) for n in a.gm.graph.nodes)
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
                try:
                    with torch.no_grad():
                        pruned(*a.inputs)
                except Timeout:
                    raise
                except Exception as e:  # noqa: BLE001 - as snp_fx.apply's check: name the failing node
                    raise snp_fx.RewriteError(f"the pruned graph does not run: {type(e).__name__}",
                                              node=_failing_node(pruned, a)) from e
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
        if plan.groups and any(g.kind == "qk" for g in a.prunable()):
            # the check can see a q/k mistake: one kept q/k unit swapped for a removed one must fail it
            try:
                _, wrong = swapped_keep(a, keep)
                out["sensitive"] = bool(mask_equivalence(a, wrong, pruned, a.inputs) > 1e-4)
            except AssertionError:  # no q/k unit removed in this plan
                pass
        return out
    except Timeout:
        return {"outcome": "timeout", "why": f"over {seconds} s"}
    except Exception as e:  # noqa: BLE001 - record, never stop the sweep
        if _timed_out(e):
            return {"outcome": "timeout", "why": f"over {seconds} s"}
        return {"outcome": "error", "why": f"{type(e).__name__}: {str(e)[:140]}",
                "trace": traceback.format_exc()[-600:]}
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------------------
# Hugging Face sweep: every base model class of transformers' AutoModel mapping
# ---------------------------------------------------------------------------

# tiny sizes under every name configs use for them (set where the config has the attribute)
HF_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
               head_dim=16, num_key_value_heads=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
               d_ff=128, d_kv=16, d_head=16, ffn_dim=128, embedding_size=64, rotary_dim=8, image_size=32, patch_size=8, use_cache=False)
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")
MOE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# mixture-of-experts configs: 4 experts, 2 per token, narrow expert FFNs (set where the config has them)
MOE_TINY = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=32, shared_expert_intermediate_size=64, n_group=1, topk_group=1)
COMPOSITE = ("text_config", "vision_config", "audio_config", "encoder", "decoder", "encoder_config",
             "decoder_config", "codec_config", "semantic_config", "patcher_config", "qformer_config")


def hf_architectures():
    """(model_type, why skipped or None) for every entry of the AutoModel mapping: text models
    (input_ids) and vision models (pixel_values) are swept, mixture-of-experts ones with 4 experts;
    multimodal / composite configs, audio, time series and the rest are listed as skipped."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    out = []
    for key, cls_name in sorted(MODEL_MAPPING_NAMES.items()):
        cls_name = cls_name if isinstance(cls_name, str) else cls_name[0]
        try:
            cls, cfg_cls = getattr(transformers, cls_name), getattr(transformers, CONFIG_MAPPING_NAMES[key])
            main = cls.main_input_name
        except Exception as e:  # noqa: BLE001 - a backend this environment lacks
            out.append((key, cls_name, f"not importable: {type(e).__name__}"))
            continue
        if main not in ("input_ids", "pixel_values"):
            out.append((key, cls_name, f"input {main!r}: not a text / vision model"))
        elif set(getattr(cfg_cls, "sub_configs", {})) & set(COMPOSITE):
            out.append((key, cls_name, "composite config (multimodal / encoder-decoder of sub-models)"))
        else:
            out.append((key, cls_name, None))
    return out


def hf_builder(key, cls_name):
    """A builder for ``key``'s base model at a tiny config, sharply initialised, with its inputs."""
    def build():
        import inspect

        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        cfg_cls = getattr(transformers, CONFIG_MAPPING_NAMES[key])
        default = cfg_cls()
        moe = any(isinstance(getattr(default, k, None), int) and getattr(default, k) > 0 for k in MOE)
        settable = set(inspect.signature(cfg_cls.__init__).parameters) | set(cfg_cls.attribute_map)
        kw = {k: v for k, v in {**HF_TINY, **(MOE_TINY if moe else {})}.items() if k in settable and hasattr(default, k) and
              (getattr(default, k) is not None or k == "head_dim") and
              not isinstance(getattr(default, k), (list, tuple))}  # per-stage lists: left as they are
        for k in TOKEN_IDS:  # special tokens inside the tiny vocabulary
            v = getattr(default, k, None)
            if isinstance(v, int) and v >= 100 or isinstance(v, list):
                kw[k] = 2
        for k in ("depths", "depth"):  # hierarchical vision models: one block per stage, 4 x 4 patches
            if isinstance(getattr(default, k, None), (list, tuple)):
                kw[k] = [1] * len(getattr(default, k))
                kw.update({x: v for x, v in (("image_size", 64), ("patch_size", 4)) if x in kw})
        if isinstance(getattr(default, "hidden_sizes", None), (list, tuple)):
            kw.pop("hidden_size", None)  # widths per stage: the model's own
        cfg = cfg_cls(**kw)
        model = getattr(transformers, cls_name)(cfg).eval()
        sharpen(model)
        params = inspect.signature(model.forward).parameters
        if model.main_input_name == "pixel_values":
            size = getattr(cfg, "image_size", 32)
            h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
            x = {"pixel_values": torch.randn(2, getattr(cfg, "num_channels", 3), h, w)}
        else:
            x = {"input_ids": torch.randint(3, min(100, getattr(cfg, "vocab_size", 100)), (2, 7))}
        if "decoder_input_ids" in params:
            x["decoder_input_ids"] = torch.randint(3, min(100, getattr(cfg, "vocab_size", 100)), (2, 5))
        if "use_cache" in params:
            x["use_cache"] = False
        return model, x
    return build


def run_isolated(jobs_todo, seconds, jobs, frontend):
    """Run every (family, model, build) in a forked child (the parent has imported torch and
    transformers once), ``jobs`` at a time; a child past ``seconds`` + 20 is killed."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    pending, running, rows = list(jobs_todo), [], {}

    def child(conn, build):
        torch.set_num_threads(1)
        conn.send(run(build, seconds, frontend))

    order = [fam for fam, _, _ in jobs_todo]
    while pending or running:
        while pending and len(running) < jobs:
            fam, name, build = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=child, args=(send, build), daemon=True)
            p.start()
            send.close()
            running.append((fam, name, p, recv, time.monotonic()))
        time.sleep(0.05)
        for item in list(running):
            fam, name, p, recv, t0 = item
            r = None
            if recv.poll():
                try:
                    r = recv.recv()
                except EOFError:
                    r = {"outcome": "error", "why": f"the worker died (exit code {p.exitcode})"}
            elif not p.is_alive():
                r = {"outcome": "error", "why": f"the worker died (exit code {p.exitcode})"}
            elif time.monotonic() - t0 > seconds + 20:
                p.kill()
                r = {"outcome": "timeout", "why": f"over {seconds} s"}
            if r is not None:
                p.join(1)
                running.remove(item)
                rows[fam] = {"family": fam, "model": name, **r}
                print(f"{fam:28s} {name:40s} {r['outcome']:12s} {r['why'][:100]}", flush=True)
    return [rows[f] for f in order]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-params", type=float, default=100e6)
    ap.add_argument("--seconds", type=int, default=240)
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model classes")
    ap.add_argument("--hf-sweep", action="store_true",
                    help="instead of timm: every text / vision base model class of transformers' AutoModel "
                         "mapping at a tiny config (torch.export), each in its own process")
    ap.add_argument("--models", nargs="*", help="with --hf-sweep: only these model types (config keys); their "
                    "rows replace those of the last sweep in results/zoo_hf.json")
    ap.add_argument("--jobs", type=int, default=1, help="with --hf-sweep: models run at once")
    args = ap.parse_args()
    if args.hf_sweep:
        return hf_sweep(args)
    torch.set_num_threads(2)
    families = args.families if args.families is not None else sorted(timm.list_modules())
    todo = []
    for fam in families:
        name = pick(fam, args.max_params)
        if name is not None:
            todo.append((fam, name, lambda name=name: timm_builder(name)))
    if not args.no_hf:
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
    summary(rows, "transformer families")
    write(rows, "zoo.json")


def hf_sweep(args):
    t0 = time.perf_counter()
    import transformers
    transformers.logging.set_verbosity_error()
    todo, rows = [], []
    for key, cls_name, skipped in hf_architectures():
        if args.models and key not in args.models:
            continue
        if skipped:
            rows.append({"family": key, "model": cls_name, "outcome": "skipped", "why": skipped})
        else:
            todo.append((key, cls_name, hf_builder(key, cls_name)))
    rows += run_isolated(todo, args.seconds, args.jobs, "export")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zoo_hf.json")
    if args.models and os.path.exists(path):  # a re-run of some models: update their rows of the last sweep
        with open(path) as f:
            new = {r["family"]: r for r in rows}
            rows = [new.pop(r["family"], r) for r in json.load(f)] + list(new.values())
    rows.sort(key=lambda r: r["family"])
    swept = [r for r in rows if r["outcome"] != "skipped"]
    print("\n| model type | class | outcome | why |\n|---|---|---|---|")
    for r in swept:
        print(f"| {r['family']} | {r['model']} | {r['outcome']}{' (check insensitive)' if r.get('sensitive') is False else ''} | {r['why']} |")
    print("\nskipped: " + ", ".join(f"{r['family']} ({r['why']})" for r in rows if r["outcome"] == "skipped"))
    print("\n| outcome | models |\n|---|---|")
    by = {}
    for r in swept:
        by.setdefault(r["outcome"], []).append(r["family"])
    for k, v in sorted(by.items(), key=lambda kv: -len(kv[1])):
        print(f"| {k} | {len(v)}: {', '.join(v)} |")
    summary(rows, "architectures")
    print(f"checks shown sensitive to a swapped q/k unit: {sum(r.get('sensitive') is True for r in rows)}, "
          f"not: {sum(r.get('sensitive') is False for r in rows)}; "
          f"sweep time {time.perf_counter() - t0:.0f} s ({args.jobs} at a time)")
    write(rows, "zoo_hf.json")


def summary(rows, what):
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    traced = [r for r in rows if r["outcome"] not in ("no attention", "refused", "timeout", "error",
                                                      "build failed", "skipped")]
    exact = sum(r["outcome"] == "exact" for r in traced)
    print(f"{what} with attention that trace: {len(traced)}; pruned exactly: {exact} "
          f"({exact / max(1, len(traced)):.0%}); wrong: {counts.get('wrong', 0)}")


def write(rows, name):
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", name), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
