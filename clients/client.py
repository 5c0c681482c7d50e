"""A small typed client for a `uc serve` server (or any OpenAI-compatible one): sync and async, streaming.

    from clients.client import Client
    c = Client("http://127.0.0.1:8000")
    print(c.chat([{"role": "user", "content": "Hi!"}], max_tokens=32).text)
    for delta in c.stream_complete("The capital of France is", max_tokens=8):
        print(delta.text, end="", flush=True)

`AsyncClient` has the same methods as coroutines / async iterators. Errors come back as `APIError` with
the server's OpenAI error fields. Sampling parameters are passed through as keyword arguments.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import httpx


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class Completion:
    id: str
    model: str
    choices: tuple[Choice, ...]
    usage: Usage | None

    @property
    def text(self) -> str:
        return self.choices[0].text


@dataclass(frozen=True)
class Delta:
    """One streamed piece of choice `index`; `finish_reason` is set on its last piece."""
    index: int
    text: str
    finish_reason: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(f"{status} {type or 'error'}: {message}")
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def _raise_for(resp: httpx.Response, body: bytes) -> None:
    if resp.status_code < 400:
        return
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise APIError(resp.status_code, body.decode(errors="replace")[:500]) from None
    raise APIError(resp.status_code, err.get("message", ""), err.get("type"), err.get("code"), err.get("param"))


def _completion(body: dict, chat: bool) -> Completion:
    choices = tuple(Choice(c["index"], (c["message"]["content"] or "") if chat else c["text"], c.get("finish_reason"))
                    for c in body["choices"])
    u = body.get("usage")
    return Completion(body["id"], body["model"], choices, Usage(**{k: u[k] for k in Usage.__dataclass_fields__}) if u else None)


def _event(line: str, chat: bool) -> list[Delta] | None:
    """One SSE line -> deltas ([] for comments and other lines), None at [DONE]."""
    if not line.startswith("data:"):
        return []
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if "error" in obj:
        e = obj["error"]
        raise APIError(500, e.get("message", ""), e.get("type"), e.get("code"), e.get("param"))
    out = []
    for c in obj.get("choices", []):
        text = (c.get("delta", {}).get("content") or "") if chat else c.get("text", "")
        if text or c.get("finish_reason"):
            out.append(Delta(c["index"], text, c.get("finish_reason")))
    return out


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model, self.timeout = model, timeout

    def _body(self, key: str, value, params: dict, stream: bool) -> dict:
        body = {key: value, **params}
        if self.model and "model" not in body:
            body["model"] = self.model
        if stream:
            body["stream"] = True
        return body


class Client(_Base):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        _raise_for(r, r.content)
        return r.json()

    def _stream(self, path: str, body: dict, chat: bool) -> Iterator[Delta]:
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                _raise_for(r, r.read())
            for line in r.iter_lines():
                deltas = _event(line, chat)
                if deltas is None:
                    return
                yield from deltas

    def models(self) -> list[str]:
        r = self.http.get("/v1/models")
        _raise_for(r, r.content)
        return [m["id"] for m in r.json()["data"]]

    def ready(self) -> bool:
        try:
            return self.http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:.0f} s")
            time.sleep(0.25)

    def complete(self, prompt, **params) -> Completion:
        return _completion(self._post("/v1/completions", self._body("prompt", prompt, params, False)), chat=False)

    def stream_complete(self, prompt, **params) -> Iterator[Delta]:
        return self._stream("/v1/completions", self._body("prompt", prompt, params, True), chat=False)

    def chat(self, messages: list[dict], **params) -> Completion:
        return _completion(self._post("/v1/chat/completions", self._body("messages", messages, params, False)), chat=True)

    def stream_chat(self, messages: list[dict], **params) -> Iterator[Delta]:
        return self._stream("/v1/chat/completions", self._body("messages", messages, params, True), chat=True)

    def tokenize(self, text: str) -> list[int]:
        return self._post("/tokenize", {"prompt": text})["tokens"]


class AsyncClient(_Base):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _post(self, path: str, body: dict) -> dict:
        r = await self.http.post(path, json=body)
        _raise_for(r, r.content)
        return r.json()

    async def _stream(self, path: str, body: dict, chat: bool) -> AsyncIterator[Delta]:
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code >= 400:
                _raise_for(r, await r.aread())
            async for line in r.aiter_lines():
                deltas = _event(line, chat)
                if deltas is None:
                    return
                for d in deltas:
                    yield d

    async def models(self) -> list[str]:
        r = await self.http.get("/v1/models")
        _raise_for(r, r.content)
        return [m["id"] for m in r.json()["data"]]

    async def complete(self, prompt, **params) -> Completion:
        return _completion(await self._post("/v1/completions", self._body("prompt", prompt, params, False)), chat=False)

    def stream_complete(self, prompt, **params) -> AsyncIterator[Delta]:
        return self._stream("/v1/completions", self._body("prompt", prompt, params, True), chat=False)

    async def chat(self, messages: list[dict], **params) -> Completion:
        body = self._body("messages", messages, params, False)
        return _completion(await self._post("/v1/chat/completions", body), chat=True)

    def stream_chat(self, messages: list[dict], **params) -> AsyncIterator[Delta]:
        return self._stream("/v1/chat/completions", self._body("messages", messages, params, True), chat=True)

    async def tokenize(self, text: str) -> list[int]:
        return (await self._post("/tokenize", {"prompt": text}))["tokens"]
