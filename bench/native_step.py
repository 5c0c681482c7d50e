"""The engine's CPU step with and without its native parts: what server/native_step.py (every layer of a
decode step in one C++ call), the il8 layout of the codes and the lean prefill (server/decoder.py) buy, and
that the native step changes no number.

    python bench/native_step.py --pack work/bench/smollm2-135m-gsq4 --pack work/bench/gemma3-270m-gsq4 [--write]

Per pack (packed residency, float32, `uc serve`'s OpenMP setting): two engine runners on the same loaded
model, one with the native body and one with the lean step's Python layers; decode steps at batch 1, 4
and 16 (40-85 cached tokens per row) take turns within each round (bench/cpu_step.py `step_medians`), and
each batch's logits are compared bit for bit; a third runner, the native body on a second load of the pack
without the il8 copies of the codes (ucformat/cpu_qgemv.py), takes its turn too: what that layout buys.
Then a 13-token prompt's prefill through the lean layers
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


def runners(pack: str, row_major: bool = False):
    """native / python / transformers runners on one loaded model; with `row_major` also a native runner on
    a second load of the pack whose weights never get the il8 copy (as with UC_CPU_IL8=0)."""
    from server.kv_cache import KVShape, SlotKVCache
    from server.runner import ModelRunner
    from ucformat import cpu_qgemv, runtime
    from ucformat.qlinear import QuantLinear

    def runner(model, lean: bool) -> ModelRunner:
        kv = SlotKVCache(KVShape.of(model.config, torch.float32, "cpu"), 256 << 20, 16)
        kv.ensure(16, 256, 0, 0)
        return ModelRunner(model, kv, lean_decode=lean)

    model = runtime.load(pack, device="cpu", dtype=torch.float32, residency="packed")
    out = {name: runner(model, lean) for name, lean in (("native", True), ("python", True), ("transformers", False))}
    out["python"].decoder.native.usable = False
    if row_major:
        other = runtime.load(pack, device="cpu", dtype=torch.float32, residency="packed")
        for m in other.modules():
            if isinstance(m, QuantLinear) and m.q is not None:
                cpu_qgemv.per_pass(m.q)  # no il8 copy: the row-major integer kernel
        out["row-major"] = runner(other, True)
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

    rs = runners(pack, row_major=True)
    name = Path(pack).name
    rows = []
    for b in BATCHES:
        toks, lens = [100 + i for i in range(b)], [40 + 3 * i for i in range(b)]
        with torch.inference_mode():
            now = rs["native"].decode(toks, lens)
            same = torch.equal(now, rs["python"].decode(toks, lens))
            agree = (rs["row-major"].decode(toks, lens).argmax(-1) == now.argmax(-1)).float().mean().item()
        assert rs["native"].decoder.native.body is not None, "the native body did not apply"
        t = step_medians({k: rs[k] for k in ("native", "python", "row-major")}, toks, lens, rounds)
        rows.append([name, f"decode, batch {b}", f"{1000 * t['python']:.2f}", f"{1000 * t['native']:.2f}",
                     f"{t['python'] / t['native']:.2f}x", "yes" if same else "**no**", f"{1000 * t['row-major']:.2f}",
                     f"{t['row-major'] / t['native']:.2f}x", f"{agree:.0%}"])
    ids = AutoTokenizer.from_pretrained(pack)(PROMPT).input_ids
    with torch.inference_mode():
        a = rs["native"].prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
        b = rs["transformers"].prefill([(0, 0, len(ids))], ids, [len(ids) - 1])
    t = prefill_medians({k: rs[k] for k in ("native", "transformers")}, ids, rounds)
    rows.append([name, f"prefill, {len(ids)} tokens", f"{1000 * t['transformers']:.2f}", f"{1000 * t['native']:.2f}",
                 f"{t['transformers'] / t['native']:.2f}x", f"max abs diff {(a - b).abs().max().item():.1e}", "", "", ""])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", action="append", required=True, help="a pack to measure (repeat for several)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--write", action="store_true", help="write the table into docs/BENCHMARKS.md")
    a = p.parse_args()
    rows = [r for pack in a.pack for r in measure(pack, a.rounds)]
    headers = ["pack", "step", "before ms", "now ms", "speed-up", "same logits", "row-major ms", "il8 speed-up",
               "same argmax as row-major"]
    body = "\n\n".join([
        f"Machine: {machine()}; float32, packed residency, GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}. "
        "Decode: `before` is the lean step's Python layers, `now` every layer in one native call "
        "(server/native_step.py); same logits = bit for bit. `row-major`: the same native step on a second load "
        "of the pack whose weights have no il8 copy (as with UC_CPU_IL8=0; `now` reads the il8 copies of the "
        "2-5-bit weights and the 8-bit head): its speed against `now`, and the share of rows whose top token "
        "it shares with `now` (the two differ in the order of float sums). Prefill: `before` is the "
        "transformers forward, `now` the lean layers (its logits differ from the forward's by float rounding). "
        "Median ms of "
        f"{a.rounds} rounds in which the variants take turns.",
        table(headers, rows),
        "Command: `python bench/native_step.py " + " ".join(f"--pack {x}" for x in a.pack) + "`"])
    print(body)
    if a.write:
        write_section("native-step", "## The decode body in one native call (`bench/native_step.py`)\n\n" + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
