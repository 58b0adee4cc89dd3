"""benchmarks/quality_lm.py: its pipeline on a tiny config (so it cannot rot), and its two baselines
checked against their definitions."""
import json
import os
import sys

import pytest
import torch

import snp_fx
from snp_fx.planning import keep_mask

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality_lm as q  # noqa: E402


def test_smoke_pipeline(tmp_path, monkeypatch):
    """--smoke trains, caches, prunes with every criterion at the target and writes table, JSON and plot;
    a second run loads the cached weights and measures the same numbers."""
    monkeypatch.setenv("SNP_FX_CACHE", str(tmp_path))
    args = ["--smoke", "--results", str(tmp_path), "--plot", str(tmp_path / "lm.png")]
    rows, meta = q.main(args)
    assert meta["timing"]["train_s"] is not None and (tmp_path / "lm.png").stat().st_size > 0
    crits = {r["criterion"] for r in rows}
    assert crits == {"snp", "l2", "random s0", "flap-style", "wanda-sp-style", 'preset="best"', "l2 +exact +comp (former best)"}
    for r in rows:
        assert r["params"] == pytest.approx(1 - r["removed"], abs=0.02), r
        assert 1 < r["ppl"] < 256, r  # finite, and no worse than guessing uniformly by much
    assert next(r for r in rows if r["criterion"] == "flap-style")["note"].split()[0] != "0"
    assert json.loads((tmp_path / "quality_lm.json").read_text()) == json.loads(json.dumps(rows))
    again, meta2 = q.main(args)
    assert meta2["timing"]["train_s"] is None  # from the cache
    assert [r["ppl"] for r in again] == pytest.approx([r["ppl"] for r in rows], rel=1e-6)


def _tiny():
    torch.manual_seed(0)
    model = q.make_model(q.SMOKE).eval()
    with torch.no_grad():  # sharp weights: HF's std 0.02 leaves activations (and their means) tiny
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 2 / w.shape[1] ** 0.5)
    gen = torch.Generator().manual_seed(0)
    cal = q.batched(torch.randint(0, 256, (16, 32), generator=gen), 8)
    return model, cal, snp_fx.analyze(model, cal[0])


def test_baseline_scores_match_their_definitions():
    """FFN neurons: Wanda-sp = ||x_j|| sum_i |W_down[i, j]|, FLAP = Var(x_j) ||W_down[:, j]||^2, x the
    input of down_proj over the calibration tokens (computed here directly)."""
    model, cal, a = _tiny()
    stats = q.linear_input_stats(model, cal)
    g = next(g for g in a.prunable() if g.kind == "ffn")
    mlp = model.model.layers[0].mlp
    xs = []
    hook = mlp.down_proj.register_forward_hook(lambda m, args, out: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in cal:
            model(**b)
    hook.remove()
    x = torch.cat(xs).double()
    w = mlp.down_proj.weight.double()
    wanda = q.baseline_importance(a, stats, "wanda")(a, g)
    flap = q.baseline_importance(a, stats, "flap")(a, g)
    torch.testing.assert_close(wanda, x.norm(dim=0) * w.abs().sum(0))
    torch.testing.assert_close(flap, x.var(dim=0) * w.pow(2).sum(0))
    qk = next(g for g in a.prunable() if g.kind == "qk")  # no Linear consumes q/k: the producing rows
    assert bool((q.baseline_importance(a, stats, "wanda")(a, qk) > 0).all())


class _LinearOut(torch.fx.Interpreter):
    """The output of the aten.linear node that uses ``weight``."""

    def __init__(self, gm, weight):
        super().__init__(gm)
        self.weight, self.found = weight, []

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default and n.args[1].target == self.weight:
            self.found.append(out.reshape(-1, out.shape[-1]))
        return out


def test_flap_bias_compensation_keeps_the_mean_output():
    """FFN neurons of one layer removed: with the bias compensation, down_proj's mean output over the
    calibration tokens is the dense one (its kept inputs are unchanged); without, it is not."""
    model, cal, a = _tiny()
    stats = q.linear_input_stats(model, cal)
    g = next(g for g in a.prunable() if g.kind == "ffn")
    p = snp_fx.plan(a, ratios={g.name: 0.5}, importance="l2")
    weight = "model.layers.0.mlp.down_proj.weight"

    def mean_out(gm):
        means = []
        for b in cal:
            r = _LinearOut(gm, weight)
            with torch.no_grad():
                r.run(*snp_fx.trace.normalize_inputs(gm, b))
            means.append(r.found[0].double().mean(0))
        return torch.stack(means).mean(0)

    dense = mean_out(a.gm)
    pruned = snp_fx.apply(a, p)
    plain = mean_out(pruned)
    assert q.bias_compensation(a, keep_mask(a, p), pruned, stats) == 1
    err = float((mean_out(pruned) - dense).abs().max())
    assert err < 1e-4 * float(dense.abs().max())
    assert float((plain - dense).abs().max()) > 100 * err  # the check is sensitive: without it the mean moves
