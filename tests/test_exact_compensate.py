"""Exact q/k selection and least-squares compensation, against plain references written here."""
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import snp_fx
from models import PlainViT
from snp_fx.compensate import FIXED_RIDGE, cross_validate, find_consumers, output_error, solve
from snp_fx.importance import compute_scores
from snp_fx.importance.calibrate import _valid_positions, pair_gram_product
from snp_fx.importance.exact import exact_keep, exact_removal, removal_error
from snp_fx.planning import keep_mask
from snp_fx.report import attention_scores


def random_psd(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(3, 12, n, generator=g, dtype=torch.float64), torch.randn(3, 12, n, generator=g,
                                                                                  dtype=torch.float64)
    return pair_gram_product(q, k).sum(0)


# ---- exact selection --------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 1000), data=st.data())
def test_exact_removal_is_swap_optimal_and_beats_ranking(n, seed, data):
    m = random_psd(n, seed)
    n_remove = data.draw(st.integers(1, n - 1))
    removed = exact_removal(m, n_remove)
    assert int(removed.sum()) == n_remove
    err = removal_error(m, removed)
    # no single swap of a removed and a kept unit lowers the error (checked one by one)
    for i in removed.nonzero().flatten().tolist():
        for j in (~removed).nonzero().flatten().tolist():
            r = removed.clone()
            r[i], r[j] = False, True
            assert removal_error(m, r) >= err - 1e-9 * abs(err)
    # never worse than removing the pairs with the smallest individual error (diag)
    by_diag = torch.zeros(n, dtype=torch.bool)
    by_diag[torch.argsort(m.diagonal())[:n_remove]] = True
    assert err <= removal_error(m, by_diag) + 1e-9 * abs(err)
    # within the best of all subsets where enumerating them is cheap
    best = min(removal_error(m, torch.tensor([i in s for i in range(n)]))
               for s in itertools.combinations(range(n), n_remove))
    assert best <= err + 1e-9 * abs(err)


def test_exact_removal_diagonal_is_the_optimum():
    m = torch.diag(torch.tensor([5.0, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64))
    assert exact_removal(m, 2).nonzero().flatten().tolist() == [1, 3]


def test_exact_keep_keeps_coupled_positions_together():
    m = random_psd(6, 3)
    row = torch.tensor([7, 8, 9, 7, 8, 9])  # positions i and i + 3 share a class (like RoPE pairs)
    kept = exact_keep(m, row, 4)
    assert len(kept) == 4 and all((i + 3) % 6 in kept for i in kept)
    with pytest.raises(snp_fx.SNPError, match="whole classes"):
        exact_keep(m, row, 3)


def test_masked_gram_product_equals_masked_scores():
    """r^T (Gq * Gk) r = ||sum_{i in R} Q_i K_i^T||^2 over the rows/columns the mask leaves."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    valid_keys = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = valid_keys[:, None, None, :].expand(2, 1, 6, 6)  # HF-style key padding mask (B, 1, Nq, Nk)

    class Site:
        kind = "sdpa"
    wq, wk = _valid_positions(Site(), (q, k, None, mask), {}, (2, 4), 6, 6)
    m = pair_gram_product(q.reshape(8, 6, 5), k.reshape(8, 6, 5), wq, wk)
    r = torch.tensor([1.0, 0, 1, 1, 0], dtype=torch.float64)
    for p in range(8):
        rows = valid_keys[p // 4]  # padding: its query rows are ignored too
        ds = (q.reshape(8, 6, 5)[p].double() * r) @ k.reshape(8, 6, 5)[p].double().T
        assert torch.allclose(r @ m[p] @ r, ds[rows][:, rows].pow(2).sum())


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return PlainViT(form="sdpa").eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]


def test_exact_error_equals_measured_score_change(vit, calib):
    """On the model: r^T M r of the chosen pairs = the measured change of block 0's scores."""
    a = snp_fx.analyze(vit, calib[0])
    s = compute_scores(a, "snp", calib, progress=False, selection="exact")
    p = snp_fx.plan(vit, None, ratios={"blocks.0.attn.qk": 0.5}, analysis=a, scores=s)
    pruned = snp_fx.apply(vit, p, None, analysis=a)
    g = a.groups["blocks.0.attn.qk"]
    predicted = 0.0
    for h, kept in enumerate(p.groups[g.name]["keep"]):
        removed = torch.ones(g.width, dtype=torch.bool)
        removed[kept] = False
        predicted += removal_error(s.pair_grams[g.name][h], removed)
    measured = sum(float((attention_scores(pruned, (x,))[0] - attention_scores(a.gm, (x,))[0]).double()
                         .pow(2).sum()) for x in calib)
    assert measured == pytest.approx(predicted * 8 ** -1.0, rel=1e-4)  # scores carry scale^2 = 1/8


def test_exact_selection_lowers_calibration_error_for_ratios_and_targets(vit, calib):
    a = snp_fx.analyze(vit, calib[0])
    exact = compute_scores(a, "snp", calib, progress=False, selection="exact")
    for imp in ("snp", "l2"):
        base = compute_scores(a, imp, calib, progress=False)
        for plan_of in (lambda sc: snp_fx.plan(vit, None, ratios={"qk": 0.5}, analysis=a, scores=sc),
                        lambda sc: snp_fx.plan(vit, None, target_macs=0.6, analysis=a, scores=sc)):
            pe, pb = plan_of(exact), plan_of(base)
            for g in a.prunable("qk"):
                for h in range(g.heads):
                    ke, kb = pe.groups[g.name]["keep"][h], pb.groups[g.name]["keep"][h]
                    if len(ke) != len(kb):  # target plans: widths may differ between score kinds
                        continue
                    re, rb = torch.ones(g.width, dtype=torch.bool), torch.ones(g.width, dtype=torch.bool)
                    re[ke], rb[kb] = False, False
                    m = exact.pair_grams[g.name][h]
                    assert removal_error(m, re) <= removal_error(m, rb) * (1 + 1e-9)
    # target plans really use the selector (the same pick as asking it directly)
    pt = snp_fx.plan(vit, None, target_macs=0.6, analysis=a, scores=exact)
    g = a.prunable("qk")[0]
    keep = pt.groups[g.name]["keep"][0]
    assert keep == exact_keep(exact.pair_grams[g.name][0], g.classes[0], len(keep))
    # any importance can be combined with exact selection (same counts: same picks)
    pl = snp_fx.plan(vit, None, ratios={"qk": 0.5}, analysis=a, calibration=calib, importance="l2", selection="exact",
                     progress=False)
    assert pl.groups == snp_fx.plan(vit, None, ratios={"qk": 0.5}, analysis=a, scores=exact).groups


# ---- compensation -------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(n=st.integers(12, 40), c=st.integers(2, 7), out=st.integers(1, 4), seed=st.integers(0, 1000),
       bias=st.booleans(), ridge=st.sampled_from([0.0, 1e-3, 0.5]), toward_kept=st.booleans())
def test_solve_equals_lstsq_reference(n, c, out, seed, bias, ridge, toward_kept):
    """The streamed normal equations = an explicit ridge least-squares solve on the rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) + torch.randn(c, generator=g, dtype=torch.float64)
    w = torch.randn(out, c, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    kept = torch.rand(c, generator=g) < 0.6
    kept[0] = True
    y = x @ w.T + (b if bias else 0)
    new_w, new_b = solve(x.T @ x, x.sum(0), n, w, b, kept, ridge, toward_kept=toward_kept)
    xk = x[:, kept]
    # the ridge strength solve uses: ridge * mean variance (centered) or second moment of the kept inputs
    ref_x = xk - xk.mean(0) if bias else xk
    lam = ridge * float(ref_x.pow(2).mean(0).mean())
    design = torch.cat([xk, torch.ones(n, 1, dtype=torch.float64)], 1) if bias else xk
    reg = torch.zeros(int(kept.sum()), design.shape[1], dtype=torch.float64)
    reg[:, :int(kept.sum())] = torch.eye(int(kept.sum())) * (n * lam) ** 0.5  # the intercept is not penalised
    # the penalty pulls toward zero, or toward the kept columns of w (toward_kept)
    prior = w[:, kept].T if toward_kept else torch.zeros(reg.shape[0], out, dtype=torch.float64)
    sol = torch.linalg.lstsq(torch.cat([design, reg]), torch.cat([y, (n * lam) ** 0.5 * prior])).solution
    assert torch.allclose(new_w, sol[:int(kept.sum())].T, atol=1e-7)
    if bias:
        assert torch.allclose(new_b, sol[-1], atol=1e-7)
    # the error formula from statistics = the error on the rows
    err = (xk @ new_w.T + (new_b if bias else 0) - y).pow(2).sum(1).mean()
    assert output_error(x.T @ x, x.sum(0), n, w, b, new_w, new_b, kept) == pytest.approx(float(err), rel=1e-6,
                                                                                          abs=1e-9)


def _capture(module, x, model):
    got = []
    h = module.register_forward_hook(lambda m, i, o: got.append(o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return torch.cat(got)


def test_compensation_writes_the_refit_and_never_hurts(vit, calib):
    a = snp_fx.analyze(vit, calib[0])
    p = snp_fx.plan(vit, None, ratios={"blocks.0.mlp.fc1": 0.5, "blocks.0.attn.v": 0.5, "qk": 0.25}, analysis=a,
                    calibration=calib, progress=False)
    plain = snp_fx.apply(vit, p, None, analysis=a)
    comp = snp_fx.apply(vit, p, None, analysis=a, compensate=True, calibration=calib, progress=False)
    recs = {r["group"]: r for r in comp.meta["snp_compensation"]}
    assert set(recs) == {"blocks.0.mlp.fc1", "blocks.0.attn.v"}
    for r in recs.values():
        assert r["applied"] and r["error_after"] < r["error_before"]
    # the written fc2, fed the dense hidden activations' kept channels, has exactly the error the
    # solve predicted against the dense fc2 (and the plain pruned fc2 the "before" error)
    x = torch.cat(calib)
    fc1_in = _capture(vit.blocks[0].norm2, x, vit)
    hidden = vit.blocks[0].mlp.act(vit.blocks[0].mlp.fc1(fc1_in)).detach()
    kept = keep_mask(a, p)[a.channels.param_ids["blocks.0.mlp.fc2.weight"][1]]
    for model, key in ((comp, "error_after"), (plain, "error_before")):
        fc2 = model.get_submodule("blocks.0.mlp.fc2")
        with torch.no_grad():
            err = (fc2(hidden[..., kept]) - vit.blocks[0].mlp.fc2(hidden)).double().pow(2).sum(-1).mean()
        assert float(err) == pytest.approx(recs["blocks.0.mlp.fc1"][key], rel=1e-3)
    # the model output moves closer to the dense one
    with torch.no_grad():
        ref = vit(x)
        assert (comp(x) - ref).norm() < (plain(x) - ref).norm()


def test_compensation_that_would_hurt_is_not_applied(vit, calib):
    a = snp_fx.analyze(vit, calib[0])
    p = snp_fx.plan(vit, None, ratios={"blocks.1.mlp.fc1": 0.5}, analysis=a, importance="l2")
    plain = snp_fx.apply(vit, p, None, analysis=a)
    with pytest.warns(UserWarning, match="would raise its calibration error"):
        comp = snp_fx.apply(vit, p, None, analysis=a, compensate=True, calibration=calib, ridge=1e8,
                            progress=False)
    assert not comp.meta["snp_compensation"][0]["applied"]
    with torch.no_grad():
        assert torch.equal(comp(calib[0]), plain(calib[0]))


class TinyMLP(nn.Module):
    """fc1 -> tanh -> fc2: the FFN group fc1 and its consumer fc2."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _heldout_errors(d, rows):
    """Half of 48 hidden neurons pruned, calibrated on ``rows`` rows; mean squared output error
    against the dense model on 4096 fresh rows: plain pruning, the default compensation and the
    former fixed ridge toward zero."""
    torch.manual_seed(0)
    m = TinyMLP(d, 48).eval()
    g = torch.Generator().manual_seed(1)
    cal, test = [torch.randn(rows, d, generator=g)], torch.randn(4096, d, generator=g)
    a = snp_fx.analyze(m, cal[0])
    p = snp_fx.plan(m, None, ratios={"fc1": 0.5}, analysis=a, importance="l2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = snp_fx.apply(m, p, None, analysis=a, compensate=True, calibration=cal)
    models = {"plain": snp_fx.apply(m, p, None, analysis=a), "auto": auto,
              "fixed": snp_fx.apply(m, p, None, analysis=a, compensate=True, calibration=cal, ridge=FIXED_RIDGE)}
    with torch.no_grad():
        ref = m(test)
        err = {k: float((pm(test) - ref).pow(2).sum(-1).mean()) for k, pm in models.items()}
    return err, auto.meta["snp_compensation"][0], [str(w.message) for w in caught]


def test_thin_statistics_fall_back_to_no_refit():
    """16 calibration rows for 24 kept neurons that share nothing the refit could use (hidden
    units of 64 random inputs are nearly independent): the former near-unregularised ridge toward
    zero fits the 16 rows and wipes the kept weights outside their span (held-out error x4); the
    default checks every strength on held-out rows, finds none that helps and keeps the plain
    weights.  Fails if the cross-validation guard is removed."""
    err, rec, warned = _heldout_errors(d=64, rows=16)
    assert err["fixed"] > 2 * err["plain"]                     # the scenario bites
    assert err["auto"] <= err["plain"] * (1 + 1e-6)            # the guard: never worse than no refit
    assert not rec["applied"] and rec["reason"] == "no refit lowers the held-out error"
    assert rec["rows"] == 16 and rec["kept_inputs"] == 24
    assert any("not compensating fc1: no refit lowers the held-out error" in w for w in warned)


def test_thin_statistics_still_refit_when_it_helps():
    """The same 16 rows < 24 kept neurons, but the hidden units are tanh of 4 inputs (strongly
    related): the held-out check keeps the refit, and it removes almost all of the error."""
    err, rec, _ = _heldout_errors(d=4, rows=16)
    assert rec["applied"] and rec["ridge"] > 0
    assert err["auto"] < 0.1 * err["plain"] and err["auto"] <= err["fixed"]


def test_a_single_calibration_row_is_not_refit():
    torch.manual_seed(0)
    m, x = TinyMLP(4, 8).eval(), torch.randn(1, 4)
    with pytest.warns(UserWarning, match="single calibration row"):
        pruned = snp_fx.prune(m, x, ratios={"fc1": 0.5}, importance="l2", compensate=True, progress=False)
    assert not pruned.meta["snp_compensation"][0]["applied"]


def test_cross_validation_error_equals_refits_scored_on_the_other_half():
    """The held-out error cross_validate reports = each half refit by ``solve`` (toward the kept
    weights, at the strength it picked for half the rows) and scored on the other half."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 3, generator=g, dtype=torch.float64)
    x = torch.tanh(z @ torch.randn(3, 10, generator=g, dtype=torch.float64)) + 0.3
    x = x + 0.1 * torch.randn(40, 10, generator=g, dtype=torch.float64)
    w, b = torch.randn(5, 10, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    kept = torch.tensor([True, False] * 5)
    xa, xb = x[:15], x[15:]  # stats[3]: the first fold (any rows)
    stats = [x.T @ x, x.sum(0), 40, [xa.T @ xa, xa.sum(0), 15]]
    for bias in (b, None):
        lam, before, after = cross_validate(stats, w, bias, kept)
        assert lam is not None and after < before
        total = 0.0
        for fit, test in ((xa, xb), (xb, xa)):
            nw, nb = solve(fit.T @ fit, fit.sum(0), len(fit), w, bias, kept, lam * 40 / 20, toward_kept=True)
            total += len(test) * output_error(test.T @ test, test.sum(0), len(test), w, bias, nw, nb, kept)
        assert after == pytest.approx(total / 40, rel=1e-6)
        assert before == pytest.approx(float((x[:, ~kept] @ w[:, ~kept].T).pow(2).sum(1).mean()), rel=1e-9)


class TwoConsumers(nn.Module):
    """The FFN hidden feeds two Linears: no single consumer to refit."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2a = nn.Linear(16, 8)
        self.fc2b = nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x).relu()
        return self.fc2a(h) + self.fc2b(h)


def test_groups_without_a_single_consumer_are_reported():
    m = TwoConsumers().eval()
    x = torch.randn(5, 8)
    a = snp_fx.analyze(m, x)
    consumers, skipped = find_consumers(a, ["fc1"])
    assert not consumers and "2 linears" in skipped["fc1"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pruned = snp_fx.prune(m, x, ratios={"fc1": 0.5}, importance="l2", compensate=True, progress=False)
    assert any("not compensating fc1" in str(x.message) for x in w)
    assert pruned.meta["snp_compensation"] == [{"group": "fc1", "applied": False,
                                                 "reason": "2 linears consume its channels"}]


# ---- API ------------------------------------------------------------------------------------------

def test_preset_and_bad_options(vit, calib):
    pruned = snp_fx.prune(vit, calib[0], ratios={"qk": 0.5, "v": 0.5, "ffn": 0.5}, calibration=calib, preset="best",
                          progress=False)
    plan = snp_fx.PruningPlan.from_json(pruned.meta["snp_plan"])
    assert plan.meta["selection"] == "exact" and plan.meta["importance"] == "fluctuation"
    assert len(pruned.meta["snp_compensation"]) == 4
    with pytest.raises(snp_fx.SNPError, match="unknown preset"):
        snp_fx.prune(vit, calib[0], ratios={"qk": 0.5}, preset="fastest", progress=False)
    with pytest.raises(snp_fx.SNPError, match="unknown selection"):
        snp_fx.plan(vit, calib[0], ratios={"qk": 0.5}, selection="optimal", progress=False)
    with pytest.raises(snp_fx.SNPError, match="generator"):
        snp_fx.prune(vit, calib[0], ratios={"v": 0.5}, calibration=(x for x in calib), compensate=True, progress=False)


def test_compensating_a_masked_reference_equals_the_pruned_model(vit, calib):
    """The same refit written into the same-shape masked original gives the pruned model's outputs."""
    from snp_fx.compensate import compensate
    from snp_fx.verify import masked_reference
    a = snp_fx.analyze(vit, calib[0])
    p = snp_fx.plan(vit, None, ratios={"v": 0.5, "ffn": 0.5}, analysis=a, importance="l2")
    keep = keep_mask(a, p)
    pruned = snp_fx.apply(vit, p, None, analysis=a, compensate=True, calibration=calib, progress=False)
    ref = masked_reference(a, keep)
    compensate(a, keep, ref, calib, progress=False)
    with torch.no_grad():
        assert torch.allclose(ref(calib[0]), pruned(calib[0]), atol=1e-5)
