"""Linears computed from the codes on this CPU (ucformat/qmatmul.py), measured side by side with dense ones.

    python bench/qkernels.py                        # both real models, 4- and 5-bit plain packs, then --write
    python bench/qkernels.py --models smollm2-135m --bits 5

Three tables, one process, on the server's compute dtype for this CPU (`--dtype auto`: bfloat16 where the
CPU multiplies it natively, float32 elsewhere) and with `uc serve`'s OpenMP setting (GOMP_SPINCOUNT):
1. memory bandwidth: a large float32 copy and a sum, the yardstick for "bytes read per second";
2. GEMV: each distinct linear shape of the models, the pack's own quantized weights (layer 0), the output
   head's 8-bit copy and two 7B-class shapes (random weights, same codec), at 1 and 8 activation rows:
   the code kernel (integer and float activations) against the
   dense float32 and bfloat16 matmul of the same shape and against reconstruct + matmul (what `packed`
   did before), with the packed bytes read per second; then the rows at which reconstruct + GEMM
   overtakes the kernel (the crossover qmatmul.CPU_MAX_ROWS stands for);
3. decode: the engine's decode step (server/runner.py: the lean step, slot KV cache, 64 cached tokens per
   row) at batch 1 and 8 for dense, packed and stream at 25% of the dense weights (integer activations,
   the default), and packed with float activations (UC_CPU_ACT=float). The variants take turns within
   each round, so a machine whose speed drifts favours none of them; medians of the rounds;
4. greedy text from the codes against dense, and where it parts, dense's margin there.
Writes bench/results/qkernels.json and the "qkernels" section of docs/BENCHMARKS.md with --write.
"""

from __future__ import annotations

import argparse
import dataclasses
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
CROSS_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 128, 192, 256, 384, 512)


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


def gemv_row(label: str, q: qtensor.QuantizedTensor, dtype: torch.dtype, rows: int, bw: float,
             w32: torch.Tensor | None = None) -> list:
    """One weight at `rows` activation rows: the kernel with integer activations (with the il8 copy where it
    applies, the default, and row-major as with UC_CPU_IL8=0) and with float ones, the dense float32 /
    bfloat16 matmul (of w32 when given: a float head, against its 8-bit copy q) and rebuild."""
    n, k = q.shape
    w32 = qtensor.dequantize(q) if w32 is None else w32.float()
    w16 = w32.bfloat16()
    x = torch.randn(rows, k).to(dtype)
    t_q = timed(lambda: cpu_qgemv.linear(x, q, act="int16"))
    row_major = dataclasses.replace(q)  # the same parts without the il8 copy
    cpu_qgemv.per_pass(row_major)
    t_rm = timed(lambda: cpu_qgemv.linear(x, row_major, act="int16"))
    t_qf = timed(lambda: cpu_qgemv.linear(x, q, act="float"))
    t_f32 = timed(lambda: F.linear(x.float(), w32))
    t_bf16 = timed(lambda: F.linear(x.bfloat16(), w16))
    t_rebuild = timed(lambda: F.linear(x, qtensor.dequantize(q, dtype)))
    packed = q.codes.numel() + q.scales.numel() * 2 + q.grid.numel() * 4
    il8 = cpu_qgemv._il8(q)[0].numel() > 0
    return [label, f"{n}x{k}", q.bits, rows, f"{t_q * 1e3:.3f}", f"{t_rm * 1e3:.3f}" if il8 else "(same)",
            f"{t_qf * 1e3:.3f}", f"{t_f32 * 1e3:.3f}",
            f"{t_bf16 * 1e3:.3f}", f"{t_rebuild * 1e3:.3f}", f"{t_qf / t_q:.2f}x", f"{t_f32 / t_q:.2f}x",
            f"{packed / t_q / 1e9:.2f}", f"{packed / (bw * 1e9) / t_q:.0%}"]


def head_rows(pack: Path, model: str, dtype: torch.dtype, bw: float) -> list:
    """The output head (a float tensor in the pack) against its 8-bit copy (qhead.py), at 1 and 8 rows."""
    from ucformat import qhead

    r = PackReader(pack)
    sd = r.nonlayer_state_dict(torch.float32, "cpu")
    name = "lm_head.weight" if "lm_head.weight" in sd else next(n for n in sd if n.endswith("embed_tokens.weight"))
    w = sd[name]
    q = qhead.int8_copy(w)
    return [gemv_row(f"{model} output head (8-bit copy)", q, dtype, rows, bw, w32=w) for rows in (1, 8)]


def crossover(q: qtensor.QuantizedTensor, dtype: torch.dtype) -> int | None:
    """Fewest rows at which reconstruct + GEMM is faster than the kernel (None: never, up to CROSS_ROWS[-1])."""
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

    variants = {"dense": ("dense", None, "int16"), "packed": ("packed", None, "int16"),
                "packed, float": ("packed", None, "float"), "stream 25%": ("stream", "25%", "int16")}
    floor = runtime.plan(pack, residency="dense").min_stream_bytes
    dense_bytes = runtime.plan(pack, residency="dense").dense_model_bytes
    runners = {}
    for name, (mode, budget, act) in variants.items():
        if budget and dense_bytes * 0.25 < floor:
            budget = floor
        cpu_qgemv.ACT = act  # at load: the 8-bit head copy goes with integer activations
        m = runtime.load(pack, device="cpu", dtype=dtype, residency=mode, vram_budget=budget)
        kv = SlotKVCache(KVShape.of(m.config, dtype, "cpu"), 256 << 20, 8)
        kv.ensure(8, 128, 0, 0)
        runners[name] = WithAct(ModelRunner(m, kv), act)
    cpu_qgemv.ACT = "int16"
    return {batch: step_medians(runners, [100 + r for r in range(batch)], [64] * batch, rounds) for batch in (1, 8)}


class WithAct:
    """A runner whose decode steps run with its own UC_CPU_ACT arithmetic (cpu_qgemv.ACT, read per call)."""

    def __init__(self, runner, act: str) -> None:
        self.runner, self.act = runner, act

    def decode(self, toks, lens):
        cpu_qgemv.ACT = self.act
        try:
            return self.runner.decode(toks, lens)
        finally:
            cpu_qgemv.ACT = "int16"


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
    outs, models = {}, {}
    for mode, vram in (("dense", None), ("packed", None), ("stream", budget)):
        m = models[mode] = runtime.load(pack, device="cpu", dtype=dtype, residency=mode, vram_budget=vram)
        with torch.inference_mode():
            outs[mode] = [m.generate(**tok(p, return_tensors="pt"), max_new_tokens=tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)[0].tolist() for p in PROMPTS]
    res = {}
    for mode in ("packed", "stream"):
        same = sum(a == b for a, b in zip(outs[mode], outs["dense"]))
        parts = []
        for p, a, b in zip(PROMPTS, outs[mode], outs["dense"]):
            if a != b:  # where they part, and by how much dense's first choice led its second there
                at = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                with torch.inference_mode():
                    top = models["dense"](torch.tensor([b[:at]])).logits[0, -1].float().topk(2).values
                parts.append(f"{at - len(tok(p).input_ids)} (dense margin {(top[0] - top[1]).item():.2f})")
        res[mode] = f"{same}/{len(PROMPTS)}" + (f"; others part at token {', '.join(parts)}" if parts else "")
    for m in models.values():
        m.uc_runtime.close()
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
            if bits == a.bits[0]:
                for row in head_rows(pack, model, dtype, bw["read_gb_s"]):
                    gemv.append(row)
                    print(row, flush=True)
            big = max(weights.values(), key=lambda q: q.shape[0] * q.shape[1])
            cross.append([model, f"{big.shape[0]}x{big.shape[1]}", bits, crossover(big, dtype)])
            g = greedy(pack, dtype)
            texts.append([model, bits, g["packed"], g["stream"]])
            print(texts[-1], flush=True)
            steps = decode_rows(pack, dtype, a.rounds)
            for batch, t in steps.items():
                decode.append([model, bits, batch, *(f"{batch / v:.1f}" for v in t.values()),
                               f"{t['dense'] / t['packed']:.2f}x", f"{t['dense'] / t['packed, float']:.2f}x",
                               f"{t['dense'] / t['stream 25%']:.2f}x"])
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
        "GEMV: median ms of one call of the native kernel from the codes, with integer activations (`int16`, "
        "the default: 15-bit activations per block, 12-bit grid; b <= 5 and the 8-bit heads read the il8 copy of "
        "their codes, 8 weight rows side by side; `int16 row-major` is the same arithmetic on the pack's own "
        "layout, as with UC_CPU_IL8=0) and with float ones (`float`, UC_CPU_ACT=float); "
        "`rebuild` reconstructs the weight then multiplies (the path for long prompts); the output heads are the "
        "pack's float weight (dense columns) against its 8-bit copy (qhead.py); packed GB/s = (codes + scales + "
        "grid bytes) / time of `int16`; % of read bw = the time to read those bytes at the measured rate / that "
        "time.", "",
        table(["weight", "shape", "bits", "rows", "int16 ms", "int16 row-major ms", "float ms", "dense fp32 ms",
               "dense bf16 ms",
               "rebuild ms", "int16 vs float", "int16 vs fp32", "packed GB/s", "% of read bw"], res["gemv"]), "",
        "Crossover: fewest activation rows at which reconstruct + GEMM beats the kernel on the model's largest "
        f"matrix (kernel used up to qmatmul.CPU_MAX_ROWS = {qmatmul.CPU_MAX_ROWS} rows):", "",
        table(["model", "shape", "bits", "rebuild faster from rows"],
              [[*c[:3], c[3] or f"> {CROSS_ROWS[-1]}"] for c in res["crossover"]]), "",
        "Decode: tokens/s of the engine's decode step (batch x steps / time), 64 cached tokens per row; "
        f"median of {res['rounds']} rounds in which the variants take turns. `packed` and `stream 25%` run "
        "the defaults (integer activations, the head from its 8-bit copy); `packed, float` runs "
        "UC_CPU_ACT=float (float activations, the float head).", "",
        table(["model", "bits", "batch", "dense", "packed", "packed, float", "stream 25%", "packed / dense",
               "packed float / dense", "stream / dense"], res["decode"]), "",
        "Greedy text: 32 tokens from each of 4 prompts (bench/qkernels.py PROMPTS) with transformers' generate on "
        "the loaded pack, from the codes (defaults) against `dense` (the reconstructed weights); where a "
        "continuation parts from dense's, the token and dense's own lead of its first choice over its second "
        "there (logits):", "",
        table(["model", "bits", "packed: identical to dense", "stream 25%: identical to dense"], res["greedy"]), "",
        f"Command: `{res['command']}`"])

if __name__ == "__main__":
    sys.exit(main())
