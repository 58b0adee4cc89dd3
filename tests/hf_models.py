"""Small Hugging Face transformers models (random init) and their keyword inputs.

Shared by tests/test_hf.py and benchmarks/zoo.py.
"""
import torch
import transformers

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
