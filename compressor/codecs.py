"""Scalar codecs: how the grid of 2**b levels is chosen. Reconstruction is shared (ucformat.qtensor).

Every codec normalises each block of `block_size` weights along the input (last) dimension by a scale,
stored as fp16 (or, with scale_bits 8, the nearest 8-bit scale code: ucformat/scalecodes.py), and maps each
normalised weight to the nearest level of a per-matrix grid. The codecs differ in the grid:
  gsq      learned: deterministic 1-D k-means (fixed seed, CPU) on the absmax-normalised weights, each weighted
           by its block's scale squared, so the grid minimises the reconstruction MSE of W itself; with
           `search` (--scale-search) each block's scale is then searched for that grid (fitted_scales);
  uniform  fixed: 2**b evenly spaced levels on [-1, 1], absmax scales (symmetric round-to-nearest baseline).
"""

from __future__ import annotations

from typing import Callable

import torch

from ucformat import bitpack, scalecodes
from ucformat import rotation as rot
from ucformat.qtensor import QuantizedTensor

GridFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

KMEANS_SAMPLES = 1 << 18  # values per matrix the grid is fitted on (subsampled with a fixed seed)
KMEANS_ITERS = 30
KMEANS_SEED = 0
# Block-scale search (fitted_scales): candidate scales as multiples of the one that puts the block's absmax on
# the grid's outermost level. Measured on SmolLM2 (bench/scale_search.py): output error of GPTQ rounding -5% at
# 4 bits, -9% at 5 bits against absmax scales; weight error of nearest rounding -12% and -17%.
SCALE_SEARCH = torch.linspace(0.84, 1.12, 15)


def uniform_grid(values: torch.Tensor, weights: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, levels, dtype=torch.float32)


def kmeans_grid(values: torch.Tensor, weights: torch.Tensor, levels: int, samples: int = KMEANS_SAMPLES) -> torch.Tensor:
    """Weighted Lloyd iterations in 1-D, initialised at quantiles. values, weights: float32 [n], CPU."""
    values = values.float().cpu().reshape(-1)
    weights = weights.float().cpu().reshape(-1)
    if values.numel() > samples:
        g = torch.Generator().manual_seed(KMEANS_SEED)
        idx = torch.randperm(values.numel(), generator=g)[:samples]
        values, weights = values[idx], weights[idx]
    q = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    grid = torch.quantile(values.double(), q).float()
    weights = weights.clamp_min(1e-30)  # all-zero blocks still pull their (zero) values
    for _ in range(KMEANS_ITERS):
        assign = nearest(values, grid)
        wsum = torch.zeros(levels).index_add_(0, assign, weights)
        vsum = torch.zeros(levels).index_add_(0, assign, weights * values)
        new = torch.where(wsum > 0, vsum / wsum.clamp_min(1e-30), grid)
        new, _ = torch.sort(new)
        if torch.equal(new, grid):
            break
        grid = new
    return grid


GRIDS: dict[str, GridFn] = {"gsq": kmeans_grid, "uniform": uniform_grid}


def nearest(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted grid (ties go to the lower level)."""
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids.to(values.device), right=False)


def block_scales(w: torch.Tensor, block_size: int, scale_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """w float32 [*lead, rows, cols] -> (fp16 scales [*lead, rows, nb], normalised w, same shape as w).
    scale_bits 8: each absmax snapped to the nearest scale its row can store as an 8-bit code."""
    absmax = _blocks(w, block_size).abs().amax(-1)
    scales = scalecodes.snap(absmax) if scale_bits == 8 else absmax.to(torch.float16)
    # Normalise by the fp16-rounded scale so that reconstruction uses exactly the stored number.
    return scales, normalise(w, scales, block_size)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., cols] -> [..., ceil(cols / block_size), block_size], the last block zero-padded."""
    pad = (-x.shape[-1]) % block_size
    return (torch.nn.functional.pad(x, (0, pad)) if pad else x).reshape(*x.shape[:-1], -1, block_size)


def fitted_scales(w: torch.Tensor, grid: torch.Tensor, block_size: int, col_weight: torch.Tensor | None = None,
                  scale_bits: int = 16, search: bool = True, factors: torch.Tensor = SCALE_SEARCH) -> torch.Tensor:
    """Block scales chosen for a fixed grid: fp16 [rows, nb] for w float32 [rows, cols], sorted grid [L].

    Each block tries its absmax scale and the scales that put its absmax at `factors` times the grid's
    outermost level, and keeps the one whose nearest-level rounding has the least squared error, each
    column weighted by col_weight (its input energy E[x_j^2], when known). The absmax scale itself is
    always a candidate, so no block rounds worse than before (as llama.cpp's k-quants search their
    scales; here the grid is per matrix and learned, so the search is along the block's scale alone).
    With scale_bits 8 the chosen scales are then snapped to what a row can store. search False: absmax."""
    if not search:
        return block_scales(w, block_size, scale_bits)[0]
    wb = _blocks(w.float(), block_size)
    cw = _blocks(torch.ones(w.shape[-1], device=w.device) if col_weight is None else col_weight.float().to(w.device),
                 block_size)
    grid = grid.float().to(w.device)
    absmax = wb.abs().amax(-1)
    top = grid.abs().max().clamp_min(1e-30)
    best_s = absmax.to(torch.float16).float()
    best_e = None
    for f in [None, *factors.tolist()]:
        s = best_s if f is None else (absmax * (f / top)).to(torch.float16).float()
        safe = s.clamp_min(1e-30).unsqueeze(-1)
        q = grid[nearest(wb / safe, grid)] * s.unsqueeze(-1)
        e = ((wb - q).square() * cw).sum(-1)
        if best_e is None:
            best_e = e
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, s, best_s)
    return scalecodes.snap(best_s) if scale_bits == 8 else best_s.to(torch.float16)


def normalise(w: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """w float32 [*lead, rows, cols] divided by its fp16 block scales [*lead, rows, nb] (0 where a scale is 0)."""
    s = scales.float().repeat_interleave(block_size, -1)[..., :w.shape[-1]]
    return torch.where(s > 0, w / s.clamp_min(1e-30), torch.zeros_like(w))


def quantize(w: torch.Tensor, bits: int, block_size: int, codec: str, scale_bits: int = 16, rotation: int = 0,
             seed: int = 0, name: str = "", search: bool = False) -> QuantizedTensor:
    """w: [*lead, rows, cols] (any float dtype, any device) -> QuantizedTensor with CPU parts. With `rotation`
    (and cols divisible by it), W R is rounded instead, R's signs drawn from (seed, name) (SPEC.md 2.5).
    search: block scales searched for the grid (fitted_scales) instead of each block's absmax."""
    if codec not in GRIDS:
        raise ValueError(f"unknown codec {codec!r}; one of {', '.join(GRIDS)}")
    if bits not in bitpack.WIDTHS:
        raise ValueError(f"unsupported bits {bits}; one of {bitpack.WIDTHS}")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if scale_bits not in scalecodes.WIDTHS:
        raise ValueError(f"unsupported scale_bits {scale_bits}; one of {scalecodes.WIDTHS}")
    shape = tuple(w.shape)
    *lead, rows, cols = shape
    w = w.float()
    signs = None
    if rotation and rot.fits(cols, rotation):
        signs = rot.random_signs(cols, seed, name).to(w.device).expand(*lead, cols)
        w = rot.rotate(w, signs, rotation)
    absmax, normed = block_scales(w, block_size, scale_bits)
    weight = absmax.float().repeat_interleave(block_size, -1)[..., :cols] ** 2
    n_mat = 1
    for d in lead:
        n_mat *= d
    w_m = w.reshape(n_mat, rows, cols)
    normed_m = normed.reshape(n_mat, rows, cols)
    weight_m = weight.reshape(n_mat, rows, cols)
    grids, codes, scales = [], [], []
    for m in range(n_mat):
        grid = GRIDS[codec](normed_m[m], weight_m[m], 2**bits).to(w.device)
        s = fitted_scales(w_m[m], grid, block_size, None, scale_bits, search)
        grids.append(grid)
        scales.append(s)
        codes.append(nearest(normalise(w_m[m], s, block_size), grid).to(torch.uint8))
    scales = torch.stack(scales).reshape(absmax.shape)
    grid_t = torch.stack(grids).reshape(*lead, 2**bits)
    codes_t = torch.stack(codes).reshape(*lead, rows, cols)
    return QuantizedTensor(
        shape=shape, bits=bits, block_size=block_size,
        codes=bitpack.pack(codes_t, bits).cpu(), scales=scales.cpu(), grid=grid_t.float().cpu(), scale_bits=scale_bits,
        rot_signs=None if signs is None else rot.pack_signs(signs.cpu()), rotation=0 if signs is None else rotation,
    )
