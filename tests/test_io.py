"""snp_fx.save / snp_fx.load: pickle-free round trips, bit for bit, and clear errors for bad directories."""
import io
import json
import os
import pickle
import shutil
import warnings

import pytest
import timm
import torch
from conftest import timm_model
from models import Block, BlockSpec, Mlp, PlainViT, randomize_norms
from safetensors.torch import load_file
from torch import nn

import snp_fx
from snp_fx.io import SavedModelError

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

RATIOS = {"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.2}
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])


def no_pickle(monkeypatch):
    """Make torch.load and the pickle entry points fail: a load that still works did not use them."""
    def refuse(*a, **k):
        raise AssertionError("pickle used while loading")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def copy_dir(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def rehash(directory, name):
    """What a hand edit that also fixes the manifest's checksum would leave."""
    from snp_fx.io import _sha256
    m = json.loads((directory / "snp_fx.json").read_text())
    m["sha256"][name] = _sha256(directory / name)
    (directory / "snp_fx.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    model = timm_model("deit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    pruned = snp_fx.prune(model, x, ratios=RATIOS, importance="l2", progress=False)
    d = tmp_path_factory.mktemp("deit")
    snp_fx.save(pruned, d)
    return model, x, pruned, d


def bert_factory(seed=0, **cfg):
    def make():
        torch.manual_seed(seed)
        c = dict(hidden_size=64, vocab_size=100, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        c.update(cfg)
        return transformers.BertModel(transformers.BertConfig(**c)).eval()
    return make


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    inputs = {"input_ids": IDS, "attention_mask": MASK}
    pruned = snp_fx.prune(bert_factory()(), inputs, ratios={**RATIOS, "heads": 0.25}, progress=False)
    d = tmp_path_factory.mktemp("bert")
    snp_fx.save(pruned, d)
    return inputs, pruned, d


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

def test_timm_round_trip_bit_for_bit(deit, monkeypatch):
    model, x, pruned, d = deit
    assert sorted(os.listdir(d)) == ["inputs.safetensors", "model.safetensors", "outputs.safetensors",
                                     "plan.json", "snp_fx.json"]
    # the weights file holds exactly the pruned state_dict; plan.json the plan
    stored = load_file(d / "model.safetensors")
    assert stored.keys() == pruned.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in pruned.state_dict().items())
    assert (d / "plan.json").read_text() == pruned.meta["snp_plan"]

    def fresh():  # another random init: every weight must come from the file
        torch.manual_seed(123)
        return timm.create_model("deit_tiny_patch16_224")
    no_pickle(monkeypatch)
    loaded = snp_fx.load(d, fresh)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert loaded.code == pruned.code and same_state(loaded, pruned)
    assert loaded.training == pruned.training and loaded.meta["snp_plan"] == pruned.meta["snp_plan"]
    x2 = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
        assert torch.equal(loaded(x2), pruned(x2))
        assert not torch.equal(loaded(x), model(x))  # it is the pruned model, not the dense one


def test_hf_bert_keyword_inputs_round_trip(bert, monkeypatch):
    inputs, pruned, d = bert
    manifest = json.loads((d / "snp_fx.json").read_text())
    assert manifest["frontend"] == "export"
    assert manifest["inputs"]["form"] == "dict"
    assert [e["name"] for e in manifest["inputs"]["entries"]] == ["input_ids", "attention_mask"]
    no_pickle(monkeypatch)
    loaded = snp_fx.load(d, bert_factory(seed=7))
    assert same_state(loaded, pruned)
    other = {"input_ids": (IDS * 7 + 3) % 100, "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    longer = {"input_ids": torch.arange(33).reshape(3, 11) % 100, "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    with torch.no_grad():
        for inp in (inputs, other, longer):  # exported graphs keep batch and length dynamic
            a, b = loaded(**inp), pruned(**inp)
            assert torch.equal(a.last_hidden_state, b.last_hidden_state)
            assert torch.equal(a.pooler_output, b.pooler_output)


class TinyLM(nn.Module):
    """Embedding tied to the output head (like most language models)."""

    def __init__(self, vocab=50, dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, BlockSpec(), "sdpa") for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def test_shared_tensors_stored_once(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 9))
    pruned = snp_fx.prune(TinyLM().eval(), ids, ratios=RATIOS, progress=False)
    assert torch.equal(pruned.head.weight, pruned.embed.weight)  # both sliced the same way
    pruned.head.weight = pruned.embed.weight  # tie them again in the pruned model
    snp_fx.save(pruned, tmp_path)
    assert "head.weight" not in load_file(tmp_path / "model.safetensors")  # safetensors cannot store aliases
    loaded = snp_fx.load(tmp_path, TinyLM)
    with torch.no_grad():
        assert torch.equal(loaded(ids), pruned(ids))
    assert torch.equal(loaded.head.weight, pruned.embed.weight)


def test_leaf_modules_by_class_and_name(tmp_path):
    torch.manual_seed(0)
    model = randomize_norms(PlainViT().eval())
    x = torch.randn(2, 3, 32, 32)
    pruned = snp_fx.prune(model, x, ratios={"qk": 0.5, "v": 0.25}, leaf_modules=[Mlp, "blocks.1.attn"], progress=False)
    assert "blocks_0_mlp = " in pruned.code  # Mlp stayed one call
    snp_fx.save(pruned, tmp_path)
    loaded = snp_fx.load(tmp_path, lambda: PlainViT())
    assert loaded.code == pruned.code  # re-traced with the same leaves
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_compensated_weights_come_from_the_file(tmp_path):
    """compensate=True refits kept weights: re-applying the plan alone would not give them back."""
    torch.manual_seed(0)
    model = randomize_norms(PlainViT().eval())
    x = torch.randn(8, 3, 32, 32)
    pruned = snp_fx.prune(model, x, ratios={"v": 0.5, "ffn": 0.5}, compensate=True, progress=False)
    plain = snp_fx.apply(model, snp_fx.PruningPlan.from_json(pruned.meta["snp_plan"]), x)
    assert not same_state(plain, pruned)
    snp_fx.save(pruned, tmp_path)
    loaded = snp_fx.load(tmp_path, model)
    assert same_state(loaded, pruned)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_loaded_model_prunes_again_compiles_and_nests(tmp_path):
    def make():
        torch.manual_seed(5)
        return randomize_norms(PlainViT(form="sdpa").eval())
    x = torch.randn(2, 3, 32, 32)
    once = snp_fx.prune(make(), x, ratios={"qk": 0.5, "ffn": 0.5, "residual": 0.25}, progress=False)
    snp_fx.save(once, tmp_path / "once")
    loaded = snp_fx.load(tmp_path / "once", make)
    twice = snp_fx.prune(loaded, x, ratios={"qk": 0.5, "v": 0.5}, progress=False)  # verified internally
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in once.parameters())
    compiled = torch.compile(twice)
    with torch.no_grad():
        out = twice(x)
        assert torch.allclose(compiled(x), out, rtol=1e-4, atol=1e-5)
    # a twice-pruned model is rebuilt from the once-pruned one, itself loaded from its directory
    snp_fx.save(twice, tmp_path / "twice")
    again = snp_fx.load(tmp_path / "twice", lambda: snp_fx.load(tmp_path / "once", make))
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_torch_save_and_load_of_the_graphmodule(deit, tmp_path):
    """The pickle route PyTorch users know works too (GraphModule pickles its code and weights)."""
    _, x, pruned, _ = deit
    buf = io.BytesIO()
    torch.save(pruned, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(restored(x), pruned(x))
    # GraphModule pickling drops .meta, so the plan is gone: snp_fx.save says so
    with pytest.raises(SavedModelError, match="torch.load does not keep"):
        snp_fx.save(restored, tmp_path, example_inputs=x)


def test_saved_dtype_must_match(tmp_path):
    def make():
        torch.manual_seed(0)
        return PlainViT().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pruned = snp_fx.prune(make().double(), x, ratios={"qk": 0.5, "ffn": 0.5}, progress=False)
    snp_fx.save(pruned, tmp_path)
    with pytest.raises(SavedModelError, match=r"torch.float64, the model passed to load is torch.float32"):
        snp_fx.load(tmp_path, make)
    loaded = snp_fx.load(tmp_path, lambda: make().double())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

def test_missing_directory_and_files(deit, tmp_path):
    model, _, _, d = deit
    with pytest.raises(SavedModelError, match="not a directory"):
        snp_fx.load(tmp_path / "nowhere", model)
    c = copy_dir(d, tmp_path)
    os.remove(c / "plan.json")
    with pytest.raises(SavedModelError, match=r"missing \['plan.json'\]"):
        snp_fx.load(c, model)


def test_edited_plan_indices_are_caught(deit, tmp_path):
    model, _, _, d = deit
    c = copy_dir(d, tmp_path)
    plan = json.loads((c / "plan.json").read_text())
    keep = plan["groups"]["blocks.0.mlp.fc1"]["keep"]
    keep[0] = next(i for i in range(10_000) if i not in keep)  # same width, another neuron
    (c / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SavedModelError, match="plan.json was changed after it was saved"):
        snp_fx.load(c, model)


def test_plan_edited_to_other_widths_does_not_fit_the_weights(tmp_path):
    model = PlainViT().eval()
    x = torch.randn(2, 3, 32, 32)
    snp_fx.save(snp_fx.prune(model, x, ratios={"ffn": 0.5}, progress=False), tmp_path)
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["groups"]["blocks.1.mlp.fc1"]["keep"].pop()  # one neuron fewer than the weights have
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rehash(tmp_path, "plan.json")  # even with the checksum fixed up, the shapes give it away
    with pytest.raises(SavedModelError, match=r"does not fit the graph rebuilt from plan.json.*blocks\.1\.mlp\.fc1"):
        snp_fx.load(tmp_path, model)


def test_bad_manifest_and_plan(deit, tmp_path):
    model, _, _, d = deit
    c = copy_dir(d, tmp_path)
    m = json.loads((c / "snp_fx.json").read_text())
    (c / "snp_fx.json").write_text(json.dumps({**m, "format": "snp_fx.saved/99"}))
    with pytest.raises(SavedModelError, match="format 'snp_fx.saved/99'"):
        snp_fx.load(c, model)
    (c / "snp_fx.json").write_text("{not json")
    with pytest.raises(SavedModelError, match="not valid JSON"):
        snp_fx.load(c, model)
    (c / "snp_fx.json").write_text(json.dumps(m))
    (c / "plan.json").write_text('{"groups": {}}')
    rehash(c, "plan.json")
    with pytest.raises(SavedModelError, match="plan.json is not a valid plan.*not an snp_fx plan"):
        snp_fx.load(c, model)


def test_other_architecture(deit):
    _, _, _, d = deit
    with pytest.raises(SavedModelError, match=r"not the architecture.*different shapes.*\[384"):
        snp_fx.load(d, timm_model("deit_small_patch16_224"))
    with pytest.raises(SavedModelError, match="original model"):
        snp_fx.load(d, "deit_tiny_patch16_224")


def test_same_shapes_other_computation(bert):
    """A config change that keeps every parameter shape (GELU -> ReLU) is caught by the saved outputs."""
    _, _, d = bert
    with pytest.raises(SavedModelError, match=r"outputs differ from the saved ones"):
        snp_fx.load(d, bert_factory(hidden_act="relu"))
    with pytest.raises(SavedModelError, match=r"not the architecture.*intermediate.dense.weight"):
        snp_fx.load(d, bert_factory(intermediate_size=96))


def test_save_errors(tmp_path):
    model = PlainViT().eval()
    with pytest.raises(SavedModelError, match="made by snp_fx"):
        snp_fx.save(torch.fx.symbolic_trace(model), tmp_path)
    pruned = snp_fx.prune(model, torch.randn(1, 3, 32, 32), ratios={"qk": 0.5}, progress=False)
    with pytest.raises(SavedModelError, match="cannot be saved without pickle"):
        snp_fx.save(pruned, tmp_path, example_inputs={"x": [torch.randn(1, 3, 32, 32)]})
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(SavedModelError, match="is a file, not a folder"):
        snp_fx.save(pruned, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
