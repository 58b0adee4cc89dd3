"""The public API's shape: keyword-only options, Analysis-first forms, custom importance and
selection callables, progress defaults, and which errors pass through analyze."""
import io

import pytest
import torch

import snp_fx
import snp_fx.api
from models import PlainViT
from snp_fx.calibration import show_progress
from snp_fx.compensate import collect_stats, find_consumers
from snp_fx.importance import compute_scores, norm_scores, params_of, producer_rows

RATIOS = {"qk": 0.5, "v": 0.5, "ffn": 0.5, "residual": 0.25, "heads": 0.25}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return PlainViT(form="sdpa").eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def analysis(vit, x):
    return snp_fx.analyze(vit, x)


def l2_importance(analysis, group):
    """importance="l2" written as a callable."""
    return norm_scores(analysis, params_of(analysis), 2)[group.classes]


def producer_l2(analysis, group):
    """The README's example: L2 norm of the weight rows that produce each channel."""
    rows = producer_rows(analysis, params_of(analysis), group.classes)
    return rows.double().norm(dim=1).reshape(group.classes.shape)


# --- keyword-only options, Analysis-first forms ---------------------------------------------------

def test_options_are_keyword_only(vit, x, analysis):
    with pytest.raises(TypeError):
        snp_fx.plan(vit, x, {"qk": 0.5})
    with pytest.raises(TypeError):
        snp_fx.prune(vit, x, {"qk": 0.5})
    with pytest.raises(TypeError):
        snp_fx.analyze(vit, x, ())
    p = snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2")
    with pytest.raises(TypeError):
        snp_fx.apply(vit, p, x, False)
    with pytest.raises(TypeError):
        snp_fx.SNPPass(x, p)


def test_plan_and_apply_take_an_analysis(vit, x, analysis):
    by_model = snp_fx.plan(vit, x, ratios=RATIOS, importance="l2")
    by_analysis = snp_fx.plan(analysis, ratios=RATIOS, importance="l2")
    by_keyword = snp_fx.plan(vit, x, ratios=RATIOS, importance="l2", analysis=analysis)  # the old alias
    assert by_model.groups == by_analysis.groups == by_keyword.groups
    pruned = snp_fx.apply(analysis, by_analysis)
    ref = snp_fx.apply(vit, by_model, x)
    assert torch.allclose(pruned(x), ref(x))
    assert pruned.meta["snp_source_shapes"] == ref.meta["snp_source_shapes"]
    assert pruned.meta["snp_source_shapes"] == {k: list(v.shape) for k, v in vit.state_dict().items()}
    assert pruned.training is False
    with pytest.raises(snp_fx.SNPError, match="needs example_inputs"):
        snp_fx.plan(vit, ratios={"qk": 0.5})


def test_apply_on_an_analysis_keeps_the_training_flag_and_saves(tmp_path, x):
    torch.manual_seed(0)
    model = PlainViT(form="sdpa").train()
    a = snp_fx.analyze(model, x)
    assert model.training  # analyze works on a copy
    pruned = snp_fx.apply(a, snp_fx.plan(a, ratios={"qk": 0.5, "ffn": 0.5}, importance="l2"))
    assert pruned.training
    snp_fx.save(pruned, tmp_path / "m")
    loaded = snp_fx.load(tmp_path / "m", model)
    assert torch.allclose(loaded.eval()(x), pruned.eval()(x), atol=1e-6)


# --- custom importance and selection ---------------------------------------------------------------

def test_callable_importance_equals_the_builtin(vit, x, analysis):
    builtin = snp_fx.plan(analysis, ratios=RATIOS, importance="l2")
    custom = snp_fx.plan(analysis, ratios=RATIOS, importance=l2_importance)
    assert custom.groups == builtin.groups
    assert custom.meta["importance"] == "custom:l2_importance"
    custom.to_json()  # the plan stays serialisable
    target = snp_fx.plan(analysis, target_macs=0.6, importance=l2_importance)
    assert target.groups == snp_fx.plan(analysis, target_macs=0.6, importance="l2").groups
    # also with exact selection on top (one calibration pass for the Gram products)
    exact = snp_fx.plan(analysis, ratios={"qk": 0.5}, importance=l2_importance, selection="exact")
    assert exact.groups == snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2", selection="exact").groups


def test_custom_importance_prunes(vit, x):
    pruned = snp_fx.prune(vit, x, ratios=RATIOS, importance=producer_l2)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in vit.parameters())


def test_callable_selection_is_used(vit, x, analysis):
    calls = []

    def last_positions(analysis, group, head, n_keep):
        calls.append((group.name, head, n_keep))
        return list(range(group.width - n_keep, group.width))

    p = snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2", selection=last_positions)
    for name, entry in p.groups.items():
        g = analysis.groups[name]
        if g.kind == "qk":
            assert entry["keep"] == [list(range(g.width // 2, g.width))] * g.heads
        else:  # only q/k pairs are selected
            assert entry["keep"] == snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2").groups[name]["keep"]
    assert calls and all(n == 4 for _, _, n in calls)
    assert p.meta["selection"] == "custom:test_callable_selection_is_used.<locals>.last_positions"
    pruned = snp_fx.prune(vit, x, ratios={"qk": 0.5}, selection=last_positions, progress=False)
    assert pruned.meta["snp_plan"]


def same_in_every_head(analysis, group, head, n_keep):
    """The README's example: the same q/k positions in every head."""
    return producer_l2(analysis, group).sum(0).topk(n_keep).indices.tolist()


def test_readme_selection_example(vit, x, analysis):
    p = snp_fx.plan(analysis, ratios={"qk": 0.5, "ffn": 0.3}, importance=producer_l2, selection=same_in_every_head)
    for name, entry in p.groups.items():
        if entry["kind"] == "qk":
            assert all(k == entry["keep"][0] for k in entry["keep"]) and len(entry["keep"][0]) == 4
    pruned = snp_fx.apply(analysis, p)
    assert pruned(x).shape == vit(x).shape


def test_bad_importance_and_selection(vit, x, analysis):
    for bad in ("magic", 42, None):
        with pytest.raises(snp_fx.SNPError, match="unknown importance") as e:
            snp_fx.plan(None, importance=bad)  # refused before any analysis
        assert "\n" not in str(e.value)
    for bad in ("optimal", 3):
        with pytest.raises(snp_fx.SNPError, match="unknown selection") as e:
            snp_fx.prune(vit, x, ratios={"qk": 0.5}, selection=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(snp_fx.SNPError, match="unknown importance"):
        compute_scores(analysis, "magic")
    with pytest.raises(snp_fx.SNPError, match="shaped like group.classes"):
        snp_fx.plan(analysis, ratios={"qk": 0.5}, importance=lambda a, g: torch.ones(3))
    with pytest.raises(snp_fx.SNPError, match="NaN/inf"):
        snp_fx.plan(analysis, ratios={"qk": 0.5}, importance=lambda a, g: torch.full(g.classes.shape, float("nan")))
    with pytest.raises(snp_fx.SNPError, match="4 distinct positions"):
        snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2", selection=lambda a, g, h, n: [0])
    with pytest.raises(snp_fx.SNPError, match="4 distinct positions"):
        snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2", selection=lambda a, g, h, n: [5, 6, 7, 8])
    with pytest.raises(snp_fx.SNPError, match="list of positions"):
        snp_fx.plan(analysis, ratios={"qk": 0.5}, importance="l2", selection=lambda a, g, h, n: None)


# --- progress ----------------------------------------------------------------------------------------

class _Stderr(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_defaults_to_a_terminal(monkeypatch, analysis, x):
    monkeypatch.setattr("sys.stderr", _Stderr(True))
    assert show_progress(None) and show_progress(True) and not show_progress(False)
    compute_scores(analysis, "snp", [x])
    assert "snp_fx calibration" in __import__("sys").stderr.getvalue()
    monkeypatch.setattr("sys.stderr", _Stderr(False))
    assert not show_progress(None) and show_progress(True)
    compute_scores(analysis, "snp", [x])
    assert __import__("sys").stderr.getvalue() == ""


# --- the streamed calibration pass is one ------------------------------------------------------------

def test_scores_and_compensation_stream_alike(analysis, x):
    consumers, _ = find_consumers(analysis, [g.name for g in analysis.prunable() if g.kind in ("v", "ffn")])
    bad = [x, torch.randn(2, 3, 16, 16)]
    for run in (lambda cal: compute_scores(analysis, "snp", cal), lambda cal: collect_stats(analysis, consumers, cal)):
        with pytest.raises(snp_fx.SNPError, match="calibration batch 1 does not run through the model"):
            run(bad)
        with pytest.raises(snp_fx.SNPError, match="the calibration iterable is empty"):
            run(iter([]))
    stats = collect_stats(analysis, consumers, [(x, torch.zeros(2))])  # (inputs, labels) pairs
    assert all(s[2] > 0 for s in stats.values())


# --- errors: a bug in snp_fx is not bad input -------------------------------------------------------

def test_internal_error_passes_through_analyze(monkeypatch, vit, x):
    def rule_bug(gm, inputs):
        raise snp_fx.InternalError("rule_linear failed at `fc1`", node="fc1", rule="rule_linear")

    def no_export(*args, **kwargs):
        raise AssertionError("torch.export must not be tried after an InternalError")

    monkeypatch.setattr(snp_fx.api, "propagate", rule_bug)
    monkeypatch.setattr(snp_fx.api, "export", no_export)
    with pytest.raises(snp_fx.InternalError, match="rule_linear") as e:
        snp_fx.analyze(vit, x)
    assert not isinstance(e.value, snp_fx.SNPError)


def test_model_failures_are_bad_input_and_try_export(monkeypatch, vit, x):
    tried = []
    real_export = snp_fx.api.export

    def model_fails(gm, inputs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    def counting_export(*args, **kwargs):
        tried.append(1)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(snp_fx.api, "propagate", model_fails)
    monkeypatch.setattr(snp_fx.api, "export", counting_export)
    with pytest.raises(snp_fx.SNPError, match="does not run on the example inputs: RuntimeError"):
        snp_fx.analyze(vit, x)
    assert tried  # the fx graph failed: the exported one was tried

    def says_bad_input(gm, inputs):
        raise snp_fx.SNPError("input `x` has 2 dims, the model indexes dim 3")

    monkeypatch.setattr(snp_fx.api, "propagate", says_bad_input)
    with pytest.raises(snp_fx.SNPError) as e:  # passes through unchanged, not re-wrapped
        snp_fx.analyze(vit, x, frontend="fx")
    assert str(e.value) == "input `x` has 2 dims, the model indexes dim 3"
