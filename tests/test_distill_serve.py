"""A student distilled from the real SmolLM2-135M (a few steps: the point is the path, not the quality) is a pack
that `uc verify --deep` accepts and that a real `uc serve` (uvicorn subprocess) serves unchanged to the official
`openai` SDK, chat and streaming completion, with the same greedy tokens as transformers' generate on
`ucformat.load` of the same pack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WIKITEXT
from test_server_api import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_student(smollm2, tmp_path_factory) -> Path:
    from compressor.distiller import DistillConfig, distill

    dst = tmp_path_factory.mktemp("student") / "smol-frr"
    cfg = DistillConfig(student="frr", width=64, scales=2, iters=2, calib=str(WIKITEXT), articles="1-2", seq_len=64,
                        samples=4, steps=3, batch=2, topk=16)
    distill(smollm2, dst, cfg, progress=False)
    return dst


@pytest.fixture(scope="module")
def server(smol_student, tmp_path_factory):
    with ServerProcess(smol_student, "--dtype", "float32", "--max-num-seqs", "4", "--served-model-name", "student",
                       log=tmp_path_factory.mktemp("srv") / "server.log") as s:
        yield s


def test_uc_verify_deep_accepts_the_student(smol_student):
    r = subprocess.run([sys.executable, "-m", "uc", "verify", "--deep", str(smol_student)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "files ok" in r.stdout and "FAIL" not in r.stdout


def test_openai_sdk_chat_and_streaming_completion(server, smol_student):
    import openai

    import ucformat
    from ucformat import PackReader
    from ucformat.assets import load_tokenizer

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    assert "student" in [m.id for m in client.models.list().data]
    prompt = "The capital of France is"
    stream = client.completions.create(model="student", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    tok = load_tokenizer(PackReader(smol_student))
    model = ucformat.load(smol_student)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    gen = ref[0, ids.shape[1]:].tolist()
    eos = tok.eos_token_id
    gen = gen[:gen.index(eos)] if eos in gen else gen
    assert streamed == tok.decode(gen, skip_special_tokens=True)
    chat = client.chat.completions.create(model="student", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    assert server.metric("uc:generation_tokens_total", model_name="student") >= len(gen) + 1
