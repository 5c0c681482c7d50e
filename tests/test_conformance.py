"""The pack against the model its config.json builds (SPEC.md section 7): packs whose hashes all match but
whose manifest lies consistently are refused, by `uc verify --deep` and by the loader, naming file and tensor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import ucformat
from conftest import ARCHS, replace_file, rewrite_stored
from ucformat import PackReader, conformance, errors
from ucformat.inspect import verify
from ucformat.manifest import MANIFEST_NAME, NONLAYER_FILE, layer_file
from test_server_api import smol_pack  # noqa: F401  (the real pack, packed once per session)

Q = "model.layers.1.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


def pack_of(src: Path, dst: Path) -> Path:
    from compressor.config import PackConfig
    from compressor.pack import pack

    pack(src, dst, PackConfig(bits=4), progress=False)
    return dst


@pytest.fixture
def packed(tiny_llama, tmp_path) -> Path:
    return pack_of(tiny_llama, tmp_path / "pack")


def _manifest(pack: Path) -> dict:
    return json.loads((pack / MANIFEST_NAME).read_text())


def _write_manifest(pack: Path, m: dict) -> None:
    (pack / MANIFEST_NAME).write_text(json.dumps(m))


def drop_entry(pack: Path, name: str) -> None:
    """The issue's first pack: the entry deleted, the file untouched (every hash still matches)."""
    m = _manifest(pack)
    del m["tensors"][name]
    _write_manifest(pack, m)


def cut_norm(pack: Path, name: str) -> None:
    """The issue's second pack: a norm cut to half its values, file, shape and hash updated to match."""
    m = rewrite_stored(pack, name, lambda t: t.update({name: t[name][: t[name].numel() // 2].clone()}))
    m["tensors"][name]["shape"] = [m["tensors"][name]["shape"][0] // 2]
    _write_manifest(pack, m)


def _messages(pack: Path) -> list[str]:
    return [str(e) for e in conformance.check(PackReader(pack))]


def _deep_failures(pack: Path) -> list[tuple[str, str]]:
    return [(rel, str(e)) for rel, e in verify(PackReader(pack), deep=True) if e is not None]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_conforms(arch, tiny_templates, tmp_path):
    """No false alarms: tied embeddings (gemma3: lm_head absent), fused MoE experts stored per expert
    (mixtral, qwen3_moe: names mapped back by transformers' conversion), every tiny architecture."""
    pack = pack_of(tiny_templates(arch), tmp_path / "pack")
    assert _messages(pack) == []
    if arch == "gemma3":
        assert "lm_head.weight" not in _manifest(pack)["tensors"]
    assert not _deep_failures(pack)


def test_deleted_entry_is_refused_naming_the_tensor(packed):
    drop_entry(packed, Q)
    assert all(e is None for _, e in verify(PackReader(packed)))  # every hash matches: only the model can tell
    msgs = _messages(packed)
    f = str(packed / layer_file(1))
    assert msgs[0] == f"{f}: tensor {Q!r}: LlamaForCausalLM (config.json) needs it, and the manifest has no entry for it"
    assert f"{f}: tensor '{Q}.qcodes': in the file, but no manifest entry refers to it" in msgs
    assert {rel for rel, _ in _deep_failures(packed)} == {layer_file(1)}
    with pytest.raises(errors.TensorError, match=rf"{Q}'.*needs it.*and 3 more: `uc verify --deep"):
        ucformat.load(packed)  # before a weight is read (it used to fail after, as 'weights missing after load')


def test_consistently_cut_norm_is_refused_naming_the_tensor(packed):
    cut_norm(packed, NORM)
    assert all(e is None for _, e in verify(PackReader(packed)))
    assert _messages(packed) == [f"{packed / layer_file(1)}: tensor {NORM!r}: shape [32], LlamaForCausalLM "
                                 f"(config.json) needs [64]"]
    with pytest.raises(errors.TensorError, match=NORM):
        ucformat.load(packed)


def test_stray_tensor_in_a_file(packed):
    rewrite_stored(packed, NORM, lambda t: t.update(stray=torch.zeros(3)))
    assert _messages(packed) == [f"{packed / layer_file(1)}: tensor 'stray': in the file, but no manifest entry "
                                 f"refers to it"]


def test_entry_in_another_layers_file(packed):
    """Moved with its tensor to layer 0's file, hashes refreshed: layer 0 would attach a layer-1 weight."""
    m = _manifest(packed)
    m["tensors"][NORM]["file"] = layer_file(0)
    _write_manifest(packed, m)
    t1, t0 = load_file(str(packed / layer_file(1))), load_file(str(packed / layer_file(0)))
    t0[NORM] = t1.pop(NORM)
    for rel, t in ((layer_file(0), t0), (layer_file(1), t1)):
        replace_file(packed, rel, save(t))
    assert _messages(packed) == [f"{packed / layer_file(0)}: tensor {NORM!r}: belongs in {layer_file(1)}"]


def test_dtype_the_config_does_not_imply(packed):
    """config.json says bfloat16; a raw norm re-stored as float16 (entry and hash updated) is refused."""
    m = rewrite_stored(packed, NORM, lambda t: t.update({NORM: t[NORM].half()}))
    m["tensors"][NORM]["dtype"] = "float16"
    _write_manifest(packed, m)
    assert _messages(packed) == [f"{packed / layer_file(1)}: tensor {NORM!r}: dtype float16, config.json implies "
                                 f"bfloat16"]


def test_raw_tensor_of_another_dtype_than_its_entry(packed):
    """The reader checks a raw tensor's dtype against its entry, not only its shape (SPEC.md section 5)."""
    rewrite_stored(packed, NORM, lambda t: t.update({NORM: t[NORM].half()}))
    with pytest.raises(errors.TensorError, match=rf"{NORM}.*torch.float16 \(64,\), manifest says bfloat16"):
        PackReader(packed).layer_state_dict(1)


def test_entry_the_model_does_not_have(packed):
    m = _manifest(packed)
    m["tensors"]["model.layers.1.mlp.extra.weight"] = m["tensors"][NORM]
    _write_manifest(packed, m)
    assert f"{packed / layer_file(1)}: tensor 'model.layers.1.mlp.extra.weight': not a weight of LlamaForCausalLM " \
           f"(config.json)" in _messages(packed)


def test_layer_count_against_the_config(packed):
    cfg = json.loads((packed / "config.json").read_text())
    replace_file(packed, "config.json", json.dumps({**cfg, "num_hidden_layers": 3}).encode())
    assert _messages(packed) == [f"{packed / MANIFEST_NAME}: invalid manifest: num_layers is 2, config.json's "
                                 f"num_hidden_layers is 3"]
    with pytest.raises(errors.ManifestError, match="num_hidden_layers is 3"):
        ucformat.load(packed)


def test_config_that_builds_other_shapes(packed):
    """A config edited consistently (hash updated) so that its model is wider: every weight is named."""
    cfg = json.loads((packed / "config.json").read_text())
    replace_file(packed, "config.json", json.dumps({**cfg, "intermediate_size": 128}).encode())
    msgs = _messages(packed)
    assert len(msgs) == 6  # gate, up, down of each of the 2 layers
    assert f"{packed / layer_file(0)}: tensor 'model.layers.0.mlp.down_proj.weight': shape [64, 96], " \
           f"LlamaForCausalLM (config.json) needs [64, 128]" in msgs


@pytest.mark.parametrize("layers", [0, 3, 10**9])
def test_num_layers_must_match_the_layer_files(packed, layers):
    m = _manifest(packed)
    m["num_layers"] = layers
    _write_manifest(packed, m)
    with pytest.raises(errors.ManifestError, match="for exactly the"):
        PackReader(packed)


def test_file_names_must_stay_inside_the_pack(packed):
    m = _manifest(packed)
    m["files"]["../../etc/passwd"] = m["files"][NONLAYER_FILE]
    _write_manifest(packed, m)
    with pytest.raises(errors.ManifestError, match="must be relative, inside the pack"):
        PackReader(packed)


# -- the issue's two packs, on the real SmolLM2 ------------------------------------------------------------------
@pytest.mark.slow
def test_verify_deep_on_the_issues_smollm2_packs(smol_pack, tmp_path):  # noqa: F811
    cases = {"drop": ("model.layers.5.self_attn.q_proj.weight", drop_entry),
             "cut": ("model.layers.5.input_layernorm.weight", cut_norm)}
    for label, (name, alter) in cases.items():
        pack = Path(shutil.copytree(smol_pack, tmp_path / label))
        alter(pack, name)
        ok = subprocess.run([sys.executable, "-m", "uc", "verify", str(pack)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout  # the hashes say nothing
        out = subprocess.run([sys.executable, "-m", "uc", "verify", str(pack), "--deep"], capture_output=True, text=True)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out
        fails = [ln for ln in out.stdout.splitlines() if ln.startswith("FAIL")]
        assert fails[0].startswith(f"FAIL {pack / layer_file(5)}: tensor {name!r}: ")
        assert out.stdout.rstrip().endswith("34/35 files ok, 1 with errors (deep: the pack against the model its "
                                            "config.json builds, every tensor rebuilt, shape and finiteness checked)")
        assert "needs it, and the manifest has no entry" in fails[0] if label == "drop" else "shape [288]" in fails[0]



def test_model_type_against_the_config(packed):
    m = _manifest(packed)
    m["model_type"] = "mistral"
    _write_manifest(packed, m)
    assert _messages(packed) == [f"{packed / MANIFEST_NAME}: invalid manifest: model_type is 'mistral', config.json's "
                                 f"is 'llama'"]
