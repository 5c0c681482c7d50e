"""End to end on the real SmolLM2-135M-Instruct: fetch, pack at 5 bits, verify, eval, generate."""

import json
import subprocess
import sys

import pytest

from conftest import WIKITEXT

pytestmark = pytest.mark.slow


def uc(*args):
    return subprocess.run([sys.executable, "-m", "uc", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def smol_pack(smollm2, tmp_path_factory):
    dst = tmp_path_factory.mktemp("smol") / "pack5"
    out = uc("pack", smollm2, dst, "--bits", "5", "-q")
    assert out.returncode == 0, out.stderr
    return dst


def test_pack_is_compact_and_verifies(smol_pack):
    info = json.loads(uc("info", smol_pack, "--json").stdout)
    assert info["model_type"] == "llama" and info["num_layers"] == 30
    assert 5.2 < info["bpw_allin"] < 5.3  # 5-bit codes + fp16 scale per 64 + grids
    assert info["ratio"] > 1.9
    assert uc("verify", smol_pack, "--deep").returncode == 0


def test_eval_against_base(smol_pack, smollm2):
    out = uc("eval", smol_pack, "--base", smollm2, "--text", WIKITEXT, "--articles", "17-62", "--ctx", "256",
             "--max-windows", "3", "--json", "-q")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert set(r) >= {"ppl_base", "ppl", "ppl_ratio", "top1_agreement", "top10_overlap", "tokens", "ctx"}
    assert r["tokens"] == 3 * 255 and r["ctx"] == 256
    assert 5 < r["ppl_base"] < 60  # a real language model on English text
    assert 1.0 < r["ppl_ratio"] < 1.3 and r["top1_agreement"] > 0.7 and r["top10_overlap"] > 0.7
    assert 0 < r["kl"] < 0.5 and r["kl_p99"] > r["kl"]  # nats per token, against the base on the same windows


def test_generate_talks(smol_pack):
    out = uc("generate", smol_pack, "The capital of France is", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.parametrize("mode", ["packed", "stream"])
def test_generate_streamed_matches_dense(smol_pack, mode):
    dense = uc("generate", smol_pack, "The capital of France is", "--max-tokens", "8")
    budget = ["--vram-budget", "30%"] if mode == "stream" else []  # packed needs the whole pack resident
    out = uc("generate", smol_pack, "The capital of France is", "--max-tokens", "8", "--residency", mode, *budget)
    assert out.returncode == 0, out.stderr
    assert out.stdout == dense.stdout and "Paris" in out.stdout
