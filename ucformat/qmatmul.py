"""Linear layers computed from a quantized weight's stored parts: y = x W^T + b, W never materialised on the
decode path.

    y = linear(x, q, bias)        # x [..., in] on the CPU or a GPU, q a 2-D QuantizedTensor there too

Which path runs is decided per call, from the device and the number of activation rows:
  cpu     the native LUT kernel (cpu_qgemv.py), up to CPU_MAX_ROWS rows: decode and short prompts;
  triton  the Triton kernel (triton_qgemv.py) on CUDA, up to GPU_MAX_ROWS rows;
  rebuild reconstruct W (qtensor.dequantize, in x's dtype) and call F.linear: long prompts, where one
          reconstruction is paid back over many rows and the GEMM libraries win; and every case the
          kernels do not cover (no compiler, UC_NATIVE=0, no Triton, stacked weights). The same
          numbers as the `dense` residency, bit for bit.
The kernels cover the codebook part and the input rotation (W x = deq(codes) (R^T x)); the sparse
overlay rows (source basis) and the low-rank term U (V x) are added here, in float32, before the one cast
to x's dtype. `rows_limit()` gives the crossover in effect (measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os

import torch

from . import cpu_qgemv, qtensor
from .qtensor import QuantizedTensor

# Most activation rows the kernels take before reconstruct + GEMM is faster (bench/qkernels.py measures
# the crossover). UC_KERNEL_MAX_ROWS, read once at import, overrides both (0: never the kernels).
CPU_MAX_ROWS = 128  # with the il8 copies (cpu_qgemv.py): rebuild + GEMM won from 128-192 rows on the bundled
# models' largest matrices (from 128 with the row-major kernel alone, which this limit was 32 for)
GPU_MAX_ROWS = 16
_ENV_ROWS = int(os.environ["UC_KERNEL_MAX_ROWS"]) if os.environ.get("UC_KERNEL_MAX_ROWS") else None


def rows_limit(device: torch.device) -> int:
    if _ENV_ROWS is not None:
        return _ENV_ROWS
    return GPU_MAX_ROWS if device.type == "cuda" else CPU_MAX_ROWS


def cpu_rows() -> int:
    """rows_limit on the CPU."""
    return CPU_MAX_ROWS if _ENV_ROWS is None else _ENV_ROWS


def path(x2: torch.Tensor, q: QuantizedTensor) -> str:
    """'cpu', 'triton' or 'rebuild' for activations x2 [M, K] against q."""
    kind = x2.device.type
    if x2.shape[0] > rows_limit(x2.device) or len(q.shape) != 2:
        return "rebuild"
    if kind == "cpu":
        return "cpu" if cpu_qgemv.supports(q) and cpu_qgemv.available()[0] else "rebuild"
    if kind == "cuda":
        from . import triton_qgemv

        return "triton" if triton_qgemv.supports(q) and triton_qgemv.available()[0] else "rebuild"
    return "rebuild"


def linear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    *lead, cols = x.shape
    x2 = x.reshape(-1, cols)
    how = path(x2, q)
    if how == "rebuild":
        return torch.nn.functional.linear(x, qtensor.dequantize(q, x.dtype), bias)
    plain = q.ov_rows is None and q.rank == 0  # else float32 sums, corrected, then one cast
    fused_bias = bias if q.ov_rows is None else None  # overlay rows replace whole rows, bias included
    if how == "cpu":
        y = cpu_qgemv.linear(x2, q, fused_bias, float_out=not plain)
    else:
        from . import triton_qgemv

        y = triton_qgemv.linear(x2, q, fused_bias, float_out=not plain)
    if not plain:
        y = corrections(y, x2, q, bias).to(x.dtype)
    return y.reshape(*lead, y.shape[-1])


def cpu_plain(q: QuantizedTensor) -> bool:
    """A plain 2-D q (no overlay, no low-rank term) that the native CPU kernel takes whole."""
    return (len(q.shape) == 2 and q.ov_rows is None and not q.rank and cpu_qgemv.supports(q)
            and cpu_qgemv.available()[0])


def cpu_call(q: QuantizedTensor, bias: torch.Tensor | None):
    """For a q that cpu_plain accepts: x [..., K] -> y, the `cpu` path of linear() with its arguments bound
    (rows up to cpu_rows(): the caller checks). None otherwise."""
    return cpu_qgemv.bound(q, bias) if cpu_plain(q) else None


def cpu_group_call(qs: list[QuantizedTensor], biases: list[torch.Tensor | None]):
    """For weights that read the same input, each one cpu_plain accepts: x [..., K] -> [y_i], one kernel
    call for all of them (cpu_qgemv.bound_group). None where any of them is not such a weight."""
    return cpu_qgemv.bound_group(qs, biases) if all(map(cpu_plain, qs)) else None


def corrections(y: torch.Tensor, x2: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The overlay rows and the low-rank term added to the codebook part y (float32 [M, N]) for inputs x2;
    with an overlay the kernel left the bias out, and it is added last."""
    if q.ov_rows is None and q.rank == 0:
        return y
    xf = x2.float()
    if q.ov_rows is not None:  # whole rows of W replaced by their 8-bit copies (in the unrotated basis)
        vals = xf @ (q.ov_q.float() * q.ov_s.float().unsqueeze(-1)).T  # [M, k]
        y = y.index_copy(1, q.ov_rows.long(), vals)
    if q.lr_u is not None:
        y = y + (xf @ q.lr_v.float().T) @ q.lr_u.float().T
    elif q.lr_uq is not None:
        v = q.lr_vq.float() * q.lr_vs.float().unsqueeze(-1)
        u = q.lr_uq.float() * q.lr_us.float().unsqueeze(-1)
        y = y + (xf @ v.T) @ u.T
    if q.ov_rows is not None and bias is not None:
        y = y + bias.float()
    return y
