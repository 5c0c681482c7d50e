"""Linears computed from a pack's codes (ucformat/qmatmul.py, cpu_qgemv.cpp) against the slow reference
F.linear(x, dequantize(q)): every code width, every instruction set this CPU has, odd shapes, 1-32 rows,
rotation, low-rank factors, the row overlay; the path choice and the fallbacks. The float path is checked
against it to float rounding; the integer path (the default, UC_CPU_ACT=int16) against a torch model of
its own rounding, and against the float reference with the tolerance docs/SERVER.md states."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from compressor.codecs import quantize
from ucformat import bitpack, cpu_qgemv, qmatmul, qtensor
from ucformat import rotation as rot

pytestmark = pytest.mark.skipif(not cpu_qgemv.available()[0], reason=f"no native kernel: {cpu_qgemv.available()[1]}")

# (rows N, cols K, block, rotation): whole chunks; a row tail that is not a whole chunk (K=200); a block
# smaller than the AVX-512 chunk (scalar there); K not a multiple of 8 (padded codes); rotated weights
SHAPES = [(40, 256, 64, 0), (37, 200, 64, 0), (24, 96, 16, 0), (9, 70, 32, 0), (48, 256, 64, 64), (33, 384, 128, 128)]
ROWS = [1, 2, 5, 8, 16, 17, 32]


def isas() -> list[str]:
    best = cpu_qgemv.ISAS[cpu_qgemv.isa()]
    return [name for name, level in cpu_qgemv.ISAS.items() if level <= best]


def weight(n: int, k: int, bits: int, block: int, rotation: int, seed: int = 0) -> qtensor.QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.2, 2.0, k)  # uneven columns: scales differ per block
    return quantize(w, bits, block, "gsq", rotation=rotation, seed=seed, name="w")


def reference(x: torch.Tensor, q: qtensor.QuantizedTensor, bias=None) -> torch.Tensor:
    return F.linear(x.double(), qtensor.dequantize(q).double(), None if bias is None else bias.double())


def close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.double() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err:.3g} against max |y| {ref.abs().max().item():.3g}"


@pytest.mark.parametrize("bits", bitpack.WIDTHS)
@pytest.mark.parametrize("isa", isas())
def test_kernel_matches_reference(bits, isa):
    g = torch.Generator().manual_seed(bits)
    for n, k, block, rotation in SHAPES:
        q = weight(n, k, bits, block, rotation)
        assert q.rotation == rotation
        bias = torch.randn(n, generator=g)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            close(cpu_qgemv.linear(x, q, isa=isa, act="float"), reference(x, q), 2e-6)
            close(cpu_qgemv.linear(x, q, bias, isa=isa, act="float"), reference(x, q, bias), 2e-6)


def integer_reference(x: torch.Tensor, q: qtensor.QuantizedTensor) -> torch.Tensor:
    """What the integer path computes, in torch: the grid rounded to 12 bits (max |level| / 2047), each
    whole block of activations (after the rotation) to 15 bits (max |x| / 16383), products summed exactly;
    columns after the last whole block in float, as the float path."""
    n, k = q.shape
    b = q.block_size
    xr = rot.rotate(x.float(), rot.unpack_signs(q.rot_signs, k), q.rotation) if q.rotation else x.float()
    codes = bitpack.unpack(q.codes, q.bits, k).long()
    grid = q.grid.reshape(-1).double()
    gs = grid.abs().max() / 2047
    scales = q.scales.double().repeat_interleave(b, 1)[:, :k]
    whole = k // b * b if b % 32 == 0 and b <= 256 and k >= b else 0
    y = xr[:, whole:].double() @ (grid[codes[:, whole:]] * scales[:, whole:]).T
    for j in range(0, whole, b):
        xb = xr[:, j:j + b]
        mx = xb.abs().amax(1, keepdim=True)
        xq = torch.round(xb * torch.where(mx > 0, 16383 / mx, 0)).double()
        w = torch.round(grid / gs)[codes[:, j:j + b]] * scales[:, j:j + b]
        y += (xq @ w.T) * (mx / 16383).double() * gs
    return y


# blocks of 32 .. 256 whole chunks take the integer path; 16 and 512 the float one (their own reference)
INT_SHAPES = SHAPES + [(37, 224, 64, 0), (20, 256, 256, 0), (12, 1024, 512, 0)]


@pytest.mark.parametrize("il8", [True, False])
@pytest.mark.parametrize("bits", bitpack.WIDTHS)
def test_integer_path_matches_its_reference(bits, il8, monkeypatch):
    """int16 activations: equal to a torch model of the same rounding (up to a rounding of x that float
    order can flip), and within 1e-3 of max |y| of the exact float sums (measured: about 3e-4); with the
    il8 copy of the codes (b <= 4, the default) and without it (UC_CPU_IL8=0, the row-major kernel)."""
    monkeypatch.setattr(cpu_qgemv, "IL8", il8)
    g = torch.Generator().manual_seed(10 + bits)
    for n, k, block, rotation in INT_SHAPES:
        q = weight(n, k, bits, block, rotation)
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            y = cpu_qgemv.linear(x, q, act="int16")
            if bits == 8 or block % 32 or block > 256:  # not covered: the float path, to float rounding
                close(y, reference(x, q), 2e-6)
                continue
            close(y, integer_reference(x, q), 3e-5)
            close(y, reference(x, q), 1e-3)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_integer_path_rows_do_not_depend_on_the_batch(bits):
    """Each activation row is rounded on its own and summed exactly: a row's output is the same bits alone
    or among others (tiles of 1, 2 and 4 rows), unlike the float path's tile-dependent order."""
    q = weight(40, 256, bits, 64, 64)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(4))
    together = cpu_qgemv.linear(x, q, act="int16")
    for i in range(7):
        assert torch.equal(cpu_qgemv.linear(x[i:i + 1], q, act="int16")[0], together[i])


@pytest.mark.parametrize("bits", [2, 4, 5, 6, 8])
def test_integer_path_weight_rows_do_not_depend_on_their_neighbours(bits):
    """At one activation row the integer path walks weight rows in pairs (the last of an odd count alone):
    each row's output is the same bits as that row computed on its own."""
    q = weight(9, 256, bits, 64, 0) if bits != 8 else qhead_copy(9, 256)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5))
    together = cpu_qgemv.linear(x, q, act="int16")
    for r in range(9):
        one = dataclasses.replace(q, shape=(1, 256), codes=q.codes[r:r + 1], scales=q.scales[r:r + 1])
        assert torch.equal(cpu_qgemv.linear(x, one, act="int16")[0, 0], together[0, r])


def qhead_copy(n: int, k: int) -> qtensor.QuantizedTensor:
    from ucformat import qhead

    return qhead.int8_copy(torch.randn(n, k, generator=torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_il8_layout_equals_the_row_major_kernel(bits, monkeypatch):
    """The il8 copy (8 weight rows in the lanes, cpu_qgemv.cpp il_pack) is used wherever it applies and gives
    the row-major integer kernel's numbers up to the order of the float sums over blocks: row counts that
    are not a multiple of 8 (the last group padded), columns after the last whole block (the scalar tail),
    rotation, tiles of 4, 2 and 1 activation rows, long rows (columns in passes), b = 5 (the fifth bits
    beside the nibbles), b = 8 over the integer grid (the output head's copy)."""
    # ... and columns in passes of 2048 (il_rows): 65 blocks of 64 are three passes, the last one block
    shapes = [(37, 224, 64, 0), (9, 200, 64, 0), (48, 256, 64, 64), (8, 96, 32, 0), (20, 256, 256, 0), (11, 4160, 64, 0)]
    g = torch.Generator().manual_seed(20 + bits)
    for n, k, block, rotation in shapes:
        q = qhead_copy(n, k) if bits == 8 else weight(n, k, bits, block, rotation)
        monkeypatch.setattr(cpu_qgemv, "IL8", True)
        ilc, ils = cpu_qgemv._il8(q)
        assert ilc.numel() == (n + 7) // 8 * (k // q.block_size * q.block_size) * {8: 8, 5: 5}.get(bits, 4)
        assert tuple(ils.shape) == ((n + 7) // 8, q.scales.shape[1], 8)
        row_major = dataclasses.replace(q)  # no il8 copy on it: the row-major kernel
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            monkeypatch.setattr(cpu_qgemv, "IL8", True)
            y = cpu_qgemv.linear(x, q, act="int16")
            monkeypatch.setattr(cpu_qgemv, "IL8", False)
            y0 = cpu_qgemv.linear(x, row_major, act="int16")
            close(y, y0.double(), 1e-6)
            assert torch.equal(cpu_qgemv.bound(q)(x), y)  # bound or not, the same copy and kernel


def test_il8_is_not_made_where_it_does_not_apply(monkeypatch):
    """No copy (and no extra memory) for 6-bit codes, 8-bit codes over another grid, blocks the
    integer path does not take, float activations, UC_CPU_IL8=0, or a streamed layer's parts."""
    cases = [weight(16, 256, 6, 64, 0), weight(16, 256, 8, 64, 0), weight(16, 256, 4, 16, 0),
             weight(16, 1024, 4, 512, 0)]
    for q in cases:
        assert cpu_qgemv._il8(q)[0].numel() == 0
    q = weight(16, 256, 4, 64, 0)
    assert cpu_qgemv._il8(q, "float")[0].numel() == 0
    monkeypatch.setattr(cpu_qgemv, "IL8", False)
    assert cpu_qgemv._il8(q)[0].numel() == 0
    monkeypatch.setattr(cpu_qgemv, "IL8", True)
    assert cpu_qgemv._il8(q)[0].numel() > 0
    assert cpu_qgemv._il8(q)[0] is cpu_qgemv._il8(q)[0]  # made once per weight
    streamed = weight(16, 256, 4, 64, 0)
    cpu_qgemv.per_pass(streamed)  # a streamed layer's parts (ucformat/streaming.py): bound for one pass
    assert cpu_qgemv._il8(streamed)[0].numel() == 0


def test_integer_path_keeps_outliers():
    """Activations with one outlier per block 200x the rest (as on SmolLM2): 15-bit rounding keeps the
    small values to about 1% each, so the sum stays within 1e-3; 8 bits would lose them."""
    g = torch.Generator().manual_seed(3)
    q = weight(64, 512, 4, 64, 0)
    x = torch.randn(4, 512, generator=g)
    x[:, ::64] = 200.0
    close(cpu_qgemv.linear(x, q, act="int16"), reference(x, q), 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_inputs_sum_in_float32(dtype):
    q = weight(64, 256, 4, 64, 64)
    x = torch.randn(3, 256).to(dtype)
    ref = reference(x.float(), q)
    y = cpu_qgemv.linear(x, q, act="float")
    assert y.dtype == dtype
    close(y, ref, 1e-2)  # one rounding of the output to 8/11 mantissa bits
    yf = cpu_qgemv.linear(x, q, float_out=True, act="float")
    assert yf.dtype == torch.float32
    close(yf, ref, 2e-6)


def with_corrections(q: qtensor.QuantizedTensor, int8: bool, overlay: bool, rank: int = 4) -> qtensor.QuantizedTensor:
    n, k = q.shape
    g = torch.Generator().manual_seed(7)
    extra = {}
    if int8:
        extra.update(lr_uq=torch.randint(-127, 128, (n, rank), generator=g, dtype=torch.int8),
                     lr_us=(torch.rand(n, generator=g) * 1e-3).half(),
                     lr_vq=torch.randint(-127, 128, (rank, k), generator=g, dtype=torch.int8),
                     lr_vs=(torch.rand(rank, generator=g) * 1e-2).half())
    else:
        extra.update(lr_u=(torch.randn(n, rank, generator=g) * 0.1).half(),
                     lr_v=(torch.randn(rank, k, generator=g) * 0.1).half())
    if overlay:
        rows = torch.tensor([0, 5, n - 1], dtype=torch.int32)
        extra.update(ov_rows=rows, ov_q=torch.randint(-127, 128, (3, k), generator=g, dtype=torch.int8),
                     ov_s=(torch.rand(3, generator=g) * 0.02).half())
    return dataclasses.replace(q, **extra)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("overlay", [False, True])
@pytest.mark.parametrize("rotation", [0, 64])
def test_qmatmul_adds_overlay_and_low_rank(int8, overlay, rotation, monkeypatch):
    monkeypatch.setattr(cpu_qgemv, "ACT", "float")  # the corrections to float rounding
    q = with_corrections(weight(48, 256, 5, 64, rotation), int8, overlay)
    bias = torch.randn(48)
    for m in (1, 4, 32):
        x = torch.randn(2, m, 256)  # leading dimensions are kept
        assert qmatmul.path(x.reshape(-1, 256), q) == ("cpu" if 2 * m <= qmatmul.CPU_MAX_ROWS else "rebuild")
        y = qmatmul.linear(x, q, bias)
        assert y.shape == (2, m, 48)
        close(y, reference(x, q, bias), 1e-5)


def test_long_inputs_rebuild_and_equal_dense_bitwise():
    q = weight(40, 256, 4, 64, 64)
    x = torch.randn(qmatmul.CPU_MAX_ROWS + 1, 256).bfloat16()
    assert qmatmul.path(x, q) == "rebuild"
    assert torch.equal(qmatmul.linear(x, q), F.linear(x, qtensor.dequantize(q, torch.bfloat16)))


def test_rows_limit_override(monkeypatch):
    q = weight(40, 256, 4, 64, 0)
    monkeypatch.setattr(qmatmul, "_ENV_ROWS", 2)  # what UC_KERNEL_MAX_ROWS=2 sets at import
    assert qmatmul.path(torch.randn(3, 256), q) == "rebuild"
    assert qmatmul.path(torch.randn(2, 256), q) == "cpu"
    monkeypatch.setattr(qmatmul, "_ENV_ROWS", 0)
    assert qmatmul.path(torch.randn(1, 256), q) == "rebuild"


@pytest.mark.parametrize("var, value", [("UC_CPU_ISA", "sse9"), ("UC_CPU_ACT", "int4")])
def test_env_names_are_checked(var, value):
    env = {**os.environ, var: value}
    r = subprocess.run([sys.executable, "-c", "import ucformat.cpu_qgemv"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and f"{var}={value!r}" in r.stderr


def test_no_native_build_falls_back_to_rebuild():
    """UC_NATIVE=0 (as without a compiler): the kernel is unavailable and every call rebuilds the weight,
    giving the dense residency's numbers bit for bit."""
    code = ("import torch, torch.nn.functional as F\n"
            "from compressor.codecs import quantize\n"
            "from ucformat import qmatmul, qtensor, cpu_qgemv\n"
            "q = quantize(torch.randn(16, 64), 4, 32, 'gsq')\n"
            "x = torch.randn(1, 64)\n"
            "assert not cpu_qgemv.available()[0] and 'UC_NATIVE=0' in cpu_qgemv.available()[1]\n"
            "assert qmatmul.path(x, q) == 'rebuild'\n"
            "assert torch.equal(qmatmul.linear(x, q), F.linear(x, qtensor.dequantize(q, native=False)))\n"
            "print('fallback ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "UC_NATIVE": "0"}, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "fallback ok" in r.stdout, r.stderr


def test_quantlinear_binds_its_parts_and_computes_what_qmatmul_does():
    """QuantLinear calls the kernel with its parts bound (decode rows on the CPU), bound again whenever the
    runtime attaches other parts or another bias; above the row limit it goes through qmatmul.linear."""
    from ucformat.qlinear import QuantLinear

    q1, q2 = weight(40, 256, 4, 64, 0), weight(40, 256, 5, 64, 64, seed=1)
    lin = QuantLinear(torch.nn.Linear(256, 40))
    lin.q, lin.bias = q1, torch.nn.Parameter(torch.randn(40))
    x = torch.randn(2, 3, 256)
    assert torch.equal(lin(x), qmatmul.linear(x, q1, lin.bias))
    lin.q = q2
    assert torch.equal(lin(x), qmatmul.linear(x, q2, lin.bias))
    lin.bias = torch.nn.Parameter(torch.zeros(40))
    assert torch.equal(lin(x), qmatmul.linear(x, q2, lin.bias))
    long = torch.randn(qmatmul.CPU_MAX_ROWS + 1, 256)
    assert torch.equal(lin(long), qmatmul.linear(long, q2, lin.bias))


@pytest.mark.parametrize("act", cpu_qgemv.ACTS)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_group_call_equals_one_call_per_weight(act, rows, monkeypatch):
    """Weights that read the same input in one kernel call (q/k/v, gate/up): each output bit for bit what its
    own call gives, with widths, block sizes, rotations and biases differing between the weights."""
    monkeypatch.setattr(cpu_qgemv, "ACT", act)
    qs = [weight(40, 256, 4, 64, 0), weight(24, 256, 5, 32, 64, seed=1), weight(9, 256, 3, 128, 0, seed=2)]
    biases = [torch.randn(40), None, torch.randn(9)]
    x = torch.randn(rows, 1, 256)
    group = qmatmul.cpu_group_call(qs, biases)
    ys = group(x)
    assert [tuple(y.shape) for y in ys] == [(rows, 1, 40), (rows, 1, 24), (rows, 1, 9)]
    for y, q, b in zip(ys, qs, biases):
        assert torch.equal(y, cpu_qgemv.bound(q, b)(x))
    # a weight the kernel does not take (low-rank term): no group call
    lowrank = dataclasses.replace(qs[0], lr_u=torch.zeros(40, 2, dtype=torch.float16),
                                  lr_v=torch.zeros(2, 256, dtype=torch.float16))
    assert qmatmul.cpu_group_call([lowrank, qs[1]], [None, None]) is None
