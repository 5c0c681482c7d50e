"""The CPU matmul that reads a pack's codes directly (cpu_qgemv.cpp): y = x W^T for a quantized 2-D weight,
no weight materialised.

    y = linear(x, q, bias)      # x [M, K] float32 / bfloat16 / float16 -> [M, N] in x's dtype

The kernel computes the codebook part and the rotation (W = deq(codes) R^T, so W x = deq(codes) (R^T x),
R^T x once per call); qmatmul.py adds the overlay rows and the low-rank term. It is built for decode,
a few activation rows at a time: per block of weights a table of 2^b levels times the block's scale sits
in registers, each chunk of codes becomes indices with a few shifts, rows of W are split over torch's
threads. AVX-512 or AVX2 is chosen at run time (UC_CPU_ISA=avx2|scalar caps it, for tests and
comparisons), the scalar loop covers the rest. Built on first use like cpu_dequant (native.py).

UC_CPU_ACT picks the arithmetic: `int16` (the default; AVX2 CPUs, 2-6-bit codes, blocks of 32-256) rounds
each block of activations to 15 bits and the grid to 12 bits and sums integer products, 2-3x faster at one
activation row on the CPUs measured, within about 3e-4 of the float sums; `float` keeps float32
activations and tables, the reconstruction's numbers to float rounding.

With integer activations, weights of 2-5 bits and the 8-bit head copies are read from an `il8` copy of
their codes (8 weight rows side by side), made the first time a weight is bound or multiplied and kept on
its QuantizedTensor: faster at every row count measured, at the cost of the codes' size in memory
(UC_CPU_IL8=0: the row-major kernel on the pack's own layout; streamed layers keep it too, `per_pass`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import native
from .qtensor import QuantizedTensor

NAME = "uc_cpu_qgemv_v1"  # the build is also keyed by the source's hash
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
_SOURCE = (Path(__file__).with_suffix(".cpp")).read_text()
_EMPTY = torch.empty(0)
_INT_GRID = torch.arange(256, dtype=torch.float32) - 128  # b = 8 over the integer grid (qhead.py)


def _module():
    return native.load(NAME, _SOURCE, "CPU quantized matmul kernel")[0]


def available() -> tuple[bool, str | None]:
    """(usable, why not) — builds the extension on first call."""
    module, why = native.load(NAME, _SOURCE, "CPU quantized matmul kernel")
    return module is not None, why


def isa() -> str:
    """The instruction set the kernel uses on this CPU (after UC_CPU_ISA), or 'unavailable'."""
    m = _module()
    if m is None:
        return "unavailable"
    return {v: k for k, v in ISAS.items()}[min(m.isa(), _CAP)]


def _cap() -> int:
    name = os.environ.get("UC_CPU_ISA", "").strip().lower()
    if name and name not in ISAS:
        raise ValueError(f"UC_CPU_ISA={name!r}: one of {', '.join(ISAS)}")
    return ISAS.get(name, 2)


_CAP = _cap()


def cap() -> int:
    """The instruction set cap in effect (UC_CPU_ISA), as the kernels' `isa` argument takes it."""
    return _CAP
ACTS = ("int16", "float")


def _act() -> str:
    name = os.environ.get("UC_CPU_ACT", "").strip().lower() or ACTS[0]
    if name not in ACTS:
        raise ValueError(f"UC_CPU_ACT={name!r}: one of {', '.join(ACTS)}")
    return name


ACT = _act()
# UC_CPU_IL8=0 keeps bound weights on the row-major integer kernel (comparisons, and RSS without the copy)
IL8 = os.environ.get("UC_CPU_IL8", "1").strip() != "0"


def supports(q: QuantizedTensor) -> bool:
    """A 2-D weight on the CPU with the scales as float16 (always, once read) and a float32 grid."""
    return (len(q.shape) == 2 and q.codes.device.type == "cpu" and q.scales.dtype == torch.float16
            and q.grid.dtype == torch.float32 and not q.grid.requires_grad and not q.scales.requires_grad)


def _parts(q: QuantizedTensor, bias: torch.Tensor | None) -> tuple:
    """The kernel's arguments after x that come from q and the bias."""
    signs = q.rot_signs if q.rotation else _EMPTY
    return (q.codes, q.scales, q.grid.reshape(-1), q.bits, q.block_size, signs, q.rotation,
            _EMPTY if bias is None else bias)


def bound(q: QuantizedTensor, bias: torch.Tensor | None = None):
    """linear(x, q, bias) with q's parts bound once: x [..., K] -> [..., N] in x's dtype (UC_CPU_ACT read per
    call)."""
    b = _bind([q], [bias])
    return lambda x: b.one(x, _CAP, ACT == "int16")


def bound_group(qs: list[QuantizedTensor], biases: list[torch.Tensor | None]):
    """Weights that read the same input (q/k/v, gate/up) in one kernel call and one parallel region, their
    parts bound once: x [..., K] -> [y_i [..., N_i]], each y_i what bound(q_i, bias_i)(x) returns."""
    b = _bind(qs, biases)
    return lambda x: b.group(x, _CAP, ACT == "int16")


def handle(qs: list[QuantizedTensor], biases: list[torch.Tensor | None]):
    """(the extension's Bound of these weights, the address of the C++ function that runs a Bound's group
    call): for native code that calls the kernels itself (server/cpu_ops.py `Body`). The caller keeps the
    Bound alive as long as it uses its address."""
    b = _bind(qs, biases)
    return b, _module().group_entry()


def _il8(q: QuantizedTensor, act: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q's codes and scales in the il8 layout (cpu_qgemv.cpp `il_pack`: 8 weight rows side by side, what the
    integer kernel reads fastest), made once per q and kept on it; empty tensors where that kernel does not
    take q (b = 6, or 8 over another grid; float activations; no AVX2; blocks it does not take), where q is
    bound for one pass (per_pass) or with UC_CPU_IL8=0. A second copy of the codes: RSS grows by their size
    (the reconstruct path of long prompts still reads the first)."""
    have = getattr(q, "_il8", None)
    if have is not None:
        return have
    cols = q.shape[1]
    use = (IL8 and (act or ACT) == "int16" and (2 <= q.bits <= 5 or q.bits == 8) and q.block_size % 32 == 0
           and q.block_size <= 256 and cols >= q.block_size and min(_module().isa(), _CAP) >= ISAS["avx2"]
           and (q.bits != 8 or torch.equal(q.grid.reshape(-1), _INT_GRID)))  # cheap checks first: called per call
    if not use:
        return _EMPTY, _EMPTY
    q._il8 = tuple(_module().il_pack(q.codes, q.scales, q.bits, cols, q.block_size))
    return q._il8


def per_pass(q: QuantizedTensor) -> None:
    """q is bound for one pass only (a streamed layer's parts, read again for the next pass): it keeps the
    row-major kernel, as a copy made for one pass would cost more than it saves."""
    q._il8 = (_EMPTY, _EMPTY)


def _bind(qs: list[QuantizedTensor], biases: list[torch.Tensor | None]):
    """The weights' parts held by the extension (its Bound): a call then converts only x."""
    parts = [_parts(q, b) for q, b in zip(qs, biases)]
    codes, scales, grids, bits, blocks, signs, rots, bs = (list(t) for t in zip(*parts))
    ilc, ils = (list(t) for t in zip(*map(_il8, qs)))
    return _module().Bound(codes, scales, grids, signs, bs, bits, blocks, rots, ilc, ils)


def linear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, isa: str | None = None,
           float_out: bool = False, act: str | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype (float32 with `float_out`): x times the codebook part of q
    (rotation included), plus bias. `act` (default: UC_CPU_ACT, else int16): "int16" rounds each block's
    activations to 15 bits and the grid to 12 bits and sums integer products (AVX2, b = 2 .. 6 and 8-bit
    codes over the integer grid, blocks of 32 .. 256 columns; other weights take the float path); "float"
    sums float32 products, the reference's numbers to float rounding."""
    cap = _CAP if isa is None else ISAS[isa]
    return _module().qgemv(x, *_parts(q, bias), cap, float_out, (act or ACT) == "int16", *_il8(q, act))
