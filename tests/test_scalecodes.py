"""8-bit block scales (SPEC.md 2.4): the code table, exact encode/decode, the format, the compressor's use."""

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor import allocate, codecs
from compressor.allocate import Choice
from compressor.config import build_config
from compressor.distill import Trainable
from compressor.pack import pack
from compressor.qweight import quantize_matrix
from conftest import rewrite_stored
from ucformat import PackReader, errors, qtensor, scalecodes
from ucformat.manifest import MANIFEST_NAME


def test_level_table_pinned():
    lv = scalecodes.LEVEL
    assert lv.dtype == torch.float32 and lv.shape == (256,)
    assert lv[0] == 0 and lv[255] == 1.0 and lv[223] == 0.5 and lv[191] == 0.25
    assert lv[1].item() == pytest.approx(2 ** (-254 / 32), rel=1e-7)
    assert bool((lv[1:] > lv[:-1]).all())
    # decode is one float32 product rounded to float16: pinned for one row
    q = torch.tensor([[255, 223, 0, 1, 200]], dtype=torch.uint8)
    got = scalecodes.decode(q, torch.tensor([0.0625], dtype=torch.float16))
    want = (torch.tensor(0.0625) * lv[q.long()]).to(torch.float16)
    assert torch.equal(got, want) and got[0, 0] == 0.0625 and got[0, 1] == 0.03125 and got[0, 2] == 0


def test_snap_encode_decode_are_exact_and_idempotent():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(64, 24, generator=g) * torch.logspace(-6, 0, 64).unsqueeze(1)  # rows down to fp16 subnormals
    s[0, :5] = 0
    s[1] = 0  # an all-zero row
    s[2, 3] = s[2].max() * 1e-4  # far below the row's smallest code: becomes 0
    snapped = scalecodes.snap(s)
    assert snapped.dtype == torch.float16
    q, smax = scalecodes.encode(snapped)
    assert q.dtype == torch.uint8 and smax.shape == (64,)
    assert torch.equal(scalecodes.decode(q, smax), snapped)
    assert torch.equal(scalecodes.snap(snapped.float()), snapped)
    assert snapped[2, 3] == 0 and bool((snapped[1] == 0).all())
    normal = s > s.amax(1, keepdim=True) / 200
    normal &= s > 1e-4  # fp16 resolution, not the code table, limits the smallest rows
    rel = ((snapped.float() - s).abs() / s)[normal]
    assert rel.max() < 2 ** (1 / 64) - 1 + 1e-3  # within half a step (1.1%)
    with pytest.raises(ValueError, match="not representable"):
        scalecodes.encode(torch.tensor([[1.0, 0.7]], dtype=torch.float16))


def test_quantized_tensor_stores_codes_and_row_maxima():
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(1))
    q16, q8 = codecs.quantize(w, 4, 64, "gsq", 16), codecs.quantize(w, 4, 64, "gsq", 8)
    parts = q8.parts()
    assert parts["scales"].dtype == torch.uint8 and parts["scale_max"].shape == (40,)
    assert set(parts) == set(q8.expected_shapes())
    assert q16.stored_bits() - q8.stored_bits() == 40 * 4 * 8 - 40 * 16
    back = qtensor.from_parts(q8.shape, 4, 64, parts, 8)
    assert torch.equal(back.scales, q8.scales) and torch.equal(qtensor.dequantize(back), qtensor.dequantize(q8))
    # snapping costs next to nothing in reconstruction error
    e16 = (qtensor.dequantize(q16) - w).square().mean()
    e8 = (qtensor.dequantize(q8) - w).square().mean()
    assert e8 < e16 * 1.02


@pytest.mark.parametrize("bits,rank,rows", [(3, 4, 2), (5, 0, 0), (8, 8, 0)])
def test_allocation_prices_8bit_scales_exactly(bits, rank, rows):
    from compressor import lowrank, overlay

    w = torch.randn(20, 70)
    q = quantize_matrix(w, bits, 32, "gsq", scale_bits=8)
    if rows:
        overlay.add_overlay(q, w, rows, None)
    if rank:
        q.u, q.v = lowrank.weighted_svd(w - q.base(), rank)
    assert q.freeze().stored_bits() == allocate.stored_bits((20, 70), Choice(bits, rank, rows), 32, "int8", 8)


def test_gptq_rounds_against_storable_scales():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    q = quantize_matrix(w, 4, 32, "gsq", x.T @ x / 256, scale_bits=8)
    frozen = q.freeze()
    assert torch.equal(frozen.scales, q.scales.to(torch.float16))  # already storable: freeze changes nothing
    assert torch.equal(qtensor.dequantize(frozen), q.base())


def test_distillation_trains_the_stored_scales():
    """Straight through: the weight a step sees is the one the pack will store, yet gradients flow."""
    from compressor.config import CalibConfig

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q = quantize_matrix(w, 3, 32, "gsq", scale_bits=8)
    tr = Trainable(q, CalibConfig())
    with torch.no_grad():
        tr.log_s.add_(0.013)  # less than a step for some blocks, more for others
    wt = tr.weight(torch.float32)
    wt.square().sum().backward()
    assert tr.log_s.grad is not None and tr.log_s.grad.abs().sum() > 0
    tr.commit()
    assert torch.equal(qtensor.dequantize(q.freeze()), wt.detach())


@pytest.fixture(scope="module")
def u8_pack(tiny_templates, tmp_path_factory):
    dst = tmp_path_factory.mktemp("u8") / "pack"
    pack(tiny_templates("llama"), dst, build_config(target_bpw=4.0, scale_bits=8), progress=False)
    return dst


def test_budgeted_pack_with_8bit_scales(u8_pack, tiny_templates, tmp_path):
    r = PackReader(u8_pack)
    assert "scales-u8" in r.manifest.requires and r.manifest.quant["scale_bits"] == 8
    q = [e for e in r.manifest.tensors.values() if e.kind == "quantized"]
    assert q and all(e.scale_bits == 8 for e in q)
    assert r.manifest.stats["bpw_allin"] <= 4.0
    name, e = next((n, e) for n, e in r.manifest.tensors.items() if e.kind == "quantized")
    stored = load_file(str(u8_pack / e.file))
    assert stored[name + ".qscales"].dtype == torch.uint8 and name + ".qsmax" in stored
    assert r.read_quantized(name).scales.dtype == torch.float16
    # the default stores float16 scales: the same budget, about 0.1 bpw less for the codes
    wide = tmp_path / "wide"
    pack(tiny_templates("llama"), wide, build_config(target_bpw=4.0), progress=False)
    p = PackReader(wide)
    assert "scales-u8" not in p.manifest.requires and p.manifest.quant["scale_bits"] == 16
    assert all(e.scale_bits == 16 for e in p.manifest.tensors.values())


@pytest.mark.parametrize("damage,match", [
    (lambda t, n: t.__setitem__(n + ".qscales", t[n + ".qscales"].to(torch.float16)), r"\.qscales.*expected torch\.uint8"),
    (lambda t, n: t.pop(n + ".qsmax"), r"\.qsmax.*missing"),
])
def test_bad_scale_parts_name_the_tensor(u8_pack, tmp_path, damage, match):
    import shutil

    dst = shutil.copytree(u8_pack, tmp_path / "p")
    name = next(n for n, e in PackReader(dst).manifest.tensors.items() if e.kind == "quantized")
    rewrite_stored(dst, name, lambda t: damage(t, name))
    with pytest.raises(errors.TensorError, match=match):
        PackReader(dst).read_quantized(name)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(requires=[f for f in m["requires"] if f != "scales-u8"]), "scales-u8"),
    (lambda m: next(e for e in m["tensors"].values() if e["kind"] == "quantized").update(scale_bits=12), "scale_bits"),
])
def test_manifest_rules_for_8bit_scales(u8_pack, tmp_path, edit, match):
    import shutil

    dst = shutil.copytree(u8_pack, tmp_path / "p")
    m = json.loads((dst / MANIFEST_NAME).read_text())
    edit(m)
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(errors.ManifestError, match=match):
        PackReader(dst)
