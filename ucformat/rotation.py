"""Incoherence rotation of a weight's input dimension (SPEC.md 2.5): block Hadamard with random signs.

A linear y = W x equals (W R)(R^T x) for any orthogonal R [C, C]. Rounding W R instead of W spreads each
outlier weight over a block of columns, so the block absmax scales waste fewer levels on it (QuIP#,
QuaRot). The pack stores the codes of W R and undoes R when it reconstructs the weight, so the runtime
and its kernels never see the rotation. Here

    R = D H,   D = diag(s) (s_j = +-1, stored as bits),   H = blockdiag(H_n, ..., H_n)

with H_n the Sylvester Hadamard matrix of order n (a power of two, n | C) divided by sqrt(n): symmetric
and orthogonal. So

    rotate(W)   = W R   = hadamard_blocks(W * s)     (what the compressor rounds)
    unrotate(W) = W R^T = hadamard_blocks(W) * s     (what the reader applies to grid[code] * scale)
    R^T G R     = rotate(rotate(G)^T)                (a symmetric input Gram matrix G, in the new basis)

Shapes: weights [*lead, rows, C]; signs float [*lead, C] of +-1 in working form, uint8 [*lead, ceil(C/8)]
as stored (bit j % 8 of byte j // 8 is 1 where s_j = -1).
"""

from __future__ import annotations

import functools
import math
import zlib

import torch

BLOCKS = (16, 32, 64, 128, 256)  # Hadamard orders a pack may use (section 2.5)
DEFAULT_BLOCK = 64  # the same as the scale blocks: bench/rotation_proxy.py, bench/rotation_e2e.py


@functools.lru_cache(maxsize=32)
def hadamard(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [n, n] (entries +-1/sqrt(n), exact in float32); cached, so
    callers must not modify it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard order must be a power of two, got {n}")
    with torch.inference_mode(False), torch.no_grad():  # cached: an ordinary tensor whoever asks first
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        return h / math.sqrt(n)


def fits(cols: int, block: int) -> bool:
    """Whether a weight with `cols` inputs can be rotated with Hadamard blocks of `block`."""
    return block in BLOCKS and cols % block == 0


def hadamard_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """w [..., C] times blockdiag(H_block, ...) [C, C] (C % block == 0): one small matmul per block."""
    cols = w.shape[-1]
    h = hadamard(block, w.device, w.dtype)
    return (w.reshape(*w.shape[:-1], cols // block, block) @ h).reshape(w.shape)


def rotate(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """W R: the basis the codes are rounded in. signs [*lead, C] broadcast over rows."""
    return hadamard_blocks(w * signs.to(w.dtype).unsqueeze(-2), block)


def unrotate(w: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """W R^T: back to the source basis (the inverse of rotate)."""
    return hadamard_blocks(w, block) * signs.to(w.dtype).unsqueeze(-2)


def rotate_gram(g: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """R^T G R for a symmetric Gram matrix G [C, C] of the inputs (what GPTQ weighs rounding W R with)."""
    return rotate(rotate(g, signs, block).T.contiguous(), signs, block)


def random_signs(cols: int, seed: int, name: str = "") -> torch.Tensor:
    """float32 [cols] of +-1, reproducible from (seed, name) on every platform (CPU generator)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    return torch.randint(0, 2, (cols,), generator=g).float() * -2 + 1


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """float +-1 [*lead, C] -> uint8 [*lead, ceil(C/8)], bit j % 8 of byte j // 8 set where s_j < 0."""
    bits = (signs < 0).to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (bits << shifts).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_signs: uint8 [*lead, ceil(C/8)] -> float32 +-1 [*lead, C]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., :cols]
    return 1.0 - 2.0 * bits.float()


def packed_bytes(cols: int) -> int:
    """Stored bytes of one matrix's signs."""
    return -(-cols // 8)
