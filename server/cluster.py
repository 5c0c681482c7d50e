"""uc serve's engine as Ray Serve replicas: one engine per replica, the same OpenAI API through Ray Serve's
HTTP proxy (docs/SERVER.md, "Scaling out"). Ray Serve places, balances, autoscales and restarts the replicas;
nothing here does any of that.

- One pack: the replicas (`_Replica`) are the ingress. Each replica runs the very FastAPI app of `uc serve`
  (server/app.py) over its own engine, so statuses, error envelopes, streaming and 429s are unchanged.
- Several packs: `_Router` (no engine, no CPU reservation) is the ingress; it reads the body's `model` and
  passes the request to that pack's deployment through a Serve handle (Serve picks the replica), which runs
  it through the same app (`_Replica.asgi`) and streams the ASGI messages back.
- Metrics: every replica serves its own Prometheus registry on a port of its node and registers the
  address with `_MetricsTargets`; `GET /metrics/targets` answers Prometheus HTTP service discovery with the
  live ones (each replica's series as they are, labelled by replica), so nothing is re-aggregated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .app import AppState, build_app
from .config import ClusterConfig, LoadError, ServerConfig
from .errors import APIError, BadRequest, NotFound

log = logging.getLogger(__name__)

APP_NAME = "uc"
TARGETS_PATH = "/metrics/targets"
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


def serve_options(cfg: ServerConfig, cc: ClusterConfig) -> dict:
    """The Serve deployment options of one pack's replicas."""
    from .commands import SERVE_ENV

    e = cfg.engine
    gpus = cc.replica_gpus if cc.replica_gpus is not None else (1.0 if e.device.startswith("cuda") else 0.0)
    # Replicas are Ray workers started by the raylet, not children of this process: they get uc serve's CPU
    # environment (server/commands.py, SERVE_ENV) and this process's UC_* variables (UC_CPU_ACT, UC_CACHE...).
    env = {k: v for k, v in os.environ.items() if k.startswith("UC_")}
    for key, value in SERVE_ENV.items():
        if not (key == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ):
            env.setdefault(key, os.environ.get(key, value))
    if "OMP_WAIT_POLICY" in os.environ:
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    opts = {
        "name": "uc-" + _slug(cfg.model_name),
        "ray_actor_options": {"num_cpus": cc.replica_cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}},
        # Above the engine's own capacity (batch + queue), so that a full replica answers its own 429
        # queue_full in the OpenAI envelope before Serve's limit (a plain-text 503) is ever reached.
        "max_ongoing_requests": e.max_num_seqs + e.max_queue + 16,
        "graceful_shutdown_timeout_s": cfg.drain_timeout,
        "health_check_period_s": 5.0,
    }
    if cc.max_replicas and cc.max_replicas > cc.replicas:
        opts["autoscaling_config"] = {"min_replicas": cc.replicas, "max_replicas": cc.max_replicas,
                                      "target_ongoing_requests": e.max_num_seqs, "upscale_delay_s": cc.upscale_delay,
                                      "downscale_delay_s": cc.downscale_delay}
    else:
        opts["num_replicas"] = cc.replicas
    return opts


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _node_ip() -> str:
    """The address Ray knows this replica's node by (`ray start --node-ip-address`), which Prometheus reaches."""
    import ray

    node = ray_node_id()
    return next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), ray.util.get_node_ip_address())


# -- the replica -------------------------------------------------------------------------------------------
class _Replica:
    """One engine and the FastAPI app of `uc serve` over it. Loaded in the constructor, so Serve routes to a
    replica only once its weights are loaded and warm (what /health/ready means for `uc serve`)."""

    async def __init__(self, cfg: ServerConfig, targets=None, metrics_port: int = 0) -> None:
        from .loader import build_engine

        self.cfg, self.state = cfg, AppState(cfg)
        state = self.state

        def load():  # on a thread that then exits: every later torch call runs on the engine thread
            engine, info = build_engine(cfg.pack, cfg.engine, cfg.model_name,
                                        stats_sink=lambda rec: state.metrics.record(rec) if state.metrics else None)
            engine.start()
            engine.warmup()
            return engine, info

        engine, info = await asyncio.to_thread(load)
        self.uc_app = build_app(cfg, engine=engine, info=info, state=state)
        state.attach(engine, info)  # as the app's lifespan does, which Serve runs only for an ingress
        self.metrics_address = self._serve_metrics(metrics_port)
        if targets is not None:
            from ray import serve

            async def metrics_targets():  # Prometheus HTTP service discovery (deploy/prometheus-ray.yml)
                return await targets.live.remote()

            self.uc_app.add_api_route(TARGETS_PATH, metrics_targets, methods=["GET"], tags=["health"])
            rid = serve.get_replica_context().replica_id.unique_id
            # __meta_* labels are for relabelling only (Prometheus drops them after): the node and process
            await targets.register.remote(rid, self.metrics_address, {
                "model_name": cfg.model_name, "replica": rid, "__meta_uc_pid": str(os.getpid()),
                "__meta_uc_node": ray_node_id()})
        log.info("replica ready: %s as %r, metrics on %s", cfg.pack, cfg.model_name, self.metrics_address)

    def _serve_metrics(self, port: int) -> str:
        from prometheus_client import start_http_server

        ip = _node_ip()
        server, _ = start_http_server(port, addr=ip, registry=self.state.metrics.registry)
        return f"{ip}:{server.server_port}"

    def __serve_build_asgi_app__(self):
        return self.uc_app

    def check_health(self) -> None:
        """Serve's health check (every 5 s): a dead engine thread fails it, and Serve replaces the replica."""
        thread = getattr(self.state.engine, "_thread", None)
        if thread is None or not thread.is_alive():
            raise RuntimeError("the engine thread is not running")

    async def asgi(self, method: str, path: str, headers: list, body: bytes):
        """Run one request through this replica's app (the multi-pack router's path); yields the ASGI
        response messages. Cancelled when the router's client goes away: the app then sees a disconnect."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                             for k, v in headers], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        out: asyncio.Queue = asyncio.Queue()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect until this generator is cancelled

        task = asyncio.ensure_future(self.uc_app(scope, receive, out.put))
        try:
            while True:
                get = asyncio.ensure_future(out.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    task.result()  # the app returned (or raised) without finishing its response
                    return
                msg = get.result()
                yield msg
                if msg["type"] == "http.response.body" and not msg.get("more_body"):
                    return
        finally:
            task.cancel()


# -- the router (several packs) ------------------------------------------------------------------------------
class _Router:
    """The ingress when several packs are served: the body's `model` picks the pack's deployment."""

    def __init__(self, handles: dict, names: dict, targets=None) -> None:
        self.handles, self.names, self.targets = handles, names, targets  # names: model id -> deployment key

    def __serve_build_asgi_app__(self):
        app = FastAPI(title="UltraCompress on Ray Serve")
        ids = list(self.names)

        def error(exc: APIError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.get("/health/live")
        @app.get("/health/ready")
        @app.get("/health")
        async def health():
            return {"status": "ready"}

        @app.get("/v1/models")
        async def models():
            data = []
            for key in dict.fromkeys(self.names.values()):
                start, body = await self._collect(key, "GET", "/v1/models", [], b"")
                data += json.loads(body)["data"] if start["status"] == 200 else []
            return {"object": "list", "data": data}

        @app.get(TARGETS_PATH)
        async def targets():
            return await self.targets.live.remote() if self.targets is not None else []

        async def route(request: Request):
            body = await request.body()
            try:
                model = json.loads(body or b"{}").get("model")
            except (ValueError, AttributeError):
                return error(BadRequest("the body is not a valid JSON object", param=None))
            if model not in self.names:
                known = ", ".join(ids)
                return error(NotFound(f"The model `{model}` does not exist. Served: {known}.", param="model",
                                      code="model_not_found")
                             if model else BadRequest(f"model: required when several models are served ({known})",
                                                      param="model"))
            gen = self.handles[self.names[model]].options(stream=True).asgi.remote(
                request.method, request.url.path, list(request.headers.items()), body)
            start = await gen.__anext__()

            async def rest():
                async for msg in gen:
                    if msg.get("body"):
                        yield msg["body"]

            headers = {k.decode(): v.decode() for k, v in start.get("headers", []) if k.lower() != b"content-length"}
            return StreamingResponse(rest(), status_code=start["status"], headers=headers,
                                     media_type=headers.get("content-type"))

        for path in ROUTED_PATHS:
            app.add_api_route(path, route, methods=["POST"])
        return app

    async def _collect(self, key: str, method: str, path: str, headers: list, body: bytes):
        start, chunks = None, []
        async for msg in self.handles[key].options(stream=True).asgi.remote(method, path, headers, body):
            if msg["type"] == "http.response.start":
                start = msg
            else:
                chunks.append(msg.get("body", b""))
        return start, b"".join(chunks)


class _MetricsTargets:
    """Where each replica serves its /metrics, for Prometheus's HTTP service discovery. A replica that died
    without saying so (SIGKILL, a lost node) is dropped once its port stops answering."""

    def __init__(self) -> None:
        self.targets: dict[str, tuple[str, dict]] = {}

    def register(self, replica: str, address: str, labels: dict) -> None:
        self.targets[replica] = (address, labels)

    async def live(self) -> list[dict]:
        async def alive(address: str) -> bool:
            host, port = address.rsplit(":", 1)
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 1.0)
                w.close()
                return True
            except (OSError, asyncio.TimeoutError):
                return False

        items = list(self.targets.items())
        ok = await asyncio.gather(*(alive(a) for _, (a, _) in items))
        for (rid, _), up in zip(items, ok):
            if not up:
                del self.targets[rid]
        return [{"targets": [a], "labels": labels} for (_, (a, labels)), up in zip(items, ok) if up]


# -- building the application ---------------------------------------------------------------------------
def build_application(configs: list[ServerConfig], cc: ClusterConfig):
    """The Serve application for these packs (one ServerConfig each): what `uc serve-cluster` runs, and what
    `serve run server.cluster:app_builder` builds from a config file."""
    from ray import serve

    names: dict[str, str] = {}
    for cfg in configs:
        for n in (cfg.model_name, Path(cfg.pack).resolve().name):
            if names.setdefault(n, cfg.model_name) != cfg.model_name:
                raise LoadError(f"two packs are served as {n!r}: give each a distinct --served-model-name")
    targets = serve.deployment(_MetricsTargets, name="uc-metrics-targets", num_replicas=1,
                               ray_actor_options={"num_cpus": 0}).bind()
    if len(configs) == 1:  # the replicas are the ingress: proxy -> replica, no hop in between
        cfg = configs[0]
        replica = serve.deployment(serve.ingress()(_Replica))
        return replica.options(**serve_options(cfg, cc)).bind(cfg, targets, cc.metrics_port)
    replica = serve.deployment(_Replica)  # Serve allows one ingress per application: here the router's
    handles = {cfg.model_name: replica.options(**serve_options(cfg, cc)).bind(cfg, targets, cc.metrics_port)
               for cfg in configs}
    router = serve.deployment(serve.ingress()(_Router), name="uc-router", num_replicas=1,
                              ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    return router.bind(handles, names, targets)
