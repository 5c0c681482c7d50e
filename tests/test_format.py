"""The pack format: round trip, and every error path of SPEC.md section 3-6 on adversarial files."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from compressor.checkpoint import SourceCheckpoint
from compressor.config import PackConfig
from compressor.pack import pack
from ucformat import PackReader, errors
from ucformat.inspect import verify
from ucformat.manifest import MANIFEST_NAME, PROGRESS_NAME, layer_file


@pytest.fixture
def packed(tiny_llama, tmp_path):
    pack(tiny_llama, tmp_path / "pack", PackConfig(bits=4), progress=False)
    return tmp_path / "pack"


def test_round_trip(tiny_llama, packed):
    r = PackReader(packed)
    src = SourceCheckpoint(tiny_llama)
    assert r.num_layers == 2 and r.manifest.layer_prefix == "model.layers."
    assert set(r.manifest.tensors) == set(src.weight_map)
    assert (packed / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()
    sd = r.layer_state_dict(1)
    for name, t in sd.items():
        ref = src.get(name)
        assert t.dtype == ref.dtype and t.shape == ref.shape
        if r.manifest.tensors[name].kind == "raw":
            assert torch.equal(t, ref)
        else:
            assert (t.float() - ref.float()).norm() / ref.float().norm() < 0.15
    assert all(e is None for _, e in verify(r, deep=True))
    # lazily opened: one layer file holds only its layer's tensors
    with safe_open(str(packed / layer_file(0)), "pt") as f:
        assert all(k.startswith("model.layers.0.") for k in f.keys())


def _manifest(packed):
    return json.loads((packed / MANIFEST_NAME).read_text())


def _write_manifest(packed, m):
    (packed / MANIFEST_NAME).write_text(json.dumps(m))


def test_truncated_file(packed):
    p = packed / layer_file(1)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(errors.SizeMismatch, match="layer-00001"):
        PackReader(packed).layer_state_dict(1)


def test_altered_byte(packed):
    p = packed / layer_file(0)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(errors.HashMismatch, match="layer-00000"):
        PackReader(packed).layer_state_dict(0)
    bad = [(rel, e) for rel, e in verify(PackReader(packed)) if e is not None]
    assert [rel for rel, _ in bad] == [layer_file(0)]


def test_altered_after_open_is_caught_at_read(packed):
    r = PackReader(packed)
    r.layer_state_dict(0)  # verified once
    p = packed / layer_file(0)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(errors.HashMismatch):
        r.layer_state_dict(0)


def test_missing_file(packed):
    (packed / layer_file(1)).unlink()
    with pytest.raises(errors.MissingFile, match="layer-00001"):
        PackReader(packed).layer_state_dict(1)


def test_unknown_major_version(packed):
    m = _manifest(packed)
    m["version"] = "1.0"
    _write_manifest(packed, m)
    with pytest.raises(errors.UnsupportedVersion, match="'1.0'"):
        PackReader(packed)


def test_higher_minor_and_unknown_fields_are_accepted(packed):
    m = _manifest(packed)
    m["version"] = "0.9"
    m["future_field"] = {"x": 1}
    next(iter(m["tensors"].values()))["future_entry_field"] = 3
    _write_manifest(packed, m)
    assert PackReader(packed).manifest.version == "0.9"


def test_unknown_required_feature(packed):
    m = _manifest(packed)
    m["requires"] = ["hyperbolic-codes"]
    _write_manifest(packed, m)
    with pytest.raises(errors.UnsupportedFeature, match="hyperbolic-codes"):
        PackReader(packed)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.update(format="gguf"), "'format' must be"),
    (lambda m: m.pop("tensors"), "missing or malformed"),
    (lambda m: next(iter(m["tensors"].values())).update(file="../../etc/passwd"), "not in 'files'"),
    (lambda m: next(iter(m["tensors"].values())).update(kind="sparse"), "unknown kind"),
])
def test_malformed_manifest(packed, mutate, match):
    m = _manifest(packed)
    mutate(m)
    _write_manifest(packed, m)
    with pytest.raises(errors.ManifestError, match=match):
        PackReader(packed)


def test_not_json(packed):
    (packed / MANIFEST_NAME).write_text("{nope")
    with pytest.raises(errors.ManifestError, match="not JSON"):
        PackReader(packed)


def test_wrong_part_shape_names_tensor(packed):
    m = _manifest(packed)
    name = "model.layers.0.mlp.up_proj.weight"
    m["tensors"][name]["shape"] = [96, 32]
    _write_manifest(packed, m)
    with pytest.raises(errors.TensorError, match=r"up_proj\.weight\.qcodes"):
        PackReader(packed).layer_state_dict(0)


def test_partial_and_non_packs(packed, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(packed, partial)
    (partial / MANIFEST_NAME).unlink()
    (partial / PROGRESS_NAME).write_text("{}")
    with pytest.raises(errors.IncompletePack, match="--resume"):
        PackReader(partial)
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.NotAPack):
        PackReader(tmp_path / "empty")
    with pytest.raises(errors.NotAPack):
        PackReader(tmp_path / "nowhere")


def test_writer_refuses_finished_pack_and_foreign_dirs(tiny_llama, packed, tmp_path):
    with pytest.raises(errors.PackError, match="finished pack"):
        pack(tiny_llama, packed, PackConfig(bits=4), progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(errors.PackError, match="not an unfinished pack"):
        pack(tiny_llama, other, PackConfig(bits=4), progress=False)


def test_sharded_checkpoint_packs_like_single_file(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_llama / "model.safetensors"))
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for k, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: sd[n] for n in chunk}, str(sharded / fname))
        weight_map.update({n: fname for n in chunk})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pack(tiny_llama, tmp_path / "a", PackConfig(bits=4), progress=False)
    pack(sharded, tmp_path / "b", PackConfig(bits=4), progress=False)
    a, b = PackReader(tmp_path / "a"), PackReader(tmp_path / "b")
    assert {k: v.sha256 for k, v in a.manifest.files.items()} == {k: v.sha256 for k, v in b.manifest.files.items()}


def test_architecture_without_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    from compressor.checkpoint import CheckpointError

    (tmp_path / "config.json").write_text('{"model_type": "mystery"}')
    save_file({"encoder.block.0.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no decoder layers found .* 'mystery' is not supported"):
        SourceCheckpoint(tmp_path)
