"""importance="fluctuation" (FLAP's activation-aware score): against a direct computation from
forward hooks on the Linears, against benchmarks/quality_lm.py's FLAP-style baseline, and exact
when planned and applied."""
import os
import sys

import torch
import transformers

import snp_fx
from snp_fx.importance import compute_scores
from snp_fx.planning import keep_mask
from snp_fx.verify import mask_equivalence

from oracles import assert_sensitive, sharpen

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality_lm as q  # noqa: E402


def _tiny():
    """A sharp Llama whose Linear input widths differ (residual 64, attention output 32, FFN 96), and
    two calibration batches."""
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=100, use_cache=False)
    torch.manual_seed(0)
    model = sharpen(transformers.LlamaForCausalLM(cfg).eval())
    gen = torch.Generator().manual_seed(0)
    cal = [{"input_ids": torch.randint(0, 100, (2, 9), generator=gen), "use_cache": False} for _ in range(2)]
    return model, cal, snp_fx.analyze(model, cal[0])


def _direct(model, a, cal):
    """Per class: Var(x_j) ||W[:, j]||^2 over consuming Linears, the fallback sum_i |W[r, i]| ||x_i||
    over producing rows, from the inputs every nn.Linear sees (hooks on the original model)."""
    xs, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(
                lambda m, args, out, name=name: xs.setdefault(name, []).append(args[0].reshape(-1, m.in_features))))
    with torch.no_grad():
        for b in cal:
            model(**b)
    for h in hooks:
        h.remove()
    ch = a.channels
    col = torch.zeros(ch.num_units, dtype=torch.float64)
    row = torch.zeros(ch.num_units, dtype=torch.float64)
    for name, parts in xs.items():
        x = torch.cat(parts).double()
        w = model.get_submodule(name).weight.double()
        ids = ch.param_ids[name + ".weight"]
        col.index_add_(0, ch.class_of[ids[1]], x.var(dim=0) * w.pow(2).sum(0))
        row.index_add_(0, ch.class_of[ids[0]], (w.abs() * x.norm(dim=0)).sum(1))
    return col, row, xs


def test_scores_equal_a_direct_computation():
    model, cal, a = _tiny()
    got = compute_scores(a, "fluctuation", cal, progress=False).classes
    col, row, xs = _direct(model, a, cal)
    kinds = set()
    for g in a.prunable():
        ids = g.classes.reshape(-1)
        want = row[ids] if g.kind == "qk" else col[ids]  # nothing consumes q/k: their producing rows
        torch.testing.assert_close(got[ids], want, rtol=1e-6, atol=0)
        assert bool((want > 0).all())
        kinds.add(g.kind)
    assert kinds == {"qk", "v", "ffn", "residual"}
    # one group by hand, no class mapping: the FFN neurons of layer 0 are down_proj's input columns
    g = next(g for g in a.prunable() if g.kind == "ffn" and "layers.0." in g.name)
    x = torch.cat(xs["model.layers.0.mlp.down_proj"]).double()
    w = model.model.layers[0].mlp.down_proj.weight.double()
    torch.testing.assert_close(got[g.classes], x.var(dim=0) * w.pow(2).sum(0), rtol=1e-6, atol=0)


def test_scores_agree_with_the_benchmark_baseline():
    """benchmarks/quality_lm.py's FLAP-style criterion (its own hooks and code) gives the same scores."""
    model, cal, a = _tiny()
    got = compute_scores(a, "fluctuation", cal, progress=False).classes
    flap = q.baseline_importance(a, q.linear_input_stats(model, cal), "flap")
    for g in a.prunable():
        torch.testing.assert_close(got[g.classes], flap(a, g), rtol=1e-6, atol=0)


def test_plan_apply_is_exact():
    """Planned with fluctuation scores at fixed ratios (at a parameter target they keep every q/k pair here) (q/k by exact selection too) and applied: mask equivalence holds,
    and the check sees a swapped q/k unit."""
    model, cal, a = _tiny()
    for selection in ("score", "exact"):
        p = snp_fx.plan(a, ratios={"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.25}, importance="fluctuation", selection=selection, calibration=cal,
                        progress=False)
        assert p.meta["importance"] == "fluctuation"
        keep = keep_mask(a, p)
        pruned = snp_fx.apply(a, p, progress=False)
        assert sum(x.numel() for x in pruned.parameters()) < sum(x.numel() for x in model.parameters())
        assert mask_equivalence(a, keep, pruned, a.inputs, exact_norms=True) < 1e-4
        assert_sensitive(a, keep, pruned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snp_fx.prune(model, cal[0], preset="best", importance="fluctuation", target_params=0.7, calibration=cal,
                 progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is not mutated
