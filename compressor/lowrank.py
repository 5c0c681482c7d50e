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


def _whiten(h: torch.Tensor | None, cols: int, device) -> torch.Tensor | None:
    if h is None:
        return None
    h = h.double().to(device).clone()
    d = torch.diagonal(h)
    d[d <= 0] = 1.0
    d += DAMP * d.mean()
    return torch.linalg.cholesky(h).float()  # lower L [C, C]


def _row_weights(f: torch.Tensor | None, rows: int, device) -> torch.Tensor | None:
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
    lower = _whiten(h, cols, e.device)
    rw = _row_weights(f, rows, e.device)
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


def whitener(h: torch.Tensor | None, device="cpu") -> torch.Tensor | None:
    """Lower Cholesky factor L of the damped H (None without activation statistics)."""
    return _whiten(h, 0, device)


def captured(resid: torch.Tensor, ranks: list[int], h: torch.Tensor | None = None,
             f: torch.Tensor | None = None, lower: torch.Tensor | None = None) -> dict[int, float]:
    """Share of the weighted residual energy that the best rank-r correction removes, for each r.
    `lower` (from `whitener(h)`) saves refactoring H when called for many residuals of one matrix."""
    e = resid.float()
    lower = _whiten(h, e.shape[1], e.device) if lower is None else lower
    rw = _row_weights(f, e.shape[0], e.device)
    a = e if lower is None else e @ lower
    if rw is not None:
        a = a * rw.unsqueeze(1)
    total = a.square().sum().item()
    top = max(ranks)
    if total <= 0 or top <= 0:
        return {r: 0.0 for r in ranks}
    q = min(top + 8, *a.shape)
    with torch.random.fork_rng(devices=[]):  # svd_lowrank sketches with the global RNG: fix it, restore it
        torch.manual_seed(0)
        _, s, _ = torch.svd_lowrank(a, q=q, niter=2)
    energy = s.square().cumsum(0)
    return {r: (energy[min(r, len(energy)) - 1].item() / total if r > 0 else 0.0) for r in ranks}
