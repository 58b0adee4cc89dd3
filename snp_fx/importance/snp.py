"""SNP's attention-score-preserving q/k pair score, fast and exact.

For one head and one input, S = Q K^T (N x N) with Q, K of shape (N, d).
With Q = Qq Rq and K = Qk Rk, S = Qq (Rq Rk^T) Qk^T, and the SVD of the
d x d core Rq Rk^T = U diag(s) V^T gives the singular vectors of S:
u_j = Qq U_j, v_j = Qk V_j.  The paper's score of pair i is

    w_i = sum_{j <= gamma} |cos(u_j v_j^T, Q_i K_i^T)|
        = sum_j |U_j . Rq_i| |V_j . Rk_i| / (|Rq_i| |Rk_i|)

since u_j . Q_i = U_j . Rq_i and |Q_i| = |Rq_i|: no N x N matrix is formed.
"""
from __future__ import annotations

import contextlib

import torch

from ..precision import wide


@contextlib.contextmanager
def one_thread():
    """Batched linear algebra on many small matrices (d x d per head) runs on one thread: measured,
    a (32, 64, 64) float64 eigh took 0.03 s on one thread and 0.2-2.7 s on two of a loaded 2-core
    machine (the threads split each tiny matrix and wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def qk_pair_scores(q: torch.Tensor, k: torch.Tensor, gamma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (P, d) of every pair index for P independent (head, input) slices.

    ``q``: (P, Nq, d), ``k``: (P, Nk, d).  Also returns ||Q K^T||_F^2 per slice
    (the head's score energy, used for head pruning).

    Only d x d matrices are factorised: with Gram matrices Gq = Q^T Q,
    Gk = K^T K and Gq = Rq^T Rq (Cholesky), the left singular vectors of S
    are u_j = Q Rq^-1 U_j for the eigenvectors U_j of M = Rq Gk Rq^T
    (eigenvalues s_j^2), so U_j . Rq_i = u_j . Q_i and
    v_j . K_i = (U_j^T Rq Gk)_i / s_j.  Rank-deficient slices fall back to QR.
    """
    q, k = wide(q), wide(k)  # float16 / bfloat16 operands: the sums run in float32
    gq = (q.transpose(-1, -2) @ q).double()  # the N-long sums in the input precision: the hot part
    gk = (k.transpose(-1, -2) @ k).double()
    with one_thread():
        return _scores_from_grams(q, k, gq, gk, gamma)


def _scores_from_grams(q, k, gq, gk, gamma: int):
    lq, info = torch.linalg.cholesky_ex(gq)
    d = gq.shape[-1]
    # Q^T Q is singular with fewer tokens than dims, and numerically so when Q is ill conditioned
    # (the Cholesky then "succeeds" on rounding noise): those slices take the direct path
    diag = torch.diagonal(lq, dim1=-2, dim2=-1).abs()
    bad = (info != 0) | (diag.amin(-1) <= 1e-3 * diag.amax(-1)) | (min(q.shape[-2], k.shape[-2]) < d)
    if bool(bad.all()):
        return _direct_scores(q, k, gamma)
    rq = lq.transpose(-1, -2)
    if bool(bad.any()):  # keep the factorisation well defined; those slices are redone exactly below
        rq = torch.where(bad[:, None, None], torch.eye(rq.shape[-1], dtype=rq.dtype).expand_as(rq), rq)
    m = rq @ gk @ rq.transpose(-1, -2)
    m = (m + m.transpose(-1, -2)) / 2
    evals, evecs = torch.linalg.eigh(m)                # ascending; s_j^2 spans twice the exponents of s_j
    g = min(gamma, evals.shape[-1])
    top = evecs[..., :, -g:].flip(-1)                  # (P, d, g)
    sig = evals[..., -g:].flip(-1).clamp_min(0).sqrt()  # (P, g)
    a = top.transpose(-1, -2) @ rq                     # (P, g, d): u_j . Q_i
    b = (a @ gk) / sig.clamp_min(1e-30)[..., None]     # (P, g, d): v_j . K_i
    b = torch.where(sig[..., None] > 0, b, torch.zeros_like(b))
    norm = (torch.diagonal(gq, dim1=-2, dim2=-1) * torch.diagonal(gk, dim1=-2, dim2=-1)).clamp_min(0).sqrt()
    w = (a.abs() * b.abs()).sum(-2) / norm.clamp_min(1e-30)
    w = torch.where(norm > 0, w, torch.zeros_like(w))
    energy = evals.clamp_min(0).sum(-1)                # ||S||_F^2 = sum of s_j^2
    if bool(bad.any()):  # rank-deficient Q (fewer tokens than dims, zero columns): exact, directly
        w, energy = w.clone(), energy.clone()
        w[bad], energy[bad] = _direct_scores(q[bad], k[bad], gamma)
    return w, energy


def _direct_scores(q: torch.Tensor, k: torch.Tensor, gamma: int):
    """The same score from the SVD of S = Q K^T itself (exact for any rank; N x N)."""
    q, k = q.double(), k.double()
    u, s, vh = torch.linalg.svd(q @ k.transpose(-1, -2))
    g = min(gamma, s.shape[-1])
    a = u[..., :, :g].transpose(-1, -2) @ q            # u_j . Q_i
    b = vh[..., :g, :] @ k                             # v_j . K_i
    norm = q.norm(dim=-2) * k.norm(dim=-2)
    w = (a.abs() * b.abs()).sum(-2) / norm.clamp_min(1e-30)
    return torch.where(norm > 0, w, torch.zeros_like(w)), s.pow(2).sum(-1)


def redundancy_scores(rows: torch.Tensor) -> torch.Tensor:
    """SNP's redundancy score of each row: sum over all rows l of (1 - |cos(row_r, row_l)|)."""
    rows = wide(rows)
    x = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)  # in the weights' precision (float32 at least)
    return x.shape[0] - (x @ x.T).abs_().sum(1, dtype=torch.float64)


def geometric_median_scores(rows: torch.Tensor) -> torch.Tensor:
    """FPGM: sum of distances to all other rows (rows near the geometric median go first)."""
    x = rows.double()
    return torch.cdist(x, x).sum(1)
