"""Device memory probes: what is free before the KV cache is sized, and the split weights / KV / other
that /metrics exports. On the CPU the "device" is host memory and the process's RSS stands in for
torch's allocator, which does not track CPU tensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .stats import MemoryStats


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, rest = line.split(":", 1)
            out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them for reuse otherwise), so that an idle
    server's RSS shows what it holds, not the high-water mark of its last busy batch."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_bytes(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free
    return _meminfo().get("MemAvailable", 4 << 30)


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers that hold real storage (tied weights counted once)."""
    runtime = getattr(model, "uc_runtime", None)
    if runtime is not None and hasattr(runtime, "stats"):
        try:
            return int(runtime.stats().resident_bytes)
        except Exception:  # an older runtime without the field: count tensors
            pass
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_stats(device: str, weights: int, kv_cache: int) -> MemoryStats:
    dev = torch.device(device)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        reserved = torch.cuda.memory_reserved(dev)
        return MemoryStats(str(dev), total, total - free, torch.cuda.memory_allocated(dev), reserved,
                           torch.cuda.max_memory_allocated(dev), weights, kv_cache,
                           max(reserved - weights - kv_cache, 0))
    info = _meminfo()
    total = info.get("MemTotal")
    used = total - info["MemAvailable"] if total is not None and "MemAvailable" in info else None
    rss = rss_bytes()
    other = max(rss - weights - kv_cache, 0) if rss is not None else None
    return MemoryStats("cpu", total, used, None, None, None, weights, kv_cache, other)
