"""8-bit block scales (SPEC.md 2.4, feature `scales-u8`): each row's block scales as one byte each under
the row's largest scale.

    scale[r, k] = float16( float32(smax[r]) * LEVEL[q[r, k]] )       (q = 0: scale 0)
    LEVEL[q]    = float32( 2 ** ((q - 255) / STEPS) ),  q in 1..255

so a block's scale is its row's largest times a power of two in steps of 1/STEPS of an octave (2.2%),
down to 2**(-254/STEPS) (1/245) of it. A weight costs 8/B + 16/C bits of scales instead of 16/B
(0.125 + 0.028 instead of 0.25 at B = 64 and C = 576).

Everything downstream of the reader sees float16 scales (`decode` runs once when a tensor is read), so
dequantization kernels are the same for both storages. A writer stores 8-bit scales only for float16
scales that `encode` represents exactly: the compressor makes them so with `snap` before it rounds.
"""

from __future__ import annotations

import torch

STEPS = 32  # levels per octave
LEVELS = 256
WIDTHS = (16, 8)  # storable scale widths: float16, or this module's codes


def _level_table() -> torch.Tensor:
    # Python float arithmetic (correctly rounded pow of an exact exponent), then one rounding to float32
    return torch.tensor([0.0] + [2.0 ** ((q - 255) / STEPS) for q in range(1, LEVELS)], dtype=torch.float32)


LEVEL = _level_table()  # float32 [256]


def row_table(smax: torch.Tensor) -> torch.Tensor:
    """float16 [..., 256]: every scale a row with largest scale smax (float16 [...]) can store, ascending."""
    return (smax.float().unsqueeze(-1) * LEVEL.to(smax.device)).to(torch.float16)


def decode(q: torch.Tensor, smax: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., nb] and float16 row maxima [...] -> float16 scales [..., nb]."""
    return (smax.float().unsqueeze(-1) * LEVEL.to(q.device)[q.long()]).to(torch.float16)


def _nearest(s: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the entry of each row's ascending table nearest to s (float32 [..., nb]); ties go up."""
    t = table.float()
    hi = torch.searchsorted(t.contiguous(), s.contiguous()).clamp(max=LEVELS - 1)
    lo = (hi - 1).clamp(min=0)
    pick_lo = (s - t.gather(-1, lo)).abs() < (t.gather(-1, hi) - s).abs()
    return torch.where(pick_lo, lo, hi)


def snap(scales: torch.Tensor) -> torch.Tensor:
    """The nearest storable scales: float [..., nb] (non-negative) -> float16 [..., nb] that `encode`
    represents exactly. The row's largest scale is kept (rounded to float16); blocks under half the
    smallest step of their row become 0."""
    smax = scales.float().amax(-1).to(torch.float16)
    table = row_table(smax)
    return table.gather(-1, _nearest(scales.float(), table))


def encode(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float16 scales [..., nb] -> (uint8 codes [..., nb], float16 row maxima [...]), exact: decode gives
    the same scales back bit for bit. ValueError if some scale is not storable (see `snap`)."""
    smax = scales.amax(-1)
    table = row_table(smax)
    q = _nearest(scales.float(), table)
    if not torch.equal(table.gather(-1, q), scales.to(torch.float16)):
        raise ValueError("block scales are not representable as 8-bit scale codes (snap them first)")
    return q.to(torch.uint8), smax.to(torch.float16)


def storage_bits(rows: int, blocks: int, width: int) -> int:
    """Bits one matrix's scales cost: [rows, blocks] float16, or codes plus one float16 maximum per row."""
    return rows * blocks * 16 if width == 16 else rows * blocks * 8 + rows * 16
