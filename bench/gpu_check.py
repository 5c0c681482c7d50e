"""One short CUDA check of the runtime's device paths; prints measured numbers (run on a GPU machine).

    python bench/gpu_check.py            # ~1-2 minutes on an H100

1. Reconstruction throughput: GB/s of packed input (4- and 5-bit GSQ, 8192 x 8192) vs the card's
   device-to-device copy bandwidth.
2. Host-to-device copy throughput: pinned vs pageable host memory (1 GiB).
3. Prefetch overlap: a synthetic 12-layer Llama (hidden 2048) packed at 4 bits, run in `stream`
   residency at 25% of its dense size with and without prefetch: decode tok/s at batch 8 and stall seconds.
Also checks that streamed logits equal dense logits on the GPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import codecs  # noqa: E402
from ucformat.qtensor import dequantize  # noqa: E402


def timed(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py needs CUDA")
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}

    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    t = timed(lambda: big.clone())
    out["d2d_copy_GBps"] = 2 * big.numel() / t / 1e9  # read + write

    w = (torch.randn(8192, 8192, device=dev) * 0.02).to(torch.bfloat16)
    for bits in (4, 5):
        q = codecs.quantize(w, bits, 64, "gsq").to(dev)
        t = timed(lambda: dequantize(q, torch.bfloat16))
        out[f"dequant{bits}_packed_GBps"] = q.stored_bytes() / t / 1e9
        out[f"dequant{bits}_out_GBps"] = w.numel() * 2 / t / 1e9

    host = torch.empty(2**30, dtype=torch.uint8)
    pinned = host.pin_memory()
    out["h2d_pageable_GBps"] = host.numel() / timed(lambda: host.to(dev), 3) / 1e9
    out["h2d_pinned_GBps"] = pinned.numel() / timed(lambda: pinned.to(dev, non_blocking=True), 3) / 1e9
    del big, host, pinned

    from transformers import LlamaConfig, LlamaForCausalLM

    from compressor.config import PackConfig
    from compressor.pack import pack
    from ucformat.speed import measure
    import ucformat

    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                          num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                          tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(f"{tmp}/src")
        t0 = time.perf_counter()
        pack(f"{tmp}/src", f"{tmp}/pack", PackConfig(bits=4, codec="uniform", device="cuda"), progress=False)
        out["pack_seconds_617M_uniform4"] = time.perf_counter() - t0
        ids = torch.randint(0, 32000, (2, 16), device=dev)
        logits = {}
        for mode, budget in (("dense", None), ("stream", "25%")):
            m = ucformat.load(f"{tmp}/pack", device="cuda", residency=mode, vram_budget=budget)
            with torch.inference_mode():
                logits[mode] = m(ids).logits.float()
            m.uc_runtime.close()
        out["stream_equals_dense"] = bool(torch.equal(logits["dense"], logits["stream"]))
        for mode, budget, pf in (("dense", None, True), ("packed", None, True), ("stream", "25%", True),
                                 ("stream", "25%", False)):
            r = measure(f"{tmp}/pack", mode, device="cuda", vram_budget=budget, prefetch=pf, decode_steps=32)
            out[f"{mode}{'_' + budget if budget else ''}{'' if pf else '_noprefetch'}"] = {
                "decode_tok_s_b8": r.decode_tok_s_b8, "decode_tok_s_b1": r.decode_tok_s_b1,
                "prefill_tok_s": r.prefill_tok_s, "stall_s": r.stall_seconds,
                "hits": r.prefetch_hits, "misses": r.prefetch_misses, "peak_resident_MiB": r.peak_resident_bytes / 2**20}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
