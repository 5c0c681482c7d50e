"""The GPU matmul that reads a pack's codes directly (Triton): y = x W^T for a quantized 2-D weight, no
weight materialised. The CUDA counterpart of cpu_qgemv.py, dispatched by qmatmul.py for decode (M <= 16).

    y = linear(x2, q, bias)     # x2 [M, K] float32 / bfloat16 / float16 -> [M, N] in x's dtype

Layout read (SPEC.md 2.1, 2.2): codes uint8 [N, K8*b/8] (K8 = K rounded up to 8), the row's bit planes
one after the other (bitpack.PLANES: plane 0 of width P0 in bytes [0, K8*P0/8), plane 1 of width P1
after it); a plane of width p packs 8/p codes a byte, the first in the lowest bits. scales float16
[N, ceil(K/B)], grid float32 [2^b]. The weight is W[n, j] = grid[code] * scale[n, j // B] (one float32
product, as in the reference), and for a weight stored rotated W = that times R^T: the kernel sees
R^T x, computed here once per call with rotation.py's torch functions (W x = deq(codes) (R^T x)).

Tiling: program (n, s, m) owns BLOCK_N output rows x BLOCK_M activation rows and walks its share s of
the K tiles (BLOCK_K columns each). Per tile it loads BLOCK_K*p/8 contiguous bytes a row and plane,
splits each byte into its 8/p codes with shifts (a [BLOCK_N, bytes, 8/p] tensor reshaped to
[BLOCK_N, BLOCK_K], order kept), gathers grid[code] from the 2^b-entry table, multiplies by the block
scale and accumulates in float32: a row-wise multiply-sum for one activation row (the GEMV), a broadcast
multiply-sum over [BLOCK_M, BLOCK_N, BLOCK_K] for 2-8 rows, tl.dot (IEEE fp32, no TF32) for 9-16 (padded
to 16; more rows take a third grid axis). BLOCK_K divides B where B has a power-of-two factor >= 16, so
a tile's scale is one per row; other block sizes gather a scale per weight. Split-K (the second grid axis)
only when the N tiles alone would leave SMs idle: partial sums go to a float32 [S, M, N] buffer reduced in
torch (no atomics, so results stay deterministic). Overlay rows and low-rank factors are qmatmul.corrections' job.
"""

from __future__ import annotations

import functools
import os

import torch

from . import bitpack, rotation as rot
from .qtensor import QuantizedTensor

try:
    import triton
    import triton.language as tl

    _WHY_NOT: str | None = None
except ImportError as e:  # the module still imports: supports()/available() answer, linear() is not called
    triton = tl = None
    _WHY_NOT = f"Triton is not importable ({e})"

# BLOCK_M -> (BLOCK_N, largest BLOCK_K), at 4 warps. A gathered weight costs several registers (64-bit
# gather addresses), so a tile holds 8 weights a thread: 55-125 registers and no spills in ptxas's report
# for sm_90 and sm_120 (compiled without a GPU; not yet timed on one).
_TILES = {1: (16, 64), 2: (16, 64), 4: (16, 64), 8: (8, 64), 16: (16, 64)}
_SPLITS_MAX = 16  # most K splits: each must still stream a few tiles


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


# The kernel calls Triton builtins and its own jit functions only, not tl.sum, tl.zeros or tl.cdiv (jit code
# in triton.language): the CPU interpreter (the tests) runs jit code only if it was decorated under
# TRITON_INTERPRET=1, and triton is often imported before that is set (building a transformers model
# imports it). Sums are tl.reduce with tl.sum's own combine function, which the interpreter recognises and
# hands to numpy (any other one it calls element by element: 6x slower tests).
_SUM = tl.standard._sum_combine if triton is not None else None


@_jit
def _plane(row_ptr, row_ok, byte0, plane_bytes, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of one plane (width P) of a tile: int32 [BLOCK_N, BLOCK_K] from BLOCK_K*P/8 bytes a row."""
    PER: tl.constexpr = 8 // P
    b = byte0 + tl.arange(0, BLOCK_K // PER)  # [BLOCK_K / PER] byte offsets in the plane
    raw = tl.load(row_ptr + b[None, :], mask=row_ok[:, None] & (b < plane_bytes)[None, :], other=0).to(tl.int32)
    shifts = tl.arange(0, PER) * P  # code i of a byte sits at bits i*P .. i*P+P-1
    codes = (raw[:, :, None] >> shifts[None, None, :]) & ((1 << P) - 1)  # [BLOCK_N, BLOCK_K / PER, PER]
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))  # column j = byte j // PER, slot j % PER


@_jit
def _qgemv_kernel(x_ptr, codes_ptr, scales_ptr, grid_ptr, bias_ptr, y_ptr,
                  M, N, K, x_stride, nbytes, nb, block, plane1_start, tiles_per_split,
                  P0: tl.constexpr, P1: tl.constexpr, HAS_BIAS: tl.constexpr, TILE_IN_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows (rows of W)
    row_ok = rows < N
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] activation rows
    m_ok = ms < M
    code_row = codes_ptr + rows.to(tl.int64) * nbytes  # [BLOCK_N]; int64: lm heads pass 2^31 bytes
    scale_row = scales_ptr + rows.to(tl.int64) * nb
    k8 = (K + 7) // 8 * 8  # codes per row as stored (zero padded)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    for t in range(t0, t1):
        cols = t * BLOCK_K + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_ok = cols < K
        code = _plane(code_row[:, None], row_ok, t * (BLOCK_K * P0 // 8), k8 * P0 // 8, P0, BLOCK_N, BLOCK_K)
        if P1 > 0:
            hi = _plane(code_row[:, None] + plane1_start, row_ok, t * (BLOCK_K * P1 // 8), k8 * P1 // 8,
                        P1, BLOCK_N, BLOCK_K)
            code = code | (hi << P0)
        level = tl.load(grid_ptr + code)  # [BLOCK_N, BLOCK_K] float32; masked bytes read as code 0
        if TILE_IN_BLOCK:  # the tile lies in one scale block: one scale a row
            s = tl.load(scale_row[:, None] + (t * BLOCK_K) // block, mask=row_ok[:, None], other=0.0)
        else:
            s = tl.load(scale_row[:, None] + (cols // block)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
        w = level * s.to(tl.float32)  # [BLOCK_N, BLOCK_K]: the reference's float32 weights
        x = tl.load(x_ptr + ms[:, None].to(tl.int64) * x_stride + cols[None, :],
                    mask=m_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        if BLOCK_M == 1:  # a GEMV: x broadcast over the tile's rows, summed along K
            acc += tl.reduce(w * x, 1, _SUM)[None, :]
        elif BLOCK_M < 16:  # [BLOCK_M, 1, BLOCK_K] x [1, BLOCK_N, BLOCK_K], summed along K
            acc += tl.reduce(x[:, None, :] * w[None, :, :], 2, _SUM)
        else:  # IEEE float32 (FMA): TF32 would round the weights to 10 bits
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        if pid_s == 0:  # added by split 0 only
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + pid_s * M * N + ms[:, None] * N + rows[None, :]  # y [S, M, N]; the store casts to y's dtype
    tl.store(out, acc, mask=m_ok[:, None] & row_ok[None, :])


def available() -> tuple[bool, str | None]:
    """(usable, why not): Triton importable, and CUDA present or the interpreter asked for (TRITON_INTERPRET=1,
    tensors on the CPU: the tests)."""
    if _WHY_NOT is not None:
        return False, _WHY_NOT
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, None
    return False, "no CUDA device (TRITON_INTERPRET=1 runs the Triton kernel on the CPU interpreter)"


def supports(q: QuantizedTensor) -> bool:
    """A 2-D weight whose parts share one device, scales float16, grid float32, nothing requiring grad."""
    parts = [q.codes, q.scales, q.grid] + ([q.rot_signs] if q.rotation else [])
    return (len(q.shape) == 2 and q.bits in bitpack.PLANES and q.codes.dtype == torch.uint8
            and q.scales.dtype == torch.float16 and q.grid.dtype == torch.float32
            and all(t.device == q.codes.device and not t.requires_grad for t in parts))


def _tiles(m: int, block: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, tile in one scale block) for m activation rows and scale block size."""
    bm = min(triton.next_power_of_2(max(m, 1)), 16)
    bn, bk = _TILES[bm]
    pow2 = block & -block  # the largest power of two dividing the block size
    if pow2 >= 16:
        return bm, bn, min(bk, pow2), True
    return bm, bn, bk, False


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(tiles_n: int, k_tiles: int, device: torch.device) -> int:
    """K splits that bring the programs up to about four per SM (several resident per SM hide the gathers'
    latency; on the interpreter up to four, to exercise the path)."""
    sms = 1
    if device.type == "cuda":
        sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    want = -(-4 * sms // tiles_n)
    return max(1, min(want, k_tiles // 2, _SPLITS_MAX))


def linear(x2: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, float_out: bool = False,
           split_k: int | None = None) -> torch.Tensor:
    """x2 [M, K] -> [M, N] in x's dtype (float32 with `float_out`): x times the codebook part of q (rotation
    included), plus bias. Sums in float32. `split_k` forces the number of K splits (tests, benchmarks)."""
    n, k = q.shape
    m, x_dtype = x2.shape[0], x2.dtype
    if x2.dim() != 2 or x2.shape[1] != k:
        raise ValueError(f"activations {tuple(x2.shape)} do not match a weight of shape {tuple(q.shape)}")
    if q.rotation:  # R^T x = H (s * x) per block: what rotate() computes for row vectors
        x2 = rot.rotate(x2.float(), rot.unpack_signs(q.rot_signs, k), q.rotation)
    if x2.stride(-1) != 1:  # rows may sit apart (x_stride), columns must be adjacent
        x2 = x2.contiguous()
    out_dtype = torch.float32 if float_out else x_dtype
    if m == 0 or n == 0:  # nothing to launch
        return torch.empty((m, n), device=x2.device, dtype=out_dtype)
    planes = bitpack.PLANES[q.bits]
    p0, p1 = planes[0], planes[1] if len(planes) > 1 else 0
    bm, bn, bk, in_block = _tiles(m, q.block_size)
    tiles_n, k_tiles = triton.cdiv(n, bn), triton.cdiv(k, bk)
    splits = split_k if split_k is not None else _splits(tiles_n, k_tiles, x2.device)
    per_split = max(1, triton.cdiv(k_tiles, max(1, min(splits, k_tiles))))
    splits = max(1, triton.cdiv(k_tiles, per_split))  # no empty split
    y = torch.empty((splits, m, n), device=x2.device, dtype=torch.float32 if splits > 1 else out_dtype)
    grid = (tiles_n, splits, triton.cdiv(m, bm))
    _qgemv_kernel[grid](x2, q.codes.contiguous(), q.scales.contiguous(), q.grid.reshape(-1).contiguous(),
                        bias if bias is not None else y, y, m, n, k, x2.stride(0), q.codes.shape[-1],
                        q.scales.shape[-1], q.block_size, (k + 7) // 8 * p0, per_split,
                        P0=p0, P1=p1, HAS_BIAS=bias is not None, TILE_IN_BLOCK=in_block,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=4, num_stages=1, enable_fp_fusion=True)  # stages > 1 spill with tl.dot
    return y[0] if splits == 1 else y.sum(0).to(out_dtype)
