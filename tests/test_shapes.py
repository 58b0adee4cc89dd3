"""Any shape: exported graphs keep batch and sequence length dynamic, so a model pruned on one
example runs at other batch sizes and lengths (up to the model's maximum) and equals the masked
original there; a shape the graph cannot take is one clear SNPError."""
import warnings

import pytest
import timm
import torch

import snp_fx
from oracles import random_scores, sharpen
from snp_fx.planning import keep_mask, make_plan
from snp_fx.rewrite import rewrite
from snp_fx.trace import normalize_inputs
from snp_fx.verify import masked_reference, relative_error

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

from hf_models import MODELS  # noqa: E402 - after the importorskip

RATIOS = {"qk": 0.5, "v": 0.25, "ffn": 0.5, "heads": 0.5}
SHAPES = [(1, 7), (3, 7), (2, 11), (3, 4)]  # (batch, length); the example is (2, 7)
_cache = {}


def analysis(name):
    if name not in _cache:
        torch.manual_seed(0)
        model, inputs = MODELS[name]()
        sharpen(model.eval())  # sharp attention: a wrong q/k channel shows
        _cache[name] = (model, inputs, snp_fx.analyze(model, inputs))
    return _cache[name]


def inputs_of(inputs, batch, length, seed=0):
    """Inputs like ``inputs`` at another batch size and (for tokens) length; padding in the masks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in inputs.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k == "input_ids":
            out[k] = torch.randint(0, 100, (batch, length), generator=g)
        elif k == "attention_mask":
            out[k] = torch.ones(batch, length, dtype=v.dtype)
            out[k][-1, length // 2:] = 0
        else:  # images: batch only
            out[k] = torch.randn((batch,) + tuple(v.shape[1:]), generator=g)
    return out


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_pruned_model_runs_at_other_batch_sizes_and_lengths(name):
    model, inputs, a = analysis(name)
    dims = a.gm.meta["snp_input_shapes"]
    tokens = "pixel_values" not in inputs
    assert all(isinstance(d[0], list) for d in dims.values())  # the batch dim stayed dynamic
    assert all(isinstance(d[1], list) == tokens for d in dims.values())  # so did the length of tokens
    keep = keep_mask(a, make_plan(a, RATIOS, random_scores(a, 0)))
    pruned = rewrite(a, keep).eval()
    ref = masked_reference(a, keep).eval()
    identity = rewrite(a, torch.ones_like(keep)).eval()
    for batch, length in SHAPES:
        x = normalize_inputs(a.gm, inputs_of(inputs, batch, length))
        with torch.no_grad():
            out, want, dense = pruned(*x), ref(*x), model(**inputs_of(inputs, batch, length))
            assert relative_error(out, want) < 1e-4, (batch, length)
            assert relative_error(out, dense) > 1e-3  # the pruning changed the outputs
            assert relative_error(identity(*x), dense) < 1e-5
        first = next(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        assert first.shape[0] == batch and (not tokens or first.shape[1] == length)


def test_the_check_sees_a_wrong_channel_at_another_shape():
    """At another batch size and length too, a swapped q channel fails mask equivalence."""
    model, inputs, a = analysis("llama")
    keep = keep_mask(a, make_plan(a, {"qk": 0.5}, random_scores(a, 1)))
    pruned = rewrite(a, keep).eval()
    g = a.prunable("qk")[0]
    kept = keep[g.classes[0]]
    wrong = keep.clone()
    i, j = int(kept.nonzero()[0]), int((~kept).nonzero()[0])
    wrong[g.classes[0, i]], wrong[g.classes[0, j]] = False, True
    x = normalize_inputs(a.gm, inputs_of(inputs, 3, 11))
    with torch.no_grad():
        assert relative_error(pruned(*x), masked_reference(a, keep)(*x)) < 1e-4
        assert relative_error(pruned(*x), masked_reference(a, wrong)(*x)) > 1e-3


def test_a_shape_the_model_cannot_take_is_one_clear_error():
    model, inputs, a = analysis("bert")
    pruned = rewrite(a, keep_mask(a, make_plan(a, RATIOS, random_scores(a, 0))))
    with pytest.raises(snp_fx.SNPError) as e:  # BERT has 512 positions
        pruned(**inputs_of(inputs, 2, 600))
    msg = str(e.value)
    assert "\n" not in msg and "(2, 600)" in msg and "exported for input_ids (d0, d1<=512)" in msg
    model, inputs, a = analysis("gpt2")  # n_positions=32: the config bounds the length
    pruned = rewrite(a, keep_mask(a, make_plan(a, RATIOS, random_scores(a, 0))))
    with pytest.raises(snp_fx.SNPError, match=r"exported for input_ids \(d0, d1<=32\)"):
        pruned(**inputs_of(inputs, 2, 40))
    model, inputs, a = analysis("vit")
    pruned = rewrite(a, keep_mask(a, make_plan(a, RATIOS, random_scores(a, 0))))
    with pytest.raises(snp_fx.SNPError, match=r"exported for pixel_values \(d0, 3, 32, 32\)"):
        pruned(pixel_values=torch.randn(2, 3, 48, 48))  # images keep their size


def test_static_fallback_says_so(monkeypatch):
    """Where the dynamic export fails, the graph is exported for the example's shapes, with a
    warning; another batch size is then refused clearly."""
    model, inputs, _ = analysis("bert")

    def fail(*args):
        raise RuntimeError("no dynamic shapes here")
    monkeypatch.setattr(snp_fx.trace, "dynamic_shapes", fail)
    with pytest.warns(UserWarning, match="exported for the example inputs' shapes only.*no dynamic shapes"):
        a = snp_fx.analyze(model, inputs)
    assert a.gm.meta["snp_input_shapes"] == {"input_ids": [2, 7], "attention_mask": [2, 7]}
    assert "no dynamic shapes here" in str(a)
    pruned = rewrite(a, torch.ones(a.channels.num_units, dtype=torch.bool))
    with pytest.raises(snp_fx.SNPError, match=r"exported for input_ids \(2, 7\).*size\(\)\[0\] == 2"):
        pruned(**inputs_of(inputs, 3, 7))


def test_batch_one_example_stays_dynamic():
    """torch.export specialises an example size of 1; the export is traced at size 2 instead, and
    the analysis still runs on the example itself."""
    model, inputs, _ = analysis("gpt2")
    one = inputs_of(inputs, 1, 1)
    a = snp_fx.analyze(model, one)
    assert all(isinstance(d, list) for d in a.gm.meta["snp_input_shapes"]["input_ids"])
    assert a.shapes["input_ids"] == (1, 1)
    pruned = rewrite(a, keep_mask(a, make_plan(a, {"ffn": 0.5}, random_scores(a, 0)))).eval()
    with torch.no_grad():
        assert pruned(**inputs_of(inputs, 3, 5)).last_hidden_state.shape == (3, 5, 64)


def test_the_pruned_model_exports_again_with_dynamic_shapes():
    model, inputs, a = analysis("llama")
    pruned = rewrite(a, keep_mask(a, make_plan(a, RATIOS, random_scores(a, 0)))).eval()
    ep = torch.export.export(pruned, (), inputs, strict=False,
                             dynamic_shapes=snp_fx.trace.dynamic_shapes(pruned, (), inputs))
    x = inputs_of(inputs, 3, 9)
    with torch.no_grad():
        assert relative_error(ep.module()(**x), pruned(**x)) < 1e-6


def test_save_and_load_keep_the_shapes_dynamic(tmp_path):
    model, inputs, a = analysis("bert")
    pruned = snp_fx.apply(a, snp_fx.plan(a, ratios=RATIOS, importance="l2"), verify=False)
    snp_fx.save(pruned, tmp_path)
    loaded = snp_fx.load(tmp_path, model)
    x = inputs_of(inputs, 3, 12)
    with torch.no_grad():
        assert relative_error(loaded(**x), pruned(**x)) == 0
    with pytest.raises(snp_fx.SNPError, match="exported for"):
        loaded(**inputs_of(inputs, 2, 513))


def test_pruned_timm_vit_runs_at_batch_3():
    """fx-traced timm models read the batch size from the input: pruned on one image, they take three."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    sharpen(model.eval())
    a = snp_fx.analyze(model, torch.randn(1, 3, 32, 32))
    assert a.gm.meta["snp_frontend"] == "fx"
    keep = keep_mask(a, make_plan(a, {**RATIOS, "residual": 0.25}, random_scores(a, 0)))
    pruned = rewrite(a, keep).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (3, 1000)
        assert relative_error(out, masked_reference(a, keep, exact_norms=True)(x)) < 1e-4
        assert relative_error(out, model(x)) > 1e-3


class TwoInputs(torch.nn.Module):
    """Positional inputs, one of them through ``*rest``."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, *rest):
        return self.down(torch.relu(self.up(x + rest[0])))


def test_positional_inputs_keep_their_batch_dynamic():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x = (torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    a = snp_fx.analyze(model, x, frontend="export")
    assert [d[0][1:] for d in a.gm.meta["snp_input_shapes"].values()] == [[1, None], [1, None]]
    keep = keep_mask(a, make_plan(a, {"ffn": 0.5}, random_scores(a, 0)))
    pruned = rewrite(a, keep)
    y = (torch.randn(3, 5, 8), torch.randn(3, 5, 8))
    with torch.no_grad():
        assert relative_error(pruned(*y), masked_reference(a, keep)(*y)) < 1e-5
        assert relative_error(pruned(*y), model(*y)) > 1e-3
    with pytest.raises(snp_fx.SNPError, match=r"exported for x \(d0, 5, 8\)"):
        pruned(torch.randn(3, 6, 8), torch.randn(3, 6, 8))  # floating 3-d inputs: the batch dim only
