"""Throughput of a loaded pack: prefill tokens/s and decode tokens/s at batch 1 and 8 (`uc bench-run`).

Random token ids (fixed seed), greedy, KV cache on; the first pass is a warm-up and is not timed.
`cold=True` drops the pack's layer files from the page cache before every forward pass, so streamed
layers are read from disk each time: what a host whose RAM cannot cache the pack sees (Linux only).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .manifest import layer_file
from .reader import PackReader
from .runtime import load
from .streaming import fadvise


@dataclass
class SpeedResult:
    prefill_tok_s: float
    decode_tok_s_b1: float
    decode_tok_s_b8: float
    peak_resident_bytes: int
    stall_seconds: float
    prefetch_hits: int
    prefetch_misses: int
    bytes_transferred: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tok_s(model, batch: int, prompt: int, steps: int, vocab: int, device) -> float:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


@torch.inference_mode()
def _prefill_tok_s(model, tokens: int, vocab: int, device, repeats: int = 2) -> float:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def _evict_page_cache(pack):
    """A forward pre-hook dropping every layer file of `pack` from the page cache."""
    root = PackReader(pack, check_hashes=False)
    files = [root.path / layer_file(i) for i in range(root.num_layers)]
    if not hasattr(os, "posix_fadvise"):
        raise OSError("cold measurements need posix_fadvise (Linux)")

    def hook(module, args):
        for f in files:
            fadvise(f, "DONTNEED")
    return hook


def measure(pack, residency: str, device: str = "cpu", vram_budget=None, prefetch: bool = True,
            prefill_tokens: int = 256, decode_steps: int = 16, prompt: int = 32, cold: bool = False) -> SpeedResult:
    model = load(pack, device=device, residency=residency, vram_budget=vram_budget, prefetch=prefetch)
    if cold:
        model.register_forward_pre_hook(_evict_page_cache(pack))
    rt = model.uc_runtime
    dev = torch.device(device)
    vocab = model.config.get_text_config().vocab_size
    try:
        decode_tok_s(model, 1, 8, 2, vocab, dev)  # warm-up
        rt.reset_peak()
        prefill = _prefill_tok_s(model, prefill_tokens, vocab, dev)
        b1 = decode_tok_s(model, 1, prompt, decode_steps, vocab, dev)
        b8 = decode_tok_s(model, 8, prompt, decode_steps, vocab, dev)
        s = rt.stats()
        return SpeedResult(prefill, b1, b8, s.peak_resident_bytes, s.stall_seconds, s.prefetch_hits,
                           s.prefetch_misses, s.bytes_transferred)
    finally:
        rt.close()
        del model
        gc.collect()
