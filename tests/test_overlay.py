"""Row overlay (SPEC.md 2.3): parts, reconstruction, bad shapes and indices, and the pack path."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor import codecs
from compressor.config import build_config
from compressor.overlay import add_overlay, row_bits
from compressor.pack import pack
from compressor.qweight import quantize_matrix
from ucformat import PackReader, errors, qtensor
from ucformat.manifest import MANIFEST_NAME, layer_file


def _weight(rows=24, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[5] *= 20  # a row the low-bit code serves badly
    return w


def test_overlay_rows_replace_the_codebook_rows():
    w = _weight()
    q = quantize_matrix(w, 2, 16, "gsq")
    before = (w - q.base()).square().sum(1)
    add_overlay(q, w, 3, None)
    assert q.ov_rows.tolist() == sorted(q.ov_rows.tolist()) and 5 in q.ov_rows.tolist()
    frozen = q.freeze()
    assert frozen.overlay_rows == 3 and frozen.ov_rows.dtype == torch.int32
    got = qtensor.dequantize(frozen)
    for r in q.ov_rows.tolist():  # int8 with a per-row scale: error at most half a step
        assert (got[r] - w[r]).abs().max() <= w[r].abs().max() / 254 * 1.01
    other = [r for r in range(w.shape[0]) if r not in q.ov_rows.tolist()]
    assert torch.equal(got[other], qtensor.dequantize(quantize_matrix(w, 2, 16, "gsq").freeze())[other])
    assert (w - got).square().sum() < before.sum() * 0.9
    # every bit of the overlay counts
    plain = quantize_matrix(w, 2, 16, "gsq").freeze().stored_bits()
    assert frozen.stored_bits() - plain == 3 * row_bits(w.shape[1])


def test_overlay_on_stacks_reconstructs_per_matrix():
    w = torch.randn(2, 8, 16)
    q = codecs.quantize(w, 3, 8, "uniform")
    q.ov_rows = torch.tensor([[1, 4], [0, 7]], dtype=torch.int32)
    q.ov_q = torch.full((2, 2, 16), 100, dtype=torch.int8)
    q.ov_s = torch.tensor([[0.5, 1.0], [2.0, 0.25]], dtype=torch.float16)
    got = qtensor.dequantize(q)
    assert torch.equal(got[0, 1], torch.full((16,), 50.0)) and torch.equal(got[1, 7], torch.full((16,), 25.0))
    assert torch.equal(got[0, 0], qtensor.dequantize(codecs.quantize(w, 3, 8, "uniform"))[0, 0])
    assert q.expected_shapes()["ov_q"] == (2, 2, 16)


@pytest.fixture(scope="module")
def overlay_pack(tiny_templates, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ov") / "pack"
    pack(tiny_templates("llama"), dst, build_config(bits=2, block_size=32, overlay=0.1), progress=False)
    return dst


def test_pack_with_overlay_round_trips(overlay_pack):
    r = PackReader(overlay_pack)
    assert "overlay" in r.manifest.requires
    entries = [e for e in r.manifest.tensors.values() if e.kind == "quantized"]
    assert entries and all(e.overlay_rows > 0 for e in entries)
    for e in entries:
        assert e.stored_bytes * 8 >= e.overlay_rows * row_bits(e.shape[-1])
    sd = r.layer_state_dict(0, torch.float32)
    assert all(torch.isfinite(t).all() for t in sd.values())


def _rewrite(pack_dir, key, value):
    """Replace one stored tensor and fix the manifest's size and hash (a well-formed but bad file)."""
    from ucformat.manifest import sha256_file

    p = pack_dir / layer_file(0)
    d = load_file(str(p))
    d[key] = value
    save_file(d, str(p))
    m = json.loads((pack_dir / MANIFEST_NAME).read_text())
    m["files"][layer_file(0)] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize("bad", ["shape", "dtype", "order", "range"])
def test_bad_overlay_parts_are_tensor_errors(overlay_pack, tmp_path, bad):
    import shutil

    dst = shutil.copytree(overlay_pack, tmp_path / "p")
    name = next(n for n, e in PackReader(dst).manifest.tensors.items() if e.file == layer_file(0) and e.overlay_rows)
    rows = load_file(str(dst / layer_file(0)))[name + ".ov_rows"]
    key, value = {
        "shape": (name + ".ov_q", torch.zeros(1, 3, dtype=torch.int8)),
        "dtype": (name + ".ov_rows", rows.to(torch.int64)),
        "order": (name + ".ov_rows", rows.flip(0)),
        "range": (name + ".ov_rows", rows + 10_000),
    }[bad]
    _rewrite(dst, key, value)
    with pytest.raises(errors.TensorError, match="ov_"):
        PackReader(dst).layer_state_dict(0)


def test_manifest_must_require_overlay(overlay_pack, tmp_path):
    import shutil

    dst = shutil.copytree(overlay_pack, tmp_path / "p")
    m = json.loads((dst / MANIFEST_NAME).read_text())
    m["requires"] = [f for f in m["requires"] if f != "overlay"]
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(errors.ManifestError, match="overlay"):
        PackReader(dst)
