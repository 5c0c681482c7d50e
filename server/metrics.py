"""Prometheus metrics, mapped from the stats records in one place.

Names and buckets follow vLLM's where the meaning is the same, under the `uc:` prefix (a vLLM dashboard
works after replacing `vllm:` by `uc:`): latency histograms use vLLM's bucket boundaries, token-count
histograms its 1-2-5 series up to max_model_len, and every series has the `model_name` label.
What vLLM lacks is added: failures by reason, device memory split into weights / KV cache / other,
residency of the weights (resident layers and bytes, bytes streamed, prefetch stalls) and an info
metric describing the pack. Gauges are read at scrape time from the engine and the runtime.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from .stats import FAILURE_REASONS, SUCCESS_REASONS, IterationStats, MemoryStats, ModelInfo, RequestRecord, SchedulerStats

P = "uc:"
disable_created_metrics()  # the *_created series only double the scrape size (vLLM does the same)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)


def buckets_1_2_5(max_value: int) -> list[int]:
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class Metrics:
    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.model_name = model_name
        r, L = self.registry, ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(P + name, doc, L, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a sequence, seconds.",
                        ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Time spent waiting for a batch slot, seconds.",
                          REQUEST_LATENCY_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "Time from admission to first token, seconds.",
                            REQUEST_LATENCY_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "Time from first to last token, seconds.",
                           REQUEST_LATENCY_BUCKETS)
        count_buckets = buckets_1_2_5(max(max_model_len, 1))
        self.req_prompt = hist("request_prompt_tokens", "Prompt tokens per request.", count_buckets)
        self.req_gen = hist("request_generation_tokens", "Generated tokens per request.", count_buckets)
        self.req_max_tokens = hist("request_params_max_tokens", "The max_tokens parameter of requests.",
                                   count_buckets)
        self.iter_tokens = hist("iteration_tokens_total", "Tokens per engine step.",
                                (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens processed.", L, registry=r).labels(model_name)
        self.gen_tokens = Counter(P + "generation_tokens", "Generation tokens processed.", L,
                                  registry=r).labels(model_name)
        self.preempted = Counter(P + "num_preemptions", "Sequences preempted to free KV cache.", L,
                                 registry=r).labels(model_name)
        success = Counter(P + "request_success", "Requests finished, by finish reason.", L + ["finished_reason"],
                          registry=r)
        self.success = {k: success.labels(model_name, k) for k in SUCCESS_REASONS}
        failure = Counter(P + "request_failure", "Requests failed, by reason.", L + ["reason"], registry=r)
        self.failure = {k: failure.labels(model_name, k) for k in FAILURE_REASONS}
        self._gauges = _GaugeCollector(model_name)
        r.register(self._gauges)

    def bind(self, info: ModelInfo, scheduler: Callable[[], SchedulerStats], memory: Callable[[], MemoryStats],
             runtime_stats: Callable[[], object | None]) -> None:
        """Attach the scrape-time sources once the engine exists."""
        self._gauges.info, self._gauges.scheduler = info, scheduler
        self._gauges.memory, self._gauges.runtime_stats = memory, runtime_stats

    def record(self, rec) -> None:
        """Map one stats record (engine thread or serving layer) to metrics."""
        if isinstance(rec, IterationStats):
            self.prompt_tokens.inc(rec.prompt_tokens)
            self.gen_tokens.inc(rec.generation_tokens)
            if rec.prompt_tokens + rec.generation_tokens:
                self.iter_tokens.observe(rec.prompt_tokens + rec.generation_tokens)
            for v in rec.ttfts:
                self.ttft.observe(v)
            for v in rec.itls:
                self.itl.observe(v)
            if rec.preempted:
                self.preempted.inc(rec.preempted)
        elif isinstance(rec, RequestRecord):
            if rec.outcome in self.success:
                self.success[rec.outcome].inc()
            else:
                self.failure[rec.outcome].inc()
            if rec.e2e is None:  # refused before the engine saw it
                return
            self.e2e.observe(rec.e2e)
            self.req_prompt.observe(rec.prompt_tokens)
            self.req_gen.observe(rec.generation_tokens)
            if rec.max_tokens is not None:
                self.req_max_tokens.observe(rec.max_tokens)
            for h, v in ((self.queue, rec.queue), (self.prefill, rec.prefill), (self.decode, rec.decode)):
                if v is not None:
                    h.observe(v)


class _GaugeCollector:
    """Everything read at scrape time: scheduler state, memory, residency, the info metric."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.info: ModelInfo | None = None
        self.scheduler = self.memory = self.runtime_stats = None

    def describe(self):
        return []

    def collect(self):
        m = self.model_name

        def gauge(name, doc, value, labels=None):
            g = GaugeMetricFamily(P + name, doc, labels=["model_name", *(labels or {})])
            if value is not None:
                g.add_metric([m, *(labels or {}).values()], value)
            return g

        if self.scheduler is None:  # still loading
            yield gauge("num_requests_running", "Sequences in the running batch.", 0)
            yield gauge("num_requests_waiting", "Sequences waiting for a batch slot.", 0)
            return
        s: SchedulerStats = self.scheduler()
        yield gauge("num_requests_running", "Sequences in the running batch (prefilling or decoding).", s.running)
        yield gauge("num_requests_waiting", "Sequences waiting for a batch slot.", s.waiting)
        yield gauge("kv_cache_usage_perc", "KV cache usage: cached tokens over the budget's capacity (1 = full).",
                    s.kv_usage)
        yield gauge("kv_cache_capacity_tokens", "Tokens the KV cache budget holds.", s.kv_capacity_tokens)
        mem: MemoryStats = self.memory()
        g = GaugeMetricFamily(P + "device_memory_bytes", "Device memory (host memory on CPU): total and used by all "
                              "processes; torch allocator allocated, reserved and peak allocated (CUDA only).",
                              labels=["model_name", "device", "kind"])
        for kind in ("total", "used", "torch_allocated", "torch_reserved", "torch_peak_allocated"):
            v = getattr(mem, kind)
            if v is not None:
                g.add_metric([m, mem.device, kind], v)
        yield g
        g = GaugeMetricFamily(P + "memory_by_use_bytes", "This server's device memory by use: model weights, KV "
                              "cache (allocated), other (activations, allocator slack; from RSS on CPU).",
                              labels=["model_name", "device", "use"])
        for use in ("weights", "kv_cache", "other"):
            v = getattr(mem, use)
            if v is not None:
                g.add_metric([m, mem.device, use], v)
        yield g
        yield from self._residency()
        info = self.info
        i = InfoMetricFamily(P + "model", "The pack served and how.")
        i.add_metric([], {"model_name": m, "format_version": info.format_version, "codec": info.codec,
                          "bits": info.bits, "bpw_allin": f"{info.bpw_allin:.4f}" if info.bpw_allin else "",
                          "residency": info.residency, "device": info.device, "device_name": info.device_name,
                          "dtype": info.dtype, "max_model_len": str(info.max_model_len)})
        yield i

    def _residency(self):
        st = self.runtime_stats() if self.runtime_stats else None
        mode = str(getattr(st, "mode", None) or (self.info.residency if self.info else "dense"))
        labels = ["model_name", "mode"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            if value is not None:
                g.add_metric([self.model_name, mode], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(P + name, doc, labels=labels)
            if value is not None:
                c.add_metric([self.model_name, mode], value)
            return c

        if st is None:  # a runtime without accounting: everything is resident
            weights = self.info.extra.get("weights_bytes") if self.info else None
            yield gauge("resident_weight_bytes", "Weight bytes resident on the device.", weights)
            return
        yield gauge("resident_layers", "Decoder layers resident on the device.", getattr(st, "resident_layers", None))
        yield gauge("total_layers", "Decoder layers of the model.", getattr(st, "total_layers", None))
        yield gauge("resident_weight_bytes", "Weight bytes resident on the device.", getattr(st, "resident_bytes", None))
        yield gauge("peak_resident_weight_bytes", "Peak weight bytes resident on the device.",
                    getattr(st, "peak_resident_bytes", None))
        yield counter("weight_bytes_transferred", "Weight bytes streamed to the device.",
                      getattr(st, "bytes_transferred", None))
        yield counter("prefetch_hits", "Streamed layers that were ready when needed.", getattr(st, "prefetch_hits", None))
        yield counter("prefetch_misses", "Streamed layers waited for.", getattr(st, "prefetch_misses", None))
        yield counter("prefetch_stall_seconds", "Seconds the forward waited for a streamed layer.",
                      getattr(st, "stall_seconds", None))
        yield counter("dequant_seconds", "Seconds spent dequantizing weights.", getattr(st, "dequant_seconds", None))
        yield counter("experts_reconstructed", "MoE experts rebuilt for a forward call (layers not dense).",
                      getattr(st, "experts_reconstructed", None))
        yield counter("experts_skipped", "MoE experts of those calls the router did not pick (never rebuilt).",
                      getattr(st, "experts_skipped", None))
