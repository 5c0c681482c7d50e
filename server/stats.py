"""Plain stats records: what the engine (and the serving layer, for requests it refuses) reports.

Nothing here knows Prometheus; `server/metrics.py` maps these records to metrics in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How a request ended. Successes carry the OpenAI finish_reason; failures a reason of their own.
SUCCESS_REASONS = ("stop", "length")
FAILURE_REASONS = ("validation", "overloaded", "aborted", "timeout", "internal", "pack")


@dataclass(frozen=True)
class IterationStats:
    """One engine step."""
    prompt_tokens: int  # prefill tokens computed this step
    generation_tokens: int  # tokens sampled this step
    ttfts: tuple[float, ...] = ()  # seconds from arrival to first token, for sequences that got it now
    itls: tuple[float, ...] = ()  # seconds since the previous token, for every other sampled token
    preempted: int = 0  # sequences evicted to free KV cache (recomputed later)


@dataclass(frozen=True)
class RequestRecord:
    """One finished (or failed) sequence. Times in seconds; None where the phase never happened."""
    outcome: str  # one of SUCCESS_REASONS + FAILURE_REASONS
    prompt_tokens: int = 0
    generation_tokens: int = 0
    e2e: float | None = None
    queue: float | None = None
    prefill: float | None = None
    decode: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class SchedulerStats:
    """State at one instant: read by /metrics at scrape time."""
    running: int
    waiting: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    kv_allocated_bytes: int
    kv_budget_bytes: int

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0


@dataclass(frozen=True)
class MemoryStats:
    """Device memory in bytes (host memory when the device is the CPU). None: not measurable there."""
    device: str
    total: int | None
    used: int | None
    torch_allocated: int | None
    torch_reserved: int | None
    torch_peak_allocated: int | None
    weights: int
    kv_cache: int
    other: int | None


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about what is served, for the info metric, /v1/models and /version."""
    name: str
    pack: str
    format_version: str
    codec: str
    bits: str
    bpw_allin: float | None
    residency: str
    device: str
    device_name: str
    dtype: str
    max_model_len: int
    extra: dict = field(default_factory=dict)
