"""A quantized matrix in working precision: what calibration builds, distillation trains, and a pack stores.

`QWeight` holds the same parts as `ucformat.qtensor.QuantizedTensor`, unpacked and in float32:
  codes   uint8   [R, C]    one code per weight (fixed once chosen)
  scales  float32 [R, nb]   per-block scales (float16, or with scale_bits 8 the nearest 8-bit scale codes'
                            values, when frozen)
  grid    float32 [2**b]    levels
  u, v    float32 [R, r], [r, C]   optional low-rank correction, W += u @ v
  ov_rows int64 [k], ov_q int8 [k, C], ov_s float16 [k]   optional rows restored at 8 bits
  rot_signs float32 [C] of +-1, rotation   optional input rotation: codes and scales hold W R, and
                            grid[code] * scale is rotated back by R^T first (ucformat/rotation.py)
`weight()` is the reconstruction formula of SPEC.md 2.2 (differentiable in scales, grid, u, v);
`freeze()` rounds every part to its stored dtype and bit-packs the codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ucformat import bitpack, scalecodes
from ucformat import rotation as rot
from ucformat.qtensor import QuantizedTensor

from . import codecs, gptq

GRID_SAMPLES = 1 << 16  # values the k-means grid is fitted on in the calibrated path


@dataclass
class QWeight:
    bits: int
    block_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    grid: torch.Tensor
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    lowrank_dtype: str = "int8"
    ov_rows: torch.Tensor | None = None
    ov_q: torch.Tensor | None = None
    ov_s: torch.Tensor | None = None
    scale_bits: int = 16
    rot_signs: torch.Tensor | None = None
    rotation: int = 0
    _flat: torch.Tensor | None = field(default=None, repr=False)  # codes as int64 [R*C], cached
    _levels: tuple | None = field(default=None, repr=False)  # (grid, grid[codes]) for a fixed grid

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[1])

    def base(self, scales: torch.Tensor | None = None, grid: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32, cache: bool = True) -> torch.Tensor:
        """grid[code] * scale (rotated back, then the overlay rows), [R, C] in `dtype`. With `cache`, a fixed
        grid's levels grid[code] (float32, 4 bytes a weight) are kept for the next call.

        Built in float32, under autocast too, and rounded to `dtype` once: with levels, scales and their
        product rounded to bfloat16 before the 64-point rotation, the weights the bfloat16 distillation
        steps saw were off by up to a few percent of a small weight, and a trained scale's step below
        bfloat16's 0.4% did not reach most blocks at all."""
        with torch.autocast(self.codes.device.type, enabled=False):  # the rotation, too, in float32
            return self._base(self.scales if scales is None else scales, self.grid if grid is None else grid,
                              cache).to(dtype)

    def _base(self, scales: torch.Tensor, grid: torch.Tensor, cache: bool = True) -> torch.Tensor:
        rows, cols = self.shape
        if grid.requires_grad:
            if self._flat is None or self._flat.device != self.codes.device:
                self._flat = self.codes.reshape(-1).long()
            levels = _Lookup.apply(grid, self._flat).reshape(rows, cols).float()
        elif self._levels is not None and self._levels[0] is grid:  # a fixed grid's levels, kept from a call
            levels = self._levels[1]
        else:
            levels = torch.index_select(grid, 0, self.codes.reshape(-1).long()).reshape(rows, cols).float()
            if cache:  # kept while the grid object is the same
                self._levels = (grid, levels)
        nb, bs = scales.shape[1], self.block_size
        if nb * bs != cols:
            levels = torch.nn.functional.pad(levels, (0, nb * bs - cols))
        w = (levels.reshape(rows, nb, bs) * scales.float().unsqueeze(-1)).reshape(rows, nb * bs)[:, :cols]
        if self.rotation:
            w = rot.unrotate(w, self.rot_signs, self.rotation)
        if self.ov_rows is not None:
            w = w.index_copy(0, self.ov_rows, overlay_values(self.ov_q, self.ov_s).to(w.dtype))
        return w

    def weight(self, scales=None, grid=None, u=None, v=None, dtype: torch.dtype = torch.float32,
               cache: bool = True) -> torch.Tensor:
        w = self.base(scales, grid, dtype, cache)
        u = self.u if u is None else u
        v = self.v if v is None else v
        if u is not None:
            w = w + (u @ v).to(dtype)
        return w

    @classmethod
    def from_stored(cls, q: QuantizedTensor, device: str | torch.device = "cpu") -> "QWeight":
        """The working form of a stored 2-D weight (inverse of freeze: freeze(from_stored(q)) == q)."""
        if len(q.shape) != 2:
            raise ValueError(f"QWeight holds 2-D weights, got shape {q.shape}")
        rows, cols = q.shape
        codes = bitpack.unpack(q.codes, q.bits, cols).reshape(rows, cols)
        u = v = None
        if q.lr_uq is not None:
            u, v = overlay_values(q.lr_uq, q.lr_us), overlay_values(q.lr_vq, q.lr_vs)
        elif q.lr_u is not None:
            u, v = q.lr_u.float(), q.lr_v.float()
        ov_rows = None if q.ov_rows is None else q.ov_rows.long()
        signs = rot.unpack_signs(q.rot_signs, cols) if q.rotation else None
        t = lambda x: None if x is None else x.to(device)  # noqa: E731
        return cls(bits=q.bits, block_size=q.block_size, codes=t(codes), scales=t(q.scales.float()),
                   grid=t(q.grid.float()), u=t(u), v=t(v), lowrank_dtype=q.lowrank_dtype,
                   ov_rows=t(ov_rows), ov_q=t(q.ov_q), ov_s=t(q.ov_s), scale_bits=q.scale_bits,
                   rot_signs=t(signs), rotation=q.rotation)

    def freeze(self) -> QuantizedTensor:
        """Round to the stored dtypes; the result reconstructs (qtensor.dequantize) to what it stores."""
        q = QuantizedTensor(shape=self.shape, bits=self.bits, block_size=self.block_size,
                            codes=bitpack.pack(self.codes.cpu(), self.bits),
                            scales=stored_scales(self.scales, self.scale_bits).cpu(), grid=self.grid.float().cpu(),
                            scale_bits=self.scale_bits)
        if self.rotation:
            q.rot_signs, q.rotation = rot.pack_signs(self.rot_signs.cpu()), self.rotation
        if self.u is not None:
            if self.lowrank_dtype == "int8":
                q.lr_uq, q.lr_us = int8_rows(self.u.cpu())
                q.lr_vq, q.lr_vs = int8_rows(self.v.cpu())
            else:
                q.lr_u, q.lr_v = self.u.to(torch.float16).cpu(), self.v.to(torch.float16).cpu()
        if self.ov_rows is not None:
            q.ov_rows = self.ov_rows.to(torch.int32).cpu()
            q.ov_q, q.ov_s = self.ov_q.cpu(), self.ov_s.cpu()
        return q


def stored_scales(scales: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """float scales [R, nb] -> the float16 values the pack stores for them."""
    return scalecodes.snap(scales.detach()) if scale_bits == 8 else scales.detach().to(torch.float16)


def storable(scales: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Training's view of the scales: what freeze() will store, with the gradient of the identity
    (straight through), so that distillation tunes the values the pack will hold."""
    if scale_bits != 8:
        return scales
    return scales + (stored_scales(scales, scale_bits).to(scales.dtype) - scales).detach()


class _Lookup(torch.autograd.Function):
    """grid[codes] whose backward is one bincount (index_put with accumulate is several times slower)."""

    @staticmethod
    def forward(ctx, grid: torch.Tensor, flat_codes: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat_codes)
        ctx.levels = grid.shape[0]
        return torch.index_select(grid, 0, flat_codes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat_codes,) = ctx.saved_tensors
        return torch.bincount(flat_codes, weights=grad.reshape(-1), minlength=ctx.levels).to(grad.dtype), None


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [n, m] -> (int8 [n, m], fp16 per-row scale [n]): symmetric, absmax/127, round to nearest."""
    s = (x.abs().amax(1) / 127).to(torch.float16)
    sf = s.float().unsqueeze(1)
    q = torch.where(sf > 0, torch.round(x.float() / sf.clamp_min(1e-30)), torch.zeros_like(x, dtype=torch.float32))
    return q.clamp(-127, 127).to(torch.int8), s


def overlay_values(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float().unsqueeze(1)


def fit_grid(w: torch.Tensor, bits: int, block_size: int, codec: str, col_weight: torch.Tensor | None,
             samples: int = GRID_SAMPLES, scale_bits: int = 16) -> torch.Tensor:
    """The grid of `codec` for w [R, C]; k-means weighs each weight by its block scale^2 and its column's
    input energy E[x_j^2] when known (the output error it causes)."""
    scales, normed = codecs.block_scales(w, block_size, scale_bits)
    weight = scales.float().repeat_interleave(block_size, -1)[..., :w.shape[1]] ** 2
    if col_weight is not None:
        weight = weight * col_weight.float().to(weight.device).unsqueeze(0)
    if codec == "gsq":
        return codecs.kmeans_grid(normed, weight, 2**bits, samples=samples).to(w.device)
    return codecs.GRIDS[codec](normed, weight, 2**bits).to(w.device)


def quantize_matrix(w: torch.Tensor, bits: int, block_size: int, codec: str, h: torch.Tensor | None = None,
                    use_gptq: bool = True, lowrank_dtype: str = "int8", scale_bits: int = 16,
                    rotation: int = 0, seed: int = 0) -> QWeight:
    """w [R, C] -> QWeight: grid fitted with activation weights, codes by GPTQ rounding when h is known."""
    return quantize_group({"": w}, {"": bits}, block_size, codec, h, use_gptq, lowrank_dtype, scale_bits,
                          rotation, seed)[""]


def rotated_group(ws: dict[str, torch.Tensor], h: torch.Tensor | None, rotation: int, seed: int):
    """(ws, h, signs) in the rotated basis when the group's inputs split into Hadamard blocks of `rotation`
    (one rotation per group: it shares h; signs drawn from the seed and the group's first name), else as
    given with signs None. ws float32 [R, C], h [C, C]."""
    ws = {n: w.float() for n, w in ws.items()}
    cols = next(iter(ws.values())).shape[1]
    if not rotation or not rot.fits(cols, rotation):
        return ws, h, None
    signs = rot.random_signs(cols, seed, next(iter(ws))).to(next(iter(ws.values())).device)
    ws = {n: rot.rotate(w, signs, rotation) for n, w in ws.items()}
    return ws, (None if h is None else rot.rotate_gram(h.float(), signs, rotation)), signs


def quantize_group(ws: dict[str, torch.Tensor], bits: dict[str, int], block_size: int, codec: str,
                   h: torch.Tensor | None = None, use_gptq: bool = True, lowrank_dtype: str = "int8",
                   scale_bits: int = 16, rotation: int = 0, seed: int = 0, search: bool = False) -> dict[str, QWeight]:
    """Matrices sharing one input Gram matrix h (q/k/v, gate/up), each at its own width; with h, their
    GPTQ rounding runs as one pass. With `rotation`, rounded as W R (rotated_group); the QWeights rotate back.
    search: block scales searched for each grid (codecs.fitted_scales) instead of each block's absmax."""
    ws, h, signs = rotated_group(ws, h, rotation, seed)
    col = torch.diagonal(h).clamp_min(0) if h is not None else None
    grids = {n: fit_grid(w, bits[n], block_size, codec, col, scale_bits=scale_bits) for n, w in ws.items()}
    if h is not None and use_gptq:
        rounded = dict(zip(ws, gptq.round_many([(ws[n], grids[n]) for n in ws], h, block_size,
                                               scale_bits=scale_bits, search=search)))
    else:
        rounded = {}
        for n, w in ws.items():
            scales = codecs.fitted_scales(w, grids[n], block_size, col, scale_bits, search)
            rounded[n] = (codecs.nearest(codecs.normalise(w, scales, block_size), grids[n]).to(torch.uint8), scales)
    return {n: QWeight(bits=bits[n], block_size=block_size, codes=rounded[n][0], scales=rounded[n][1].float(),
                       grid=grids[n].float(), lowrank_dtype=lowrank_dtype, scale_bits=scale_bits,
                       rot_signs=signs, rotation=rotation if signs is not None else 0) for n in ws}
