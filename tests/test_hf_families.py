"""Hugging Face families at tiny configs, sharply initialised: every attention layer's q/k, v and
FFN are prunable and the pruned model equals the masked original on random plans; the check is
shown to see a swapped q/k unit.  One row per family in FAMILIES."""
import warnings

import pytest
import torch

import snp_fx
from oracles import assert_sensitive, check_mask_equivalence, sharpen
from snp_fx.cost import count_macs, count_params, estimate_macs, estimate_params
from snp_fx.planning import keep_mask
from snp_fx.verify import mask_equivalence

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def decoder(config_cls, model_cls="AutoModelForCausalLM", tiny=TINY, inputs=None, **cfg):
    """A builder: (model, keyword inputs) for a decoder without KV cache.  ``tiny``: the config's
    own names for the tiny sizes; ``inputs``: more keyword inputs (an encoder-decoder's)."""
    def build():
        experts = cfg.pop("experts", None)  # an MoE's experts implementation (config._experts_implementation)
        config = config_cls(**{**tiny, "use_cache": False, **cfg})
        if experts:
            config._experts_implementation = experts
        model = getattr(transformers, model_cls).from_config(config) if model_cls.startswith("Auto") \
            else getattr(transformers, model_cls)(config)
        return model, {"input_ids": IDS, "use_cache": False, **(inputs or {})}
    return build


def encoder(config_cls, model_cls, tiny=TINY, inputs=None, **cfg):
    """A builder for an encoder, text or vision (no cache argument); ``inputs``: its keyword inputs
    (default: the token ids)."""
    def build():
        return getattr(transformers, model_cls)(config_cls(**{**tiny, **cfg})), inputs or {"input_ids": IDS}
    return build


T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=100, relative_attention_num_buckets=8)
SWIN = dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4)
BLOOM = dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=100)
FALCON = {k: v for k, v in TINY.items() if k != "intermediate_size"}  # Falcon's FFN is 4 * hidden
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
TEXT = {"input_ids": IDS, "attention_mask": MASK}
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
MOE = dict(num_local_experts=4, num_experts_per_tok=2)  # Mixtral's names
QWEN_MOE = dict(num_experts=4, num_experts_per_tok=2)   # Qwen-MoE's and OLMoE's
SQUEEZEBERT = {**TINY, "embedding_size": 64}
XLNET = dict(d_model=64, n_layer=2, n_head=4, d_inner=128, vocab_size=100)
XLNET_INPUTS = {**TEXT, "token_type_ids": IDS % 2, "use_mems": False}

# family -> (builder, attention sites expected)
FAMILIES = {
    "llama": (decoder(transformers.LlamaConfig, num_key_value_heads=2), 2),
    "t5_encoder": (encoder(transformers.T5Config, "T5EncoderModel", T5), 2),
    # 2 encoder self-attention, 2 decoder self- and 2 cross-attention sites
    "t5": (decoder(transformers.T5Config, "T5Model", T5, inputs={"decoder_input_ids": IDS[:, :5]}), 6),
    "falcon": (decoder(transformers.FalconConfig, "FalconForCausalLM", FALCON), 2),
    "falcon_new_arch": (decoder(transformers.FalconConfig, "FalconForCausalLM", FALCON,
                                new_decoder_architecture=True, num_kv_heads=2), 2),
    "bloom": (decoder(transformers.BloomConfig, "BloomForCausalLM", BLOOM), 2),
    "mpnet": (encoder(transformers.MPNetConfig, "MPNetModel"), 2),
    # disentangled attention: the position terms q @ pos_key^T and k @ pos_query^T pair the q/k
    # channels again (v3 shares the q/k projections; v2-style separate pos_key_proj / pos_query_proj
    # join the q/k classes); the per-head position keys are repeated over batch x heads
    "deberta_v3": (encoder(transformers.DebertaV2Config, "DebertaV2Model", inputs=TEXT,
                           relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                           position_buckets=16, norm_rel_ebd="layer_norm", position_biased_input=False), 2),
    "deberta_v2_pos_proj": (encoder(transformers.DebertaV2Config, "DebertaV2Model", inputs=TEXT,
                                    relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=False,
                                    max_relative_positions=16), 2),
    # the pooling head's nn.MultiheadAttention is a cross-attention (a learned probe attends to the
    # tokens): a third site, its q/k/v weights rows of in_proj_weight
    "siglip_vision": (encoder(transformers.SiglipVisionConfig, "SiglipVisionModel", inputs={"pixel_values": PIXELS},
                              image_size=32, patch_size=8), 3),
    # partial rotary: q/k of channel pairs (rotated) and single channels (passed through)
    "phi": (decoder(transformers.PhiConfig, partial_rotary_factor=0.5), 2),
    "gpt_neox": (decoder(transformers.GPTNeoXConfig, rotary_pct=0.25), 2),  # fused qkv (heads, 3, head_dim)
    "stablelm": (decoder(transformers.StableLmConfig, num_key_value_heads=2), 2),  # a quarter of each head rotated
    "gptj": (decoder(transformers.GPTJConfig, rotary_dim=8), 2),  # rotate-every-two pairs (2i, 2i + 1)
    "codegen": (decoder(transformers.CodeGenConfig, rotary_dim=8), 2),  # fused qkv in model-parallel blocks
    # interleaved rotary over the whole head: cos / sin built with repeat_interleave
    "cohere": (decoder(transformers.CohereConfig, num_key_value_heads=2), 2),
    # q/k norms: RMSNorm over each head (Qwen3, Gemma3) or the whole q / k width (OLMo2)
    "qwen3": (decoder(transformers.Qwen3Config, num_key_value_heads=2, head_dim=16), 2),
    "gemma3": (decoder(transformers.Gemma3TextConfig, num_key_value_heads=2, head_dim=16), 2),
    "olmo2": (decoder(transformers.Olmo2Config, num_key_value_heads=2), 2),
    # mixture of experts: expert weights are 3-d parameters (experts, out, in) run by grouped_mm over
    # tokens sorted by expert (transformers' default experts implementation); each MoE layer's
    # experts are one FFN group (the same neurons in every expert), the router's experts stay
    "mixtral": (decoder(transformers.MixtralConfig, num_key_value_heads=2, **MOE), 2),
    # experts gathered by expert id and multiplied with bmm (the batched_mm implementation)
    "mixtral_batched_mm": (decoder(transformers.MixtralConfig, num_key_value_heads=2, experts="batched_mm",
                                   **MOE), 2),
    # a shared expert (a dense SwiGLU FFN) beside the routed ones, scaled by sigmoid(shared_expert_gate(x))
    "qwen2_moe": (decoder(transformers.Qwen2MoeConfig, num_key_value_heads=2, moe_intermediate_size=32,
                          shared_expert_intermediate_size=64, **QWEN_MOE), 2),
    "qwen3_moe": (decoder(transformers.Qwen3MoeConfig, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                          **QWEN_MOE), 2),
    "olmoe": (decoder(transformers.OlmoeConfig, num_key_value_heads=2, **QWEN_MOE), 2),
    # cosine attention: F.normalize(q) exports as q / linalg_vector_norm(q).expand_as(q)
    "swinv2": (encoder(transformers.Swinv2Config, "Swinv2Model", SWIN, inputs={"pixel_values": PIXELS}), 2),
    # random patch masking (torch.rand in the graph): the check seeds both models' draws alike
    "vit_mae": (encoder(transformers.ViTMAEConfig, "ViTMAEModel", inputs={"pixel_values": PIXELS},
                        image_size=32, patch_size=8), 2),
    # 2-d rotary positions from a meshgrid of patch positions
    "pixtral": (encoder(transformers.PixtralVisionConfig, "PixtralVisionModel", {**TINY, "head_dim": 16},
                        inputs={"pixel_values": PIXELS}, image_size=32, patch_size=8), 2),
    # raw (hidden, heads, head dim) parameters applied by einsum ('ibh,hnd->ibnd', 'ibnd,hnd->ibh'),
    # per-head q biases, position keys k_r and a segment table (2, heads, head dim) contracted with q
    # grouped 1 x 1 convs on (batch, channels, tokens): q/k/v, intermediate and output convs of 4
    # groups (a group holds whole heads; input j of every group is one channel)
    "squeezebert": (encoder(transformers.SqueezeBertConfig, "SqueezeBertModel", SQUEEZEBERT, inputs=TEXT), 2),
    "xlnet": (encoder(transformers.XLNetConfig, "XLNetModel", XLNET, inputs=XLNET_INPUTS), 2),
    # rotary tables made from parameters, shared by every layer: RoFormer's sinusoidal embedding of
    # positions (rotating v too with rotary_value), MLCD's learned class-token angles before the
    # patches' buffer-made ones; gathered per use like a buffer's table
    "roformer": (encoder(transformers.RoFormerConfig, "RoFormerModel", {**TINY, "embedding_size": 64}), 2),
    "roformer_rotary_value": (encoder(transformers.RoFormerConfig, "RoFormerModel", {**TINY, "embedding_size": 64},
                                      rotary_value=True), 2),
    # q/k LayerNorm over each head: the pruned norm keeps the original width's statistics (zeros counted)
    "persimmon": (decoder(transformers.PersimmonConfig, "PersimmonForCausalLM", qk_layernorm=True), 2),
    "stablelm_qk_layernorm": (decoder(transformers.StableLmConfig, num_key_value_heads=2, qk_layernorm=True), 2),
    "mlcd_vision": (encoder(transformers.MLCDVisionConfig, "MLCDVisionModel", inputs={"pixel_values": PIXELS},
                            image_size=32, patch_size=8), 2),
}
FFN_LAYERS = {"t5": 4}  # FFNs where there are fewer than attention sites
MOE_FAMILIES = ["mixtral", "mixtral_batched_mm", "qwen2_moe", "qwen3_moe", "olmoe"]

_cache = {}


def analysis(name):
    if name not in _cache:
        torch.manual_seed(0)
        build, layers = FAMILIES[name]
        model, inputs = build()
        sharpen(model.eval())
        _cache[name] = (model, inputs, snp_fx.analyze(model, inputs), layers)
    return _cache[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_attention_layer_is_prunable(name):
    model, inputs, a, layers = analysis(name)
    assert len(a.sites) == layers, [s.name for s in a.sites]
    for kind in ("qk", "v"):
        assert len(a.prunable(kind)) == layers, (kind, a.reasons())
    assert len(a.prunable("ffn")) >= FFN_LAYERS.get(name, layers), a.reasons()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equivalence_and_sensitivity(name, seed):
    model, inputs, a, layers = analysis(name)
    ratios = {"qk": 0.5, "v": 0.25 + 0.25 * seed, "ffn": 0.5}
    pruned, plan = check_mask_equivalence(a, ratios, seed)
    assert_sensitive(a, keep_mask(a, plan), pruned)


@pytest.mark.parametrize("name", ["deberta_v3", "deberta_v2_pos_proj", "siglip_vision", "xlnet"])
def test_whole_heads(name):
    """Removing whole heads shrinks the merged batch x heads dim: DeBERTa's repeated position keys
    and its gather indices (relative positions expanded over batch x heads) follow."""
    model, inputs, a, layers = analysis(name)
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.25, "v": 0.5, "ffn": 0.5, "heads": 0.5}, seed)


@pytest.mark.parametrize("name", ["phi", "gpt_neox", "stablelm", "gptj", "codegen"])
def test_partial_rotary_keeps_pairs_and_singles_alike_in_every_head(name):
    model, inputs, a, layers = analysis(name)
    plan = snp_fx.plan(a, ratios={"qk": 0.5}, importance="l2")
    for g in a.prunable("qk"):
        assert g.unit_sizes is not None, g.name  # rotated pairs and pass-through singles
        layouts = {tuple(g.size_counts(h, idx).items()) for h, idx in enumerate(plan.groups[g.name]["keep"])}
        assert len(layouts) == 1 and len(dict(next(iter(layouts)))) == 2, layouts


def experts_groups(a):
    return [g for g in a.prunable("ffn") if any(name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                                                 for name, _ in a.channels.param_ids.items()
                                                 if name.startswith(g.name + "."))]


def swap_in_one_expert(a, g, keep, e=0):
    """``keep`` with one kept and one removed neuron of expert ``e`` of ``g`` swapped (the other
    experts as they are)."""
    row = keep[g.classes[e]]
    i, j = int(row.nonzero()[0]), int((~row).nonzero()[0])
    wrong = keep.clone()
    wrong[g.classes[e, i]], wrong[g.classes[e, j]] = False, True
    return wrong


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_experts_prune_per_expert_router_kept(name):
    """Each MoE layer's experts are one FFN group of (experts, neurons): every expert keeps the same
    count, each its own neurons (rows of its gate/up, columns of its down projection); the expert
    count stays (the router's outputs are not pruned).  With the residual stream pruned too the
    result equals the masked original, and the check sees one kept and one removed neuron swapped
    in one expert; the dense FFNs (Qwen2-MoE's shared expert) stay 1-d groups."""
    model, inputs, a, layers = analysis(name)
    experts = experts_groups(a)
    assert len(experts) == layers, a.reasons()
    assert all(g.slots is not None and tuple(g.classes.shape) == (4, g.width) for g in experts)
    assert all(g.classes.dim() == 1 for g in a.prunable("ffn") if g not in experts)
    routers = [g for g in a.groups.values() if g.width == 4]  # the routers' 4 experts
    assert routers and all(not g.prunable and "topk" in g.reason for g in routers), a.reasons()
    assert a.prunable("residual") and not a.unknown_ops, a.unknown_ops
    for seed in (0, 1):
        ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.25 + 0.25 * seed, "residual": 0.25 * seed}
        pruned, plan = check_mask_equivalence(a, ratios, seed)
        keep = keep_mask(a, plan)
        # the cost predicted from the labels is what the pruned model runs and holds
        assert estimate_macs(a, keep) == count_macs(pruned, a.inputs, batch=a.batch)
        assert estimate_params(a, keep) == count_params(pruned)
        state = pruned.state_dict()
        for g in experts:
            kept = plan.groups[g.name]["keep"]
            k = len(kept[0])
            assert len({tuple(r) for r in kept}) > 1, f"every expert of {g.name} keeps the same neurons"
            up, down = state[g.name + ".gate_up_proj"], state[g.name + ".down_proj"]
            assert k < g.width and up.shape[:2] == (4, 2 * k) and down.shape[0] == 4 and down.shape[2] == k
            # expert e's rows are its own kept neurons' (gate and up), in order
            orig = dict(a.gm.named_parameters())[g.name + ".gate_up_proj"]
            cols = slice(None) if not ratios["residual"] else [int(i) for i in range(orig.shape[2])
                                                               if keep[a.channels.param_ids[g.name + ".gate_up_proj"][2][i]]]
            for e in (0, 3):
                rows = kept[e] + [g.width + j for j in kept[e]]
                assert torch.equal(up[e], orig.detach()[e][rows][:, cols])
        for e in (0, 3):  # the check sees a wrong neuron in one expert
            wrong = swap_in_one_expert(a, experts[0], keep, e)
            err = mask_equivalence(a, wrong, pruned, a.inputs, exact_norms=bool(ratios["residual"]))
            assert err > 1e-4, f"the check cannot see a swapped neuron in expert {e} of {experts[0].name}: {err:.2e}"


@pytest.mark.parametrize("importance", ["snp", "l2", "gm", "fluctuation"])
def test_moe_experts_scored_per_expert(importance):
    """Every importance scores each (expert, neuron) from that expert's own weights (and, for
    fluctuation, the variance of that expert's own token rows): the experts keep different
    neurons.  The two experts implementations (grouped_mm: rows by offsets; batched_mm: rows by a
    gather index) route the same tokens to the same experts, so the scores of a model built
    alike agree between them."""
    plans = []
    for name in ("mixtral", "mixtral_batched_mm"):
        model, inputs, a, layers = analysis(name)
        scores = snp_fx.importance.compute_scores(a, importance)
        p = snp_fx.plan(a, ratios={"ffn": 0.5}, scores=scores)
        for g in experts_groups(a):
            s = scores.classes[g.classes]
            assert bool((s != 0).all()) and not torch.allclose(s[0], s[1]), (g.name, s[:, :4])
            kept = p.groups[g.name]["keep"]
            assert len({tuple(r) for r in kept}) > 1 and len({len(r) for r in kept}) == 1
        if importance == "snp":  # the rows scored for expert e's neuron j: its own gate and up rows
            g = experts_groups(a)[0]
            rows = snp_fx.importance.expert_rows(a, snp_fx.importance.params_of(a), g, 2)
            w = dict(a.gm.named_parameters())[g.name + ".gate_up_proj"].detach()[2]
            assert torch.equal(rows[5], torch.cat([w[5], w[g.width + 5]]))
        plans.append((scores, [scores.classes[g.classes] for g in experts_groups(a)]))
        snp_fx.apply(a, p)  # the self-check passes
    for x, y in zip(plans[0][1], plans[1][1]):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-9), (x[:, :4], y[:, :4])


def test_moe_experts_planned_for_a_target():
    """A MACs budget allots each experts group one width per expert (its neurons ranked among its
    own), met within the planner's tolerance; the pruned model passes the self-check."""
    model, inputs, a, layers = analysis("mixtral")
    p = snp_fx.plan(a, target_macs=0.6, importance="l2")
    for g in experts_groups(a):
        kept = p.groups[g.name]["keep"]
        assert len({len(r) for r in kept}) == 1 and 0 < len(kept[0]) < g.width, p
        assert len({tuple(r) for r in kept}) > 1
    dense = estimate_macs(a, keep_mask(a, snp_fx.PruningPlan({})))
    assert abs(estimate_macs(a, keep_mask(a, p)) - 0.6 * dense) <= 0.01 * 0.6 * dense
    snp_fx.apply(a, p)


def test_moe_experts_compensation_skips_them_cleanly():
    """Least-squares compensation refits one Linear per pruned group; the experts' down
    projections are per-expert 3-d weights, no such Linear: the experts group is left as pruned,
    with the reason, and the rest is compensated."""
    model, inputs, a, layers = analysis("qwen2_moe")
    p = snp_fx.plan(a, ratios={"ffn": 0.5, "v": 0.25}, importance="l2")
    pruned = snp_fx.apply(a, p, compensate=True)
    records = {r["group"]: r for r in pruned.meta["snp_compensation"]}
    for g in experts_groups(a):
        assert not records[g.name]["applied"] and "MoE experts" in records[g.name]["reason"], records
    assert any("shared_expert" in name for name in records), records


def test_moe_eager_experts_loop_is_refused_cleanly():
    """The eager experts loop runs one matmul per expert hit by the data: torch.export cannot trace
    a data-dependent loop, so the analysis says so (the grouped_mm / batched_mm implementations
    prune)."""
    FAMILIES["mixtral_eager"] = (decoder(transformers.MixtralConfig, experts="eager", **MOE), 2)
    try:
        with pytest.raises(snp_fx.SNPError, match="data-dependent"):
            analysis("mixtral_eager")
    finally:
        del FAMILIES["mixtral_eager"]


def test_xlnet_einsum_weights_prune_residual_and_compensate():
    """XLNet's einsum weights are weights like a Linear's: the residual stream prunes exactly through
    them (LM head model), and the output projection ('ibnd,hnd->ibh') is v's consumer: compensation
    refits it as a matrix (hidden, heads * head dim) and lowers its calibration error."""
    model = sharpen(transformers.XLNetLMHeadModel(transformers.XLNetConfig(**XLNET)).eval())
    a = snp_fx.analyze(model, XLNET_INPUTS)
    assert a.prunable("residual") and not a.unknown_ops, a.reasons()
    check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5, "residual": 0.25}, 0)
    p = snp_fx.plan(a, ratios={"v": 0.5}, importance="l2")
    pruned = snp_fx.apply(model, p, None, analysis=a, compensate=True, calibration=[XLNET_INPUTS], progress=False)
    recs = {r["group"]: r for r in pruned.meta["snp_compensation"]}
    assert len(recs) == 2, recs
    for name, r in recs.items():
        assert r["consumer"] == name.replace(".v", ".o") and r["error_after"] < r["error_before"], r


def test_grouped_conv_splitting_heads_is_refused():
    """SqueezeBERT with 8 q/k groups for 4 heads: a conv group holds half a head, whose channels the
    plan chooses per head: q/k is refused with the reason; v (4 groups) and the FFN still prune."""
    FAMILIES["squeezebert_split"] = (encoder(transformers.SqueezeBertConfig, "SqueezeBertModel", SQUEEZEBERT,
                                             inputs=TEXT, q_groups=8, k_groups=8), 2)
    try:
        model, inputs, a, layers = analysis("squeezebert_split")
    finally:
        del FAMILIES["squeezebert_split"]
    qk = [g for g in a.groups.values() if g.kind == "qk"]
    assert len(qk) == layers and all(not g.prunable and "splits its heads" in g.reason for g in qk), a.reasons()
    assert len(a.prunable("v")) == layers and len(a.prunable("ffn")) == layers
    check_mask_equivalence(a, {"v": 0.5, "ffn": 0.5}, 0)


@pytest.mark.parametrize("name", ["xlnet", "squeezebert"])
def test_estimated_macs_are_what_runs(name):
    """einsum with a parameter and grouped convs: the estimated MACs of a pruned plan are what
    FlopCounterMode counts in the pruned graph."""
    from oracles import random_scores
    from snp_fx.cost import count_macs, estimate_macs
    from snp_fx.planning import make_plan
    from snp_fx.rewrite import rewrite
    model, inputs, a, layers = analysis(name)
    keep = keep_mask(a, make_plan(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5, "heads": 0.5}, random_scores(a, 0)))
    assert estimate_macs(a, keep) == count_macs(rewrite(a, keep), a.inputs) < count_macs(a.gm, a.inputs)
