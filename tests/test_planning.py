"""Planning: the authors' config files, MACs/params budgets, round_to, JSON plans."""
import json

import pytest
import torch

import snp_fx
from conftest import timm_analysis, timm_model
from snp_fx.importance import compute_scores
from snp_fx.planning import BUNDLED_CONFIGS, _unit_spread_per_kind, keep_mask, make_plan, paper_ratios, plan_for_target
from snp_fx.cost import count_macs, count_params, estimate_macs, estimate_params
from snp_fx.rewrite import rewrite
from snp_fx.errors import SNPError

PAPER = [("DeiT_t", "deit_tiny_patch16_224", 0.64e9, 153), ("DeiT_s", "deit_small_patch16_224", 2.04e9, 307),
         ("DeiT_s_small", "deit_small_patch16_224", 1.27e9, 345), ("DeiT_b", "deit_base_patch16_224", 6.32e9, 538)]


@pytest.mark.parametrize("config, name, macs, residual", PAPER)
def test_authors_configs_reproduce_their_widths_and_macs(config, name, macs, residual):
    a = timm_analysis(name)
    ratios = paper_ratios(a, config)
    assert len(ratios) == 12 * 3 + 1
    plan = make_plan(a, ratios, compute_scores(a, "l2"))
    raw = json.load(open(BUNDLED_CONFIGS[config]))
    hd = a.groups["blocks.0.attn.qk"].width
    for i in range(12):  # kept = round(head_dim * (1 - ratio)) per head
        qk = plan.groups[f"blocks.{i}.attn.qk"]["keep"]
        v = plan.groups[f"blocks.{i}.attn.v"]["keep"]
        assert {len(h) for h in qk} == {round(hd * (1 - raw["matmul" if i == 0 else f"matmul_{2 * i}"]))}
        assert {len(h) for h in v} == {round(hd * (1 - raw[f"matmul_{2 * i + 1}"]))}
    assert len(plan.groups["residual"]["keep"]) == residual
    pruned = rewrite(a, keep_mask(a, plan))
    measured = count_macs(pruned, a.inputs)  # FlopCounterMode, the SDPA kernel counted
    assert measured == pytest.approx(macs, rel=0.02)


def test_config_file_errors(tmp_path):
    a = timm_analysis("deit_tiny_patch16_224")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"matmul": 0.5, "blocks_99_mlp_fc1": 0.2, "conv_7": 0.1}))
    with pytest.raises(snp_fx.SNPError, match=r"does not have: \['blocks_99_mlp_fc1', 'conv_7'\]"):
        paper_ratios(a, str(bad))
    with pytest.raises(snp_fx.SNPError, match="cannot read ratio file"):
        paper_ratios(a, str(tmp_path / "missing.json"))


@pytest.mark.parametrize("name, target, heads", [("deit_small_patch16_224", 2.0e9, False),
                                                 ("deit_base_patch16_224", 6.4e9, False),
                                                 ("deit_base_patch16_224", 3.5e9, True)])
@pytest.mark.parametrize("round_to", [1, 8])
def test_macs_target_is_met_within_one_percent(name, target, heads, round_to):
    a = timm_analysis(name)
    plan = plan_for_target(a, compute_scores(a, "snp", progress=False), target_macs=target, heads=heads,
                           round_to=round_to)
    keep = keep_mask(a, plan)
    pruned = rewrite(a, keep)
    measured = count_macs(pruned, a.inputs)
    assert measured == estimate_macs(a, keep)
    assert abs(measured - target) <= 0.01 * target
    widths = plan.widths()
    for name_, w in widths.items():
        for x in (w if isinstance(w, list) else [w]):
            if x and round_to > 1:
                assert x % round_to == 0 or x == a.groups[name_].width
    if heads:
        assert any(0 in w for w in widths.values() if isinstance(w, list)), "no head was removed"


def test_params_target_and_fraction():
    a = timm_analysis("deit_tiny_patch16_224")
    plan = plan_for_target(a, compute_scores(a, "l2"), target_params=0.5)
    keep = keep_mask(a, plan)
    dense = count_params(a.gm)
    pruned = rewrite(a, keep)
    assert count_params(pruned) == estimate_params(a, keep)
    assert abs(count_params(pruned) - 0.5 * dense) <= 0.01 * 0.5 * dense


def test_target_errors():
    a = timm_analysis("deit_tiny_patch16_224")
    s = compute_scores(a, "l2")
    with pytest.raises(snp_fx.SNPError, match="below what one channel"):
        plan_for_target(a, s, target_macs=1e6)
    with pytest.raises(snp_fx.SNPError, match="exactly one"):
        plan_for_target(a, s)
    with pytest.raises(snp_fx.SNPError, match="either ratios or a target"):
        snp_fx.plan(timm_model("deit_tiny_patch16_224"), a.inputs[0], ratios={"qk": 0.5}, target_macs=0.5,
                    analysis=a)


def test_estimates_match_measurement_on_random_plans():
    for name in ("swin_tiny_patch4_window7_224", "efficientformer_l1", "pvt_v2_b0"):
        a = timm_analysis(name)
        plan = make_plan(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.2, "heads": 0.25},
                         compute_scores(a, "random"))
        keep = keep_mask(a, plan)
        pruned = rewrite(a, keep)
        assert count_macs(pruned, a.inputs) == estimate_macs(a, keep)
        assert count_params(pruned) == estimate_params(a, keep)


def test_memoised_estimates_equal_fresh_ones():
    """keep_mask and the estimates memoise per analysis (a planner asks hundreds of near-equal
    plans): plans that share most groups, one asked many times, one edited in place after use,
    each give what a fresh analysis gives; an invalid entry is refused every time it is asked."""
    import copy
    a = timm_analysis("swin_tiny_patch4_window7_224")
    fresh = copy.deepcopy(a)
    plans = [make_plan(a, {"qk": 0.5 - s / 8, "v": 0.25, "ffn": 0.3 + s / 8, "residual": 0.2 + s / 8, "heads": 0.25},
                       compute_scores(a, "random", seed=s)) for s in range(3)]
    mixed = copy.deepcopy(plans[0])
    for g in a.prunable("ffn"):  # the FFN groups from another plan
        mixed.groups[g.name] = plans[1].groups[g.name]
    edited = copy.deepcopy(plans[2])
    for p in plans + [mixed, plans[0], edited]:
        keep = keep_mask(a, p)
        for k in ("_removed_classes", "_estimates"):
            fresh.__dict__.pop(k, None)
        assert torch.equal(keep, keep_mask(fresh, p))
        assert estimate_macs(a, keep) == estimate_macs(fresh, keep)
        assert estimate_params(a, keep) == estimate_params(fresh, keep)
    ffn = next(g for g in a.prunable("ffn"))
    edited.groups[ffn.name]["keep"].pop()  # the same list, one channel fewer
    assert not torch.equal(keep_mask(a, edited), keep)
    edited.groups[ffn.name]["keep"].append(edited.groups[ffn.name]["keep"][0])  # a duplicate index
    for _ in range(2):
        with pytest.raises(SNPError, match="invalid indices"):
            keep_mask(a, edited)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10**6), fraction=st.floats(0.25, 0.8), round_to=st.sampled_from([1, 4, 8, 16]),
       heads=st.booleans())
def test_any_scores_any_budget_within_one_percent(seed, fraction, round_to, heads):
    """Rounding makes MACs a step function of the threshold; the budget is still met."""
    import torch
    a = timm_analysis("deit_tiny_patch16_224")
    plan = plan_for_target(a, compute_scores(a, "random", seed=seed), target_macs=fraction, round_to=round_to,
                           heads=heads)
    dense = estimate_macs(a, torch.ones(a.channels.num_units, dtype=torch.bool))
    assert abs(estimate_macs(a, keep_mask(a, plan)) - fraction * dense) <= 0.01 * fraction * dense


def test_budgets_and_macs_are_per_sample_whatever_the_example_batch():
    """A MACs budget means the same with example batches of 1, 2 and 8 (it was spent on the whole
    batch before): the same plan (l2 scores do not read the data), the same per-sample counts."""
    import torch
    from models import PlainViT

    torch.manual_seed(0)
    model = PlainViT(dim=32, img=32, patch=8).eval()
    x = torch.randn(8, 3, 32, 32)
    dense = count_macs(model, (x[:1],))
    target = int(0.6 * dense)  # absolute: the budget of one sample
    plans, macs = [], []
    for b in (1, 2, 8):
        assert count_macs(model, (x[:b],)) == dense  # per sample
        assert count_macs(model, (x[:b],), batch=1) == b * dense  # explicit batch: the pass's total
        a = snp_fx.analyze(model, x[:b])
        assert a.batch == b and estimate_macs(a, torch.ones(a.channels.num_units, dtype=torch.bool)) == dense
        p = snp_fx.plan(a, importance="l2", target_macs=target)
        assert p.meta["dense"] == dense and p.meta["target_macs"] == target
        pruned = snp_fx.apply(a, p)
        plans.append(p.groups)
        macs.append(count_macs(pruned, (x[:b],)))
        assert macs[-1] == estimate_macs(a, keep_mask(a, p))
    assert plans[0] == plans[1] == plans[2]
    assert macs[0] == macs[1] == macs[2]
    assert abs(macs[0] - target) <= 0.01 * target


def test_batch_size_rule():
    import torch
    from snp_fx.cost import batch_size
    assert batch_size((torch.zeros(4, 3),)) == 4
    assert batch_size({"input_ids": torch.zeros(5, 7, dtype=torch.long)}) == 5
    assert batch_size((None, 3, torch.tensor(2.0), (torch.zeros(6),))) == 6  # first tensor with a dim
    assert batch_size((3,)) == 1


@pytest.mark.parametrize("round_to", [{"qk": 8, "v": 16, "ffn": 64}, {"qk": 4, "ffn": 32, "blocks.0.mlp.fc1": 96}])
def test_round_to_per_kind_and_group(round_to):
    """Kept widths are multiples of their kind's (or group's) step, for ratios and for targets."""
    import torch
    a = timm_analysis("deit_tiny_patch16_224")
    scores = compute_scores(a, "l2")
    for plan in (make_plan(a, {"qk": 0.45, "v": 0.3, "ffn": 0.33, "residual": 0.1}, scores, round_to=round_to),
                 plan_for_target(a, scores, target_macs=0.5, round_to=round_to)):
        checked = set()
        for name, w in plan.widths().items():
            g = a.groups[name]
            step = round_to.get(name, round_to.get(g.kind, 1))
            for x in (w if isinstance(w, list) else [w]):
                assert x % step == 0 or x == g.width, (name, x, step)
                checked.add(g.kind if step > 1 else None)
        assert {"qk", "ffn"} <= checked
    dense = estimate_macs(a, torch.ones(a.channels.num_units, dtype=torch.bool))
    assert abs(estimate_macs(a, keep_mask(a, plan)) - 0.5 * dense) <= 0.01 * 0.5 * dense


@pytest.mark.parametrize("bad", [0, 2.5, {"qk": 0}, {"ffn": "8"}, {3: 8}])
def test_bad_round_to(bad):
    a = timm_analysis("deit_tiny_patch16_224")
    with pytest.raises(SNPError, match="round_to"):
        make_plan(a, {"qk": 0.5}, compute_scores(a, "l2"), round_to=bad)
    with pytest.raises(SNPError, match="round_to"):
        plan_for_target(a, compute_scores(a, "l2"), target_macs=0.5, round_to=bad)


def test_hardware_hint_picks_the_width_steps():
    from snp_fx.api import HARDWARE
    a = timm_analysis("deit_tiny_patch16_224")
    scores = compute_scores(a, "l2")
    plan = snp_fx.plan(a, target_macs=0.5, scores=scores, hardware="cuda")
    for name, w in plan.widths().items():
        g = a.groups[name]
        for x in (w if isinstance(w, list) else [w]):
            assert x % HARDWARE["cuda"][g.kind] == 0 or x == g.width, (name, x)
    explicit = snp_fx.plan(a, target_macs=0.5, scores=scores, hardware="cuda", round_to=4)
    assert explicit.meta["round_to"] == 4  # an explicit round_to wins
    with pytest.raises(SNPError, match="unknown hardware 'tpu'"):
        snp_fx.plan(a, target_macs=0.5, scores=scores, hardware="tpu")


def test_hardware_hint_rounds_an_authors_config():
    """``ratios=`` with ``hardware="cpu"``: the authors' per-layer widths, each rounded to the nearest
    multiple of 8 (odd widths such as DeiT-T's residual 153 cost the CPU GEMMs 10-15%,
    benchmarks/widths.py); the rounded model is exact against its masked self (``apply`` verifies)."""
    a = timm_analysis("deit_tiny_patch16_224")
    scores = compute_scores(a, "l2")
    exact = make_plan(a, paper_ratios(a, "DeiT_t"), scores)
    rounded = snp_fx.plan(a, ratios="DeiT_t", scores=scores, hardware="cpu")
    changed = 0
    for name, w in exact.widths().items():
        for x, r in zip(*(v if isinstance(v, list) else [v] for v in (w, rounded.widths()[name]))):
            assert r % 8 == 0 and abs(r - x) <= 4, (name, x, r)
            changed += r != x
    assert changed and rounded.widths()["residual"] == 152  # 153 -> 152
    m = estimate_macs(a, keep_mask(a, rounded)) / estimate_macs(a, keep_mask(a, exact))
    assert 0.97 < m < 1.03
    snp_fx.apply(a, rounded)


def test_hardware_hint_fills_the_padding():
    """With ``hardware``, q/k and v of a fused-attention site keep one head width (the narrower side
    keeps its next best channels where the rewrite would pad zeros): no padded call is emitted, the
    budget is still met, the model is exact; explicit-matmul attention (no fused kernel, no padding)
    keeps SNP's unequal widths."""
    from snp_fx.kernels import padded_sdpa
    a = timm_analysis("deit_tiny_patch16_224")
    scores = compute_scores(a, "l2")
    plain = snp_fx.plan(a, target_macs=0.5, scores=scores, round_to=8)
    filled = snp_fx.plan(a, target_macs=0.5, scores=scores, hardware="cpu")
    sites = [f"blocks.{i}.attn" for i in range(12)]
    assert any(plain.widths()[f"{s}.qk"] != plain.widths()[f"{s}.v"] for s in sites)  # it had padding to fill
    for s in sites:
        assert filled.widths()[f"{s}.qk"] == filled.widths()[f"{s}.v"], s
    for p in (plain, filled):
        assert estimate_macs(a, keep_mask(a, p)) == pytest.approx(0.5 * estimate_macs(a, keep_mask(a, p) | True),
                                                                  rel=0.011)
    pruned = snp_fx.apply(a, filled)  # verified against the masked model
    assert not any(n.target is padded_sdpa for n in pruned.graph.nodes)
    assert any(n.target is padded_sdpa for n in snp_fx.apply(a, plain).graph.nodes)

    model = timm_model("deit_tiny_patch16_224")
    for blk in model.blocks:
        blk.attn.fused_attn = False  # q @ k^T, softmax, @ v: nothing is padded, nothing to fill
    m = snp_fx.analyze(model, torch.randn(1, 3, 224, 224))
    s = compute_scores(m, "l2")
    unfilled = plan_for_target(m, s, target_macs=0.5, round_to=8)
    assert {x.kind for x in m.sites} == {"matmul"}
    assert any(unfilled.widths()[f"{x}.qk"] != unfilled.widths()[f"{x}.v"] for x in sites)
    assert plan_for_target(m, s, target_macs=0.5, round_to=8, fill_padding=True).groups == unfilled.groups


def _kept_fraction(a, plan, kind) -> float:
    kept = total = 0
    for name, g in a.groups.items():
        if g.kind == kind and g.prunable:
            keep = plan.groups[name]["keep"]
            total += g.classes.numel()
            kept += sum(len(h) for h in keep) if keep and isinstance(keep[0], list) else len(keep)
    return kept / total


def test_normalise_by_kind_cuts_flat_kinds_gradually():
    """SNP's FFN redundancy scores are nearly flat: compared by their mean alone, a MACs budget keeps
    the FFN almost whole and halves the residual stream; with normalise="kind" the FFN gives its share,
    and both plans meet the budget."""
    a = timm_analysis("deit_tiny_patch16_224")
    s = compute_scores(a, "snp", progress=False)
    by_group = plan_for_target(a, s, target_macs=0.5)
    by_kind = plan_for_target(a, s, target_macs=0.5, normalise="kind")
    dense = estimate_macs(a, keep_mask(a, snp_fx.PruningPlan({})))
    for p in (by_group, by_kind):
        assert abs(estimate_macs(a, keep_mask(a, p)) / dense - 0.5) <= 0.01 * 0.5
    assert _kept_fraction(a, by_group, "ffn") > 0.9 and _kept_fraction(a, by_group, "residual") < 0.6
    assert _kept_fraction(a, by_kind, "ffn") < _kept_fraction(a, by_group, "ffn") - 0.1
    assert _kept_fraction(a, by_kind, "residual") > _kept_fraction(a, by_group, "residual")
    with pytest.raises(snp_fx.SNPError, match="normalise='layer' is not one of"):
        snp_fx.plan(a, target_macs=0.5, normalise="layer")
    with pytest.raises(snp_fx.SNPError, match="ratios set the widths themselves"):
        snp_fx.plan(a, ratios={"ffn": 0.5}, normalise="kind", scores=s)


def test_unit_spread_per_kind_keeps_the_layers_relative_spreads():
    norm = {"ffn.0": torch.tensor([1.2, 0.8, 1.0], dtype=torch.float64),
            "ffn.1": torch.tensor([1.02, 0.98, 1.0], dtype=torch.float64),
            "qk.0": torch.tensor([[3.0, -1.0], [1.0, 1.0]], dtype=torch.float64)}
    out = _unit_spread_per_kind(norm, {"ffn.0": "ffn", "ffn.1": "ffn", "qk.0": "qk"})
    for kind in (("ffn.0", "ffn.1"), ("qk.0",)):
        dev = torch.cat([out[n].flatten() - 1 for n in kind])
        assert abs(float(dev.std()) - 1) < 1e-12  # each kind's pooled spread is one
    # a kind's layers keep their relative spreads (standardising each group would make them equal)
    assert torch.allclose(out["ffn.0"] - 1, 10 * (out["ffn.1"] - 1))
    assert out["qk.0"].shape == (2, 2) and float(out["qk.0"][1, 0]) == 1.0
    flat = _unit_spread_per_kind({"v.0": torch.ones(4, dtype=torch.float64)}, {"v.0": "v"})
    assert torch.equal(flat["v.0"], torch.ones(4, dtype=torch.float64))  # all equal: left as it is
