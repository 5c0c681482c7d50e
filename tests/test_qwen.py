"""End to end on the real Qwen2.5-Coder-0.5B-Instruct (issue 32): fetch, plain pack at 4 bits, deep verify,
eval on 2 windows, generate, ucformat.load in every residency mode, uc serve with the openai SDK.

Not part of CI: the fetch downloads 0.5 GB of wheels, the pack alone takes 2-5 minutes on 2 cores and the
whole file took 24 minutes on a loaded 2-core machine, far past the minute CI can give it. Run it with
UC_QWEN_TESTS=1; bench/qwen.py runs the same steps on 0.5B and 1.5B (and measures them) for
docs/BENCHMARKS.md.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import WIKITEXT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("UC_QWEN_TESTS") != "1",
                                 reason="real Qwen2.5 0.5B (0.5 GB of wheels, a 2-5 minute pack): set UC_QWEN_TESTS=1")]

PROMPT = "def fibonacci(n):"


def uc(*args):
    return subprocess.run([sys.executable, "-m", "uc", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def qwen(model_cache):
    from compressor.fetch import fetch_model

    return fetch_model("qwen2.5-coder-0.5b", model_cache / "models" / "qwen2.5-coder-0.5b", cache_dir=model_cache)


@pytest.fixture(scope="module")
def qwen_pack(qwen, tmp_path_factory):
    dst = tmp_path_factory.mktemp("qwen") / "gsq4"
    out = uc("pack", qwen, dst, "--bits", "4", "-q")
    assert out.returncode == 0, out.stderr
    return dst


def test_fetched_checkpoint_is_qwen2(qwen):
    config = json.loads((qwen / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("qwen2", 24, 896)
    generation = json.loads((qwen / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]  # <|im_end|>, <|endoftext|>


def test_pack_verifies(qwen_pack):
    info = json.loads(uc("info", qwen_pack, "--json").stdout)
    assert info["model_type"] == "qwen2" and info["num_layers"] == 24
    assert 4.2 < info["bpw_allin"] < 4.3  # 4-bit codes + fp16 scale per 64 + grids
    out = uc("verify", qwen_pack, "--deep")
    assert out.returncode == 0, out.stdout + out.stderr


def test_eval_two_windows(qwen_pack, qwen):
    out = uc("eval", qwen_pack, "--base", qwen, "--text", WIKITEXT, "--articles", "17-62", "--ctx", "256",
             "--max-windows", "2", "--json", "-q")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["tokens"] == 2 * 255
    assert 3 < r["ppl_base"] < 60 and 1.0 < r["ppl_ratio"] < 1.5 and r["top1_agreement"] > 0.6


def test_generate_writes_code(qwen_pack):
    out = uc("generate", qwen_pack, PROMPT, "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "n" in out.stdout and "return" in out.stdout


@pytest.mark.parametrize("mode", ["dense", "packed", "stream"])
def test_load_in_every_residency(qwen_pack, mode):
    import ucformat
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_pack)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    # the untied embeddings and head alone are 43% of the dense weights: a stream budget must hold them
    budget = {"vram_budget": "50%"} if mode == "stream" else {}
    model = ucformat.load(qwen_pack, device="cpu", residency=mode, **budget)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "return" in tok.decode(out[0, ids.shape[1]:]) or "if" in tok.decode(out[0, ids.shape[1]:])
    runtime = model.uc_runtime
    if mode == "stream":
        assert runtime.stats().peak_resident_bytes < runtime.plan.dense_model_bytes


def test_serve_with_openai_sdk(qwen_pack):
    import httpx
    import openai

    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, "-m", "uc", "serve", str(qwen_pack), "--port", str(port),
                             "--residency", "stream", "--vram-budget", "50%", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}])
        assert "def " in chat.choices[0].message.content
        assert chat.usage.completion_tokens <= 24
    finally:
        proc.terminate()
        proc.wait(30)
