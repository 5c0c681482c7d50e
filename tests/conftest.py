"""Shared fixtures: tiny random-weight checkpoints built from transformers configs, and the real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def pytest_sessionstart(session):
    """The calibration and evaluation tests read WikiText-2 from ../shared/data beside the checkout (README):
    without it, one clear line instead of dozens of FileNotFoundErrors."""
    if not WIKITEXT.is_file():
        pytest.exit(f"WikiText-2 test split not found at {WIKITEXT}: the tests read it from ../shared/data "
                    "beside the repository (README, 'Evaluation text')", returncode=pytest.ExitCode.USAGE_ERROR)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str, **overrides):
    import transformers as tf

    TINY = {**globals()["TINY"], **overrides}

    if arch == "llama":
        return tf.LlamaConfig(**TINY)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**TINY)
    if arch == "gemma3":
        n = overrides.get("num_hidden_layers", 3)
        return tf.Gemma3TextConfig(**{**TINY, "num_hidden_layers": n}, head_dim=16, sliding_window=8,
                                   layer_types=[("sliding_attention", "sliding_attention", "full_attention")[i % 3]
                                                for i in range(n)])
    if arch == "phi3":
        return tf.Phi3Config(**TINY, pad_token_id=0)
    if arch == "mixtral":
        return tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TINY, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    raise KeyError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "mixtral", "qwen3_moe"]


def make_tiny(path: Path, arch: str = "llama", dtype=torch.bfloat16, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_templates(tmp_path_factory):
    """Building a model costs seconds; build each tiny checkpoint once and copy it per test."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny(root / arch, arch)
        return made[arch]

    return get


@pytest.fixture
def tiny_llama(tmp_path, tiny_templates) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_templates("llama"), tmp_path / "tiny-llama"))


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("UC_CACHE", REPO / ".uc-cache"))


@pytest.fixture(scope="session")
def smollm2(model_cache) -> Path:
    """The real SmolLM2-135M-Instruct as an HF safetensors folder (converted once, then cached)."""
    from compressor.fetch import fetch_model

    return fetch_model("smollm2-135m", model_cache / "models" / "smollm2-135m", cache_dir=model_cache)


def dequantized_checkpoint(pack_dir: Path, out: Path) -> Path:
    """The reference for runtime tests: an ordinary float32 checkpoint of the pack's reconstructed weights."""
    import shutil

    from safetensors.torch import save_file

    from ucformat import PackReader

    r = PackReader(pack_dir)
    sd = r.nonlayer_state_dict(torch.float32)
    for i in range(r.num_layers):
        sd.update(r.layer_state_dict(i, torch.float32))
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    shutil.copy(pack_dir / "config.json", out / "config.json")
    return out


def rewrite_stored(pack_dir: Path, name: str, fn) -> dict:
    """Change the stored parts of tensor `name` (fn gets the dict of its file's tensors) and refresh the
    manifest's size and hash of that file, so that only the change itself is wrong. Returns the manifest."""
    import json

    from safetensors.torch import load_file, save_file

    from ucformat.manifest import MANIFEST_NAME, sha256_file

    m = json.loads((pack_dir / MANIFEST_NAME).read_text())
    rel = m["tensors"][name]["file"]
    tensors = load_file(str(pack_dir / rel))
    fn(tensors)
    save_file(tensors, str(pack_dir / rel))
    m["files"][rel] = {"bytes": (pack_dir / rel).stat().st_size, "sha256": sha256_file(pack_dir / rel)}
    (pack_dir / MANIFEST_NAME).write_text(json.dumps(m))
    return m


@pytest.fixture(scope="session")
def tiny_chat_pack(smollm2, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer files, packed at 4 bits: a pack that every
    command (generate, eval, serve) runs in seconds."""
    import shutil

    from compressor.config import PackConfig
    from compressor.pack import pack

    root = tmp_path_factory.mktemp("tiny-chat")
    src = make_tiny(root / "src", "llama", vocab_size=49152, max_position_embeddings=512)
    for f in smollm2.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, src / f.name)
    pack(src, root / "pack", PackConfig(bits=4), progress=False)
    return root / "pack"


def replace_file(pack_dir: Path, rel: str, data: bytes, consistent: bool = True) -> None:
    """Write a pack file atomically (a new inode: hard-linked or memory-mapped copies keep the old bytes);
    consistent: the manifest's size and SHA-256 of it refreshed too, so only the content itself is wrong."""
    import hashlib
    import json

    from ucformat.manifest import MANIFEST_NAME, atomic_write_bytes

    atomic_write_bytes(pack_dir / rel, data)
    if consistent:
        m = json.loads((pack_dir / MANIFEST_NAME).read_text())
        m["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write_bytes(pack_dir / MANIFEST_NAME, json.dumps(m).encode())
