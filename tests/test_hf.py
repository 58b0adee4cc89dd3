"""Hugging Face transformers models (small configs, random init) through the torch.export front-end."""
import warnings

import pytest
import torch

import snp_fx
from oracles import check_mask_equivalence
from snp_fx.verify import relative_error

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

from hf_models import MODELS  # noqa: E402 - after the importorskip

_cache = {}


def analysis(name):
    if name not in _cache:
        torch.manual_seed(0)
        model, inputs = MODELS[name]()
        _cache[name] = (model.eval(), inputs, snp_fx.analyze(model.eval(), inputs))
    return _cache[name]


@pytest.mark.parametrize("name", list(MODELS))
def test_sites_and_groups(name):
    model, inputs, a = analysis(name)
    assert len(a.sites) == 2
    assert len(a.prunable("v")) == 2 and len(a.prunable("ffn")) == 2
    assert len(a.prunable("qk")) == 2
    if name in ("llama", "qwen2"):
        assert [s.name for s in a.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        qk = a.groups["model.layers.0.self_attn.qk"]
        # grouped-query attention: a q/k class spans the 2 query heads of its kv head;
        # rotary embeddings pair index i with i + 8 (head dim 16): 8 classes per kv head
        assert (qk.heads, qk.width) == (2, 8)
        assert a.groups["model.layers.0.self_attn.v"].heads == 2  # v pruned per kv head
        assert a.groups["model.layers.0.mlp.gate_proj"].width == 128  # gate and up coupled: one group
        assert a.gathered  # the shared cos/sin tables are cut per use, not coupled across heads


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equivalence(name, seed):
    model, inputs, a = analysis(name)
    ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.5, "heads": 0.5 if seed else 0.0, "residual": 0.25 * seed}
    check_mask_equivalence(a, ratios, seed)


@pytest.mark.parametrize("name", ["vit", "deit", "llama"])
def test_residual_pruning_keyword_inputs(name):
    model, inputs, a = analysis(name)
    pruned = snp_fx.prune(model, inputs, ratios={"residual": 0.25, "v": 0.25, "ffn": 0.25}, progress=False)
    with torch.no_grad():
        out, ref = pruned(**inputs), model(**inputs)
    assert out.logits.shape == ref.logits.shape  # same output structure, called with the same keywords
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_identity_keeps_outputs():
    model, inputs, a = analysis("bert")
    pruned = snp_fx.prune(model, inputs, ratios={}, progress=False)
    with torch.no_grad():
        assert relative_error(pruned(**inputs).last_hidden_state, model(**inputs).last_hidden_state) < 1e-6


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rotary_pairs_and_kv_heads_go_together(name):
    """q/k channels i and i + d/2 (rotate_half partners) are kept or removed together, per kv head,
    and whole kv heads take their query heads with them."""
    model, inputs, a = analysis(name)
    pruned = snp_fx.prune(model, inputs, ratios={"qk": 0.5, "heads": 0.5}, importance="random", progress=False)
    d, n_rep = 16, 2
    for layer in range(2):
        w0 = dict(model.named_parameters())[f"model.layers.{layer}.self_attn.q_proj.weight"]
        w1 = dict(pruned.named_parameters())[f"model.layers.{layer}.self_attn.q_proj.weight"]
        rows = [int((w0 == r).all(1).nonzero()) for r in w1]  # original index of every kept q row
        heads = sorted({r // d for r in rows})
        assert len(heads) == n_rep  # one kv group (two query heads) left of two
        assert heads[0] // n_rep == heads[1] // n_rep
        for h in heads:
            kept = {r % d for r in rows if r // d == h}
            assert len(kept) == d // 2 // 2 * 2  # half the pairs, both members of each
            assert all((i + d // 2) % d in kept for i in kept)
        assert kept == {r % d for r in rows if r // d == heads[0]}  # query heads of a group keep the same
    with torch.no_grad():
        assert pruned(**inputs).logits.shape == model(**inputs).logits.shape


def test_calibration_batches_of_other_sizes_on_an_exported_graph():
    """The exported graph keeps batch and length dynamic: calibration batches of other sizes and
    lengths just run (a batch twice as large scores as its two halves given one by one); a length
    beyond the model's maximum (BERT's 512 positions) is refused clearly."""
    model, inputs, a = analysis("bert")
    double = {k: torch.cat([v, v.flip(0)]) for k, v in inputs.items()}
    halves = [{k: v[:2] for k, v in double.items()}, {k: v[2:] for k, v in double.items()}]
    s1 = snp_fx.importance.compute_scores(a, "snp", [double], progress=False)
    s2 = snp_fx.importance.compute_scores(a, "snp", halves, progress=False)
    assert torch.allclose(s1.classes, s2.classes)
    longer = {k: torch.cat([v, v], dim=1) for k, v in inputs.items()}
    s3 = snp_fx.importance.compute_scores(a, "snp", [longer], progress=False)
    assert not torch.allclose(s3.classes, s1.classes)  # really run at the other length
    too_long = {k: v.repeat(1, 80)[:, :520] for k, v in inputs.items()}
    with pytest.raises(snp_fx.SNPError, match=r"do not fit the exported graph.*<=512"):
        snp_fx.importance.compute_scores(a, "snp", [too_long], progress=False)


def test_calibration_batches_on_a_static_exported_graph():
    """A graph exported for the example's shapes only: a batch larger by a whole multiple runs in
    chunks of the example's size; another length is refused, saying what the graph takes."""
    model, inputs, _ = analysis("bert")
    a = snp_fx.api._analyze(snp_fx.trace.export(model, inputs, dynamic=False), inputs, ())
    assert a.gm.meta["snp_input_shapes"] == {"input_ids": [2, 7], "attention_mask": [2, 7]}
    double = {k: torch.cat([v, v.flip(0)]) for k, v in inputs.items()}
    halves = [{k: v[:2] for k, v in double.items()}, {k: v[2:] for k, v in double.items()}]
    s1 = snp_fx.importance.compute_scores(a, "snp", [double], progress=False)
    s2 = snp_fx.importance.compute_scores(a, "snp", halves, progress=False)
    assert torch.allclose(s1.classes, s2.classes)
    longer = {k: torch.cat([v, v], dim=1) for k, v in inputs.items()}
    with pytest.raises(snp_fx.SNPError, match=r"exported for input_ids \(2, 7\)"):
        snp_fx.importance.compute_scores(a, "snp", [longer], progress=False)
