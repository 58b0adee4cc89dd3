"""Hand-written transformers: every attention form, random widths and random plans."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import snp_fx
from models import BlockSpec, MHATransformer, Mlp, PlainViT, randomize_norms
from oracles import assert_sensitive, check_mask_equivalence, sharpen
from snp_fx.planning import keep_mask

FORMS = ["matmul", "matmul_after", "einsum", "bmm", "sdpa"]


@pytest.mark.parametrize("form", FORMS)
def test_every_attention_form_is_found(form):
    torch.manual_seed(0)
    model = PlainViT(form=form).eval()
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.sites) == 2
    assert len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2
    assert len(a.prunable("ffn")) == 2 and len(a.prunable("residual")) == 1
    assert a.groups["blocks.0.attn.qk"].classes.shape == (4, 8)


specs = st.builds(BlockSpec, heads=st.integers(1, 4), qk_dim=st.integers(2, 8), v_dim=st.integers(2, 8),
                  hidden=st.integers(4, 32))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(blocks=st.lists(specs, min_size=1, max_size=3), form=st.sampled_from(FORMS),
       pool=st.sampled_from(["cls", "mean"]), batch=st.integers(1, 3),
       qk=st.floats(0, 0.8), v=st.floats(0, 0.8), ffn=st.floats(0, 0.8), heads=st.sampled_from([0, 0.3, 0.6]),
       residual=st.sampled_from([0, 0, 0.25, 0.6]), seed=st.integers(0, 10**6))
def test_mask_equivalence_random_models_and_plans(blocks, form, pool, batch, qk, v, ffn, heads, residual, seed):
    torch.manual_seed(seed)
    model = randomize_norms(PlainViT(dim=16, blocks=blocks, form=form, pool=pool).eval(), seed)
    a = snp_fx.analyze(model, torch.randn(batch, 3, 32, 32))
    ratios = {"qk": qk, "v": v, "ffn": ffn, "heads": heads, "residual": residual}
    for g in a.prunable():  # ratios that would empty a group are an error; keep them valid here
        if round(g.width * (1 - ratios.get(g.kind, 0))) < 1:
            ratios[g.kind] = 0.0
    if any(round(s.heads * (1 - heads)) < 1 for s in blocks):
        ratios["heads"] = 0.0
    check_mask_equivalence(a, ratios, seed)


def test_scale_is_kept_for_sdpa():
    torch.manual_seed(0)
    model = PlainViT(form="sdpa").eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = snp_fx.prune(model, x, ratios={"qk": 0.5})
    assert "scale = 0.35355" in pruned.code  # 1/sqrt(8): the original width, not the pruned 4


def test_multihead_attention_leaf_is_reported_with_fx():
    torch.manual_seed(0)
    model = MHATransformer().eval()
    x = torch.randn(2, 7, 16)
    a = snp_fx.analyze(model, x, frontend="fx")
    assert not a.sites
    assert any("MultiheadAttention" in r for r in a.unknown_ops.values())
    assert "MultiheadAttention" in str(a)
    # what can be pruned still is (the FFNs), exactly
    ffn = a.prunable("ffn")
    assert len(ffn) == 2
    check_mask_equivalence(a, {"ffn": 0.5}, seed=0)
    # the residual stream runs through the leaf: a model-wide ratio leaves it, with the reason
    assert "MultiheadAttention" in a.groups["residual"].reason


@pytest.mark.parametrize("heads, residual", [(0.0, 0.0), (0.5, 0.25)])
def test_multihead_attention_is_pruned_through_export(heads, residual):
    """auto: fx leaves nn.MultiheadAttention opaque, so the model is exported and its fused
    in_proj (unflatten -> transpose -> select per slot) is split into q, k and v."""
    torch.manual_seed(0)
    model = randomize_norms(MHATransformer().eval())
    x = torch.randn(2, 7, 16)
    a = snp_fx.analyze(model, x)
    assert len(a.sites) == 2 and len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2
    check_mask_equivalence(a, {"qk": 0.5, "v": 0.25, "ffn": 0.5, "heads": heads, "residual": residual}, seed=1)


class GroupedHidden(torch.nn.Module):
    """An FFN whose hidden channels are viewed in groups and computed on so: per-group counts must
    match (a view only moved on, e.g. flattened back, is gathered from its source instead)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 64)
        self.fc2 = torch.nn.Linear(64, 8)
        self.other = torch.nn.Linear(8, 32)
        self.out = torch.nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x).view(x.shape[0], 4, 16)).flatten(1)
        return self.out(torch.relu(self.other(self.fc2(h))))


def test_unrewritable_group_is_left_alone_and_reported():
    torch.manual_seed(0)
    model = GroupedHidden().eval()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match=r"left \['fc1'\] unpruned"):
        pruned = snp_fx.prune(model, x, ratios={"ffn": 0.5}, importance="random", seed=3)
    assert pruned.fc1.out_features == 64        # refused: the view needs equal counts per group
    assert pruned.other.out_features == 16      # the other FFN was still pruned
    with torch.no_grad():
        assert pruned(x).shape == (3, 3)
    with pytest.raises(snp_fx.RewriteError, match="cannot rewrite node"):  # named explicitly: an error
        snp_fx.prune(model, x, ratios={"fc1": 0.5}, importance="random", seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda():
    torch.manual_seed(0)
    model = PlainViT(form="sdpa").eval().cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    pruned = snp_fx.prune(model, x, ratios={"qk": 0.5, "v": 0.5, "ffn": 0.5, "heads": 0.25})  # verified inside
    assert next(pruned.parameters()).is_cuda


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_dim_moved_inside_is_gathered_back_in_order(seed):
    """(B, N, Dv, H) then merged: per-head v choices interleave across heads, so the merged channels
    come out of order; the rewrite gathers them back (an index_select after the reshape).

    Found by benchmarks/zoo.py on timm's NesT, where the rewrite once reordered channels silently
    (then refused the layout; now it is pruned, checked against the masked original).
    """
    torch.manual_seed(0)
    model = PlainViT(form="head_last").eval()
    a = snp_fx.analyze(model, torch.randn(2, 3, 32, 32))
    assert len(a.prunable("v")) == 2
    pruned, _ = check_mask_equivalence(a, {"qk": 0.5, "v": 0.5, "heads": 0.5 * (seed == 2)}, seed)
    assert pruned.get_submodule("blocks.0.attn.v").out_features < 32
    assert sum(n.startswith("snp_order_") for n, _ in pruned.named_buffers()) == 2  # one per block


def test_head_last_pruned_twice_renumbers_the_stored_gather():
    """A second prune of a head-last model meets the first prune's gather (an index_select with a
    stored index) on a pruned dim: its index is renumbered for the kept channels (apply verifies)."""
    torch.manual_seed(0)
    model = PlainViT(form="head_last").eval()
    x = torch.randn(2, 3, 32, 32)
    once = snp_fx.prune(model, x, ratios={"v": 0.5}, importance="random", progress=False)
    twice = snp_fx.prune(once, x, ratios={"v": 0.5, "heads": 0.5, "residual": 0.25}, importance="random", seed=1,
                         progress=False)
    assert twice.get_submodule("blocks.0.attn.v").out_features < once.get_submodule("blocks.0.attn.v").out_features
    kept = [int(b.numel()) for n, b in twice.named_buffers() if n.startswith("snp_order_")]
    assert kept and all(k < 32 for k in kept)  # the stored gathers were cut to the kept channels


def test_model_holding_an_autograd_cache_is_copied_not_refused():
    """timm's EfficientViT caches its attention biases on an eval forward run with autograd on; a
    deepcopy of such a model fails.  The pass copies those cached tensors detached and leaves the
    model (and its cache) as it was."""
    torch.manual_seed(0)
    model = PlainViT().eval()
    x = torch.randn(2, 3, 32, 32)
    model.cache = {"scaled_pos": model.pos_embed * 2}  # a non-leaf tensor, as such caches are
    with pytest.raises(RuntimeError, match="graph leaves"):
        __import__("copy").deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = snp_fx.prune(model, x, ratios={"qk": 0.5, "ffn": 0.5}, progress=False)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert model.cache["scaled_pos"].grad_fn is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class CrossAttention(nn.Module):
    """A DETR-style decoder: queries attend to a memory through nn.MultiheadAttention (its in_proj
    weight is sliced into w_q and w_k, w_v), then an FFN.  ``same_kv``: key and value are one tensor."""

    def __init__(self, dim=32, heads=4, hidden=64, depth=2, same_kv=True):
        super().__init__()
        self.same_kv = same_kv
        self.embed = nn.Linear(16, dim)
        self.mem = nn.Linear(16, dim)
        self.mem_v = nn.Linear(16, dim)
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mlps = nn.ModuleList(Mlp(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x, memory):
        x, k = self.embed(x), self.mem(memory)
        v = k if self.same_kv else self.mem_v(memory)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlps):
            x = x + attn(norm(x), k, v)[0]
            x = x + mlp(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("same_kv", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_multihead_attention_as_cross_attention(same_kv, seed):
    """The q, k, v weights are rows of in_proj_weight taken by split / chunk: the linears on them
    make the parameter's rows, the rewrite prunes those rows and renumbers the split.  The query
    stream and the memory meet in in_proj's columns: the residual stream is pruned through both."""
    torch.manual_seed(seed)
    model = sharpen(randomize_norms(CrossAttention(same_kv=same_kv).eval(), seed))
    a = snp_fx.analyze(model, (torch.randn(2, 5, 16), torch.randn(2, 7, 16)))
    assert len(a.sites) == 2 and len(a.prunable("qk")) == 2 and len(a.prunable("v")) == 2, a.reasons()
    assert len(a.prunable("ffn")) == 2, a.reasons()
    ratios = {"qk": 0.5, "v": 0.25 + 0.25 * seed, "ffn": 0.5, "heads": 0.25 * seed, "residual": 0.25 * seed}
    pruned, plan = check_mask_equivalence(a, ratios, seed)
    assert pruned.get_parameter("attn.0.in_proj_weight").shape[0] < 3 * 32  # the rows are gone
    assert_sensitive(a, keep_mask(a, plan), pruned)
