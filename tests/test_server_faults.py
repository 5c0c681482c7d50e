"""`uc serve` and a bad pack: refused at start-up in one line; a streamed layer read that fails while serving
is a 500 in the OpenAI envelope naming the pack, /health/ready turns 503 while the pack stays unusable, and
the server serves again once the file is restored. A real uvicorn subprocess over a tiny pack (seconds)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import replace_file
from test_cli import _one_line_error
from test_server_api import ServerProcess, free_port
from ucformat.manifest import MANIFEST_NAME, layer_file

BODY = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def _serve_once(pack: Path) -> subprocess.CompletedProcess:
    """`uc serve PACK` as a process that is expected to end by itself (without its re-exec for the CPU
    environment: one interpreter start, not two)."""
    return subprocess.run([sys.executable, "-m", "uc", "serve", str(pack), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "UC_SERVE_ENV_SET": "1"})


def test_serve_refuses_bad_packs_in_one_line(tiny_chat_pack, tmp_path):
    dropped = Path(shutil.copytree(tiny_chat_pack, tmp_path / "dropped"))
    m = json.loads((dropped / MANIFEST_NAME).read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    del m["tensors"][name]
    (dropped / MANIFEST_NAME).write_text(json.dumps(m))
    _one_line_error(_serve_once(dropped), str(dropped / layer_file(1)), name, "needs it")

    broken = Path(shutil.copytree(tiny_chat_pack, tmp_path / "tokenizer"))
    replace_file(broken, "tokenizer.json", b"{}")
    _one_line_error(_serve_once(broken), "the pack's tokenizer cannot be loaded")


def test_weight_file_altered_before_start_ends_in_a_uc_error_line(tiny_chat_pack, tmp_path):
    """Start-up checks the structure; the weight files' hashes are checked as the load reads them: a mismatch
    there stops the server, and its last line is the one-line error (uvicorn's own lines come before)."""
    pack = Path(shutil.copytree(tiny_chat_pack, tmp_path / "pack"))
    bad = bytearray((pack / layer_file(1)).read_bytes())
    bad[-1] ^= 0xFF
    replace_file(pack, layer_file(1), bytes(bad), consistent=False)
    out = _serve_once(pack)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"uc: error: {pack / layer_file(1)}: SHA-256 is") and last.endswith("(file altered)")


@pytest.fixture
def streamed(tiny_chat_pack, tmp_path):
    """`uc serve` with every layer streamed from the pack's files (a budget of the non-layer weights plus one
    layer), over a copy of the pack that the test may alter."""
    import ucformat

    pack = Path(shutil.copytree(tiny_chat_pack, tmp_path / "pack"))
    budget = ucformat.plan(pack, residency="dense").min_stream_bytes
    s = ServerProcess(pack, "--dtype", "float32", "--residency", "stream", "--vram-budget", str(budget),
                      "--max-num-seqs", "2", log=tmp_path / "server.log")
    try:
        s.wait_ready(timeout=180)
        yield s, pack
    finally:
        s.stop()


def test_failed_streamed_read_is_a_500_naming_the_pack_and_readiness_follows(streamed):
    s, pack = streamed
    ok = httpx.post(s.url + "/v1/completions", json=BODY, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    rel = layer_file(1)
    good = (pack / rel).read_bytes()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    replace_file(pack, rel, bytes(bad), consistent=False)  # same size, new content: only the hash tells

    r = httpx.post(s.url + "/v1/completions", json=BODY, timeout=60)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "pack_unreadable" and err["type"] == "internal_error"
    assert err["message"].startswith(f"the pack {pack.resolve()} cannot be read: {pack.resolve() / rel}: SHA-256 is")
    ready = httpx.get(s.url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "pack_unusable"
    assert str(pack.resolve()) in ready.json()["error"]["message"] and ready.headers["retry-after"] == "5"
    assert httpx.get(s.url + "/health/live", timeout=10).status_code == 200
    refused = httpx.post(s.url + "/v1/completions", json=BODY, timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "pack_unusable"
    assert s.metric("uc:request_failure_total", reason="pack") == 2

    replace_file(pack, rel, good, consistent=False)  # restored: the probe re-hashes it, readiness follows
    assert httpx.get(s.url + "/health/ready", timeout=10).status_code == 200
    again = httpx.post(s.url + "/v1/completions", json=BODY, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
    assert s.proc.poll() is None
    assert "Traceback" not in s.log.read_text()  # a bad pack is an error line in the log, not a crash
