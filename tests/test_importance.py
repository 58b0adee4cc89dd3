"""Importance scores against plain references written here, and calibration behaviour."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import snp_fx
from models import PlainViT
from snp_fx.importance import compute_scores
from snp_fx.importance.snp import geometric_median_scores, qk_pair_scores, redundancy_scores


def naive_qk_scores(q, k, gamma):
    """The paper's formula, literally: full SVD of S = Q K^T, flattened cosines."""
    s = q.double() @ k.double().T
    u, sig, vh = torch.linalg.svd(s)
    w = torch.zeros(q.shape[1], dtype=torch.float64)
    for i in range(q.shape[1]):
        rank1 = torch.outer(q[:, i].double(), k[:, i].double()).flatten()
        for j in range(min(gamma, sig.numel())):
            comp = (sig[j] * torch.outer(u[:, j], vh[j])).flatten()
            denom = comp.norm() * rank1.norm()
            if denom > 0:
                w[i] += (comp @ rank1).abs() / denom
    return w


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 20), d=st.integers(1, 8), gamma=st.integers(1, 8), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_fast_qk_score_equals_naive(n, d, gamma, seed, dtype):
    """Exact in float64.  In float32 the Gram matrices are summed in the input precision (the hot
    part): components with s_j / s_1 near 1e-5 then carry ~1e-4 of rounding (seen over 20k cases)."""
    gamma = min(gamma, d)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=dtype)
    k = torch.randn(n, d, generator=g, dtype=dtype)
    w, energy = qk_pair_scores(q[None], k[None], gamma)
    ref = naive_qk_scores(q, k, gamma)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert torch.allclose(w[0], ref, atol=tol, rtol=tol)
    assert torch.allclose(energy[0], (q.double() @ k.double().T).pow(2).sum(), rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), f=st.integers(1, 6), seed=st.integers(0, 1000))
def test_redundancy_and_gm_equal_double_loops(n, f, seed):
    rows = torch.randn(n, f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = torch.zeros(n, dtype=torch.float64)
    gm = torch.zeros(n, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            cos = rows[a] @ rows[b] / (rows[a].norm() * rows[b].norm())
            ref[a] += 1 - cos.abs()
            gm[a] += (rows[a] - rows[b]).norm()
    assert torch.allclose(redundancy_scores(rows), ref, atol=1e-9)
    assert torch.allclose(geometric_median_scores(rows), gm, atol=1e-9)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return PlainViT(form="sdpa").eval()


def test_calibration_streams_and_matches_per_batch_sums(vit):
    """Scores over several batches = sum of the scores of each batch (running sums, nothing kept)."""
    x = torch.randn(2, 3, 32, 32)
    a = snp_fx.analyze(vit, x)
    batches = [torch.randn(3, 3, 32, 32) for _ in range(3)]
    whole = compute_scores(a, "snp", batches, gamma=2, progress=False)
    parts = [compute_scores(a, "snp", [b], gamma=2, progress=False) for b in batches]
    g = a.groups["blocks.0.attn.qk"]
    assert torch.allclose(whole.classes[g.classes], sum(p.classes[g.classes] for p in parts))
    # (inputs, labels) pairs from a DataLoader read the same as bare tensors
    pairs = [(b, torch.zeros(3, dtype=torch.long)) for b in batches]
    assert torch.equal(compute_scores(a, "snp", pairs, gamma=2, progress=False).classes, whole.classes)


def test_calibration_qk_score_matches_naive_on_the_model(vit):
    """End to end: the q/k scores equal the naive formula on the model's own q and k."""
    x = torch.randn(1, 3, 32, 32)
    a = snp_fx.analyze(vit, x)
    s = compute_scores(a, "snp", [x], gamma=3, progress=False)
    blk = vit.blocks[0]
    h = blk.norm1(torch.cat([vit.cls_token, vit.patch_embed(x).flatten(2).transpose(1, 2)], 1) + vit.pos_embed)
    q = blk.attn.q(h)[0].view(-1, 4, 8)
    k = blk.attn.k(h)[0].view(-1, 4, 8)
    g = a.groups["blocks.0.attn.qk"]
    for head in range(4):
        ref = naive_qk_scores(q[:, head].detach(), k[:, head].detach(), 3)
        assert torch.allclose(s.classes[g.classes[head]], ref, atol=1e-5)


def test_every_criterion_prunes(vit):
    x = torch.randn(2, 3, 32, 32)
    for imp in ("snp", "l1", "l2", "gm", "random", "reverse"):
        pruned = snp_fx.prune(vit, x, ratios={"qk": 0.5, "v": 0.5, "ffn": 0.5, "residual": 0.25, "heads": 0.25},
                              importance=imp, progress=False)
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in vit.parameters())
    snp_plan = snp_fx.plan(vit, x, ratios={"qk": 0.5}, progress=False)
    rev_plan = snp_fx.plan(vit, x, ratios={"qk": 0.5}, importance="reverse", progress=False)
    keep = snp_plan.groups["blocks.0.attn.qk"]["keep"][0]
    drop = rev_plan.groups["blocks.0.attn.qk"]["keep"][0]
    assert not set(keep) & set(drop)  # reverse keeps exactly what snp removes


def test_calibration_errors(vit):
    x = torch.randn(2, 3, 32, 32)
    a = snp_fx.analyze(vit, x)
    with pytest.raises(snp_fx.SNPError, match="empty"):
        compute_scores(a, "snp", [], progress=False)
    with pytest.raises(snp_fx.SNPError, match="batch 1 does not run"):
        compute_scores(a, "snp", [x, torch.randn(2, 3, 16, 16)], progress=False)
    with pytest.raises(snp_fx.SNPError, match="gamma=9"):
        compute_scores(a, "snp", [x], gamma=9, progress=False)
    with pytest.raises(snp_fx.SNPError, match="unknown importance"):
        compute_scores(a, "magic")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(snp_fx.SNPError, match="NaN/inf at node"):
        compute_scores(a, "snp", [bad], progress=False)
