"""Hugging Face transformers models (small configs, random init) through the torch.export front-end."""
import copy
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


def scores_of_a_double_batch_and_its_halves(a, inputs):
    """SNP scores of a batch twice the example's, checked equal to those of its two halves."""
    double = {k: torch.cat([v, v.flip(0)]) for k, v in inputs.items()}
    halves = [{k: v[:2] for k, v in double.items()}, {k: v[2:] for k, v in double.items()}]
    s1 = snp_fx.importance.compute_scores(a, "snp", [double], progress=False)
    s2 = snp_fx.importance.compute_scores(a, "snp", halves, progress=False)
    assert torch.allclose(s1.classes, s2.classes)
    return s1


def test_calibration_batches_of_other_sizes_on_an_exported_graph():
    """The exported graph keeps batch and length dynamic: calibration batches of other sizes and
    lengths just run (a batch twice as large scores as its two halves given one by one); a length
    beyond the model's maximum (BERT's 512 positions) is refused clearly."""
    model, inputs, a = analysis("bert")
    s1 = scores_of_a_double_batch_and_its_halves(a, inputs)
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
    scores_of_a_double_batch_and_its_halves(a, inputs)
    longer = {k: torch.cat([v, v], dim=1) for k, v in inputs.items()}
    with pytest.raises(snp_fx.SNPError, match=r"exported for input_ids \(2, 7\)"):
        snp_fx.importance.compute_scores(a, "snp", [longer], progress=False)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_uniform_plan_to_hf_round_trip(name, tmp_path):
    """uniform=True keeps one width per kind in every layer; to_hf writes a folder that
    AutoModelForCausalLM.from_pretrained loads with the pruned sizes and the pruned model's logits."""
    from oracles import sharpen
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    sharpen(model.eval())
    pruned = snp_fx.prune(model, inputs, ratios={"heads": 0.5, "ffn": 0.3, "residual": 0.25}, uniform=True,
                          progress=False)
    snp_fx.to_hf(pruned, model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    c = loaded.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (48, 88, 2, 1, 16)  # residual 64 -> 48, FFN 128 * 0.7 -> 88 (multiples of 8), one kv group of two
    with torch.no_grad():
        assert relative_error(loaded(**inputs).logits, pruned(**inputs).logits) < 1e-5
    assert loaded.generate(inputs["input_ids"][:1], max_new_tokens=4, do_sample=False).shape == (1, 11)
    p = snp_fx.plan(model, inputs, target_params=0.6, uniform=True, progress=False)
    assert p.meta["uniform"] and set(p.meta["ratios"]) == {"heads", "ffn"}


def test_to_hf_refuses_what_a_standard_config_cannot_state(tmp_path):
    model, inputs, a = analysis("llama")
    with pytest.raises(snp_fx.SNPError, match="keeps the head dim of rotary attention whole"):
        snp_fx.plan(a, ratios={"qk": 0.5}, uniform=True)
    with pytest.raises(snp_fx.SNPError, match="per kind"):
        snp_fx.plan(a, ratios={"model.layers.0.mlp.gate_proj": 0.5}, uniform=True)
    ratios = {"model.layers.0.mlp.gate_proj": 0.5}  # one layer's FFN only
    pruned = snp_fx.apply(a, snp_fx.plan(a, ratios=ratios))
    with pytest.raises(snp_fx.SNPError, match="intermediate_size differs between layers"):
        snp_fx.to_hf(pruned, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for ratios in ({"qk": 0.5}, {"qk": 0.5, "v": 0.5}):  # q/k per head: no standard config states it
        pruned = snp_fx.apply(a, snp_fx.plan(a, ratios=ratios))  # (with v too the weights fit; the logits differ)
        with pytest.raises(snp_fx.SNPError, match="plan with uniform=True"):
            snp_fx.to_hf(pruned, model, tmp_path / "out")


def test_to_hf_generates_with_a_kv_cache_like_the_masked_dense_model(tmp_path):
    """A uniform plan written by to_hf generates with transformers' own KV cache (key/value widths
    follow the kept kv heads): 32 greedy tokens equal those of the dense model with the removed
    weight slices zeroed, generating with its cache too."""
    from oracles import sharpen
    from snp_fx.planning import keep_mask
    from snp_fx.verify import _zeroed
    torch.manual_seed(0)
    model, inputs = MODELS["llama"]()
    sharpen(model.eval(), seed=3)
    a = snp_fx.analyze(model, inputs)
    plan = snp_fx.plan(a, ratios={"heads": 0.5, "ffn": 0.5}, uniform=True)
    snp_fx.to_hf(snp_fx.apply(a, plan), model, tmp_path / "out")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    masked = copy.deepcopy(model)
    keep = keep_mask(a, plan)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            p.copy_(_zeroed(a, name, p, keep))
    prompt = inputs["input_ids"][:1]
    opts = dict(max_new_tokens=32, do_sample=False, use_cache=True)
    tokens = pruned.generate(prompt, **opts)
    assert torch.equal(tokens, masked.generate(prompt, **opts))
    assert not torch.equal(tokens, model.generate(prompt, **opts))  # the pruning did change the model
    assert pruned.config.num_key_value_heads == 1


def masked_dense(a, model, plan, prefix=""):
    """The dense model with the removed weight slices zeroed (the oracle pruning must equal)."""
    from snp_fx.planning import keep_mask
    from snp_fx.verify import _zeroed
    masked, keep = copy.deepcopy(model), keep_mask(a, plan)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            p.copy_(_zeroed(a, prefix + name, p, keep))
    return masked


@torch.no_grad()
def cached_logits(lm, tokens, n_prompt, tamper=None):
    """Logits of every position after the prompt, fed one token per call through the cache
    (``tamper(lm)`` runs after the prompt: a deliberate mistake)."""
    out = [lm(input_ids=tokens[:, :n_prompt], cache_position=torch.arange(n_prompt))[:, -1]]
    if tamper is not None:
        tamper(lm)
    for i in range(n_prompt, tokens.shape[1] - 1):
        out.append(lm(input_ids=tokens[:, i:i + 1], cache_position=torch.tensor([i]))[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_any_plan_generates_with_a_static_kv_cache_like_the_masked_dense_model(name, tmp_path):
    """The decoder wrapped with a static KV cache (StaticCacheLM), pruned with plans no standard
    config states: the cache buffers keep each layer's kept k / v channels, and greedy tokens, one
    per call through the cache, equal the masked dense model's, token for token and in the logits
    of every step.  (1) An SNP plan by kind (q/k apart from v, a kv head of each layer,
    the residual pruned): against the masked reference graph (exact norms) generating through its dense cache.
    (2) Per-layer ratios, residual whole: against the Hugging Face model with the removed slices
    zeroed, generating with transformers' own cache; saved and loaded, the same tokens.  The check
    sees a swapped q/k unit and a cache whose channels are out of order."""
    from oracles import sharpen, swapped_keep
    from snp_fx.hf import StaticCacheLM, generate
    from snp_fx.planning import keep_mask
    from snp_fx.rewrite import rewrite
    from snp_fx.verify import masked_reference
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    sharpen(model.eval(), seed=3)
    prompt, n = inputs["input_ids"][:1], inputs["input_ids"].shape[1]
    a = snp_fx.analyze(StaticCacheLM(model, 40), StaticCacheLM.inputs(prompt))
    assert not a.unknown_ops and len(a.state) == 4  # the k and v caches of two layers, understood
    dense = model.generate(prompt, max_new_tokens=32, do_sample=False)

    plan = snp_fx.plan(a, ratios={"qk": 0.5, "v": 0.25, "heads": 0.5, "ffn": 0.5, "residual": 0.25})
    assert len(plan.groups["residual"]["keep"]) == 48
    pruned = snp_fx.apply(a, plan)
    reference = masked_reference(a, keep_mask(a, plan), exact_norms=True)
    tokens = generate(pruned, prompt, 32)
    assert tokens.shape == (1, n + 32) and torch.equal(tokens, generate(reference, prompt, 32))
    assert relative_error(cached_logits(pruned, tokens, n), cached_logits(reference, tokens, n)) < 1e-4
    assert not torch.equal(tokens, dense)  # the pruning did change the model

    layer = "inner.model.model.layers.{}.{}"
    ratios = {layer.format(0, "self_attn.qk"): 0.5, layer.format(1, "self_attn.qk"): 0.25,
              layer.format(0, "self_attn.v"): 0.25, layer.format(1, "self_attn.v"): 0.5,
              layer.format(0, "mlp.gate_proj"): 0.5, layer.format(1, "mlp.gate_proj"): 0.25}
    plan = snp_fx.plan(a, ratios=ratios)
    widths = {g: [len(h) for h in e["keep"]] for g, e in plan.groups.items() if e["kind"] in ("qk", "v")}
    assert len({tuple(w) for w in widths.values()}) == 4, widths  # its own width per layer and kind
    pruned = snp_fx.apply(a, plan)
    caches = {k: tuple(b.shape) for k, b in pruned.named_buffers() if k in a.state}
    assert sorted(caches.values()) == [(1, 2, 40, 8)] * 2 + [(1, 2, 40, 12)] * 2, caches  # k, v: 8, 12 then 12, 8
    masked = masked_dense(a, model, plan, prefix="inner.model.")
    tokens = generate(pruned, prompt, 32)
    assert torch.equal(tokens, masked.generate(prompt, max_new_tokens=32, do_sample=False, use_cache=True))
    assert not torch.equal(tokens, dense)
    with torch.no_grad():
        ref = masked(tokens[:, :-1]).logits[:, n - 1:]
    assert relative_error(cached_logits(pruned, tokens, n), ref) < 1e-4
    snp_fx.save(pruned, tmp_path / "lm")
    assert torch.equal(generate(snp_fx.load(tmp_path / "lm", lambda: StaticCacheLM(model, 40)), prompt, 32), tokens)
    # deliberate mistakes the check must see: one q/k unit swapped; one cache's channels reversed
    _, wrong = swapped_keep(a, keep_mask(a, plan))
    assert relative_error(cached_logits(rewrite(a, wrong), tokens, n), ref) > 1e-3
    cache = next(k for k in a.state if "layers.1" in k)
    flip = lambda lm: lm.get_buffer(cache).copy_(lm.get_buffer(cache).flip(-1))  # noqa: E731
    assert relative_error(cached_logits(snp_fx.apply(a, plan), tokens, n, flip), ref) > 1e-3
