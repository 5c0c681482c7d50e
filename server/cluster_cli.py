"""`uc serve-cluster PACK...`: deploy packs as Ray Serve replicas on a Ray cluster and serve them through Ray
Serve's HTTP proxy until Ctrl-C or SIGTERM (then the application is deleted and the replicas drain). Needs
the optional extra: pip install 'ultracompress[cluster]'. Flags: uc serve's (ServerConfig, EngineConfig;
--host/--port are the proxy's) plus ClusterConfig's, each also from UC_<FLAG>."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time

from .config import ClusterConfig, EngineConfig, LoadError, ServerConfig, flag_fields

log = logging.getLogger(__name__)


def register(sub) -> None:
    from .commands import _add_fields

    s = sub.add_parser("serve-cluster", help="serve packs as Ray Serve replicas (OpenAI API through Ray Serve's proxy)",
                       description="Deploy each PACK as Ray Serve replicas (one engine each) on a Ray cluster and serve "
                       "them with the OpenAI API through Ray Serve's HTTP proxy; several packs are routed by the "
                       "request's `model`. Ray Serve balances, autoscales (--max-replicas) and restarts replicas. "
                       "Needs pip install 'ultracompress[cluster]' and a Ray cluster (`ray start --head`), or "
                       "--address local. Every flag can also be set by an environment variable UC_<FLAG>.")
    s.add_argument("packs", nargs="+", metavar="PACK", help="uc pack folders (the same path on every Ray node)")
    _add_fields(s, ClusterConfig)
    _add_fields(s, ServerConfig)
    _add_fields(s, EngineConfig)
    s.set_defaults(fn=cmd_serve_cluster)


def configs_from_args(a) -> tuple[list[ServerConfig], ClusterConfig]:
    from .commands import check

    cc = ClusterConfig(**{f.name: getattr(a, f.name) for f in flag_fields(ClusterConfig)})
    if cc.replicas < 1 or (cc.max_replicas is not None and cc.max_replicas < cc.replicas):
        raise LoadError("--replicas must be at least 1 and --max-replicas at least --replicas")
    if cc.replica_cpus <= 0:
        raise LoadError("--replica-cpus must be positive")
    if cc.upscale_delay < 0 or cc.downscale_delay < 0:
        raise LoadError("--upscale-delay and --downscale-delay must not be negative")
    if len(a.packs) > 1 and a.served_model_name:
        raise LoadError("--served-model-name names one pack; with several, each is served by its folder name")
    engine = EngineConfig(**{f.name: getattr(a, f.name) for f in flag_fields(EngineConfig)})
    server = {f.name: getattr(a, f.name) for f in flag_fields(ServerConfig)}
    configs = []
    for pack in a.packs:
        cfg = ServerConfig(pack=str(pack), engine=engine, **server)
        check(cfg)
        configs.append(with_threads(cfg, cc))
    return configs, cc


def cmd_serve_cluster(a) -> int:
    from .launch import examples
    from .loader import check_pack

    configs, cc = configs_from_args(a)
    for cfg in configs:
        check_pack(cfg.pack)  # a bad pack is refused here in one line, before any replica starts
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LoadError("uc serve-cluster needs Ray Serve: pip install 'ultracompress[cluster]'") from None
    from .cluster import APP_NAME, TARGETS_PATH, build_application

    logging.getLogger("server").setLevel(configs[0].log_level.upper())
    app = build_application(configs, cc)
    ray.init(address=None if cc.address == "local" else cc.address, namespace="uc", logging_level=logging.WARNING)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C, including while serve.run waits for the replicas
    try:
        serve.start(http_options={"host": configs[0].host, "port": configs[0].port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except (serve.exceptions.RayServeException, RuntimeError) as exc:  # a replica that failed to start...
            raise LoadError(f"Ray Serve could not deploy {', '.join(c.pack for c in configs)}: "
                            f"{str(exc).strip().splitlines()[-1]}") from None
        first = configs[0]
        for cfg in configs:
            print(examples(dataclasses.replace(cfg, port=first.port)).rstrip(), flush=True)
        host = "127.0.0.1" if first.host in ("0.0.0.0", "::", "") else first.host
        print(f"\nPrometheus service discovery of the replicas' /metrics: http://{host}:{first.port}{TARGETS_PATH}\n",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log.warning("deleting the Serve application %r (replicas drain up to %.0f s)", APP_NAME,
                    configs[0].drain_timeout)
        try:
            serve.delete(APP_NAME)
            if not serve.status().applications:  # nothing else on Serve: stop it too, freeing the proxy's port
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def with_threads(cfg: ServerConfig, cc: ClusterConfig) -> ServerConfig:
    """A replica's torch threads default to the CPUs Ray reserves for it (Ray sets no CPU affinity: without
    this, every replica on a node would start one thread per core of the node)."""
    if cfg.engine.threads or cfg.engine.device.startswith("cuda"):
        return cfg
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, threads=max(1, round(cc.replica_cpus))))


ERRORS = (LoadError,)
