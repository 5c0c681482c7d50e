"""Build an Engine from a pack: weights through the runtime's residency plan, the tokenizer, and a KV
cache sized from the memory that remains once the weights are in place."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

import torch

from .config import EngineConfig, LoadError, parse_size
from .cpu_linear import prepack
from .engine import Engine
from .kv_cache import SlotKVCache, KVShape
from .memory import available_bytes, weight_bytes
from .stats import ModelInfo

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_KV_SHARE, CPU_KV_MAX, CUDA_KV_SHARE = 0.25, 8 << 30, 0.9


def resolve_dtype(name: str, device: str, config_dtype: str | None) -> torch.dtype:
    """auto: the checkpoint's bf16/fp16 where the device computes it fast, else float32."""
    if name != "auto":
        try:
            return _DTYPES[name]
        except KeyError:
            raise LoadError(f"--dtype {name}: one of auto, {', '.join(_DTYPES)}") from None
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if _cpu_has_fast_bf16() and config_dtype in ("bfloat16", "float32", None):
        return torch.bfloat16
    return torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_residency(name: str, device: str, dtype: torch.dtype) -> str:
    """`auto`: packed where the quantized linears were measured faster than dense (a CPU computing in
    float32 with the native kernel built: bench/qkernels.py), dense elsewhere (CUDA and bfloat16 CPUs: not
    yet measured against their dense matmuls)."""
    if name != "auto":
        return name
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        from ucformat import cpu_qgemv

        if cpu_qgemv.available()[0]:
            return "packed"
    return "dense"


def load_model(pack: str, cfg: EngineConfig, dtype: torch.dtype):
    """runtime.load with the residency kwargs it knows (older runtimes have only dense)."""
    from ucformat import runtime

    params = inspect.signature(runtime.load).parameters
    kwargs = {}
    if "residency" in params:
        kwargs["residency"] = cfg.residency
        if "vram_budget" in params:
            kwargs["vram_budget"] = cfg.vram_budget
    elif cfg.residency != "dense":
        raise LoadError(f"--residency {cfg.residency}: this runtime only has dense residency")
    return runtime.load(pack, device=cfg.device, dtype=dtype, **kwargs)


def kv_budget(cfg: EngineConfig, device: str) -> int:
    asked = parse_size(cfg.kv_cache_memory)
    if asked is not None:
        return asked
    free = available_bytes(device)
    if torch.device(device).type == "cuda":
        return int(free * CUDA_KV_SHARE)
    return min(int(free * CPU_KV_SHARE), CPU_KV_MAX)


def check_pack(pack: str) -> None:
    """What `uc serve` checks before it starts (each a named error, so the command refuses with one line): the pack
    is the model its config.json builds (ucformat/conformance.py) and its tokenizer loads. The weight files' hashes
    are checked as the load reads them."""
    from ucformat import PackReader, conformance
    from ucformat.assets import load_tokenizer

    reader = PackReader(pack, check_hashes=False)
    conformance.require(reader)
    load_tokenizer(reader)


def build_engine(pack: str, cfg: EngineConfig, name: str, stats_sink=None) -> tuple[Engine, ModelInfo]:
    from ucformat import PackReader
    from ucformat.assets import load_tokenizer

    reader = PackReader(pack, check_hashes=False)
    man = reader.manifest
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    config = reader.config_dict()
    config_dtype = config.get("dtype") or config.get("torch_dtype")
    dtype = resolve_dtype(cfg.dtype, cfg.device, config_dtype)
    cfg = dataclasses.replace(cfg, residency=resolve_residency(cfg.residency, cfg.device, dtype))
    model = load_model(pack, cfg, dtype)
    if cfg.cpu_prepack not in ("auto", "fused", "off"):
        raise LoadError(f"--cpu-prepack {cfg.cpu_prepack}: auto, fused or off")
    if cfg.cpu_prepack != "off" and cfg.residency == "dense":
        n = prepack(model, batch_hint=min(cfg.max_num_seqs, 16), fuse=cfg.cpu_prepack == "fused")
        if n:
            log.info("prepacked %d linear weights for oneDNN", n)
    tokenizer = load_tokenizer(reader)
    shape = KVShape.of(model.config, dtype, cfg.device)
    kv = SlotKVCache(shape, kv_budget(cfg, cfg.device), cfg.max_num_seqs)
    tc = getattr(model.config, "get_text_config", lambda: model.config)()
    limit = getattr(tc, "max_position_embeddings", None) or kv.max_len
    max_len = min(cfg.max_model_len or limit, limit, kv.max_len)
    if max_len < 2:
        raise LoadError(f"the KV cache budget ({kv.budget_tokens} tokens) leaves no room; raise --kv-cache-memory")
    eos = _eos_ids(model, tokenizer)
    runtime = getattr(model, "uc_runtime", None)
    engine = Engine(model, tokenizer, kv, max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_queue,
                    max_model_len=max_len, prefill_chunk=cfg.prefill_chunk, eos_token_ids=eos, stats_sink=stats_sink,
                    cuda_graphs=cfg.cuda_graphs != "off", pack=str(Path(pack).resolve()),
                    probe=getattr(runtime, "check_files", None))
    quant = man.quant if isinstance(man.quant, dict) else {}
    stats = man.stats if isinstance(man.stats, dict) else {}
    info = ModelInfo(
        name=name, pack=str(Path(pack).resolve()), format_version=str(man.version), codec=str(quant.get("codec", "")),
        bits=str(quant.get("bits", "")), bpw_allin=stats.get("bpw_allin"),
        residency=getattr(getattr(runtime, "plan", None), "mode", cfg.residency), device=cfg.device,
        device_name=device_name(cfg.device), dtype=str(dtype).removeprefix("torch."), max_model_len=max_len,
        extra={"weights_bytes": weight_bytes(model)})
    log.info("loaded %s: %s on %s (%s), max_model_len %d, KV budget %.0f MiB (%d tokens)", name, pack, info.device_name,
             info.dtype, max_len, kv.budget_tokens * shape.bytes_per_token / 2**20, kv.budget_tokens)
    return engine, info


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return tuple(sorted(ids))


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
