"""The serving layer shared by completions and chat: prompt limits, submission to the engine, the bridge
from the engine thread to asyncio, SSE framing, client-disconnect cancellation and error events.

Routers stay thin (app.py); the request-specific shapes live in serving_completion.py / serving_chat.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import AsyncIterator

from .engine import EngineRequest, EngineStopped, QueueFull, SequenceOutput
from .errors import (
    APIError, BadRequest, ContextLengthExceeded, InternalError, NotFound, NotReady, Overloaded, PackUnreadable, Timeout,
)
from .sampling import SamplingParams
from .stats import RequestRecord

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def failure_error(out: SequenceOutput) -> APIError:
    """The API error for a sequence the engine failed (the engine already counted it in its stats)."""
    if out.error == "timeout":
        exc = Timeout(out.error_message, code="request_timeout")
    elif out.error == "aborted":
        exc = InternalError(out.error_message or "the request was aborted", code="aborted")
    elif out.error == "pack":
        exc = PackUnreadable(out.error_message)
    else:
        exc = InternalError(out.error_message or "internal error", code="internal_error")
    exc.counted = True
    return exc


class ClientGone(Exception):
    """The client disconnected before its response was ready; its engine work is aborted."""


class OutputStream:
    """Outputs of the engine requests behind one API request, handed from the engine thread to asyncio.
    Items are (choice index, SequenceOutput). Closing it before every choice finished aborts the rest."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.request_ids: list[str] = []
        self.pending = 0

    def sink_for(self, offset: int):
        def sink(out: SequenceOutput) -> None:  # engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (offset + out.index, out))
        return sink

    async def get(self, timeout: float | None = None) -> tuple[int, SequenceOutput]:
        item = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        if item[1].finished:
            self.pending -= 1
        return item

    def close(self, record: bool = True) -> None:
        """Abort what has not finished; record=False when the caller counts the failure itself."""
        if self.pending > 0:
            for rid in self.request_ids:
                self.engine.abort(rid, record)
            self.pending = 0


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # for echo


class Serving:
    def __init__(self, state) -> None:
        self.state = state  # app.AppState: engine, tokenizer, info, cfg, metrics

    # -- checks ---------------------------------------------------------------------------------------------
    @property
    def engine(self):
        return self.state.engine

    @property
    def tokenizer(self):
        return self.state.engine.tokenizer

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.state.model_names:
            raise NotFound(f"The model `{name}` does not exist. Served: {', '.join(self.state.model_names)}.",
                           param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)

    def max_tokens(self, prompt_ids: list[int], requested: int | None, param: str) -> int:
        """Check a prompt against the vocabulary and the context; the max_tokens to use (default: the rest)."""
        limit, n = self.engine.max_model_len, len(prompt_ids)
        if n == 0:
            raise BadRequest("the prompt is empty", param=param)
        self.check_token_ids(prompt_ids, param)
        if n >= limit or n + (requested or 0) > limit:
            raise ContextLengthExceeded(n, requested, limit, param)
        return requested if requested is not None else limit - n

    # -- submission -----------------------------------------------------------------------------------------
    async def submit(self, prompts: list[Prompt], params: list[SamplingParams], n: int, timeout: float | None,
                     request_id: str) -> OutputStream:
        """Submit every prompt (each with n choices); choice index = prompt index * n + i."""
        if self.state.draining:
            raise NotReady("the server is shutting down", code="draining", headers={"Retry-After": "5"})
        most = self.engine.max_queue + self.engine.max_num_seqs
        if len(prompts) * n > most:
            raise BadRequest(f"{len(prompts)} prompt(s) x n={n} choices is more sequences than this server ever takes "
                             f"at once ({most}: --max-num-seqs + --max-queue)", param="n")
        limit = self.state.cfg.engine.request_timeout or None
        timeout = min(t for t in (timeout, limit) if t) if (timeout or limit) else None
        stream = OutputStream(self.engine, asyncio.get_running_loop())
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = f"{request_id}-{i}" if len(prompts) > 1 else request_id
                self.engine.submit(EngineRequest(rid, prompt.ids, p, stream.sink_for(i * n), n=n, timeout=timeout))
                stream.request_ids.append(rid)
                stream.pending += n
        except QueueFull as exc:
            stream.close()
            raise Overloaded(str(exc), code="queue_full", headers={"Retry-After": str(self.retry_after())}) from None
        except EngineStopped as exc:
            stream.close()
            raise NotReady(str(exc), code="draining", headers={"Retry-After": "5"}) from None
        return stream

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time to drain the queue, at least 1."""
        s = self.engine.scheduler_stats()
        return max(1, min(60, s.waiting // max(self.engine.max_num_seqs, 1)))

    def record_failure(self, exc: APIError) -> None:
        if self.state.metrics is not None:
            self.state.metrics.record(RequestRecord(outcome=exc.reason))

    def stream_failed(self, exc: Exception, stream: OutputStream, request_id: str) -> str:
        """The error event ending a stream that raised `exc` (a bug: the status line is long sent, so the
        client learns of it from an event, not a 500). Logged with its traceback; the engine work still
        running is aborted without being counted, and the request counts once as an internal failure."""
        log.error("streaming %s failed", request_id, exc_info=exc)
        stream.close(record=False)
        err = InternalError(f"internal error while streaming: {type(exc).__name__}", code="internal_error")
        self.record_failure(err)
        return sse(err.body())

    # -- consuming ------------------------------------------------------------------------------------------
    async def collect(self, stream: OutputStream, raw_request, num_choices: int) -> dict[int, list[SequenceOutput]]:
        """Every output of every choice, or an APIError; aborts the engine work if the client goes away."""
        watcher = asyncio.ensure_future(wait_disconnect(raw_request))
        outs: dict[int, list[SequenceOutput]] = {i: [] for i in range(num_choices)}
        try:
            while stream.pending > 0:
                getter = asyncio.ensure_future(stream.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    log.info("client went away: aborting %s", ",".join(stream.request_ids))
                    raise ClientGone()
                idx, out = getter.result()
                if out.error:
                    raise failure_error(out)
                outs[idx].append(out)
        finally:
            watcher.cancel()
            stream.close()
        return outs

    async def sse_events(self, stream: OutputStream) -> AsyncIterator[tuple[int, SequenceOutput] | None]:
        """Outputs as they come; None when it is time for a keep-alive comment."""
        keepalive = self.state.cfg.sse_keepalive
        while stream.pending > 0:
            try:
                yield await stream.get(keepalive if keepalive > 0 else None)
            except asyncio.TimeoutError:
                yield None



async def wait_disconnect(raw_request) -> None:
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


# -- token strings for logprobs -------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenStrings:
    """id -> (display text, exact bytes) of one token, cached."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        try:
            self.byte_level = '"ByteLevel"' in tokenizer.backend_tokenizer.to_str()
        except AttributeError:
            self.byte_level = False
        self.get = lru_cache(maxsize=65536)(self._get)

    def _get(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tok.convert_ids_to_tokens(token_id)
        text = self.tok.decode([token_id])
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return text, [int(piece[3:5], 16)]
            except ValueError:
                pass
        if self.byte_level and isinstance(piece, str) and piece and all(c in _BYTE_DECODER for c in piece):
            raw = bytes(_BYTE_DECODER[c] for c in piece)
            return raw.decode("utf-8", errors="replace"), list(raw)
        return text, list(text.encode("utf-8"))
