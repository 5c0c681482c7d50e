import pytest
import torch

from compressor import codecs
from ucformat.qtensor import dequantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_uniform_error_bound(bits):
    w = torch.randn(48, 200) * 0.02
    q = codecs.quantize(w, bits, 64, "uniform")
    err = (dequantize(q) - w).abs()
    # Half a step of the [-1, 1] grid times the block scale, plus fp16 rounding of the scale.
    step = 2 / (2**bits - 1)
    scale = q.scales.float().repeat_interleave(64, -1)[:, :200]
    assert (err <= scale * (step / 2 + 1e-3) + 1e-7).all()


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_gsq_beats_uniform_and_is_deterministic(bits):
    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    g = codecs.quantize(w, bits, 64, "gsq")
    u = codecs.quantize(w, bits, 64, "uniform")
    mse = lambda q: ((dequantize(q) - w) ** 2).mean().item()  # noqa: E731
    # The learned grid gains most where levels are scarce; at 5 bits the uniform grid is near optimal.
    assert mse(g) < (0.9 if bits <= 4 else 1.0) * mse(u)
    g2 = codecs.quantize(w.clone(), bits, 64, "gsq")
    assert torch.equal(g.grid, g2.grid) and torch.equal(g.codes, g2.codes)


def test_zero_blocks_partial_blocks_and_experts():
    w = torch.randn(3, 16, 70)
    w[0, :, :64] = 0
    q = codecs.quantize(w, 4, 64, "gsq")
    assert q.grid.shape == (3, 16) and q.scales.shape == (3, 16, 2)
    d = dequantize(q)
    assert d.shape == w.shape and torch.isfinite(d).all()
    assert (d[0, :, :64] == 0).all()
    # each expert has its own grid: expert 1 alone gives the same result
    q1 = codecs.quantize(w[1], 4, 64, "gsq")
    assert torch.equal(dequantize(q1), d[1])


def test_eight_bit_is_nearly_lossless():
    w = torch.randn(64, 128)
    q = codecs.quantize(w, 8, 64, "gsq")
    rel = ((dequantize(q) - w).norm() / w.norm()).item()
    assert rel < 0.01


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown codec"):
        codecs.quantize(torch.randn(4, 8), 4, 64, "nope")
    with pytest.raises(ValueError, match="unsupported bits"):
        codecs.quantize(torch.randn(4, 8), 7, 64, "gsq")


@pytest.mark.parametrize("bits", [3, 4, 5, 6])
def test_searched_block_scales_round_better_than_absmax(bits):
    """Every block's searched scale rounds it no worse than its absmax scale (the absmax is a candidate),
    and over a matrix of heavy-tailed weights the error drops clearly; columns are weighted as asked."""
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(5.0).sample((96, 200)) * 0.02
    absmax, normed = codecs.block_scales(w, 64)
    grid = codecs.kmeans_grid(normed, absmax.float().repeat_interleave(64, -1)[:, :200] ** 2, 2**bits)
    col = torch.rand(200) + 0.1

    def block_err(scales):
        q = grid[codecs.nearest(codecs.normalise(w, scales, 64), grid)] * scales.float().repeat_interleave(64, -1)[:, :200]
        e = torch.nn.functional.pad((w - q).square() * col, (0, 56))
        return e.reshape(96, -1, 64).sum(-1)

    searched = codecs.fitted_scales(w, grid, 64, col)
    assert searched.dtype == torch.float16 and searched.shape == absmax.shape
    before, after = block_err(absmax), block_err(searched)
    assert (after <= before).all()
    assert after.sum() < 0.95 * before.sum()
    # with search, a quantized matrix stores the searched scales: its error is lower than absmax rounding
    q = codecs.quantize(w, bits, 64, "gsq", search=True)
    plain = grid[codecs.nearest(normed, grid)] * absmax.float().repeat_interleave(64, -1)[:, :200]
    assert ((dequantize(q) - w) ** 2).sum() < ((plain - w) ** 2).sum()


def test_uniform_codec_and_eight_bit_scales_under_the_search():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.02
    grid = torch.linspace(-1, 1, 16)
    # search off (the uniform baseline): exactly the absmax scales
    assert torch.equal(codecs.fitted_scales(w, grid, 64, search=False), codecs.block_scales(w, 64)[0])
    assert torch.equal(codecs.quantize(w, 4, 64, "uniform").scales, codecs.block_scales(w, 64)[0])
    assert torch.equal(codecs.quantize(w, 4, 64, "gsq").scales, codecs.block_scales(w, 64)[0])  # off by default
    assert not torch.equal(codecs.quantize(w, 4, 64, "gsq", search=True).scales, codecs.block_scales(w, 64)[0])
    # 8-bit scales: the searched scales are snapped to what each row can store
    s8 = codecs.fitted_scales(w, grid, 64, scale_bits=8)
    from ucformat import scalecodes
    assert torch.equal(s8, scalecodes.snap(s8.float()))
