"""Low-rank correction of a quantization residual, initialised by an activation-weighted SVD.

For a residual E = W - Q [R, C], input Gram matrix H = E[x x^T] = L L^T and optional output-channel
weights f [R] (loss sensitivity of each output), the rank-r factors minimising
    sum_r f_r * || (E - U V)_r x ||^2   =   || diag(sqrt f) (E - U V) L ||_F^2
come from the SVD of  diag(sqrt f) E L = P S Q^T:  U = diag(1/sqrt f) P_r S_r^1/2,  V = S_r^1/2 Q_r^T L^-1.
The same SVD says how much weighted error each rank removes (`captured`), which the allocator uses.
"""

from __future__ import annotations

import torch

DAMP = 0.01  # relative diagonal damping of H before its Cholesky factor
ROW_FLOOR = 1e-2  # row weights are clamped to this share of their mean (no row is ignored entirely)


def _whiten(h: torch.Tensor | None, device) -> torch.Tensor | None:
    if h is None:
        return None
    h = h.to(device=device, dtype=torch.float64, copy=True)  # one float64 copy (8960 columns: 642 MB)
    d = torch.diagonal(h)
    d[d <= 0] = 1.0
    d += DAMP * d.mean()
    lower = torch.linalg.cholesky(h)
    del h, d
    return lower.float()  # lower L [C, C]


def _row_weights(f: torch.Tensor | None, device) -> torch.Tensor | None:
    if f is None:
        return None
    f = f.float().to(device)
    return (f / f.mean().clamp_min(1e-30)).clamp_min(ROW_FLOOR).sqrt()


def weighted_svd(resid: torch.Tensor, rank: int, h: torch.Tensor | None = None,
                 f: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (U [R, r], V [r, C]) float32 of the best rank-r approximation of resid in the weighted norm."""
    e = resid.float()
    rows, cols = e.shape
    rank = min(rank, rows, cols)
    lower = _whiten(h, e.device)
    rw = _row_weights(f, e.device)
    a = e if lower is None else e @ lower
    if rw is not None:
        a = a * rw.unsqueeze(1)
    p, s, qt = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    v = root.unsqueeze(1) * qt[:rank]
    if rw is not None:
        u = u / rw.unsqueeze(1)
    if lower is not None:  # V = S^1/2 Q^T L^-1  <=>  L^T V^T = (S^1/2 Q^T)^T
        v = torch.linalg.solve_triangular(lower.T, v.T, upper=True).T
    return u.contiguous(), v.contiguous()


def captured(resid: torch.Tensor, ranks: list[int], h: torch.Tensor | None = None,
             f: torch.Tensor | None = None) -> dict[int, float]:
    """Share of the weighted residual energy that the best rank-r correction removes, for each r."""
    e = resid.float()
    lower = _whiten(h, e.device)
    rw = _row_weights(f, e.device)
    a = e if lower is None else e @ lower
    if rw is not None:
        a = a * rw.unsqueeze(1)
    total = a.square().sum().item()
    top = max(ranks)
    if total <= 0 or top <= 0:
        return {r: 0.0 for r in ranks}
    # exact singular values from the smaller Gram matrix (an eigendecomposition of at most C x C is cheaper
    # and steadier than a randomized SVD's QR steps on a busy CPU)
    g = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    ev = torch.linalg.eigvalsh(g.double()).flip(0).clamp_min(0)
    energy = ev.cumsum(0)
    return {r: (min(energy[min(r, len(energy)) - 1].item() / total, 1.0) if r > 0 else 0.0) for r in ranks}
