"""The output head's 8-bit copy (ucformat/qhead.py): the copy itself, the integer kernel reading it without a
table, and the runtime computing a float head from it on the CPU (tied and untied), only where the layers
compute from their codes with integer activations."""

import pytest
import torch
import torch.nn.functional as F

import ucformat
from compressor.config import PackConfig
from compressor.pack import pack
from conftest import make_tiny
from ucformat import cpu_qgemv, qhead, qlinear, qtensor

needs_kernel = pytest.mark.skipif(not cpu_qgemv.available()[0], reason="no native kernel")


@pytest.mark.parametrize("shape", [(40, 256), (33, 200), (7, 70)])
def test_copy_rounds_each_weight_within_half_a_step(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 1, shape[1])
    w[0, :64] = 0  # an all-zero block: scale 0, codes 128
    q = qhead.int8_copy(w.bfloat16())
    assert q.bits == 8 and torch.equal(q.grid, torch.arange(256.0) - 128)
    d = qtensor.dequantize(q)
    step = q.scales.float().repeat_interleave(qhead.BLOCK, 1)[:, :shape[1]]
    assert ((d - w.bfloat16().float()).abs() <= step / 2 + 1e-6).all()
    assert (d[0, :64] == 0).all()


@needs_kernel
def test_integer_kernel_reads_the_codes_as_weights():
    q = qhead.int8_copy(torch.randn(50, 320, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(2))
    ref = F.linear(x.double(), qtensor.dequantize(q).double())
    for act, tol in (("int16", 2e-4), ("float", 2e-6)):
        y = cpu_qgemv.linear(x, q, act=act).double()
        assert (y - ref).abs().max() <= tol * ref.abs().max(), act


@needs_kernel
@pytest.mark.parametrize("tied", [True, False])
def test_runtime_computes_a_float_head_from_its_copy(tied, tmp_path, monkeypatch):
    src = make_tiny(tmp_path / "src", "llama", dtype=torch.float32, tie_word_embeddings=tied)
    p = tmp_path / "pack"
    pack(src, p, PackConfig(bits=4, block_size=32), progress=False)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    dense = ucformat.load(p, residency="dense")
    ref = dense(ids).logits
    dense_bytes = dense.uc_runtime.stats().resident_bytes
    for act, copied in (("int16", True), ("float", False)):
        monkeypatch.setattr(cpu_qgemv, "ACT", act)
        m = ucformat.load(p, residency="packed")
        head = m.get_output_embeddings()
        assert m.uc_runtime.head8 == copied and isinstance(head, qlinear.QuantLinear) == copied
        if copied:
            assert head.q.bits == 8
            assert (m.get_input_embeddings().weight.device.type != "meta")  # the embeddings keep their floats
        out = m(ids).logits
        err = (out - ref).abs().max().item()
        assert err <= (1e-2 if copied else 1e-5) * ref.abs().max().item()
        assert m.uc_runtime.stats().resident_bytes < dense_bytes
    # stream and kernels off: the same rule (the copy only where layers compute from their codes)
    monkeypatch.setattr(cpu_qgemv, "ACT", "int16")
    floor = ucformat.plan(p, residency="stream", vram_budget="100%").min_stream_bytes
    assert ucformat.load(p, residency="stream", vram_budget=floor).uc_runtime.head8
    assert not ucformat.load(p, residency="packed", kernels=False).uc_runtime.head8
