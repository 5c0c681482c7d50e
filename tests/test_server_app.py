"""The app in this process (starlette's TestClient, driven by the official `openai` SDK) over an engine on
a tiny random Llama with the SmolLM2 tokenizer: what a subprocess server cannot be made to show, such as
a bug raising in the middle of a stream, or a model without a chat template."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import build_app
from server.config import ServerConfig
from server.stats import ModelInfo
from test_server_engine import make_engine, tiny_model, tokenizer  # noqa: F401

CHAT = [{"role": "user", "content": "Hi"}]


@contextmanager
def serve(engine):
    """(app state, HTTP client, openai client) for `engine`; the app shuts the engine down on exit."""
    info = ModelInfo(name="tiny", pack="tiny", format_version="0.3", codec="none", bits="", bpw_allin=None,
                     residency="dense", device="cpu", device_name="cpu", dtype="float32",
                     max_model_len=engine.max_model_len)
    app = build_app(ServerConfig(served_model_name="tiny"), engine=engine, info=info)
    with TestClient(app) as http:
        yield app.state.uc, http, openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                                                max_retries=0)


def metric(http, name: str, **labels) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def raise_after(serving, k: int) -> None:
    """Make the serving object's output iteration raise after k outputs, as a bug in it would."""
    real = serving.sse_events

    async def events(stream):
        seen = 0
        async for item in real(stream):
            if item is not None:
                seen += 1
                if seen > k:
                    raise RuntimeError("boom in the serving layer")
            yield item

    serving.sse_events = events


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_exception_mid_stream_ends_it_with_an_error_event(tiny_model, tokenizer, caplog, route):  # noqa: F811
    eng = make_engine(tiny_model, tokenizer)
    body = {"max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    body.update({"prompt": "Once upon a time"} if route == "completions" else {"messages": CHAT})
    with serve(eng) as (state, http, client):
        raise_after(state.completions if route == "completions" else state.chat, 3)
        with http.stream("POST", f"/v1/{'chat/' if route == 'chat' else ''}completions", json=body) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:]) == {"error": {"message": "internal error while streaming: RuntimeError",
                                                       "type": "internal_error", "param": None,
                                                       "code": "internal_error"}}
        assert len(lines) == 3 + (route == "chat") + 2  # 3 outputs (after the role chunk), the error, [DONE]
        # the openai SDK raises on the event
        create = client.completions.create if route == "completions" else client.chat.completions.create
        with pytest.raises(openai.APIError, match="internal error while streaming"):
            for _ in create(model="tiny", **{k: v for k, v in body.items() if k != "ignore_eos"},
                            extra_body={"ignore_eos": True}):
                pass
        # the engine work is aborted and its slot freed; each request counts once, as internal
        deadline = time.monotonic() + 10
        while eng.num_unfinished() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.num_unfinished() == 0 and eng.scheduler_stats().running == 0
        assert metric(http, "uc:request_failure_total", reason="internal") == 2
        assert metric(http, "uc:request_failure_total", reason="aborted") == 0
    failures = [r for r in caplog.records if r.name == "server.serving" and r.levelno == logging.ERROR]
    assert len(failures) == 2 and all("boom in the serving layer" in str(r.exc_info[1]) for r in failures)
    assert "Traceback" in caplog.text  # the traceback is in the server's log


def test_chat_without_a_template_is_a_400(tiny_model, smollm2):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    tok.chat_template = None
    with serve(make_engine(tiny_model, tok)) as (_, http, client):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, stream=stream)
            assert e.value.body["code"] == "no_chat_template" and e.value.body["param"] == "messages"
        r = http.post("/tokenize", json={"messages": CHAT})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        # plain completions still work
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
