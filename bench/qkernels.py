"""Linears computed from the codes on this CPU (ucformat/qmatmul.py), measured side by side with dense ones.

    python bench/qkernels.py                        # both real models, 4- and 5-bit plain packs, then --write
    python bench/qkernels.py --models smollm2-135m --bits 5

Three tables, one process, on the server's compute dtype for this CPU (`--dtype auto`: bfloat16 where the
CPU multiplies it natively, float32 elsewhere) and with `uc serve`'s OpenMP setting (GOMP_SPINCOUNT):
1. memory bandwidth: a large float32 copy and a sum, the yardstick for "bytes read per second";
2. GEMV: each distinct linear shape of the models, the pack's own quantized weights (layer 0) and two
   7B-class shapes (random weights, same codec), at 1 and 8 activation rows: the code kernel against the
   dense float32 and bfloat16 matmul of the same shape and against reconstruct + matmul (what `packed`
   did before), with the packed bytes read per second; then the rows at which reconstruct + GEMM
   overtakes the kernel (the crossover qmatmul.CPU_MAX_ROWS stands for);
3. decode: the engine's decode step (server/runner.py: the lean step, slot KV cache, 64 cached tokens per
   row) at batch 1 and 8 for dense, packed and stream at 25% of the dense weights, and packed with the
   kernels off (every weight rebuilt per step). The variants take turns within each round, so a machine
   whose speed drifts favours none of them; medians of the rounds.
Writes bench/results/qkernels.json and the "qkernels" section of docs/BENCHMARKS.md with --write.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as `uc serve` runs (server/commands.py SERVE_ENV)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_step import step_medians  # noqa: E402
from bench.report import machine, table, write_section  # noqa: E402
from compressor.codecs import quantize  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat import cpu_qgemv, qmatmul, qtensor  # noqa: E402
from ucformat.manifest import layer_file  # noqa: E402
from ucformat.reader import PackReader  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "qkernels.json"
BIG = {"7B-class 4096x4096": (4096, 4096), "7B-class 14336x4096 (up)": (14336, 4096)}
CROSS_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 128)


def timed(fn, min_s: float = 0.2) -> float:
    """Median seconds of one call, over at least 7 calls and min_s."""
    fn()
    times, t_end = [], time.perf_counter() + min_s
    while len(times) < 7 or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth() -> dict:
    a = torch.empty(64 << 20)  # 256 MiB float32: far beyond every cache
    a.uniform_()
    b = torch.empty_like(a)
    copy = timed(lambda: b.copy_(a), 1.0)
    total = timed(lambda: a.sum(), 1.0)
    return {"copy_gb_s": 2 * a.numel() * 4 / copy / 1e9, "read_gb_s": a.numel() * 4 / total / 1e9}


def gemv_row(label: str, q: qtensor.QuantizedTensor, dtype: torch.dtype, rows: int, bw: float) -> list:
    n, k = q.shape
    w32 = qtensor.dequantize(q)
    w16 = w32.bfloat16()
    x = torch.randn(rows, k).to(dtype)
    t_q = timed(lambda: qmatmul.linear(x, q))
    t_f32 = timed(lambda: F.linear(x.float(), w32))
    t_bf16 = timed(lambda: F.linear(x.bfloat16(), w16))
    t_rebuild = timed(lambda: F.linear(x, qtensor.dequantize(q, dtype)))
    packed = q.codes.numel() + q.scales.numel() * 2 + q.grid.numel() * 4
    return [label, f"{n}x{k}", q.bits, rows, f"{t_q * 1e3:.3f}", f"{t_f32 * 1e3:.3f}", f"{t_bf16 * 1e3:.3f}",
            f"{t_rebuild * 1e3:.3f}", f"{t_f32 / t_q:.2f}x", f"{t_bf16 / t_q:.2f}x", f"{packed / t_q / 1e9:.2f}",
            f"{packed / (bw * 1e9) / t_q:.0%}"]


def crossover(q: qtensor.QuantizedTensor, dtype: torch.dtype) -> int | None:
    """Fewest rows at which reconstruct + GEMM is faster than the kernel (None: never, up to 128)."""
    for m in CROSS_ROWS:
        x = torch.randn(m, q.shape[1]).to(dtype)
        kern = timed(lambda: cpu_qgemv.linear(x, q, None, float_out=False))
        rebuild = timed(lambda: F.linear(x, qtensor.dequantize(q, dtype)))
        if rebuild < kern:
            return m
    return None


def pack_for(model: str, bits: int, work: Path, cache: Path) -> Path:
    src = fetch_model(model, cache / "models" / model, cache_dir=cache)
    pack = work / f"{model}-gsq{bits}"
    if not (pack / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "uc", "pack", str(src), str(pack), "--bits", str(bits), "--resume", "-q"],
                       check=True)
    return pack


def layer0(pack: Path) -> dict[str, qtensor.QuantizedTensor]:
    r = PackReader(pack)
    parts = r.read_parts(layer_file(0))
    return {n.split(".")[-2]: p for n, p in parts.items() if isinstance(p, qtensor.QuantizedTensor)}


def decode_rows(pack: Path, dtype: torch.dtype, rounds: int) -> dict:
    """Median ms of one engine decode step, per variant and batch."""
    from server.kv_cache import KVShape, SlotKVCache
    from server.runner import ModelRunner
    from ucformat import runtime

    variants = {"dense": ("dense", None, True), "packed": ("packed", None, True), "stream 25%": ("stream", "25%", True),
                "packed, kernels off": ("packed", None, False)}
    floor = runtime.plan(pack, residency="dense").min_stream_bytes
    dense_bytes = runtime.plan(pack, residency="dense").dense_model_bytes
    runners = {}
    for name, (mode, budget, kernels) in variants.items():
        if budget and dense_bytes * 0.25 < floor:
            budget = floor
        m = runtime.load(pack, device="cpu", dtype=dtype, residency=mode, vram_budget=budget, kernels=kernels)
        kv = SlotKVCache(KVShape.of(m.config, dtype, "cpu"), 256 << 20, 8)
        kv.ensure(8, 128, 0, 0)
        runners[name] = ModelRunner(m, kv)
    return {batch: step_medians(runners, [100 + r for r in range(batch)], [64] * batch, rounds) for batch in (1, 8)}


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "The three laws of thermodynamics state that"]


def greedy(pack: Path, dtype: torch.dtype, tokens: int = 32) -> dict:
    """Greedy continuations (transformers generate on the loaded pack) of PROMPTS: packed and stream 25%
    (from the codes) against dense. Per mode: prompts whose text is identical, and where the others part."""
    from transformers import AutoTokenizer

    from ucformat import runtime

    tok = AutoTokenizer.from_pretrained(pack)
    floor = runtime.plan(pack, residency="dense").min_stream_bytes
    budget = max(floor, int(runtime.plan(pack, residency="dense").dense_model_bytes * 0.25))
    outs = {}
    for mode, vram in (("dense", None), ("packed", None), ("stream", budget)):
        m = runtime.load(pack, device="cpu", dtype=dtype, residency=mode, vram_budget=vram)
        with torch.inference_mode():
            outs[mode] = [m.generate(**tok(p, return_tensors="pt"), max_new_tokens=tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)[0].tolist() for p in PROMPTS]
        m.uc_runtime.close()
    res = {}
    for mode in ("packed", "stream"):
        same = sum(a == b for a, b in zip(outs[mode], outs["dense"]))
        parts = [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) - len(tok(p).input_ids)
                 for p, a, b in zip(PROMPTS, outs[mode], outs["dense"]) if a != b]
        res[mode] = f"{same}/{len(PROMPTS)}" + (f" (others part at token {', '.join(map(str, parts))})" if parts else "")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 5])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--work", default=str(ROOT / "work" / "bench"))
    p.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    p.add_argument("--rewrite", action="store_true", help="measure nothing: write the section from the results file")
    a = p.parse_args()
    if a.rewrite:
        write_section("qkernels", report(json.loads(RESULTS.read_text())))
        return 0
    if not cpu_qgemv.available()[0]:
        sys.exit(f"the native kernel is unavailable: {cpu_qgemv.available()[1]}")
    from server.loader import resolve_dtype

    dtype = resolve_dtype("auto", "cpu", "bfloat16")
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    bw = bandwidth()
    print(json.dumps(bw), flush=True)
    gemv, cross, decode, texts = [], [], [], []
    for bits in a.bits:
        for model in a.models:
            pack = pack_for(model, bits, Path(a.work), cache)
            weights = layer0(pack)
            for name, q in weights.items():
                for rows in (1, 8):
                    gemv.append(gemv_row(f"{model} {name}", q, dtype, rows, bw["read_gb_s"]))
                    print(gemv[-1], flush=True)
            big = max(weights.values(), key=lambda q: q.shape[0] * q.shape[1])
            cross.append([model, f"{big.shape[0]}x{big.shape[1]}", bits, crossover(big, dtype)])
            g = greedy(pack, dtype)
            texts.append([model, bits, g["packed"], g["stream"]])
            print(texts[-1], flush=True)
            steps = decode_rows(pack, dtype, a.rounds)
            for batch, t in steps.items():
                decode.append([model, bits, batch, *(f"{batch / v:.1f}" for v in t.values()),
                               f"{t['dense'] / t['packed']:.2f}x", f"{t['dense'] / t['stream 25%']:.2f}x",
                               f"{t['packed, kernels off'] / t['packed']:.2f}x"])
                print(decode[-1], flush=True)
        g = torch.Generator().manual_seed(0)
        for label, (n, k) in BIG.items():
            q = quantize(torch.randn(n, k, generator=g), bits, 64, "gsq")
            for rows in (1, 8):
                gemv.append(gemv_row(label, q, dtype, rows, bw["read_gb_s"]))
                print(gemv[-1], flush=True)
    res = {"machine": machine(), "dtype": str(dtype), "isa": cpu_qgemv.isa(), "threads": torch.get_num_threads(),
           "rounds": a.rounds, "command": "python bench/qkernels.py " + " ".join(x for x in sys.argv[1:] if x != "--write"),
           "bandwidth": bw, "gemv": gemv, "crossover": cross, "decode": decode, "greedy": texts}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    body = report(res)
    print(body)
    if a.write:
        write_section("qkernels", body)
    return 0


def report(res: dict) -> str:
    bw = res["bandwidth"]
    return "\n".join([
        "## Linears from the codes: kernels and decode on this CPU (`bench/qkernels.py`)", "",
        f"Machine: {res['machine']}; kernel ISA {res['isa']}, {res['threads']} torch threads, compute dtype "
        f"{res['dtype'].removeprefix('torch.')} (the server's `--dtype auto` here), GOMP_SPINCOUNT=20000. Memory "
        f"bandwidth measured in the same run: {bw['copy_gb_s']:.1f} GB/s copying (read + write), "
        f"{bw['read_gb_s']:.1f} GB/s reading (sum of 256 MiB).", "",
        "GEMV: median ms of one call; `codes` is qmatmul.linear (the native kernel), `rebuild` reconstructs the "
        "weight then multiplies (the old packed path); packed GB/s = (codes + scales + grid bytes) / time of "
        "`codes`; % of read bw = the time to read those bytes at the measured rate / that time.", "",
        table(["weight", "shape", "bits", "rows", "codes ms", "dense fp32 ms", "dense bf16 ms", "rebuild ms",
               "vs fp32", "vs bf16", "packed GB/s", "% of read bw"], res["gemv"]), "",
        "Crossover: fewest activation rows at which reconstruct + GEMM beats the kernel on the model's largest "
        f"matrix (kernel used up to qmatmul.CPU_MAX_ROWS = {qmatmul.CPU_MAX_ROWS} rows):", "",
        table(["model", "shape", "bits", "rebuild faster from rows"],
              [[*c[:3], c[3] or "> 128"] for c in res["crossover"]]), "",
        "Decode: tokens/s of the engine's decode step (batch x steps / time), 64 cached tokens per row; "
        f"median of {res['rounds']} rounds in which the variants take turns.", "",
        table(["model", "bits", "batch", "dense", "packed", "stream 25%", "packed, kernels off", "packed / dense",
               "stream / dense", "kernels on / off"], res["decode"]), "",
        "Greedy text: 32 tokens from each of 4 prompts (bench/qkernels.py PROMPTS) with transformers' generate on "
        "the loaded pack, from the codes against `dense` (the reconstructed weights):", "",
        table(["model", "bits", "packed: identical to dense", "stream 25%: identical to dense"], res["greedy"]), "",
        f"Command: `{res['command']}`"])

if __name__ == "__main__":
    sys.exit(main())
