"""Hugging Face transformers models (small configs, random init) through the torch.export front-end."""
import warnings

import pytest
import torch

import snp_fx
from oracles import check_mask_equivalence
from snp_fx.verify import relative_error

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def bert():
    cfg = transformers.BertConfig(hidden_size=64, vocab_size=100, **SMALL)
    return transformers.BertModel(cfg), {"input_ids": IDS, "attention_mask": MASK}


def vit():
    cfg = transformers.ViTConfig(hidden_size=64, image_size=32, patch_size=8, num_labels=5, **SMALL)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": PIXELS}


def deit():
    cfg = transformers.DeiTConfig(hidden_size=64, image_size=32, patch_size=8, num_labels=5, **SMALL)
    return transformers.DeiTForImageClassification(cfg), {"pixel_values": PIXELS}


def gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, use_cache=False)
    return transformers.GPT2Model(cfg), {"input_ids": IDS, "use_cache": False}


def llama():
    cfg = transformers.LlamaConfig(hidden_size=64, num_key_value_heads=2, vocab_size=100, use_cache=False, **SMALL)
    return transformers.LlamaForCausalLM(cfg), {"input_ids": IDS, "use_cache": False}


def qwen2():
    cfg = transformers.Qwen2Config(hidden_size=64, num_key_value_heads=2, vocab_size=100, use_cache=False, **SMALL)
    return transformers.Qwen2ForCausalLM(cfg), {"input_ids": IDS, "use_cache": False}


MODELS = {"bert": bert, "vit": vit, "deit": deit, "gpt2": gpt2, "llama": llama, "qwen2": qwen2}
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
    if name in ("llama", "qwen2"):
        # rotary tables shared by every head and layer couple all q/k pairs: left alone, with the reason
        assert not a.prunable("qk")
        assert all(("coupled" in g.reason or "shares channels" in g.reason)
                   for g in a.groups.values() if g.kind == "qk")
        assert [s.name for s in a.sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert a.groups["model.layers.0.self_attn.v"].heads == 2  # v pruned per kv head
        assert a.groups["model.layers.0.mlp.gate_proj"].width == 128  # gate and up coupled: one group
    else:
        assert len(a.prunable("qk")) == 2


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equivalence(name, seed):
    model, inputs, a = analysis(name)
    ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.5, "heads": 0.5 if seed else 0.0, "residual": 0.25 * seed}
    check_mask_equivalence(a, ratios, seed)


@pytest.mark.parametrize("name", ["vit", "deit", "llama"])
def test_residual_pruning_keyword_inputs(name):
    model, inputs, a = analysis(name)
    pruned = snp_fx.prune(model, inputs, {"residual": 0.25, "v": 0.25, "ffn": 0.25}, progress=False)
    with torch.no_grad():
        out, ref = pruned(**inputs), model(**inputs)
    assert out.logits.shape == ref.logits.shape  # same output structure, called with the same keywords
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_identity_keeps_outputs():
    model, inputs, a = analysis("bert")
    pruned = snp_fx.prune(model, inputs, {}, progress=False)
    with torch.no_grad():
        assert relative_error(pruned(**inputs).last_hidden_state, model(**inputs).last_hidden_state) < 1e-6
