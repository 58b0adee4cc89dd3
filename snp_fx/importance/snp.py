"""SNP's attention-score-preserving q/k pair score, fast and exact.

For one head and one input, S = Q K^T (N x N) with Q, K of shape (N, d).
With Q = Qq Rq and K = Qk Rk (QR), S = Qq (Rq Rk^T) Qk^T, and the SVD of the
d x d core Rq Rk^T = U diag(s) V^T gives the singular vectors of S:
u_j = Qq U_j, v_j = Qk V_j.  The paper's score of pair i is

    w_i = sum_{j <= gamma} |cos(u_j v_j^T, Q_i K_i^T)|
        = sum_j |U_j . Rq_i| |V_j . Rk_i| / (|Rq_i| |Rk_i|)

since u_j . Q_i = U_j . Rq_i and |Q_i| = |Rq_i|: no N x N matrix is formed.
"""
from __future__ import annotations

import torch


def qk_pair_scores(q: torch.Tensor, k: torch.Tensor, gamma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (P, d) of every pair index for P independent (head, input) slices.

    ``q``: (P, Nq, d), ``k``: (P, Nk, d).  Also returns ||Q K^T||_F^2 per slice
    (the head's score energy, used for head pruning).
    """
    q = q.double()
    k = k.double()
    rq = torch.linalg.qr(q, mode="r").R if q.shape[-2] >= q.shape[-1] else q
    rk = torch.linalg.qr(k, mode="r").R if k.shape[-2] >= k.shape[-1] else k
    if rq.shape[-2] != rk.shape[-2]:  # fewer tokens than dims: work with the factors themselves
        rq, rk = q, k
    core = rq @ rk.transpose(-1, -2)
    u, s, vh = torch.linalg.svd(core)
    g = min(gamma, s.shape[-1])
    a = u[..., :, :g].transpose(-1, -2) @ rq          # (P, g, d): U_j . Rq_i
    b = vh[..., :g, :] @ rk                           # (P, g, d): V_j . Rk_i
    norm = rq.norm(dim=-2) * rk.norm(dim=-2)          # |Q_i| |K_i|
    w = (a.abs() * b.abs()).sum(-2) / norm.clamp_min(1e-30)
    w = torch.where(norm > 0, w, torch.zeros_like(w))
    energy = s.pow(2).sum(-1)
    return w, energy


def redundancy_scores(rows: torch.Tensor) -> torch.Tensor:
    """SNP's redundancy score of each row: sum over all rows l of (1 - |cos(row_r, row_l)|)."""
    x = rows.double()
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    c = (x @ x.T).abs()
    return (1.0 - c).sum(1)


def geometric_median_scores(rows: torch.Tensor) -> torch.Tensor:
    """FPGM: sum of distances to all other rows (rows near the geometric median go first)."""
    x = rows.double()
    return torch.cdist(x, x).sum(1)
