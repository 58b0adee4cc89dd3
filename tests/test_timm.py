"""Every required timm model: analysis finds its sites, identity, mask equivalence on random plans
(residual pruning included: the residual stream of every model is pruned in every run)."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import snp_fx
from conftest import TIMM_MODELS, timm_analysis, timm_model
from oracles import check_mask_equivalence, random_scores
from snp_fx.planning import PruningPlan, keep_mask, make_plan
from snp_fx.rewrite import rewrite

EXPECTED_SITES = {  # attention blocks per model
    "deit_tiny_patch16_224": 12, "deit_small_patch16_224": 12, "deit_base_patch16_224": 12,
    "deit_tiny_distilled_patch16_224": 12, "vit_tiny_patch16_224": 12, "vit_small_patch16_224": 12,
    "vit_base_patch16_224": 12, "deit3_small_patch16_224": 12, "beit_base_patch16_224": 12,
    "swin_tiny_patch4_window7_224": 12, "pvt_v2_b0": 8, "efficientformer_l1": 1,
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_analysis_finds_every_site_and_group(name):
    a = timm_analysis(name)
    assert len(a.sites) == EXPECTED_SITES[name]
    for kind in ("qk", "v", "ffn", "residual"):
        assert a.prunable(kind), f"no prunable {kind} group in {name}:\n{a}"
    assert len(a.prunable("qk")) == EXPECTED_SITES[name]
    assert len(a.prunable("v")) == EXPECTED_SITES[name]
    text = str(a)
    assert "Attention sites" in text and "Unprunable" in text
    # the classifier is reported, with its reason
    assert any("model output" in g.reason for g in a.groups.values() if not g.prunable)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_identity(name):
    """An empty plan keeps every unit; the rewrite of the cached analysis computes what the model does."""
    a = timm_analysis(name)
    model = timm_model(name)
    plan = PruningPlan(groups={})
    keep = keep_mask(a, plan)
    assert keep.dtype == torch.bool and bool(keep.all())
    assert bool(keep_mask(a, make_plan(a, {}, random_scores(a, 0))).all())  # zero ratios: the same empty prune
    pruned = rewrite(a, keep).eval()
    with torch.no_grad():
        got, ref = pruned(*a.inputs), model(*a.inputs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    shapes = {k: tuple(v.shape) for k, v in pruned.named_parameters()}
    assert shapes == {k: tuple(v.shape) for k, v in model.named_parameters()}


ratio = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("name", TIMM_MODELS)
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@example(qk=0.25, v=0.0, ffn=0.25, residual=0.25, heads=0.0, seed=0)  # every model's residual, every run
@given(qk=ratio, v=ratio, ffn=ratio, residual=st.sampled_from([0.0, 0.0, 0.2, 0.5]),
       heads=st.sampled_from([0.0, 0.0, 0.25, 0.5]), seed=st.integers(0, 10**6))
def test_mask_equivalence_random_plans(name, qk, v, ffn, residual, heads, seed):
    ratios = {"qk": qk, "v": v, "ffn": ffn, "residual": residual, "heads": heads}
    check_mask_equivalence(timm_analysis(name), ratios, seed)


def test_pass_through_modules_leave_the_pruned_graph():
    """nn.Identity and Dropout(p=0) calls are bypassed (Python overhead at batch 1); a Dropout
    that drops is kept, and the pruned model still computes what the masked one does."""
    import timm
    import torch.nn as nn

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                              drop_rate=0.0, proj_drop_rate=0.25).eval()
    x = torch.randn(2, 3, 64, 64)
    a = snp_fx.analyze(model, x)
    called = [type(a.gm.get_submodule(n.target)) for n in a.gm.graph.nodes if n.op == "call_module"]
    assert nn.Identity in called and nn.Dropout in called  # timm's graph has both
    plan = make_plan(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5}, random_scores(a, 0))
    pruned = rewrite(a, keep_mask(a, plan))
    kept = [pruned.get_submodule(n.target) for n in pruned.graph.nodes if n.op == "call_module"]
    assert not any(type(m) is nn.Identity for m in kept)
    dropouts = [m for m in kept if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.25 for m in dropouts)  # proj_drop and mlp.drop* of both blocks
    check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5}, 0)
