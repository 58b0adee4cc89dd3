"""Transformer families beyond plain ViTs (small configs, random init): rotary embeddings (timm
EVA-02, ViT-RoPE, Qwen3-ViT), cosine attention (Swin V2), relative-position tables contracted with q
(BoTNet, SAM), heads inside the head dim (NesT), nn.MultiheadAttention (torchvision's ViT), conv
attention through torch.export (LowFormer, EfficientViT-MSRA).

Each must find every attention site, prune q/k, v, FFN, heads and residual, and equal the masked
original (the zoo sweep, benchmarks/zoo.py, runs the full-size variants)."""
import pytest
import timm
import torch

import snp_fx
from oracles import check_mask_equivalence
from models import randomize_constants

SMALL = {  # name -> (create_model kwargs, input size, sites)
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=2), 56, 2),            # interleaved RoPE pairs
    "vit_small_patch16_rope_224": (dict(img_size=64, depth=2), 64, 2),        # rotate-half RoPE
    "qwen3_vit_88m": (dict(depth=2, embed_dim=128, num_heads=4), 64, 2),     # RoPE table as [sin | cos]
    "xcit_nano_12_p16_224": (dict(img_size=64, depth=2), 64, 2),             # F.normalize, vector norms
    "swinv2_tiny_window8_256": (dict(img_size=64, depths=(1, 1), num_heads=(2, 4), embed_dim=32, window_size=4), 64, 2),
    # relative-position tables shared by the heads, contracted with q (matmul / einsum 'bhwc,hkc->bhwk')
    "botnet26t_256": (dict(img_size=64), 64, 3),
    "samvit_base_patch16": (dict(img_size=64, depth=2, global_attn_indexes=(1,), window_size=2, embed_dim=64,
                                 num_heads=4), 64, 2),
    # conv attention (a timm leaf: torch.export): batch norm, depthwise conv, dense ConvTranspose2d upsampling
    "lowformer_b0": ({"width_list": [8, 16, 32, 64, 128], "depth_list": [0, 1, 1, 1, 1], "head_widths": (64, 64)},
                     64, 2),
}


_cache = {}


def analysis(name):
    if name not in _cache:
        torch.manual_seed(0)
        kw, size, _ = SMALL[name]
        model = randomize_constants(timm.create_model(name, pretrained=False, num_classes=5, **kw).eval())
        _cache[name] = snp_fx.analyze(model, torch.randn(2, 3, size, size))
    return _cache[name]


@pytest.mark.parametrize("name", list(SMALL))
def test_sites_found_and_qk_prunable(name):
    a = analysis(name)
    assert len(a.sites) == SMALL[name][2]
    assert len(a.prunable("qk")) == len(a.sites) and len(a.prunable("v")) == len(a.sites), str(a)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equivalence(name, seed):
    ratios = {"qk": 0.5, "v": 0.25, "ffn": 0.3, "heads": 0.5 * seed, "residual": 0.25 * seed}
    check_mask_equivalence(analysis(name), ratios, seed)


def test_rotary_pairs_stay_together_interleaved():
    """EVA-02 rotates interleaved pairs (2i, 2i+1): kept q/k indices come in such pairs."""
    a = analysis("eva02_tiny_patch14_224")
    g = a.prunable("qk")[0]
    assert (g.heads, g.width) == (3, 32)  # head dim 64: 32 rotary pairs per head
    pruned, plan = check_mask_equivalence(a, {"qk": 0.5}, seed=3)
    w0 = a.gm.get_parameter("blocks.0.attn.qkv.weight")[:192]  # the query rows of the fused qkv
    w1 = pruned.get_parameter("blocks.0.attn.qkv.weight")
    rows = {int(m.nonzero()) for m in (w1[:, None] == w0[None]).all(-1) if bool(m.any())}
    assert len(rows) == 3 * 32  # half of each head's 64 query channels
    assert all((r ^ 1) in rows for r in rows)  # r ^ 1: the other member of the pair (2i, 2i+1)


def test_head_shared_rel_pos_table_couples_heads():
    """SAM's rel-pos tables (one per axis, shared by the heads) are contracted with q: the heads keep
    the same q/k channels, and the tables lose the same columns."""
    a = analysis("samvit_base_patch16")
    g = a.prunable("qk")[0]
    assert (g.heads, g.width) == (1, 16)  # 4 heads of 16 channels, one shared choice
    assert a.groups[g.name[:-3] + ".v"].heads == 4  # v is still chosen per head
    pruned, plan = check_mask_equivalence(a, {"qk": 0.5}, seed=2)
    kept = plan.groups[g.name]["keep"][0]
    for axis in ("h", "w"):
        t0 = a.gm.get_parameter(f"blocks.0.attn.rel_pos_{axis}")
        t1 = pruned.get_parameter(f"blocks.0.attn.rel_pos_{axis}")
        assert torch.equal(t1, t0[:, kept])
    q0 = a.gm.get_parameter("blocks.0.attn.qkv.weight")[:64].reshape(4, 16, -1)
    q1 = pruned.get_parameter("blocks.0.attn.qkv.weight")[:4 * len(kept)].reshape(4, len(kept), -1)
    assert torch.equal(q1, q0[:, kept])


def test_heads_asked_for_but_shared_are_kept_with_a_warning():
    a = analysis("samvit_base_patch16")
    with pytest.warns(UserWarning, match="heads of blocks.0.attn kept: the heads share their q/k channels"):
        p = snp_fx.plan(None, a.inputs, ratios={"heads": 0.5, "v": 0.25}, importance="random", analysis=a)
    assert set(p.meta["heads_kept"]) == {"blocks.0.attn", "blocks.1.attn"}
    assert all(len(h) == 12 for h in p.groups["blocks.0.attn.v"]["keep"])  # v still pruned, in every head


def test_nest_heads_inside_head_dim():
    """NesT merges heads as (head_dim, heads): the kept v channels of each head are interleaved across
    heads, so the rewrite gathers them back into the order the projection's columns are sliced in."""
    from timm.models.nest import Nest
    torch.manual_seed(0)
    model = randomize_constants(Nest(img_size=32, patch_size=4, num_levels=2, embed_dims=(32, 64), num_heads=(2, 4),
                            depths=(1, 1), num_classes=5).eval())
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2, str(a)
    for seed in (0, 1):
        pruned, _ = check_mask_equivalence(a, {"qk": 0.5, "v": 0.5, "ffn": 0.3, "heads": 0.5 * seed,
                                               "residual": 0.25 * seed}, seed)
    assert any(n.startswith("snp_order_") for n, _ in pruned.named_buffers())


def test_torchvision_vit_multihead_attention():
    """torchvision's VisionTransformer runs nn.MultiheadAttention: auto exports it past the leaf."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = randomize_constants(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                         mlp_dim=64, num_classes=5).eval())
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "heads": 0.5 * seed,
                                   "residual": 0.25 * seed}, seed)


@pytest.mark.filterwarnings("ignore:The tensor attributes")  # timm caches the attention biases in eval mode
def test_efficientvit_msra_cascaded_heads():
    """EfficientViT (MSRA), exported: functional batch norm, depthwise conv on q, out = v @ attn^T (v the
    left operand), and cascaded heads: head i's output is added to input chunk i + 1, so the v of heads
    0..H-2 are residual channels, shared by every block of a stage (pruned with the stream)."""
    torch.manual_seed(0)
    kw = {"img_size": 96, "embed_dim": (32, 64), "key_dim": (8, 8), "depth": (1, 2), "num_heads": (2, 2),
          "window_size": (4, 4), "kernels": (3, 3), "down_ops": (("", 1), ("subsample", 2))}
    model = randomize_constants(timm.create_model("efficientvit_m0", pretrained=False, num_classes=5, **kw).eval())
    a = snp_fx.analyze(model, torch.randn(2, 3, 96, 96))  # windows of 4 on a 6 x 6 map: padded windows
    assert len(a.sites) == 6 and all(s.av_node is not None for s in a.sites)
    assert len(a.prunable("qk")) == 6, str(a)
    v = {s.name: a.groups[f"{s.name}.v"] for s in a.sites}
    stream = sorted(name for name, g in v.items() if not g.prunable)
    # heads 0..H-2 (here head 0) of every block: their v channels are the stage's residual stream,
    # pruned with it under the residual ratio, not as v; the last head's v is its own
    assert stream == [f"stages.{s}.blocks.{b}.mixer.m.attn.qkvs.0.conv" for s, b in ((0, 0), (1, 0), (1, 1))], str(a)
    assert all(v[name].reason.endswith("residual stream") for name in stream)
    assert [g.width for g in a.prunable("residual")] == [32, 64]  # batch-norm streams, found by their adds
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.25 * seed}, seed)


def test_torchvision_swin_frontend_by_findings():
    """torchvision's Swin: fx keeps `shifted_window_attention` whole (wrapped), so no attention site is
    seen in the fx graph; auto takes the exported graph, where every window attention is a site; the
    front-end can be chosen in plan and apply too."""
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    model = randomize_constants(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                window_size=[4, 4], num_classes=5).eval())
    x = torch.randn(2, 3, 32, 32)
    assert snp_fx.analyze(model, x, frontend="fx").sites == []
    a = snp_fx.analyze(model, x)
    assert a.gm.meta["snp_frontend"] == "export" and len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "heads": 0.5 * seed}, seed)
    p = snp_fx.plan(model, x, ratios={"qk": 0.5}, frontend="fx")
    assert not any(k.endswith(".qk") for k in p.groups)  # the fx graph, as asked
    pruned = snp_fx.apply(model, snp_fx.plan(a, ratios={"qk": 0.5}), x, frontend="export")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_torchvision_swin_v2_cosine_attention():
    """torchvision's Swin V2: cosine attention (F.normalize of q and k over the head dim, a learned
    per-head logit scale) and a continuous position-bias MLP: q/k and v of every block prune exactly."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    torch.manual_seed(0)
    model = randomize_constants(SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                                window_size=[4, 4], num_classes=5, block=SwinTransformerBlockV2,
                                                downsample_layer=PatchMergingV2).eval())
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2, str(a)
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "heads": 0.5 * seed}, seed)


def test_torchvision_maxvit_upper_case_einsum():
    """torchvision's MaxViT writes its attention as einsum('BGHID,BGHJD->BGHIJ') (5-D, upper case):
    block and grid attention of every stage are sites."""
    from torchvision.models.maxvit import MaxVit
    torch.manual_seed(0)
    model = randomize_constants(MaxVit(input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[16, 32],
                                       block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0,
                                       num_classes=5).eval())
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.prunable("qk")) == 4 and len(a.prunable("v")) == 4, str(a)
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.3, "heads": 0.5 * seed}, seed)


def test_swiftformer_additive_attention_is_a_site():
    """SwiftFormer's additive attention scores tokens with q @ w_g, w_g a (dim, 1) parameter: a
    per-token score paired with q's channels (a site), not a linear layer with one output channel
    (x @ W is one for wider W: Falcon)."""
    torch.manual_seed(0)
    model = randomize_constants(timm.create_model("swiftformer_xs", pretrained=False, num_classes=5).eval())
    a = snp_fx.analyze(model, torch.randn(1, 3, 64, 64))
    assert len(a.sites) == 4 and len(a.prunable("qk")) == 4, str(a)
    check_mask_equivalence(a, {"qk": 0.5, "ffn": 0.3}, 0)
