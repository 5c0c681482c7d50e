"""Low-rank correction: activation-weighted SVD init, fp16 and int8 factors in the format, bad parts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor import lowrank
from compressor.config import build_config
from compressor.pack import pack
from compressor.qweight import int8_rows, quantize_matrix
from ucformat import PackReader, errors, qtensor
from ucformat.manifest import MANIFEST_NAME, layer_file, sha256_file


def _problem(rows=48, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(512, cols, generator=g) * torch.linspace(0.1, 3.0, cols)  # uneven input channels
    return w, x, x.T @ x / x.shape[0]


def test_weighted_svd_is_best_in_the_output_norm():
    w, x, h = _problem()
    q = quantize_matrix(w, 2, 16, "gsq")
    e = w - q.base()
    out_err = lambda u, v: ((e - u @ v) @ x.T).square().mean().item()  # noqa: E731
    u, v = lowrank.weighted_svd(e, 8, h)
    u0, v0 = lowrank.weighted_svd(e, 8, None)  # the plain SVD minimises the weight error instead
    assert out_err(u, v) < out_err(u0, v0) < out_err(torch.zeros(48, 8), torch.zeros(8, 64))
    # and the captured share agrees with the error it removes
    share = lowrank.captured(e, [8], h)[8]
    assert abs((1 - out_err(u, v) / out_err(torch.zeros(48, 8), torch.zeros(8, 64))) - share) < 0.05


def test_int8_rows_round_trip():
    x = torch.randn(7, 33)
    q, s = int8_rows(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (7,)
    back = q.float() * s.float().unsqueeze(1)
    assert ((back - x).abs().amax(1) <= x.abs().amax(1) / 254 * 1.01).all()
    assert torch.equal(int8_rows(torch.zeros(2, 3))[0], torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_factors_round_trip_through_the_format(dtype):
    w, _, h = _problem()
    q = quantize_matrix(w, 3, 16, "gsq", h, lowrank_dtype=dtype)
    q.u, q.v = lowrank.weighted_svd(w - q.base(), 4, h)
    frozen = q.freeze()
    assert frozen.rank == 4 and frozen.lowrank_dtype == dtype
    assert set(frozen.parts()) == set(frozen.expected_shapes())
    got = qtensor.dequantize(frozen)
    want = q.base() + q.u @ q.v
    assert (got - want).abs().max() < (0.02 if dtype == "int8" else 1e-3) * want.abs().max()


@pytest.fixture(scope="module")
def lr_pack(tiny_templates, tmp_path_factory):
    dst = tmp_path_factory.mktemp("lr") / "pack"
    pack(tiny_templates("llama"), dst, build_config(bits=3, block_size=32, rank=4), progress=False)
    return dst


def test_pack_with_rank_lists_features_and_counts_factor_bits(lr_pack, tiny_templates):
    r = PackReader(lr_pack)
    assert set(r.manifest.requires) == {"lowrank", "lowrank-int8"}
    e = next(e for e in r.manifest.tensors.values() if e.kind == "quantized")
    rows, cols = e.shape
    plain = qtensor.QuantizedTensor(e.shape, 3, 32, torch.zeros(rows, qtensor.bitpack.packed_row_bytes(cols, 3), dtype=torch.uint8),
                                    torch.zeros(rows, -(-cols // 32), dtype=torch.float16), torch.zeros(8))
    assert e.stored_bytes * 8 - plain.stored_bits() == (rows + cols) * 4 * 8 + (rows + 4) * 16
    # the correction helps: closer to the source than the same codes without it
    from compressor.checkpoint import SourceCheckpoint

    src = SourceCheckpoint(tiny_templates("llama"))
    name = next(n for n, e in r.manifest.tensors.items() if e.kind == "quantized" and e.file == layer_file(0))
    q = r.read_quantized(name)
    full = qtensor.dequantize(q)
    q.lr_uq = q.lr_us = q.lr_vq = q.lr_vs = None
    assert (full - src.get(name).float()).norm() < (qtensor.dequantize(q) - src.get(name).float()).norm()


def _rewrite(pack_dir, key, value):
    p = pack_dir / layer_file(0)
    d = load_file(str(p))
    d[key] = value
    save_file(d, str(p))
    m = json.loads((pack_dir / MANIFEST_NAME).read_text())
    m["files"][layer_file(0)] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize("part,bad", [(".lr_uq", "shape"), (".lr_vs", "shape"), (".lr_vq", "dtype"), (".lr_us", "missing")])
def test_bad_factor_parts_are_tensor_errors(lr_pack, tmp_path, part, bad):
    dst = shutil.copytree(lr_pack, tmp_path / "p")
    name = next(n for n, e in PackReader(dst).manifest.tensors.items() if e.file == layer_file(0) and e.rank)
    t = load_file(str(dst / layer_file(0)))[name + part]
    if bad == "missing":
        p = dst / layer_file(0)
        d = load_file(str(p))
        del d[name + part]
        save_file(d, str(p))
        m = json.loads((dst / MANIFEST_NAME).read_text())
        m["files"][layer_file(0)] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        (dst / MANIFEST_NAME).write_text(json.dumps(m))
    else:
        _rewrite(dst, name + part, t[..., :-1].contiguous() if bad == "shape" else t.to(torch.float16))
    with pytest.raises(errors.TensorError, match=part.replace(".", r"\.")):
        PackReader(dst).layer_state_dict(0)


def test_unknown_lowrank_dtype_and_missing_feature_are_manifest_errors(lr_pack, tmp_path):
    dst = shutil.copytree(lr_pack, tmp_path / "p")
    m = json.loads((dst / MANIFEST_NAME).read_text())
    m["requires"] = ["lowrank"]
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(errors.ManifestError, match="lowrank-int8"):
        PackReader(dst)
    name = next(n for n, e in m["tensors"].items() if e["kind"] == "quantized")
    m["requires"] = ["lowrank", "lowrank-int8"]
    m["tensors"][name]["lowrank_dtype"] = "int4"
    (dst / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(errors.ManifestError, match="lowrank_dtype"):
        PackReader(dst)
