"""q/k groups of mixed units (partial rotary embeddings: rotated channels tied in pairs, the rest single):
every head keeps the same number of units of each size, and the pruned model equals the masked one;
a rewrite that builds a graph which does not run sets its groups aside in ``prune``."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snp_fx
from oracles import check_mask_equivalence, random_scores
from snp_fx.errors import SNPError
from snp_fx.planning import PruningPlan, keep_mask, make_plan, plan_for_target, split_by_size


class PartialRotary(nn.Module):
    """One attention block whose heads rotate their first ``rot`` channels (rotate-half, as
    Phi / GPT-NeoX / StableLM) and pass the rest through.  ``table_op`` transforms the rotary
    table with an op the analysis does not know (to make a rewrite that does not run)."""

    def __init__(self, dim=32, heads=4, rot=4, table_op=None):
        super().__init__()
        self.heads, self.rot, self.table_op = heads, rot, table_op
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)))

    def rope(self, t, cos, sin):
        r, rest = t[..., :self.rot], t[..., self.rot:]
        r1, r2 = r[..., :self.rot // 2], r[..., self.rot // 2:]
        return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, rest], -1)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        freqs = torch.arange(N, device=x.device).float()[:, None] * self.inv_freq  # tables built per call, as HF's
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos(), emb.sin()
        if self.table_op is not None:
            cos = self.table_op(cos)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(x)))


X = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def analysis():
    torch.manual_seed(0)
    return snp_fx.analyze(PartialRotary().eval(), (X,))


def test_partial_rotary_units_are_pairs_and_singles(analysis):
    (g,) = analysis.prunable("qk")
    assert g.unit_sizes is not None and g.width == 2 + 4  # 2 pairs (4 rotated channels) + 4 singles
    for h in range(g.heads):
        assert g.size_counts(h, range(g.width)) == {1: 4, 2: 2}
        assert g.channels(h, range(g.width)) == 8


def test_split_by_size_keeps_proportions_and_every_size(analysis):
    (g,) = analysis.prunable("qk")
    for k in range(1, g.width + 1):
        split = split_by_size(g, k)
        assert sum(split.values()) == k and split[1] <= 4 and split[2] <= 2
        if k >= 2:
            assert min(split.values()) >= 1, (k, split)  # neither the rotated nor the plain part vanishes
    assert split_by_size(g, 4) == {1: 3, 2: 1}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_head_keeps_the_same_layout_and_mask_equivalence_holds(analysis, ratio, seed):
    (g,) = analysis.prunable("qk")
    plan = make_plan(analysis, {"qk": ratio}, random_scores(analysis, seed))
    keep = plan.groups[g.name]["keep"]
    layouts = {tuple(g.size_counts(h, idx).items()) for h, idx in enumerate(keep)}
    assert len(layouts) == 1, layouts
    check_mask_equivalence(analysis, {"qk": ratio, "v": 0.5, "ffn": 0.5}, seed)


def test_plan_with_different_layouts_per_head_is_refused(analysis):
    (g,) = analysis.prunable("qk")
    pairs = [i for i in range(g.width) if g.unit_sizes[0, i] == 2]
    singles = [i for i in range(g.width) if g.unit_sizes[0, i] == 1]
    keep = [pairs[:1] + singles[:1]] + [singles[:2]] * (g.heads - 1)  # same count, other layout
    with pytest.raises(SNPError, match="pairs and single"):
        keep_mask(analysis, PruningPlan({g.name: {"kind": "qk", "keep": keep}}))


def test_budget_plans_keep_equal_layouts(analysis):
    plan = plan_for_target(analysis, random_scores(analysis, 0), target_params=0.7)
    (g,) = analysis.prunable("qk")
    keep = plan.groups[g.name]["keep"]
    assert len({tuple(g.size_counts(h, idx).items()) for h, idx in enumerate(keep) if idx}) == 1
    keep_mask(analysis, plan)


def test_a_table_over_positions_made_by_an_unknown_op_is_gathered():
    # a constant over positions x channels multiplied into q/k is gathered per use, whatever made it:
    # q/k prune and equal the masked original
    torch.manual_seed(0)
    a = snp_fx.analyze(PartialRotary(table_op=lambda t: torch.cumsum(t, -1) * 0.1).eval(), (X,))
    assert len(a.prunable("qk")) == 1, a.reasons()
    for seed in (0, 1):
        check_mask_equivalence(a, {"qk": 0.5, "v": 0.5, "ffn": 0.5}, seed)


def test_prune_sets_aside_groups_whose_rewrite_does_not_run():
    # cumsum is no op the analysis knows: the table's channels are lost, q is not tied to them and its
    # pruned copy no longer fits the table; the self-check names the node and prune leaves q/k whole
    # (summed over positions: one value per channel; a table over positions would be gathered per use)
    torch.manual_seed(0)
    model = PartialRotary(table_op=lambda t: torch.cumsum(t, -1).sum(0) * 0.1).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = snp_fx.prune(model, (X,), ratios={"qk": 0.5, "v": 0.5}, importance="l2")
    assert any("left" in str(w.message) and ".qk" in str(w.message) for w in caught), [str(w.message) for w in caught]
    plan = pruned.meta["snp_plan"]
    assert ".qk" not in plan and ".v" in plan
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
