"""Decode steps replayed from CUDA graphs: one capture per batch bucket, no per-token host work.

An eager decode step on a GPU is host-bound: a few hundred kernel launches and their Python frames cost
more than the kernels (docs/BENCHMARKS.md "CUDA check": about 16 ms of host work for 1.3 ms of GPU work).
A CUDA graph records the launches of one step once and replays them with one call. That needs every
tensor of the step at a fixed address with a fixed shape, so the step here differs from the eager one
(decoder.py) only in its inputs:

- the batch is padded to a bucket (BUCKETS): rows [R, B) decode a dummy token at the last column of their
  cache row, whose content nobody reads before writing it (a row always writes a column before it attends
  to it), and their logits are dropped;
- tokens and lengths are copied into static buffers; positions, the cache write index and the masks are
  computed from them inside the graph;
- attention runs over every allocated column (`cap`) instead of the longest row's, masked as before: the
  shape no longer changes from step to step. Masked columns add exact zeros.

A graph is keyed by (bucket, the KV buffers' address and capacity) and re-captured when the cache is
reallocated (rare: it grows geometrically). Streamed layers attach their weights on the host around each
layer, which a graph cannot replay, so `usable` refuses models with such layers; the quantized kernels
(Triton) and the dense matmuls are captured like any other kernel. On the CPU `StaticDecode` runs the same
static step eagerly (`capture=False`): that is what the CPU tests check against the eager step, and the
CUDA test checks the replay against both.
"""

from __future__ import annotations

import logging

import torch

from .decoder import Decoder
from .kv_cache import SlotKVCache, decode_mask

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(rows: int) -> int | None:
    return next((b for b in BUCKETS if b >= rows), None)


def usable(model) -> tuple[bool, str]:
    """(yes, '') when a decode step of `model` can be captured, else (no, why)."""
    runtime = getattr(model, "uc_runtime", None)
    if runtime is not None and any(runtime.hooked(i) for i in range(len(model.model.layers))):
        return False, "streamed layers attach their weights on the host at every step"
    return True, ""


class StaticView:
    """The slot cache seen by a captured step: B rows, every allocated column. Duck-types DecodeView."""

    def __init__(self, cache: SlotKVCache, lens: torch.Tensor) -> None:
        self.cache, self.lens = cache, lens  # lens: int64 [B], a static buffer
        self.n, self.width = lens.shape[0], cache.cap
        heads, cap = cache.shape.kv_heads, cache.cap
        rh = torch.arange(self.n, device=lens.device).unsqueeze(1) * heads + torch.arange(heads, device=lens.device)
        self.flat = (rh * cap + lens.unsqueeze(1)).reshape(-1)  # [B * kv_heads] rows of the flat buffer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.cache.k[layer_idx], self.cache.v[layer_idx]
        d = k.shape[-1]
        k.view(-1, d).index_copy_(0, self.flat, key_states.reshape(-1, d))
        v.view(-1, d).index_copy_(0, self.flat, value_states.reshape(-1, d))
        return k[: self.n], v[: self.n]

    def position_ids(self) -> torch.Tensor:
        return self.lens.unsqueeze(1)  # [B, 1]

    def mask(self, window: int | None = None) -> torch.Tensor:
        return decode_mask(self.lens, self.width, window)  # [B, 1, 1, cap]


class _Step:
    """One bucket: static inputs, the view over them, and (on CUDA) the captured graph and its logits."""

    def __init__(self, decoder: Decoder, masks_of, cache: SlotKVCache, rows: int, capture: bool, pool=None) -> None:
        dev = cache.shape.device
        self.cap = cache.cap
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.lens = torch.full((rows,), cache.cap - 1, dtype=torch.long, device=dev)
        self.decoder, self.masks_of, self.cache = decoder, masks_of, cache
        self.graph, self.out = None, None
        if capture:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up off the capture: autotuning, lazy inits, Triton compiles
                for _ in range(2):
                    self.run()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):  # one memory pool for every bucket
                self.out = self.run()

    def run(self) -> torch.Tensor:
        # the view is built inside the step: its cache-write index is computed from the lengths there
        # (so, on CUDA, inside the captured graph)
        view = StaticView(self.cache, self.lens)
        return self.decoder.decode(self.ids, view, self.masks_of(view))

    def __call__(self, tokens: list[int], lens: list[int]) -> torch.Tensor:
        r = len(tokens)
        self.ids[:r].copy_(torch.tensor(tokens), non_blocking=True)
        self.lens[:r].copy_(torch.tensor(lens), non_blocking=True)
        self.lens[r:].fill_(self.cap - 1)  # padding rows: the last column
        if self.graph is None:
            return self.run()[:r]
        self.graph.replay()
        return self.out[:r].clone()


def _key(cache: SlotKVCache) -> tuple[int, int, int]:
    return cache.k[0].data_ptr(), cache.rows, cache.cap


class StaticDecode:
    """decode(tokens, lens) -> logits [R, V], through the bucket's static step (captured on CUDA)."""

    def __init__(self, decoder: Decoder, masks_of, cache: SlotKVCache, capture: bool | None = None) -> None:
        self.decoder, self.masks_of, self.cache = decoder, masks_of, cache
        self.capture = cache.shape.device.type == "cuda" if capture is None else capture
        self.steps: dict[int, _Step] = {}  # bucket -> its step, all for the cache buffers `key`
        self.key: tuple[int, int, int] | None = None
        self.captures = 0
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def fits(self, rows: int) -> bool:
        b = bucket(rows)
        return b is not None and b <= self.cache.rows

    @torch.inference_mode()
    def decode(self, tokens: list[int], lens: list[int]) -> torch.Tensor:
        key = _key(self.cache)
        if key != self.key:  # the cache was reallocated: every capture points at the old buffers
            self.steps.clear()
            self.key = key
        b = bucket(len(tokens))
        step = self.steps.get(b)
        if step is None:
            step = self.steps[b] = _Step(self.decoder, self.masks_of, self.cache, b, self.capture, self.pool)
            self.captures += self.capture
            if self.capture:
                log.info("captured the decode step for %d rows (KV capacity %d)", b, self.cache.cap)
        return step(tokens, lens)
