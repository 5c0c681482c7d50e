"""The server's CPU decode step, piece by piece: what linear prepacking, sibling fusion and the OpenMP wait
policy each buy on this machine.

    python bench/cpu_step.py --pack work/packs/smollm2-135m-gsq5 [--write]

For each OpenMP setting (the one `uc serve` sets, GOMP_SPINCOUNT=20000, and OMP_WAIT_POLICY=PASSIVE) a
child process loads the pack three times in bfloat16 (plain `nn.Linear`, prepacked one by one, prepacked
with q/k/v and gate/up fused; server/cpu_linear.py) and times the engine's batched decode forward
(`ModelRunner.decode`, slot KV cache, 60-75 cached tokens per row) at batch 1 and 16. The three variants
take turns within each round, 8 rounds, so a machine whose speed drifts favours none of them; the table
shows median step times. Writes the "cpu-step" section of docs/BENCHMARKS.md with --write.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ENVS = {"GOMP_SPINCOUNT=20000 (uc serve)": {"GOMP_SPINCOUNT": "20000", "THP_MEM_ALLOC_ENABLE": "1"},
        "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}}
VARIANTS = ("plain", "packed", "packed+fused")
BATCHES = (1, 16)


def child(pack: str, rounds: int) -> dict:
    import torch

    from server import cpu_linear
    from server.kv_cache import KVShape, SlotKVCache
    from server.runner import ModelRunner
    from ucformat import runtime

    models = {}
    for name in VARIANTS:
        m = runtime.load(pack, device="cpu", dtype=torch.bfloat16)
        if name != "plain":
            cpu_linear.prepack(m, batch_hint=16, fuse=name == "packed+fused")
        models[name] = m
    kv = SlotKVCache(KVShape.of(models["plain"].config, torch.bfloat16, "cpu"), 1 << 30, max(BATCHES))
    kv.ensure(max(BATCHES), 256, 0, 0)
    runners = {k: ModelRunner(m, kv) for k, m in models.items()}
    return {str(b): step_medians(runners, [100 + r for r in range(b)], [60 + r for r in range(b)], rounds)
            for b in BATCHES}


def step_medians(runners: dict, toks: list[int], lens: list[int], rounds: int) -> dict[str, float]:
    """Median seconds of one `ModelRunner.decode(toks, lens)` per runner, over `rounds` rounds in which the
    runners take turns (4 timed steps each, after one untimed step that brings its weights back in cache,
    as in serving), so that a machine whose speed drifts favours none of them."""
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            r.decode(toks, lens)
            t = time.perf_counter()
            for _ in range(4):
                r.decode(toks, lens)
            times[k].append((time.perf_counter() - t) / 4)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.pack, a.rounds)))
        return 0
    results = {}
    for label, env in ENVS.items():
        clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        r = subprocess.run([sys.executable, __file__, "--child", "--pack", a.pack, "--rounds", str(a.rounds)],
                           env={**clean, **env}, capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(f"child ({label}) failed:\n{r.stderr[-2000:]}")
        results[label] = json.loads(r.stdout.strip().splitlines()[-1])
        print(label, json.dumps(results[label]), flush=True)
    from bench.report import machine, table, write_section

    rows = []
    for label, res in results.items():
        for b in BATCHES:
            t = res[str(b)]
            rows.append([label, b, *(f"{t[v] * 1e3:.1f}" for v in VARIANTS),
                         f"{t['plain'] / t['packed']:.2f}x", f"{t['packed'] / t['packed+fused']:.2f}x"])
    body = "\n".join([
        "## CPU decode step: prepacked and fused linears, OpenMP wait policy", "",
        f"Machine: {machine()}. Pack: `{Path(a.pack).name}`, bfloat16. One decode forward of the server's engine "
        "(`ModelRunner.decode`, slot KV cache, 60-75 cached tokens per row), median step time in ms over "
        f"{a.rounds} rounds in which the three variants take turns; each OpenMP setting in its own process.", "",
        table(["OpenMP", "batch", "plain nn.Linear", "prepacked (default)", "prepacked + q/k/v, gate/up fused",
               "speed-up of prepacking", "speed-up of fusing"], rows), "",
        f"Command: `python bench/cpu_step.py --pack {a.pack}`"])
    print(body)
    if a.write:
        write_section("cpu-step", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
