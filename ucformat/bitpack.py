"""Bit-packing of b-bit codes into bytes. Knows nothing of scales or grids.

Layout (SPEC.md, "Codes"): a b-bit code is split into planes of 1, 2, 4 or 8 bits (PLANES, low bits
first: a 5-bit code is a 4-bit plane holding bits 0-3 and a 1-bit plane holding bit 4). Each row is
padded with zero codes to a multiple of 8; then each plane of width p packs 8/p codes per byte, the
first code in the lowest bits, and the row is the concatenation of its planes in PLANES order. Every
plane is byte aligned, so unpacking is a few uint8 shifts and masks, never a wide-word loop.
"""

from __future__ import annotations

import torch

# code width -> plane widths, low bits first. Data, not code: the spec and the tests read this table.
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
WIDTHS = tuple(PLANES)


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes taken by one row of n codes."""
    _check_bits(bits)
    return (n + 7) // 8 * bits


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., n] (values < 2**width, n % 8 == 0) -> uint8 [..., n * width / 8]."""
    if width == 8:
        return codes
    per = 8 // width
    g = codes.reshape(*codes.shape[:-1], -1, per)
    out = g[..., 0].clone()
    for k in range(1, per):
        out |= g[..., k] << (k * width)
    return out


def _unpack_plane(plane: torch.Tensor, width: int) -> torch.Tensor:
    if width == 8:
        return plane
    per = 8 // width
    shifts = torch.arange(0, 8, width, device=plane.device, dtype=torch.uint8)
    return ((plane.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(*plane.shape[:-1], plane.shape[-1] * per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: uint8 [..., n] with values < 2**bits -> uint8 [..., packed_row_bytes(n, bits)]."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    pad = (-codes.shape[-1]) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    planes, low = [], 0
    for width in PLANES[bits]:
        planes.append(_pack_plane((codes >> low) & ((1 << width) - 1), width))
        low += width
    return torch.cat(planes, dim=-1).contiguous() if len(planes) > 1 else planes[0].contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., packed_row_bytes(n, bits)] -> uint8 [..., n]."""
    _check_bits(bits)
    nbytes = packed.shape[-1]
    if nbytes != packed_row_bytes(n, bits):
        raise ValueError(f"{nbytes} bytes per row cannot hold {n} codes of {bits} bits")
    n8 = (n + 7) // 8 * 8
    codes, start, low = None, 0, 0
    for width in PLANES[bits]:
        size = n8 * width // 8
        part = _unpack_plane(packed[..., start:start + size], width)
        codes = part if codes is None else codes | (part << low)
        start += size
        low += width
    return codes[..., :n]


def _check_bits(bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"unsupported code width {bits}; supported: {', '.join(map(str, WIDTHS))}")
