"""Server and engine settings: frozen dataclasses, the one source of defaults.

`uc serve` builds its flags from these fields (help text in `metadata["help"]`), and every flag can also
be set from an environment variable named `UC_<FIELD>` (e.g. `UC_MAX_NUM_SEQS=32`), so a container is
configured by environment alone. Precedence: command-line flag > environment > default here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "UC_"


class LoadError(ValueError):
    """Bad server settings, or a pack the server cannot load; the message says what to change."""


def _opt(default: Any, help: str, flag: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class EngineConfig:
    device: str = _opt("cpu", "cpu or cuda[:N]")
    dtype: str = _opt("auto", "compute dtype: auto (bfloat16 where the device has fast bf16 matmul, "
                              "else float32), float32, bfloat16 or float16")
    residency: str = _opt("auto", "weight residency plan of the runtime: dense, packed or stream; auto: packed "
                                  "on a CPU computing in float32 where the native quantized kernel is built (faster "
                                  "than dense there: docs/BENCHMARKS.md), else dense")
    vram_budget: str | None = _opt(None, "device bytes for weights under --residency stream, e.g. 24GiB or auto")
    max_num_seqs: int = _opt(32, "most sequences decoded together in one batch")
    max_queue: int = _opt(256, "most sequences waiting while the batch is full; beyond it requests get 429")
    max_model_len: int | None = _opt(None, "context length limit (default: the model's, capped by the KV budget)")
    kv_cache_memory: str = _opt("auto", "bytes for the KV cache, e.g. 4GiB; auto: what remains on the device "
                                        "after the weights (90%% on CUDA; 25%% of available RAM, at most 8GiB, on CPU)")
    prefill_chunk: int = _opt(512, "most prompt tokens prefilled per engine step (long prompts are chunked so "
                                   "running streams keep flowing)")
    request_timeout: float = _opt(600.0, "seconds a request may take in total (0: no limit); a request may ask "
                                         "for less with the `timeout` field")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    cpu_prepack: str = _opt("auto", "auto: on the CPU in bfloat16 with dense residency, pack linear weights for "
                                    "oneDNN once at load (same results, faster steps); fused: also compute q/k/v "
                                    "and gate/up as one matmul each (faster only with OMP_WAIT_POLICY=PASSIVE); "
                                    "off: never")
    cuda_graphs: str = _opt("auto", "auto: on CUDA with dense or packed residency, decode steps replay a CUDA "
                                    "graph captured once per batch size bucket (no per-token host work); off: "
                                    "eager decode steps")


@dataclass(frozen=True)
class ServerConfig:
    pack: str = _opt("", "the uc pack to serve", flag=False)
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 in a container)")
    port: int = _opt(8000, "TCP port")
    api_key: str | None = _opt(None, "require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize")
    served_model_name: str | None = _opt(None, "model id clients send (default: the pack folder's name)")
    sse_keepalive: float = _opt(10.0, "seconds between SSE keep-alive comments while a stream waits (e.g. a "
                                      "long prefill)")
    drain_timeout: float = _opt(30.0, "on SIGTERM: seconds to let running requests finish before exiting")
    log_level: str = _opt("info", "debug, info, warning or error")
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"flag": False})

    @property
    def model_name(self) -> str:
        from pathlib import Path

        return self.served_model_name or Path(self.pack).resolve().name


@dataclass(frozen=True)
class ClusterConfig:
    """How Ray Serve runs the replicas of each pack (the engine's settings stay in EngineConfig)."""
    address: str = _opt("auto", "Ray cluster to join: auto (the one `ray start` made on this node), ray://HOST:10001, "
                                "or local (start a one-node Ray in this process)")
    replicas: int = _opt(1, "replicas per pack (the minimum when --max-replicas is given)")
    max_replicas: int | None = _opt(None, "autoscale each pack between --replicas and this many replicas on ongoing "
                                          "requests (target: --max-num-seqs per replica)")
    upscale_delay: float = _opt(10.0, "with --max-replicas: seconds the load must stay above the target before Serve "
                                      "adds a replica")
    downscale_delay: float = _opt(300.0, "with --max-replicas: seconds the load must stay below the target before "
                                         "Serve removes a replica")
    replica_cpus: float = _opt(1.0, "CPUs Ray reserves per replica (also the replica's torch threads, rounded)")
    replica_gpus: float | None = _opt(None, "GPUs per replica (default: 1 with --device cuda, else 0)")
    metrics_port: int = _opt(0, "port of each replica's /metrics on its node (0: any free port; a fixed one allows "
                                 "one replica per node)")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("flag", True)]


def parse_value(f, text: str) -> Any:
    """Convert an environment string to a field's type (`int | None` etc. from the annotation text)."""
    kind = str(f.type)
    if text == "" and "None" in kind:
        return None
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    return text


def env_default(f) -> Any:
    raw = os.environ.get(env_name(f.name))
    if raw is None:
        return f.default
    try:
        return parse_value(f, raw)
    except ValueError:
        raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {f.type}") from None


def parse_size(text: str | int | None) -> int | None:
    """'4GiB', '512MiB', '2e9', 1234 -> bytes; None/'auto' -> None."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip()
    if t.lower() in ("", "auto"):
        return None
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12, "b": 1}
    low = t.lower()
    for suffix, mult in units.items():
        if low.endswith(suffix):
            return int(float(low[: -len(suffix)].strip()) * mult)
    return int(float(t))
