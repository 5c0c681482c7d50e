"""One short check of the runtime's and the server engine's CUDA paths; prints measured numbers.

    python bench/gpu_check.py --tokenizer DIR --out gpu_check.json     # ~2-4 minutes on an H100/H200
    python bench/gpu_check.py --device cpu --small                     # smoke test of this script, no GPU

1. Reconstruction throughput: GB/s of packed input (4- and 5-bit GSQ, 8192 x 8192) next to the card's
   device-to-device copy bandwidth; eager torch, and (last) the same function under torch.compile.
2. Host-to-device copy throughput: pinned vs pageable host memory (1 GiB).
3. A synthetic 12-layer Llama (hidden 2048, 0.6 B parameters) packed at 4 bits on the device: streamed
   logits equal dense logits; decode tok/s at batch 1 and 8 and prefill tok/s per residency mode; stall
   seconds and prefetch hits with and without prefetch at a 25% budget (does the side stream overlap?);
   decode ms/step at KV lengths not seen before with cuDNN attention on and off, and our dense residency
   next to the same checkpoint loaded by plain transformers.
4. With --tokenizer (any HF tokenizer folder; its vocabulary sizes the synthetic model): the server's
   engine on the device, dense and stream 25%: greedy tokens equal to transformers' generate, and
   aggregate decode tok/s at 1, 8 and 32 concurrent requests.
4b. Linears from the codes (issue: quantized kernels): the Triton kernel (ucformat/triton_qgemv.py) on
   8192 x 8192 and 14336 x 4096 at 4 and 5 bits, batch 1 and 16: ms, GB/s of packed bytes and its share of
   the copy bandwidth, next to bf16 torch.matmul of the same shape and to reconstruct + matmul; and on the
   synthetic model, one decode step's host time (until the call returns) and GPU time (CUDA events), eager
   and replayed from a CUDA graph (server/graphs.py), with the engine's decode tok/s at batch 1 and 16 for
   dense bf16 (plain transformers), ours dense and ours packed.
5. MoE: a small synthetic Qwen3-MoE packed at 4 bits; `packed` and `stream` at the floor rebuild only
   the routed experts (experts copied from pinned memory when picked): logits equal to dense.
6. With --calib (a text file) too: a small synthetic Llama packed with calibration on the device
   (`uc pack --target-bpw 4 --calib`: GPTQ rounding, distillation, allocation), verified, and run with
   `uc generate` in stream residency.
Each section catches its own failure, so one broken path does not hide the others' numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import codecs  # noqa: E402
from ucformat.qtensor import dequantize  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int = 10) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / repeats


def section(out: dict, name: str):
    """Decorator: run the section, record its numbers or its error, print them as they arrive."""
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as e:  # noqa: BLE001 - a check script reports and goes on
            out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        out[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: out[name]}, indent=1, default=str), flush=True)
        return fn
    return wrap


def bandwidth(dev: torch.device, size: int, side: int) -> dict:
    r = {}
    big = torch.empty(size, dtype=torch.uint8, device=dev)
    r["d2d_copy_GBps"] = 2 * size / timed(lambda: big.clone(), dev) / 1e9  # read + write
    del big
    w = (torch.randn(side, side, device=dev) * 0.02).to(torch.bfloat16)
    for bits in (4, 5):
        q = codecs.quantize(w, bits, 64, "gsq").to(dev)
        t = timed(lambda: dequantize(q, torch.bfloat16), dev)
        r[f"dequant{bits}_packed_GBps"] = q.stored_bytes() / t / 1e9
        r[f"dequant{bits}_bf16_out_GBps"] = w.numel() * 2 / t / 1e9
        r[f"dequant{bits}_ms"] = t * 1e3
    return r


def compiled_dequant(dev: torch.device, side: int) -> dict:
    w = (torch.randn(side, side, device=dev) * 0.02).to(torch.bfloat16)
    q = codecs.quantize(w, 4, 64, "gsq").to(dev)
    fn = torch.compile(lambda: dequantize(q, torch.bfloat16, native=False))
    t0 = time.perf_counter()
    got = fn()
    sync(dev)
    r = {"compile_s": time.perf_counter() - t0,
         "equal_to_eager": bool(torch.equal(got, dequantize(q, torch.bfloat16, native=False)))}
    t = timed(fn, dev)
    r["dequant4_packed_GBps"] = q.stored_bytes() / t / 1e9
    r["dequant4_ms"] = t * 1e3
    return r


def host_copy(dev: torch.device, size: int) -> dict:
    host = torch.empty(size, dtype=torch.uint8)
    pinned = host.pin_memory() if dev.type == "cuda" else host
    return {"h2d_pageable_GBps": size / timed(lambda: host.to(dev), dev, 3) / 1e9,
            "h2d_pinned_GBps": size / timed(lambda: pinned.to(dev, non_blocking=True), dev, 3) / 1e9}


def synthetic_model(tmp: Path, vocab: int, small: bool, tokenizer: str | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4) if small else \
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16)
    cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, **dims)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp / "src")
    if tokenizer:
        for f in Path(tokenizer).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp / "src" / f.name)
    return tmp / "src"


def residency(dev: torch.device, src: Path, tmp: Path, low: str, mid: str) -> dict:
    import ucformat
    from compressor.config import PackConfig
    from compressor.pack import pack
    from ucformat.speed import measure

    r = {}
    t0 = time.perf_counter()
    res = pack(src, tmp / "pack", PackConfig(bits=4, codec="uniform", device=dev.type), progress=False)
    r["pack_seconds_uniform4"] = time.perf_counter() - t0
    r["bpw_allin"] = res.stats.get("bpw_allin") if hasattr(res, "stats") else None
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, 16), device=dev)
    logits = {}
    for mode, budget in (("dense", None), ("packed", None), ("stream", low)):
        m = ucformat.load(tmp / "pack", device=dev.type, residency=mode, vram_budget=budget)
        with torch.inference_mode():
            logits[mode] = m(ids).logits.float()
        m.uc_runtime.close()
        del m
    # packed and stream compute from the codes (Triton kernels, float32 sums in another order): close, not equal
    for mode in ("packed", "stream"):
        err = (logits[mode] - logits["dense"]).abs().max() / logits["dense"].abs().max()
        r[f"{mode}_max_rel_err_vs_dense"] = float(err)
        r[f"{mode}_same_argmax"] = bool(torch.equal(logits[mode].argmax(-1), logits["dense"].argmax(-1)))
    for mode, budget, pf in (("dense", None, True), ("packed", None, True), ("stream", low, True),
                             ("stream", low, False), ("stream", mid, True), ("stream", mid, False)):
        s = measure(tmp / "pack", mode, device=dev.type, vram_budget=budget, prefetch=pf, decode_steps=32)
        r[f"{mode}{'_' + budget if budget else ''}{'' if pf else '_noprefetch'}"] = {
            "decode_tok_s_b8": s.decode_tok_s_b8, "decode_tok_s_b1": s.decode_tok_s_b1, "prefill_tok_s": s.prefill_tok_s,
            "stall_s": s.stall_seconds, "hits": s.prefetch_hits, "misses": s.prefetch_misses,
            "peak_resident_MiB": s.peak_resident_bytes / 2**20, "transferred_MiB": s.bytes_transferred / 2**20}
    return r


def cudnn_decode(dev: torch.device, tmp: Path, src: Path) -> dict:
    """Decode ms/step at KV lengths never seen before, cuDNN attention on and off (ucformat.load turns it
    off on CUDA by default; see ucformat.runtime.avoid_cudnn_attention); then the same checkpoint loaded by
    plain transformers next to our dense residency, cuDNN attention off, at lengths both have seen."""
    import inspect

    import ucformat
    from transformers import AutoModelForCausalLM, DynamicCache

    m = ucformat.load(tmp / "pack", device=dev.type, residency="dense", cudnn_attention=True)
    vocab = m.config.vocab_size
    r = {}

    @torch.inference_mode()
    def step_ms(model, prompt: int, steps: int = 16) -> float:
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.randint(0, vocab, (1, prompt), device=dev), use_cache=True, **{kw: cache})
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        return (time.perf_counter() - t0) / steps * 1e3

    for on, prompt in ((True, 100), (False, 200)):
        torch.backends.cuda.enable_cudnn_sdp(on)
        r[f"cudnn_{'on' if on else 'off'}_new_shapes_ms"] = step_ms(m, prompt)
        r[f"cudnn_{'on' if on else 'off'}_seen_shapes_ms"] = step_ms(m, prompt)
    torch.backends.cuda.enable_cudnn_sdp(False)
    r["dtype"] = str(m.dtype)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=m.dtype).to(dev).eval()  # same dtype as ours
    for name, model in (("transformers", hf), ("ours_dense", m), ("transformers_again", hf), ("ours_dense_again", m)):
        step_ms(model, 300)  # lengths 300..316 seen by both after the first pass
        r[f"{name}_seen_shapes_ms"] = min(step_ms(model, 300) for _ in range(3))
    del hf
    m.uc_runtime.close()
    return r


def qgemv(dev: torch.device, small: bool) -> dict:
    """The Triton kernel against bf16 matmul and against reconstruct + matmul, per shape, bits and rows."""
    from ucformat import qmatmul, triton_qgemv

    ok, why = triton_qgemv.available()
    if not ok:
        return {"skipped": why}
    big = torch.empty(2**30, dtype=torch.uint8, device=dev)
    copy = 2 * big.numel() / timed(lambda: big.clone(), dev) / 1e9
    del big
    r = {"d2d_copy_GBps": copy}
    shapes = [(1024, 1024)] if small else [(8192, 8192), (14336, 4096)]
    for n, k in shapes:
        w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
        for bits in (4, 5):
            q = codecs.quantize(w, bits, 64, "gsq").to(dev)
            packed = q.codes.numel() + q.scales.numel() * 2 + q.grid.numel() * 4
            wq = dequantize(q, torch.bfloat16)
            for rows in (1, 16):
                x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
                assert qmatmul.path(x, q) == "triton"
                err = (qmatmul.linear(x, q).float() - x.float() @ wq.float().T).abs().max() / (x.float() @ wq.float().T).abs().max()
                t_q = timed(lambda: qmatmul.linear(x, q), dev, 50)
                t_mm = timed(lambda: x @ wq.T, dev, 50)
                t_rb = timed(lambda: x @ dequantize(q, torch.bfloat16).T, dev, 20)
                r[f"{n}x{k}_b{bits}_rows{rows}"] = {
                    "kernel_ms": t_q * 1e3, "bf16_matmul_ms": t_mm * 1e3, "rebuild_matmul_ms": t_rb * 1e3,
                    "packed_GBps": packed / t_q / 1e9, "share_of_copy_bw": packed / t_q / 1e9 / copy,
                    "speedup_vs_bf16": t_mm / t_q, "max_rel_err": float(err)}
    return r


def graph_decode(dev: torch.device, tmp: Path, src: Path) -> dict:
    """One decode step of the engine's runner: host time (Python until the call returns, GPU still working)
    and GPU time (events), eager and from a CUDA graph; then decode tok/s at batch 1 and 16, dense bf16
    transformers (its own generate loop, DynamicCache) next to ours dense and packed with graphs."""
    import ucformat
    from server.kv_cache import KVShape, SlotKVCache
    from server.runner import ModelRunner
    from transformers import AutoModelForCausalLM, DynamicCache

    r = {}
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    for mode in ("dense", "packed"):
        m = ucformat.load(tmp / "pack", device=dev.type, residency=mode, dtype=torch.bfloat16)
        for graphs_on in (False, True):
            kv = SlotKVCache(KVShape.of(m.config, torch.bfloat16, dev.type), 2 << 30, 16)
            kv.ensure(16, 512, 0, 0)
            run = ModelRunner(m, kv, cuda_graphs=graphs_on)
            assert (run.static is not None) == graphs_on
            for b in (1, 16):
                toks, lens = [5] * b, [100] * b
                for _ in range(3):
                    run.decode(toks, lens)  # warm-up, capture
                sync(dev)
                host, gpu = [], []
                for _ in range(20):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    t = time.perf_counter()
                    run.decode(toks, lens)
                    host.append(time.perf_counter() - t)
                    e1.record()
                    sync(dev)
                    gpu.append(e0.elapsed_time(e1) / 1e3)
                t = timed(lambda: run.decode(toks, lens), dev, 50)
                r[f"{mode}_{'graphs' if graphs_on else 'eager'}_b{b}"] = {
                    "host_ms": sorted(host)[10] * 1e3, "gpu_ms": sorted(gpu)[10] * 1e3, "tok_s": b / t}
        m.uc_runtime.close()
        del m
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to(dev).eval()
    for b in (1, 16):
        with torch.inference_mode():
            cache = DynamicCache(config=hf.config)
            out = hf(input_ids=torch.randint(0, vocab, (b, 100), device=dev), past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(32):
                nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sync(dev)
        r[f"transformers_bf16_b{b}_tok_s"] = b * 32 / (time.perf_counter() - t0)
    return r


def moe(dev: torch.device, tmp: Path) -> dict:
    import ucformat
    from bench.moe_stream import SHAPE, build

    shape = {**SHAPE, "hidden_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "num_experts": 16, "num_experts_per_tok": 2}
    p = build(tmp / "moe", shape, dev.type)
    floor = ucformat.plan(p, device=dev.type, residency="stream", vram_budget="100%").min_stream_bytes
    ids = torch.randint(0, shape["vocab_size"], (2, 12), device=dev)
    r, ref = {}, None
    for mode, budget in (("dense", None), ("packed", None), ("stream", floor)):
        m = ucformat.load(p, device=dev.type, residency=mode, vram_budget=budget)
        with torch.inference_mode():
            logits = m(ids).logits.float()
            logits_1 = m(ids[:, :1]).logits.float()  # one token per row: few experts
        st = m.uc_runtime.stats()
        m.uc_runtime.close()
        if ref is None:
            ref = (logits, logits_1)
        else:
            r[mode] = {"equal_to_dense": bool(torch.equal(logits, ref[0]) and torch.equal(logits_1, ref[1])),
                       "experts_reconstructed": st.experts_reconstructed, "experts_skipped": st.experts_skipped,
                       "transferred_MiB": st.bytes_transferred / 2**20}
    return r


def engine(dev: torch.device, tmp: Path, small: bool, low: str) -> dict:
    from transformers import AutoTokenizer

    import ucformat
    from server.config import EngineConfig
    from server.loader import build_engine
    from server.sampling import SamplingParams
    from server.sequence import EngineRequest

    tok = AutoTokenizer.from_pretrained(tmp / "pack")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    n_new = 16
    ref_model = ucformat.load(tmp / "pack", device=dev.type, residency="dense", dtype=torch.bfloat16)
    refs = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(dev)
            out = ref_model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=2, eos_token_id=None)
            refs.append(out[0, ids.shape[1]:].tolist())
    ref_model.uc_runtime.close()
    del ref_model

    def run(eng, prompt_ids: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
        done, outs = [threading.Event() for _ in prompt_ids], [[] for _ in prompt_ids]

        def sink(i):
            def f(o):
                outs[i].extend(o.token_ids)
                if o.error:
                    errors.append(f"{o.error}: {o.error_message}")
                if o.finished:
                    done[i].set()
            return f
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        for i, ids in enumerate(prompt_ids):
            eng.submit(EngineRequest(f"r{i}-{time.monotonic_ns()}", ids, params, sink(i)))
        for d in done:
            assert d.wait(600), "engine request timed out"
        if errors:
            raise RuntimeError(f"engine: {errors[0]}")
        return outs, time.perf_counter() - t0

    def mismatches(outs: list[list[int]]) -> list[dict]:
        """Where a greedy run leaves the reference: the step, and the reference model's top-1 minus top-2
        logit there (a near-tie that bfloat16 rounding in another kernel can flip), next to the logits' std."""
        m = ucformat.load(tmp / "pack", device=dev.type, residency="dense", dtype=torch.bfloat16)
        found = []
        with torch.inference_mode():
            for p, got, want in zip(prompts * 2, outs, refs * 2):
                if got == want:
                    continue
                at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                logits = m(torch.tensor([tok(p).input_ids + want[:at]], device=dev)).logits[0, -1].float()
                top = logits.topk(2).values
                found.append({"prompt": p, "step": at, "top2_gap": float(top[0] - top[1]), "logit_std": float(logits.std())})
        m.uc_runtime.close()
        return found

    errors: list[str] = []
    r = {}
    for mode, budget in (("dense", None), ("packed", None), ("stream", low)):
        cfg = EngineConfig(device=dev.type, residency=mode, vram_budget=budget, max_num_seqs=32,
                           kv_cache_memory="256MiB" if small else "8GiB")
        t0 = time.perf_counter()
        eng, info = build_engine(str(tmp / "pack"), cfg, "synthetic")
        eng.start()
        row = {"load_s": time.perf_counter() - t0, "dtype": info.dtype}
        try:
            alone = [run(eng, [tok(p).input_ids], n_new)[0][0] for p in prompts]
            busy, _ = run(eng, [tok(p).input_ids for p in prompts], n_new)
            row["greedy_alone_equal_generate"] = sum(a == b for a, b in zip(alone, refs))
            row["greedy_batched_equal_generate"] = sum(a == b for a, b in zip(busy, refs))
            row["of"] = len(refs)
            row["mismatches"] = mismatches(alone + busy)
            g = torch.Generator().manual_seed(0)
            for c in (1, 8, 32):
                ids = [torch.randint(0, len(tok), (64,), generator=g).tolist() for _ in range(c)]
                outs, secs = run(eng, ids, 64)
                row[f"c{c}_tok_s"] = sum(len(o) for o in outs) / secs
        finally:
            eng.shutdown()
            rt = getattr(eng, "model", None)
            if rt is not None and getattr(rt, "uc_runtime", None) is not None:
                rt.uc_runtime.close()
        r[mode + ("_" + budget if budget else "")] = row
    return r


def calibrated(dev: torch.device, tmp: Path, tokenizer: str, calib: str) -> dict:
    import subprocess

    vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(tokenizer))
    src = synthetic_model(tmp / "small", vocab, True, tokenizer)
    uc = [sys.executable, "-m", "uc"]
    r = {}

    def call(*args: str) -> str:
        t0 = time.perf_counter()
        p = subprocess.run([*uc, *args], capture_output=True, text=True, cwd=ROOT)
        r[args[0] + "_s"] = round(time.perf_counter() - t0, 1)
        if p.returncode:
            raise RuntimeError(f"uc {args[0]} exited {p.returncode}: {p.stderr[-1500:]}")
        return p.stdout

    res = json.loads(call("pack", str(src), str(tmp / "small-pack"), "--target-bpw", "4", "--calib", calib,
                          "--calib-samples", "8", "--calib-len", "128", "--steps", "20", "--device", dev.type,
                          "--json", "-q"))
    r["bpw_allin"] = res.get("stats", res).get("bpw_allin") if isinstance(res, dict) else None
    r["verify"] = call("verify", str(tmp / "small-pack")).strip()[-200:]
    r["generate"] = call("generate", str(tmp / "small-pack"), "The capital of France is", "--max-tokens", "8",
                         "--device", dev.type, "--residency", "stream", "--vram-budget", "90%")[-200:]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes: a smoke test of the script itself")
    ap.add_argument("--tokenizer", help="tokenizer folder for the engine section (skipped without it)")
    ap.add_argument("--calib", help="calibration text for the calibrated-pack section (needs --tokenizer)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile dequantization timing")
    ap.add_argument("--out", help="also write the results as JSON here")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_check.py: CUDA is not available (use --device cpu --small for a smoke test)")
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    side, size = (1024, 2**24) if a.small else (8192, 2**30)
    section(out, "bandwidth")(lambda: bandwidth(dev, size, side))
    section(out, "host_copy")(lambda: host_copy(dev, size))
    if dev.type == "cuda":
        section(out, "qgemv")(lambda: qgemv(dev, a.small))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        vocab = 32000
        if a.tokenizer:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(a.tokenizer))
        src = synthetic_model(tmp, vocab, a.small, a.tokenizer)
        # budgets as shares of the dense size; the small model's embeddings take most of it
        low, mid = ("90%", "95%") if a.small else ("25%", "50%")
        section(out, "residency")(lambda: residency(dev, src, tmp, low, mid))
        section(out, "moe")(lambda: moe(dev, tmp))
        if (tmp / "pack").exists():
            section(out, "cudnn_decode")(lambda: cudnn_decode(dev, tmp, src))
        if (tmp / "pack").exists() and dev.type == "cuda":
            section(out, "graph_decode")(lambda: graph_decode(dev, tmp, src))
        if a.tokenizer and (tmp / "pack").exists():
            section(out, "engine")(lambda: engine(dev, tmp, a.small, low))
        if a.tokenizer and a.calib:
            section(out, "calibrated_pack")(lambda: calibrated(dev, tmp, a.tokenizer, a.calib))
    if not a.no_compile:  # last: its compile workers stay alive and would share the CPU with later sections
        section(out, "compiled_dequant")(lambda: compiled_dequant(dev, side))
    text = json.dumps(out, indent=1, default=str)
    if a.out:
        Path(a.out).write_text(text)
    print("== all results ==")
    print(text)


if __name__ == "__main__":
    main()
