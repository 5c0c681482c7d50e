"""Bit-packing of b-bit codes into bytes. Knows nothing of scales or grids.

Layout (SPEC.md, "Codes"): each row of n codes is an LSB-first bit stream; the row is padded with zero
codes to a multiple of 8, so every group of 8 codes fills exactly `bits` bytes and rows stay byte
aligned. Code k of a row occupies stream bits [k*bits, (k+1)*bits); stream bit t is bit (t % 8) of byte
t // 8.
"""

from __future__ import annotations

import torch

WIDTHS = (2, 3, 4, 5, 6, 8)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes taken by one row of n codes."""
    _check_bits(bits)
    return (n + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., n] with values < 2**bits -> uint8 [..., packed_row_bytes(n, bits)]."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    *lead, n = codes.shape
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    if bits == 8:
        return codes.contiguous()
    groups = codes.reshape(*lead, -1, 8).to(torch.int64)  # [..., g, 8]
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(-1)  # [..., g], at most 48 bits used (bits <= 6)
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., g, bits]
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., packed_row_bytes(n, bits)] -> uint8 [..., n]."""
    _check_bits(bits)
    *lead, nbytes = packed.shape
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(f"{nbytes} bytes per row cannot hold {n} codes of {bits} bits")
    if bits == 8:
        return packed[..., :n]
    if bits in (2, 4):
        # Byte-aligned widths: plain shifts, no 64-bit words (the runtime's hot path).
        per = 8 // bits
        shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, -1)[..., :n]
    groups = packed.reshape(*lead, -1, bits).to(torch.int64)  # [..., g, bits]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(-1)  # [..., g]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., g, 8]
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]


def _check_bits(bits: int) -> None:
    if bits not in WIDTHS:
        raise ValueError(f"unsupported code width {bits}; supported: {', '.join(map(str, WIDTHS))}")
