"""The engine's CPU step with and without its native parts: what server/native_step.py (every layer of a
decode step in one C++ call) and the lean prefill (server/decoder.py) buy, and that they change no number.

    python bench/native_step.py --pack work/bench/smollm2-135m-gsq4 --pack work/bench/gemma3-270m-gsq4 [--write]

Per pack (packed residency, float32, `uc serve`'s OpenMP setting): two engine runners on the same loaded
model, one with the native body and one with the lean step's Python layers; decode steps at batch 1, 4
and 16 (40-85 cached tokens per row) take turns within each round (bench/cpu_step.py `step_medians`), and
each batch's logits are compared bit for bit. Then a 13-token prompt's prefill through the lean layers
against the transformers forward (the path before), alternating likewise. Writes the "native-step"
section of docs/BENCHMARKS.md with --write.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "20000")  # as `uc serve` runs (server/commands.py SERVE_ENV)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cpu_step import step_medians  # noqa: E402
from bench.report import machine, table, write_section  # noqa: E402

BATCHES = (1, 4, 16)
PROMPT = "Once upon a time, in a small village by the sea,"


def runners(pack: str):
    from server.kv_cache import KVShape, SlotKVCache
    from server.runner import ModelRunner
    from ucformat import runtime

    model = runtime.load(pack, device="cpu", dtype=torch.float32, residency="packed")
    out = {}
    for name, lean in (("native", True), ("python", True), ("transformers", False)):
        kv = SlotKVCache(KVShape.of(model.config, torch.float32, "cpu"), 256 << 20, 16)
        kv.ensure(16, 256, 0, 0)
        out[name] = ModelRunner(model, kv, lean_decode=lean)
    out["python"].decoder.native.usable = False
    return out


def prefill_medians(rs: dict, ids: list[int], rounds: int) -> dict[str, float]:
    """Median seconds of one prefill of `ids` per runner, the runners taking turns each round."""
    times = {k: [] for k in rs}
    for _ in range(rounds):
        for k, r in rs.items():
            r.prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
            t = time.perf_counter()
            for _ in range(2):
                r.prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
            times[k].append((time.perf_counter() - t) / 2)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(pack: str, rounds: int) -> list[list]:
    from transformers import AutoTokenizer

    rs = runners(pack)
    name = Path(pack).name
    rows = []
    for b in BATCHES:
        toks, lens = [100 + i for i in range(b)], [40 + 3 * i for i in range(b)]
        with torch.inference_mode():
            same = torch.equal(rs["native"].decode(toks, lens), rs["python"].decode(toks, lens))
        assert rs["native"].decoder.native.body is not None, "the native body did not apply"
        t = step_medians({k: rs[k] for k in ("native", "python")}, toks, lens, rounds)
        rows.append([name, f"decode, batch {b}", f"{1000 * t['python']:.2f}", f"{1000 * t['native']:.2f}",
                     f"{t['python'] / t['native']:.2f}x", "yes" if same else "**no**"])
    ids = AutoTokenizer.from_pretrained(pack)(PROMPT).input_ids
    with torch.inference_mode():
        a = rs["native"].prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
        b = rs["transformers"].prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
    t = prefill_medians({k: rs[k] for k in ("native", "transformers")}, ids, rounds)
    rows.append([name, f"prefill, {len(ids)} tokens", f"{1000 * t['transformers']:.2f}", f"{1000 * t['native']:.2f}",
                 f"{t['transformers'] / t['native']:.2f}x", f"max abs diff {(a - b).abs().max().item():.1e}"])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", action="append", required=True, help="a pack to measure (repeat for several)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    a = p.parse_args()
    rows = [r for pack in a.pack for r in measure(pack, a.rounds)]
    headers = ["pack", "step", "before ms", "now ms", "speed-up", "same logits"]
    body = "\n\n".join([
        f"Machine: {machine()}; float32, packed residency, GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}. "
        "Decode: `before` is the lean step's Python layers, `now` every layer in one native call "
        "(server/native_step.py); same logits = bit for bit. Prefill: `before` is the transformers forward, "
        "`now` the lean layers (its logits differ from the forward's by float rounding). Median ms of "
        f"{a.rounds} rounds in which the variants take turns.",
        table(headers, rows),
        "Command: `python bench/native_step.py " + " ".join(f"--pack {x}" for x in a.pack) + "`"])
    print(body)
    if a.write:
        write_section("native-step", "## The decode body in one native call (`bench/native_step.py`)\n\n" + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
