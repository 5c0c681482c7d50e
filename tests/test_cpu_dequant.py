"""The native CPU dequantization kernel (ucformat/cpu_dequant.py): the same floats as the torch path, bit
for bit, for every code width, block sizes, ragged columns and stacked (MoE) matrices."""

import pytest
import torch

from ucformat import bitpack, cpu_dequant, qtensor


@pytest.fixture(scope="module", autouse=True)
def kernel():
    ok, why = cpu_dequant.available()
    if not ok:
        pytest.skip(f"native kernel unavailable here: {why}")


def random_q(shape, bits, block, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    *lead, rows, cols = shape
    codes = torch.randint(0, 2 ** bits, shape, generator=g).to(torch.uint8)
    scales = (torch.rand(*lead, rows, -(-cols // block), generator=g) + 1e-3).half()
    grid = torch.randn(*lead, 2 ** bits, generator=g)
    return qtensor.QuantizedTensor(tuple(shape), bits, block, bitpack.pack(codes, bits), scales, grid, **extra)


@pytest.mark.parametrize("bits", bitpack.WIDTHS)
@pytest.mark.parametrize("shape,block", [((37, 101), 32), ((64, 576), 64), ((3, 16, 72), 8), ((5, 130), 128)])
def test_native_equals_torch_path_bitwise(bits, shape, block):
    q = random_q(shape, bits, block)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(qtensor.dequantize(q, dtype), qtensor.dequantize(q, dtype, native=False))
    fast = cpu_dequant.dequant_levels(q.codes, q.scales, q.grid, bits, block, q.shape)
    assert fast is not None and fast.dtype == torch.float32


def test_corrections_apply_after_the_kernel():
    g = torch.Generator().manual_seed(1)
    q = random_q((48, 80), 3, 16, lr_u=torch.randn(48, 4, generator=g).half(),
                 lr_v=torch.randn(4, 80, generator=g).half(), ov_rows=torch.tensor([2, 30], dtype=torch.int32),
                 ov_q=torch.randint(-127, 128, (2, 80), generator=g).to(torch.int8), ov_s=torch.rand(2).half())
    assert torch.equal(qtensor.dequantize(q), qtensor.dequantize(q, native=False))


def test_unsupported_inputs_fall_back():
    q = random_q((8, 24), 4, 12)  # block not a multiple of 8
    assert cpu_dequant.dequant_levels(q.codes, q.scales, q.grid, 4, 12, q.shape) is None
    assert torch.equal(qtensor.dequantize(q), qtensor.dequantize(q, native=False))
    grad = random_q((8, 64), 4, 32)
    grad.grid.requires_grad_(True)
    assert cpu_dequant.dequant_levels(grad.codes, grad.scales, grad.grid, 4, 32, grad.shape) is None
