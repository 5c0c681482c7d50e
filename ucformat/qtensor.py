"""A quantized weight as stored in a pack, and its reconstruction (SPEC.md, "Reconstruction").

Shapes, for a weight of shape [*lead, rows, cols] (a Linear is lead=(), rows=out, cols=in; fused MoE
experts are lead=(experts,)), block size B, width b:
  codes   uint8   [*lead, rows, ceil(cols/8)*b]   bit-packed (bitpack.py)
  scales  float16 [*lead, rows, ceil(cols/B)]     per-block absmax
  grid    float32 [*lead, 2**b]                   levels on block-normalised weights
  lr_u    float16 [*lead, rows, r]                optional low-rank correction, W += lr_u @ lr_v
  lr_v    float16 [*lead, r, cols]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bitpack

# Suffixes appended to the source tensor name inside a layer file. Data, not code paths: the writer,
# the reader and the spec all use this table.
SUFFIX = {"codes": ".qcodes", "scales": ".qscales", "grid": ".qgrid", "lr_u": ".lr_u", "lr_v": ".lr_v"}
REQUIRED_PARTS = ("codes", "scales", "grid")


@dataclass
class QuantizedTensor:
    shape: tuple[int, ...]
    bits: int
    block_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    grid: torch.Tensor
    lr_u: torch.Tensor | None = None
    lr_v: torch.Tensor | None = None

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales, "grid": self.grid}
        if self.lr_u is not None:
            out["lr_u"], out["lr_v"] = self.lr_u, self.lr_v
        return out

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "QuantizedTensor":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantizedTensor(self.shape, self.bits, self.block_size, mv(self.codes), mv(self.scales),
                               mv(self.grid), mv(self.lr_u), mv(self.lr_v))

    def stored_bytes(self) -> int:
        return self.stored_bits() // 8

    def stored_bits(self) -> int:
        """All bits this weight costs on disk: codes + scales + grid + correction factors."""
        return sum(t.numel() * t.element_size() * 8 for t in self.parts().values())

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_part_shapes(self.shape, self.bits, self.block_size, self.rank)

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else int(self.lr_u.shape[-1])


def expected_part_shapes(shape, bits: int, block_size: int, rank: int = 0) -> dict[str, tuple[int, ...]]:
    *lead, rows, cols = shape
    lead = tuple(lead)
    out = {
        "codes": (*lead, rows, bitpack.packed_row_bytes(cols, bits)),
        "scales": (*lead, rows, -(-cols // block_size)),
        "grid": (*lead, 2**bits),
    }
    if rank:
        out["lr_u"] = (*lead, rows, rank)
        out["lr_v"] = (*lead, rank, cols)
    return out


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact reconstruction: W[..., r, j] = grid[..., code[r, j]] * scale[r, j // B] (+ (U @ V)[r, j]).

    Computed in float32 and cast to `dtype` once at the end, so CPU results are deterministic.
    """
    *lead, rows, cols = q.shape
    codes = bitpack.unpack(q.codes, q.bits, cols)  # uint8 [*lead, rows, cols]
    grid = q.grid.float()
    levels_n = grid.shape[-1]
    if lead:
        # One grid per matrix: offset each matrix's codes into the flattened [n_mat * 2**b] grid.
        n_mat = grid.numel() // levels_n
        offs = (torch.arange(n_mat, device=codes.device, dtype=torch.int32) * levels_n).reshape(*lead, 1, 1)
        idx = codes.to(torch.int32) + offs
    else:
        idx = codes.to(torch.int32)
    levels = torch.index_select(grid.reshape(-1), 0, idx.reshape(-1)).reshape(*lead, rows, cols)
    B = q.block_size
    nb = q.scales.shape[-1]
    pad = nb * B - cols
    if pad:
        levels = torch.nn.functional.pad(levels, (0, pad))
    w = (levels.reshape(*lead, rows, nb, B) * q.scales.float().unsqueeze(-1)).reshape(*lead, rows, nb * B)
    if pad:
        w = w[..., :cols]
    if q.lr_u is not None:
        w = w + q.lr_u.float() @ q.lr_v.float()
    return w.to(dtype)
