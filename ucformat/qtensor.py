"""A quantized weight as stored in a pack, and its reconstruction (SPEC.md, "Reconstruction").

Shapes, for a weight of shape [*lead, rows, cols] (a Linear is lead=(), rows=out, cols=in; fused MoE
experts are lead=(experts,)), block size B, width b:
  codes   uint8   [*lead, rows, ceil(cols/8)*b]   bit-packed (bitpack.py)
  scales  float16 [*lead, rows, ceil(cols/B)]     per-block absmax (stored as such, or with scale_bits 8
                                                  as uint8 codes + float16 row maxima: scalecodes.py)
  grid    float32 [*lead, 2**b]                   levels on block-normalised weights
  lr_u    float16 [*lead, rows, r]                optional low-rank correction, W += lr_u @ lr_v
  lr_v    float16 [*lead, r, cols]
  lr_uq   int8    [*lead, rows, r]   + lr_us float16 [*lead, rows]   the same factors stored as int8
  lr_vq   int8    [*lead, r, cols]   + lr_vs float16 [*lead, r]      with one scale per row
  ov_rows int32   [*lead, k]                      optional row overlay: these rows (increasing) are
  ov_q    int8    [*lead, k, cols]                replaced by ov_q * ov_s before the low-rank term
  ov_s    float16 [*lead, k]
  rot_signs uint8 [*lead, ceil(cols/8)]           optional rotation signs: grid[code] * scale is W R, and
                                                  W = that times R^T (rotation.py; block size `rotation`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import bitpack, cpu_dequant, rotation as rot, scalecodes

# Suffixes appended to the source tensor name inside a layer file. Data, not code paths: the writer,
# the reader and the spec all use this table.
SUFFIX = {"codes": ".qcodes", "scales": ".qscales", "grid": ".qgrid", "lr_u": ".lr_u", "lr_v": ".lr_v",
          "lr_uq": ".lr_uq", "lr_us": ".lr_us", "lr_vq": ".lr_vq", "lr_vs": ".lr_vs",
          "ov_rows": ".ov_rows", "ov_q": ".ov_q", "ov_s": ".ov_s", "scale_max": ".qsmax",
          "rot_signs": ".rsigns"}
REQUIRED_PARTS = ("codes", "scales", "grid")
OPTIONAL_PARTS = ("lr_u", "lr_v", "lr_uq", "lr_us", "lr_vq", "lr_vs", "ov_rows", "ov_q", "ov_s", "rot_signs")
LOWRANK_DTYPES = ("float16", "int8")


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
    lr_uq: torch.Tensor | None = None
    lr_us: torch.Tensor | None = None
    lr_vq: torch.Tensor | None = None
    lr_vs: torch.Tensor | None = None
    ov_rows: torch.Tensor | None = None
    ov_q: torch.Tensor | None = None
    ov_s: torch.Tensor | None = None
    scale_bits: int = 16  # how `scales` (always float16 here) are stored: float16, or 8-bit codes
    rot_signs: torch.Tensor | None = None  # packed signs of the rotation (SPEC.md 2.5), with `rotation`
    rotation: int = 0  # Hadamard block size of the input rotation; 0: none

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored parts (SUFFIX keys): with scale_bits 8, `scales` as uint8 codes plus `scale_max`."""
        out = self._held()
        if self.scale_bits == 8:
            out["scales"], out["scale_max"] = scalecodes.encode(self.scales)
        return out

    def apply(self, fn) -> "QuantizedTensor":
        """The same weight with `fn` applied to every stored part (device moves, pinning)."""
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "QuantizedTensor":
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def stored_bytes(self) -> int:
        return self.stored_bits() // 8

    def stored_bits(self) -> int:
        """All bits this weight costs on disk: codes + scales + grid + correction factors."""
        held = self._held()
        scales = held.pop("scales")
        blocks = scales.shape[-1]
        return (sum(t.numel() * t.element_size() * 8 for t in held.values())
                + scalecodes.storage_bits(scales.numel() // max(blocks, 1), blocks, self.scale_bits))

    def nbytes(self) -> int:
        """Bytes it holds in memory (scales as float16 whatever their storage)."""
        return sum(t.numel() * t.element_size() for t in self._held().values())

    def _held(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales, "grid": self.grid}
        out.update({k: getattr(self, k) for k in OPTIONAL_PARTS if getattr(self, k) is not None})
        return out

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_part_shapes(self.shape, self.bits, self.block_size, self.rank, self.lowrank_dtype,
                                    self.overlay_rows, self.scale_bits, self.rotation)

    @property
    def rank(self) -> int:
        u = self.lr_u if self.lr_u is not None else self.lr_uq
        return 0 if u is None else int(u.shape[-1])

    @property
    def lowrank_dtype(self) -> str:
        return "int8" if self.lr_uq is not None else "float16"

    @property
    def overlay_rows(self) -> int:
        return 0 if self.ov_rows is None else int(self.ov_rows.shape[-1])


def from_parts(shape, bits: int, block_size: int, parts: dict[str, torch.Tensor], scale_bits: int = 16,
               rotation: int = 0) -> QuantizedTensor:
    """The inverse of QuantizedTensor.parts(): stored parts (SUFFIX keys) -> QuantizedTensor, 8-bit scale
    codes decoded to float16 (SPEC.md 2.4) so that every consumer sees one kind of scales."""
    parts = dict(parts)
    if scale_bits == 8:
        parts["scales"] = scalecodes.decode(parts["scales"], parts.pop("scale_max"))
    return QuantizedTensor(shape=tuple(shape), bits=bits, block_size=block_size, scale_bits=scale_bits,
                           rotation=rotation, **parts)


def expected_part_shapes(shape, bits: int, block_size: int, rank: int = 0, lowrank_dtype: str = "float16",
                         overlay_rows: int = 0, scale_bits: int = 16, rotation: int = 0) -> dict[str, tuple[int, ...]]:
    *lead, rows, cols = shape
    lead = tuple(lead)
    out = {
        "codes": (*lead, rows, bitpack.packed_row_bytes(cols, bits)),
        "scales": (*lead, rows, -(-cols // block_size)),
        "grid": (*lead, 2**bits),
    }
    if scale_bits == 8:
        out["scale_max"] = (*lead, rows)
    if rank and lowrank_dtype == "int8":
        out.update(lr_uq=(*lead, rows, rank), lr_us=(*lead, rows), lr_vq=(*lead, rank, cols), lr_vs=(*lead, rank))
    elif rank:
        out["lr_u"] = (*lead, rows, rank)
        out["lr_v"] = (*lead, rank, cols)
    if overlay_rows:
        out.update(ov_rows=(*lead, overlay_rows), ov_q=(*lead, overlay_rows, cols), ov_s=(*lead, overlay_rows))
    if rotation:
        out["rot_signs"] = (*lead, rot.packed_bytes(cols))
    return out


def entry_part_shapes(e) -> dict[str, tuple[int, ...]]:
    """The parts a manifest entry (manifest.TensorEntry) calls for, with their shapes."""
    return expected_part_shapes(e.shape, e.bits, e.block_size, e.rank, e.lowrank_dtype, e.overlay_rows, e.scale_bits,
                                e.rotation)


def from_entry(e, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    """from_parts with the settings of a manifest entry (manifest.TensorEntry)."""
    return from_parts(e.shape, e.bits, e.block_size, parts, e.scale_bits, e.rotation)


def overlay_error(q: QuantizedTensor) -> str | None:
    """Why q's overlay row indices are invalid (SPEC.md 2.3: strictly increasing, in 0..R-1), or None."""
    if q.ov_rows is None:
        return None
    rows = q.ov_rows.long()
    if rows.numel() and (rows.min() < 0 or rows.max() >= q.shape[-2]):
        return f"overlay row index out of range 0..{q.shape[-2] - 1}"
    if rows.shape[-1] > 1 and not bool((rows[..., 1:] > rows[..., :-1]).all()):
        return "overlay row indices are not strictly increasing"
    return None


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32, native: bool = True) -> torch.Tensor:
    """Exact reconstruction: W[..., r, j] = grid[..., code[r, j]] * scale[r, j // B], rotated back by R^T when
    the weight was rounded rotated, overlay rows replaced by ov_q * ov_s, then + (U @ V)[r, j] (U, V from
    fp16 parts, or int8 parts times their row scales).

    Computed in float32 and cast to `dtype` once at the end, so CPU results are deterministic. On the CPU
    the first product runs in a native kernel (cpu_dequant.py) when it is available: the same floats,
    about 9x faster; `native=False` forces the torch path.
    """
    w = cpu_dequant.dequant_levels(q.codes, q.scales, q.grid, q.bits, q.block_size, q.shape) if native else None
    if w is None:
        w = _levels_times_scales(q)
    if q.rotation:
        w = rot.unrotate(w, rot.unpack_signs(q.rot_signs, q.shape[-1]), q.rotation)
    return _corrections(q, w).to(dtype)


def _levels_times_scales(q: QuantizedTensor) -> torch.Tensor:
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
    return w


def _corrections(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    if q.ov_rows is not None:  # whole rows replaced by their 8-bit copies
        vals = q.ov_q.float() * q.ov_s.float().unsqueeze(-1)  # [*lead, k, cols]
        w = w.scatter(-2, q.ov_rows.long().unsqueeze(-1).expand(*vals.shape), vals)
    if q.lr_u is not None:
        w = w + q.lr_u.float() @ q.lr_v.float()
    elif q.lr_uq is not None:
        u = q.lr_uq.float() * q.lr_us.float().unsqueeze(-1)
        v = q.lr_vq.float() * q.lr_vs.float().unsqueeze(-1)
        w = w + u @ v
    return w
