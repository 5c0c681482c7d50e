"""The typed client (sync and async, streaming), `uc chat` (pack and URL targets) and the openai SDK
examples, against a server running in this process (clients.chat.LocalServer, as `uc chat PACK` uses)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest

from clients.chat import LocalServer, repl
from clients.client import APIError, AsyncClient, Client
from test_server_api import smol_pack  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def local(smol_pack):  # noqa: F811
    with LocalServer(str(smol_pack), dtype="float32", threads=1) as srv, Client(srv.url) as c:
        c.wait_ready(300)
        yield srv


def test_sync_client(local, smol_pack):  # noqa: F811
    with Client(local.url) as c:
        assert c.models() == [smol_pack.name]
        r = c.complete(PROMPT, max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        streamed = list(c.stream_complete(PROMPT, max_tokens=6, temperature=0))
        assert "".join(d.text for d in streamed) == r.text and streamed[-1].finish_reason == "length"
        chat = c.chat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
        deltas = list(c.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0))
        assert "".join(d.text for d in deltas) == chat.text and chat.usage.prompt_tokens > 0
        assert c.tokenize("Hello") == [19556]
        with pytest.raises(APIError) as e:
            c.complete(PROMPT, temperature=9)
        assert e.value.status == 400 and e.value.param == "temperature"


def test_async_client(local):
    async def main():
        async with AsyncClient(local.url) as c:
            r, s = await asyncio.gather(c.complete(PROMPT, max_tokens=5, temperature=0),
                                        _collect(c.stream_complete(PROMPT, max_tokens=5, temperature=0)))
            chat = await c.chat([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
            with pytest.raises(APIError) as e:
                await c.chat([], max_tokens=4)
            return r, s, chat, e.value

    r, s, chat, err = asyncio.run(main())
    assert "".join(d.text for d in s) == r.text and chat.choices[0].finish_reason in ("stop", "length")
    assert err.status == 400 and err.param == "messages"


async def _collect(it):
    return [d async for d in it]


def test_chat_repl(local):
    out = io.StringIO()
    with Client(local.url) as c:
        code = repl(c, "Be brief.", {"max_tokens": 5, "temperature": 0}, stdin=io.StringIO("Hello\n/reset\nBye\n"),
                    stdout=out)
    text = out.getvalue()
    assert code == 0 and text.count("assistant> ") == 2 and "(conversation cleared)" in text


def test_uc_chat_url_command(local):
    r = subprocess.run([sys.executable, "-m", "uc", "chat", local.url, "--max-tokens", "4", "--temperature", "0"],
                       input="Hello\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("you> assistant> ") and r.stdout.rstrip().endswith("you>")


def test_uc_chat_rejects_bad_target(tmp_path):
    r = subprocess.run([sys.executable, "-m", "uc", "chat", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, input="")
    assert r.returncode == 2 and r.stderr.startswith("uc: error:") and "neither" in r.stderr


@pytest.mark.parametrize("script", ["openai_completion.py", "openai_chat_stream.py", "openai_async.py"])
def test_openai_examples_run(local, script):
    args = ["--n", "2"] if script == "openai_async.py" else []
    if script == "openai_chat_stream.py":
        args = ["Hi", "--max-tokens", "8"]
    r = subprocess.run([sys.executable, str(REPO / "clients" / "examples" / script), "--base-url", local.url + "/v1",
                        *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
