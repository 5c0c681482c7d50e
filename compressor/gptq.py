"""Activation-aware rounding (GPTQ-style error feedback) onto a fixed grid with per-block scales.

Plain rounding picks the nearest level for every weight alone. Here the columns of W [R, C] are rounded
in order and each rounding error is pushed onto the columns not yet rounded, through the inverse of the
input Gram matrix H = E[x x^T] [C, C], so the error of the *output* W x is minimised rather than that of
the weights (Frantar et al., 2022, "GPTQ"). With act_order (the default) the block scales are fixed up
front: the searched ones the caller passes (codecs.fitted_scales), or each block's absmax; without it, a
block's scale is its absmax when rounding reaches it, taken from the already-updated weights. Scales are
rounded to fp16 as stored. Rows are independent.
"""

from __future__ import annotations

import math

import torch

from . import codecs

DAMP = 0.01  # added to H's diagonal, relative to its mean: keeps the inverse well conditioned
LAZY = 128  # columns whose updates are batched into one matrix product


def inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag) I)^-1, float32 [C, C]. Dead columns get diag 1.

    Works in float64 holding at most two C x C matrices at a time (8960 columns: 1.3 GB rather than 2.9): each
    factor is freed once the next is made, and a failed try rebuilds the damped matrix from h and its diagonal."""
    diag = torch.diagonal(h).double().clone()
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    for _ in range(4):  # raise the damping until it factors (nearly singular Gram matrices)
        a = h.to(torch.float64, copy=True)
        a.diagonal().copy_(diag)
        try:
            lower = torch.linalg.cholesky(a)
            del a
            inv = torch.cholesky_inverse(lower)
            del lower
            upper = torch.linalg.cholesky(inv, upper=True)
            del inv
            return upper.float()
        except torch.linalg.LinAlgError:
            diag += 10 * damp * diag.mean()
    raise ValueError("input Gram matrix is not positive definite even with damping")


def round_gptq(w: torch.Tensor, h: torch.Tensor, grid: torch.Tensor, block_size: int,
               act_order: bool = True, scale_bits: int = 16,
               scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w float32 [R, C], h [C, C], sorted grid [L] (or one per row, [R, L]: several grids at once)
    -> (codes uint8 [R, C], fp16 scales [R, ceil(C/B)]).

    act_order: round the columns with the largest input energy first (their errors are then spread over
    the many columns still free); block scales are then fixed up front, from w, as they must not depend on
    a column order that differs from the blocks'. 8-bit scales (scale_bits 8) are always fixed up front:
    a row's codes are relative to its largest scale, which must be known before the first block.
    scales: fixed fp16 block scales [R, nb] to round against (codecs.fitted_scales; static orders only),
    instead of each block's absmax.
    """
    if w.device.type != "cpu":
        return _round_gptq(w, h, grid, block_size, act_order, scale_bits, scales)
    # thousands of tiny ops: one thread avoids OpenMP barrier waits (up to 100x faster on a busy CPU)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _round_gptq(w, h, grid, block_size, act_order, scale_bits, scales)
    finally:
        torch.set_num_threads(threads)


def round_many(jobs: list[tuple[torch.Tensor, torch.Tensor]], h: torch.Tensor, block_size: int,
               act_order: bool = True, scale_bits: int = 16,
               search: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Several matrices sharing one input (q/k/v, gate/up, or one matrix at several widths) rounded in
    one pass: jobs of (rows [n, C], sorted grid [L]); their rows are stacked, each with its own grid
    padded by +inf levels that are never nearest. Same result as one call per job, a fraction of the
    per-column overhead. search: each job's block scales are searched for its grid first (codecs.fitted_scales,
    columns weighted by h's diagonal). Returns (codes uint8 [n, C], fp16 scales [n, nb]) per job."""
    width = max(g.numel() for _, g in jobs)
    stacked = torch.cat([x.float() for x, _ in jobs])
    grids = torch.cat([torch.nn.functional.pad(g.float(), (0, width - g.numel()), value=math.inf).expand(len(x), width)
                       for x, g in jobs])
    fixed = None
    if search and (act_order or scale_bits == 8):
        col = torch.diagonal(h).clamp_min(0)
        fixed = torch.cat([codecs.fitted_scales(x.float(), g, block_size, col, scale_bits) for x, g in jobs])
    codes, scales = round_gptq(stacked, h, grids, block_size, act_order, scale_bits, fixed)
    sizes = [len(x) for x, _ in jobs]
    return list(zip(codes.split(sizes), scales.split(sizes)))


def _round_gptq(w, h, grid, block_size, act_order, scale_bits, fixed=None):
    w = w.float().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) <= 0
    w[:, dead] = 0.0
    grid = grid.float().to(w.device)
    if grid.dim() == 1:
        nearest, level = (lambda x: codecs.nearest(x, grid)), (lambda c: grid[c])
    else:
        nearest, level = _row_grids(grid)
    nb = -(-cols // block_size)
    static = act_order or scale_bits == 8
    if static:
        perm = (torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order
                else torch.arange(cols)).to(w.device)
        scales = codecs.block_scales(w, block_size, scale_bits)[0] if fixed is None else fixed  # fp16 [R, nb], static
        col_scale = scales.float()[:, perm // block_size]  # [R, C] in rounding order
        w, h = w[:, perm], h[perm][:, perm]
    else:
        scales = torch.zeros(rows, nb, dtype=torch.float16, device=w.device)
    hinv = inverse_cholesky(h).to(w.device)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    lazy = block_size * max(1, LAZY // block_size)  # a scale block never straddles two lazy batches
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        s = None
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                s = col_scale[:, j]
            elif j % block_size == 0:  # the block's scale from its columns as updated so far
                s16 = w1[:, i:i + block_size].abs().amax(1).to(torch.float16)
                scales[:, j // block_size] = s16
                s = s16.float()
            col = w1[:, i]
            normed = torch.where(s > 0, col / s.clamp_min(1e-30), torch.zeros_like(col))
            c = nearest(normed)
            codes[:, j] = c.to(torch.uint8)
            err = (col - level(c) * s) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if static:
        out = torch.empty_like(codes)
        out[:, perm] = codes
        codes = out
    return codes, scales


def _row_grids(grid: torch.Tensor):
    """nearest/level functions for one sorted grid per row [R, L]."""
    mids = ((grid[:, 1:] + grid[:, :-1]) / 2).contiguous()

    def nearest(x: torch.Tensor) -> torch.Tensor:  # ties to the lower level, as codecs.nearest
        return torch.searchsorted(mids, x.unsqueeze(1).contiguous()).squeeze(1)

    def level(c: torch.Tensor) -> torch.Tensor:
        return grid.gather(1, c.unsqueeze(1)).squeeze(1)

    return nearest, level
