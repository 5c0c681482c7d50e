"""The Triton quantized matmul (ucformat/triton_qgemv.py) against the reference reconstruction: every code
width, odd shapes, both scale paths, rotation, bias, split-K, half-precision inputs.

Without CUDA the kernel runs on Triton's CPU interpreter: TRITON_INTERPRET=1 has to be set when the kernel
is decorated (triton.jit reads it then), so it is set here while the module is imported and put back at
once (no other test sees it). triton itself may have been imported before without it (building a
transformers model imports it): the kernel uses no jit code of triton.language, which would then not run
on the interpreter. With CUDA the same cases run the compiled kernel on the GPU.
"""

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from compressor import codecs
from ucformat import bitpack, qtensor

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[test]')")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_prev = os.environ.get("TRITON_INTERPRET")
try:
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
        if "ucformat.triton_qgemv" in sys.modules:  # decorated earlier without the interpreter
            importlib.reload(sys.modules["ucformat.triton_qgemv"])
    from ucformat import triton_qgemv
finally:
    if _prev is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _prev


def weight(n: int, k: int, bits: int, block: int, rotation: int = 0, seed: int = 0) -> qtensor.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))  # rows of different scales
    q = codecs.quantize(w, bits, block, "gsq", rotation=rotation)
    assert q.rotation == rotation
    return q.to(DEVICE)


def reference(x: torch.Tensor, q, bias=None) -> torch.Tensor:
    """float32 x W^T + b with W the reference reconstruction."""
    return F.linear(x.float(), qtensor.dequantize(q), None if bias is None else bias.float())


def check(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Close up to float32 summation order (relative to the output's magnitude) or the output's rounding."""
    assert y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=1e-5 * ref.abs().max().item())


def test_available_and_supports(monkeypatch):
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not triton_qgemv.available()[0]  # no GPU, no interpreter asked for: qmatmul rebuilds
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_qgemv.available() == (True, None)
    q = weight(8, 64, 4, 32)
    assert triton_qgemv.supports(q)
    assert not triton_qgemv.supports(qtensor.QuantizedTensor(**{**q.__dict__, "shape": (1, 8, 64)}))
    assert not triton_qgemv.supports(qtensor.QuantizedTensor(**{**q.__dict__, "grid": q.grid.double()}))
    assert not triton_qgemv.supports(qtensor.QuantizedTensor(**{**q.__dict__, "scales": q.scales.float()}))
    grad = q.scales.clone().requires_grad_()
    assert not triton_qgemv.supports(qtensor.QuantizedTensor(**{**q.__dict__, "scales": grad}))


# (N, K, block, rotation, M): K not a multiple of 8, a last partial tile and two K splits (one row: the
# GEMV path); a tile per scale block (broadcast sums); the rotation with 16 rows (tl.dot) and with 6 (8-row
# tiles); a block size with no power-of-two factor >= 16 (a scale per weight).
SHAPES = [(37, 203, 64, 0, 1), (40, 96, 32, 0, 3), (24, 128, 64, 64, 16), (29, 160, 32, 32, 6), (20, 120, 40, 0, 2)]


@pytest.mark.parametrize("bits", bitpack.WIDTHS)
@pytest.mark.parametrize("n,k,block,rotation,m", SHAPES)
def test_matches_reference(bits, n, k, block, rotation, m):
    q = weight(n, k, bits, block, rotation, seed=bits)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    check(triton_qgemv.linear(x, q), reference(x, q))
    y = triton_qgemv.linear(x, q, bias)
    assert y.dtype == torch.float32
    check(y, reference(x, q, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotation", [0, 64])
def test_half_inputs_and_float_out(dtype, rotation):
    q = weight(33, 192, 5, 64, rotation)
    x = torch.randn(3, 192, device=DEVICE).to(dtype)
    bias = torch.randn(33, device=DEVICE).to(dtype)
    ref = reference(x, q, bias)
    y = triton_qgemv.linear(x, q, bias)
    assert y.dtype == dtype
    check(y, ref.to(dtype).float(), rtol=2**-7)  # one rounding of the float32 result, either side
    y = triton_qgemv.linear(x, q, bias, float_out=True)
    assert y.dtype == torch.float32
    check(y, ref)


def test_split_k_and_row_tiles():
    """The K splits (partial sums added in torch) and more than 16 activation rows (a third grid axis) give the
    one-pass result; activations with a row stride other than K are read as such."""
    q = weight(18, 512, 3, 64)
    x = torch.randn(20, 600, device=DEVICE)[:, :512]
    bias = torch.randn(18, device=DEVICE)
    ref = reference(x, q, bias)
    one = triton_qgemv.linear(x[:1], q, bias, split_k=1)
    check(one, ref[:1])
    for s in (2, 3, 100):  # 100: capped at one K tile a split
        check(triton_qgemv.linear(x[:1], q, bias, split_k=s), ref[:1])
    check(triton_qgemv.linear(x, q, bias), ref)


def test_shape_mismatch_and_empty_inputs():
    q = weight(8, 64, 4, 32)
    assert triton_qgemv.linear(torch.randn(0, 64, device=DEVICE), q).shape == (0, 8)
    with pytest.raises(ValueError, match="do not match"):
        triton_qgemv.linear(torch.randn(2, 63, device=DEVICE), q)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_kernel_at_model_sizes():
    """The compiled kernel at a model's shapes, every width, decode row counts, and qmatmul dispatching to it."""
    from ucformat import qmatmul

    for bits in bitpack.WIDTHS:
        q = weight(1000, 2048, bits, 64, rotation=64, seed=bits)
        bias = torch.randn(1000, device="cuda")
        for m in (1, 2, 5, 16):
            x = torch.randn(m, 2048, device="cuda")
            check(triton_qgemv.linear(x, q, bias), reference(x, q, bias))
        xb = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
        assert qmatmul.path(xb, q) == "triton"
        check(qmatmul.linear(xb, q), reference(xb, q).to(torch.bfloat16).float(), rtol=2**-7)
