"""Exact attention-error selection of q/k pairs (beyond the paper).

Removing the pairs marked by the 0/1 vector r from one head changes its
pre-softmax scores by sum_i r_i Q_i K_i^T, whose squared Frobenius norm,
summed over the calibration inputs, is

    err(r) = r^T M r,   M = sum_inputs Gq * Gk   (Gq = Q^T Q, Gk = K^T K, elementwise product)

(calibrate.py accumulates M per head).  The SNP score ranks pairs one at a
time; this chooses the removed *set* for the count the budget allows: greedy
removal of the pair that raises err least, then swaps of a removed and a kept
pair while one lowers it.  Pairs are cheap to compare: d <= 128 per head.
"""
from __future__ import annotations

import torch

from ..errors import SNPError


def exact_removal(m: torch.Tensor, n_remove: int, max_swaps: int | None = None) -> torch.Tensor:
    """Bool mask (n,) of the units to remove minimising r^T m r with |r| = n_remove."""
    n = m.shape[0]
    m = m.double()
    removed = torch.zeros(n, dtype=torch.bool)
    if n_remove <= 0:
        return removed
    if n_remove >= n:
        return ~removed
    g = torch.zeros(n, dtype=torch.float64)   # g = m r
    diag = m.diagonal()
    for _ in range(n_remove):  # greedy: err(r + e_j) = err + 2 g_j + m_jj
        cost = 2 * g + diag
        cost[removed] = float("inf")
        j = int(torch.argmin(cost))
        removed[j] = True
        g += m[:, j]
    err = float(g[removed].sum())
    # swaps: remove j, put back i: err' = err - 2 g_i + m_ii + 2 g_j + m_jj - 2 m_ij
    for _ in range(max_swaps if max_swaps is not None else 4 * n):
        i_idx = removed.nonzero().flatten()
        j_idx = (~removed).nonzero().flatten()
        delta = (-2 * g[i_idx] + diag[i_idx])[:, None] + (2 * g[j_idx] + diag[j_idx])[None, :] \
            - 2 * m[i_idx][:, j_idx]
        best = int(torch.argmin(delta))
        d = float(delta.reshape(-1)[best])
        if not d < -1e-12 * max(abs(err), 1e-300):
            break
        i, j = int(i_idx[best // j_idx.numel()]), int(j_idx[best % j_idx.numel()])
        removed[i], removed[j] = False, True
        g += m[:, j] - m[:, i]
        err += d
    return removed


def removal_error(m: torch.Tensor, removed: torch.Tensor) -> float:
    """r^T m r for the bool mask ``removed``."""
    r = removed.double()
    return float(r @ m.double() @ r)


def exact_keep(m: torch.Tensor, row: torch.Tensor, n_keep: int) -> list[int]:
    """Kept positions (sorted) of one head's row of class ids, keeping ``n_keep`` positions.

    ``m`` (E, E) is over positions; positions sharing a class (coupled channels)
    are kept or removed together, so the selection works on class indicators."""
    row = row.reshape(-1)
    uniq, inverse = torch.unique(row, return_inverse=True)
    p = torch.zeros(uniq.numel(), row.numel(), dtype=torch.float64)
    p[inverse, torch.arange(row.numel())] = 1.0
    size = int(p.sum(1)[0])
    if not bool((p.sum(1) == size).all()) or n_keep % size:
        raise SNPError(f"exact selection needs whole classes: {n_keep} of {row.numel()} positions in "
                       f"classes of sizes {sorted(set(p.sum(1).long().tolist()))}")
    removed_cls = exact_removal(p @ m.double() @ p.T, uniq.numel() - n_keep // size)
    return sorted((~removed_cls[inverse]).nonzero().flatten().tolist())
