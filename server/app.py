"""The FastAPI application: thin routes over the serving layer, auth, health, metrics, error envelopes.

The app is up (live) at once; the engine loads in a background thread and /health/ready turns 200 only
after the weights are loaded and a one-token warm-up passed. It turns 503 again while draining.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ucformat.errors import PackError

from . import __version__
from .config import LoadError, ServerConfig
from .errors import APIError, BadRequest, InternalError, NotReady, PackUnusable, Unauthorized
from .memory import memory_stats, weight_bytes
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ErrorResponse, ModelCard, ModelList, ParamError, TokenizeRequest, TokenizeResponse,
)
from .serving import ClientGone, Serving
from .serving_chat import ChatServing
from .serving_completion import CompletionServing

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          408: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@dataclass
class AppState:
    cfg: ServerConfig
    metrics: Metrics | None = None
    engine: object | None = None
    info: object | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    load_exception: BaseException | None = None
    created: int = 0
    on_load_failure: Callable[[], None] | None = None
    on_ready: Callable[[], None] | None = None
    completions: CompletionServing | None = None
    chat: ChatServing | None = None
    model_names: list[str] = field(default_factory=list)

    def attach(self, engine, info) -> None:
        """Engine loaded and warm: build the serving objects, bind metrics, become ready."""
        import time

        self.engine, self.info, self.created = engine, info, int(time.time())
        self.completions, self.chat = CompletionServing(self), ChatServing(self)
        if self.metrics is not None:
            device = self.cfg.engine.device
            runtime = getattr(engine.model, "uc_runtime", None)
            weights = weight_bytes(engine.model)
            self.metrics.bind(info, engine.scheduler_stats,
                              lambda: memory_stats(device, weight_bytes(engine.model) if runtime else weights,
                                                   engine.kv.allocated_bytes),
                              (lambda: runtime.stats()) if runtime is not None and hasattr(runtime, "stats") else lambda: None)
        self.ready = True


def validation_param(errs: list[dict]) -> tuple[str | None, str]:
    """(param, message) for pydantic's errors about a request body, naming the field of the first error.

    A value that fits no member of a union (`prompt`: str | list[str] | list[int] | list[list[int]]) gives
    one error per member, with the member's type as an extra location part (`prompt.str`,
    `prompt.list[str].1`); the parameter is the field itself (the locations' common prefix) and the
    message says how each member failed."""
    if not errs:
        return None, "invalid request"
    locs = [tuple(str(p) for p in e.get("loc", ()) if p != "body") for e in errs]
    same = [(loc, e) for loc, e in zip(locs, errs) if loc[:1] == locs[0][:1]]
    n = 0
    while all(len(loc) > n and loc[n] == locs[0][n] for loc, _ in same):
        n += 1
    param = ".".join(locs[0][:n]) or None
    if len(same) == 1:
        return param, errs[0].get("msg", "invalid request")
    first_per_branch: dict[str, str] = {}  # keyed by the union member (or list index) each error is under
    for loc, e in same:
        rest, msg = _readable_type(".".join(loc[n:])), e.get("msg")
        first_per_branch.setdefault(loc[n] if len(loc) > n else "", f"{rest}: {msg}" if rest else msg)
    parts = list(first_per_branch.values())
    return param, "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def _readable_type(tag: str) -> str:
    """pydantic's union member tags without validator internals: list[constrained-int] -> list[int]."""
    tag = re.sub(r"function-\w+\[[^,\[\]]*,\s*(\w+)\]", r"\1", tag)
    return tag.replace("constrained-", "")


def _config_max_len(pack: str) -> int:
    try:
        cfg = json.loads((Path(pack) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return int(cfg.get("max_position_embeddings") or 8192)
    except (OSError, ValueError):
        return 8192


def load_in_background(state: AppState) -> threading.Thread:
    from .loader import build_engine

    def run():
        try:
            engine, info = build_engine(state.cfg.pack, state.cfg.engine, state.cfg.model_name,
                                        stats_sink=state.metrics.record if state.metrics else None)
            engine.start()
            engine.warmup()
            state.attach(engine, info)
            log.info("ready: serving %s as %r", state.cfg.pack, state.cfg.model_name)
            if state.on_ready:
                state.on_ready()
        except Exception as exc:
            if isinstance(exc, (PackError, LoadError)):  # a bad pack or setting: its message says it all
                log.error("loading %s failed: %s", state.cfg.pack, exc)
            else:
                log.exception("loading %s failed", state.cfg.pack)
            state.load_error, state.load_exception = f"{type(exc).__name__}: {exc}", exc
            if state.on_load_failure:
                state.on_load_failure()

    t = threading.Thread(target=run, name="uc-load", daemon=True)
    t.start()
    return t


def build_app(cfg: ServerConfig, engine=None, info=None, state: AppState | None = None) -> FastAPI:
    """With `engine`/`info` given (tests, `uc chat`), serve that engine; else load cfg.pack at startup."""
    state = state or AppState(cfg)
    state.model_names = [cfg.model_name] + ([Path(cfg.pack).name] if cfg.pack and Path(cfg.pack).name != cfg.model_name else [])
    state.metrics = Metrics(cfg.model_name, (info.max_model_len if info else None) or cfg.engine.max_model_len
                            or _config_max_len(cfg.pack))

    async def lifespan(app):
        if engine is not None:
            state.attach(engine, info)
        elif cfg.pack:
            load_in_background(state)
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="UltraCompress OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  description="Serves a uc pack with the OpenAI completions and chat completions APIs.")
    app.state.uc = state

    # -- dependencies ----------------------------------------------------------------------------------------
    def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise Unauthorized()

    def ready() -> None:
        if state.draining:
            raise NotReady("the server is shutting down", code="draining", headers={"Retry-After": "5"})
        if not state.ready:
            msg = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
            raise NotReady(msg, code="not_ready", headers={"Retry-After": "5"})
        fault = state.engine.pack_fault()  # a sync dependency: runs in the threadpool, may re-hash a file
        if fault is not None:
            raise PackUnusable(state.info.pack if state.info is not None else cfg.pack, fault)

    # -- errors -------------------------------------------------------------------------------------------
    def count(request: Request, exc: APIError) -> None:
        """Failures the engine never saw (refused requests); the engine counts the ones it ran."""
        if request.url.path in GENERATION_PATHS and state.completions is not None and not exc.counted:
            state.completions.record_failure(exc)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        count(request, exc)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ParamError)
    async def param_error(request: Request, exc: ParamError):
        return await api_error(request, BadRequest(str(exc), param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            msg = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return await api_error(request, BadRequest(msg, param=None))
        param, msg = validation_param(errs)
        return await api_error(request, BadRequest(f"{param}: {msg}" if param else msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": kind}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return await api_error(request, InternalError(f"internal error: {type(exc).__name__}", code="internal_error"))

    # -- health, version, metrics -------------------------------------------------------------------------
    @app.get("/health/live", tags=["health"])
    async def live():
        return {"status": "live"}

    @app.get("/health/ready", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def is_ready(_=Depends(ready)):
        return {"status": "ready"}

    @app.get("/health", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def health(_=Depends(ready)):
        return {"status": "ready"}

    @app.get("/version", tags=["health"])
    async def version():
        from ucformat import VERSION as FORMAT_VERSION

        return {"version": __version__, "pack_format": FORMAT_VERSION}

    @app.get("/metrics", tags=["health"])
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI API ---------------------------------------------------------------------------------------
    @app.get("/v1/models", response_model=ModelList, tags=["openai"], responses=ERRORS)
    async def models(_=Depends(auth), __=Depends(ready)):
        limit = state.engine.max_model_len
        return ModelList(data=[ModelCard(id=n, created=state.created, root=state.info.pack, max_model_len=limit)
                               for n in state.model_names])

    async def respond(result):
        if isinstance(result, (CompletionResponse, ChatCompletionResponse)):
            return JSONResponse(result.model_dump())
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["openai"], responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request, _=Depends(auth), __=Depends(ready)):
        return await respond(await state.completions.create(body, request))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"], responses=ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request, _=Depends(auth), __=Depends(ready)):
        return await respond(await state.chat.create(body, request))

    # -- tokenizer (vLLM's shapes) ------------------------------------------------------------------------
    @app.post("/tokenize", response_model=TokenizeResponse, tags=["tokenizer"], responses=ERRORS)
    async def tokenize(body: TokenizeRequest, _=Depends(auth), __=Depends(ready)):
        serving: Serving = state.chat
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("send exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            ids = state.chat.prompt(body.messages, body.add_generation_prompt is not False).ids
        else:
            ids = state.engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False).input_ids
        return TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=DetokenizeResponse, tags=["tokenizer"], responses=ERRORS)
    async def detokenize(body: DetokenizeRequest, _=Depends(auth), __=Depends(ready)):
        state.chat.check_model(body.model)
        state.chat.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))

    return app
