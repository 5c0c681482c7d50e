"""`uc serve PACK`: the OpenAI-compatible server. Flags come from ServerConfig/EngineConfig (one source of
defaults); every flag can also be given as an environment variable UC_<FLAG> (flag > environment > default)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import EngineConfig, LoadError, ServerConfig, env_default, env_name, flag_fields, parse_value


def _add_fields(parser: argparse.ArgumentParser, cls) -> None:
    for f in flag_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = env_default(f)
        shown = "unset" if default is None else default
        parser.add_argument(flag, dest=f.name, default=default, type=lambda s, f=f: parse_value(f, s),
                            metavar=f.name.upper(), help=f"{f.metadata['help']} (env {env_name(f.name)}; default {shown})")


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a pack with the OpenAI API (completions, chat, streaming, metrics)",
                       description="Serve PACK over HTTP with the OpenAI completions and chat completions APIs, "
                       "continuous batching, Prometheus /metrics and health probes (/health/live, /health/ready). "
                       "Every flag can also be set by an environment variable UC_<FLAG>.")
    pack_default = os.environ.get(env_name("pack"))
    s.add_argument("pack", nargs="?" if pack_default else None, default=pack_default,
                   help=f"the uc pack folder (env {env_name('pack')})")
    _add_fields(s, ServerConfig)
    _add_fields(s, EngineConfig)
    s.set_defaults(fn=cmd_serve)

    from .cluster_cli import register as register_cluster

    register_cluster(sub)


def config_from_args(a) -> ServerConfig:
    engine = EngineConfig(**{f.name: getattr(a, f.name) for f in flag_fields(EngineConfig)})
    server = {f.name: getattr(a, f.name) for f in flag_fields(ServerConfig)}
    cfg = ServerConfig(pack=a.pack, engine=engine, **server)
    check(cfg)
    return cfg


def check(cfg: ServerConfig) -> None:
    from pathlib import Path

    e = cfg.engine
    if not Path(cfg.pack).is_dir() or not (Path(cfg.pack) / "manifest.json").is_file():
        raise LoadError(f"{cfg.pack}: not a finished uc pack (no manifest.json); make one with `uc pack`")
    if e.cuda_graphs not in ("auto", "off"):
        raise LoadError(f"--cuda-graphs {e.cuda_graphs}: one of auto, off")
    if e.max_num_seqs < 1 or e.max_queue < 1:
        raise LoadError("--max-num-seqs and --max-queue must be at least 1")
    if e.prefill_chunk < 1:
        raise LoadError("--prefill-chunk must be at least 1")
    if e.residency not in ("auto", "dense", "packed", "stream"):
        raise LoadError(f"--residency {e.residency}: one of auto, dense, packed, stream")
    if cfg.log_level not in ("debug", "info", "warning", "error", "critical"):
        raise LoadError(f"--log-level {cfg.log_level}: one of debug, info, warning, error")


# Process environment for `uc serve` on the CPU; each is set only where the user has not set it.
SERVE_ENV = {
    # OpenMP workers spin about half a millisecond at a barrier before they sleep: long enough to catch the
    # next matmul of the same decode step, short enough not to starve the HTTP loop or a neighbour.
    # OMP_WAIT_POLICY=PASSIVE (sleep at once) made every matmul wait for a futex wake-up: decode steps
    # 1.7-1.9x slower (bench/cpu_step.py). Unbounded spinning (ACTIVE) collapses when the cores are shared.
    "GOMP_SPINCOUNT": "20000",
    # torch's CPU allocator: 2 MiB-aligned large buffers advised as transparent huge pages (KV cache,
    # embeddings, packed weights), fewer TLB misses while a decode step streams the weights.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def _serve_environment() -> None:
    """Re-exec `uc serve` with SERVE_ENV (docs/SERVER.md, "CPU speed"). libgomp and the allocator read
    these only at load, and torch is loaded by now, hence the re-exec (same PID, same arguments). A user
    who set OMP_WAIT_POLICY chose the OpenMP policy: GOMP_SPINCOUNT is then left alone too."""
    if "serve" not in sys.argv[1:] or os.environ.get("UC_SERVE_ENV_SET"):
        return
    env = {**os.environ, "UC_SERVE_ENV_SET": "1"}
    for key, value in SERVE_ENV.items():
        if key == "GOMP_SPINCOUNT" and "OMP_WAIT_POLICY" in os.environ:
            continue
        env.setdefault(key, value)
    os.execve(sys.executable, [sys.executable, "-m", "uc", *sys.argv[1:]], env)


def cmd_serve(a) -> int:
    import logging

    from .launch import serve
    from .loader import check_pack

    cfg = config_from_args(a)
    _serve_environment()
    check_pack(cfg.pack)  # a pack that is not its model, or whose tokenizer does not load: refused before serving
    logging.getLogger().setLevel(cfg.log_level.upper())
    logging.getLogger("server").setLevel(cfg.log_level.upper())
    return serve(dataclasses.replace(cfg))


ERRORS = (LoadError,)
