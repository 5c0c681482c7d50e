"""What the end-to-end distillation stage (compressor/finetune.py) really holds, against the estimate it is
admitted by (finetune.fits of working_bytes + held_bytes).

    python bench/e2e_memory.py SRC PACK [--steps 2] [--sequences 8] [--write]
    python bench/e2e_memory.py --docs-only     # rewrite the docs section from the kept rows

SRC is an HF checkpoint and PACK any pack of it (plain or calibrated): the stage is built from PACK's layers as
stored exactly as `uc pack --target-bpw ... --calib ...` builds it after its last layer, and runs `--steps` real
steps of E2E_TOKENS tokens plus its two held-out checks. The teacher's final hidden states are random (seeded):
the numbers are memory and time only, the KL values mean nothing. The process's resident set is sampled every
50 ms; each phase reports its peak above the resident set before the stage began, so the figure compares with
the estimate, which counts the stage's own working set. --write keeps the row (one per SRC) in
bench/results/e2e_memory.json and rewrites the "e2e-memory" section of docs/BENCHMARKS.md from all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402
from compressor import finetune, rss  # noqa: E402
from compressor.checkpoint import SourceCheckpoint, nonlayer_state_dict  # noqa: E402
from compressor.config import E2E_TOKENS, CalibConfig  # noqa: E402
from ucformat import PackReader  # noqa: E402
from ucformat.manifest import layer_file  # noqa: E402
from ucformat.qtensor import QuantizedTensor  # noqa: E402
from ucformat.skeleton import Skeleton  # noqa: E402

MIB = 1 << 20
RESULTS = ROOT / "bench" / "results" / "e2e_memory.json"


class RssPeak:
    """Peak resident set of this process, sampled in a thread, since the last reset()."""

    def __init__(self, every: float = 0.05) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    now = staticmethod(rss.current)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", nargs="?")
    ap.add_argument("pack", nargs="?")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=8, help="e2e sequences of E2E_TOKENS tokens (4 held out)")
    ap.add_argument("--write", action="store_true", help="keep the row and rewrite the docs section")
    ap.add_argument("--docs-only", action="store_true", help="only rewrite the docs section from the kept rows")
    a = ap.parse_args()
    if a.docs_only:
        return write_docs(json.loads(RESULTS.read_text()))
    if not (a.src and a.pack):
        ap.error("SRC and PACK are required (or --docs-only)")
    torch.manual_seed(0)
    sampler = RssPeak()
    ckpt, reader = SourceCheckpoint(a.src), PackReader(a.pack)
    sk = Skeleton(ckpt.path, dtype=torch.float32)
    sk.load(nonlayer_state_dict(ckpt))
    layers = [reader.read_parts(layer_file(i)) for i in range(reader.num_layers)]
    per_layer = [sum(t.numel() for t in ts.values() if isinstance(t, QuantizedTensor)) for ts in layers]
    numel = sum(per_layer)
    vocab, hidden = sk.model.get_output_embeddings().weight.shape
    cfg = CalibConfig(file="unused", e2e_steps=a.steps, e2e_min_kl=0.0, e2e_warmup=1)
    cfg = replace(cfg, e2e_topk=finetune.stage_topk(cfg, sk, numel))
    ids = torch.randint(0, vocab, (a.sequences, E2E_TOKENS))
    teacher = torch.randn(a.sequences, E2E_TOKENS, hidden)
    held = finetune.held_bytes(ids.numel(), hidden, vocab, cfg.e2e_topk)
    base = sampler.reset()
    t0 = time.perf_counter()
    model = finetune.student(sk, layers, ckpt.layer_prefix, torch.device("cpu"))
    built, build_s = sampler.peak - base, time.perf_counter() - t0
    steps_seen: list[float] = []
    step_peaks: list[int] = []  # the first includes the held-out check before the stage
    step_rss: list[int] = []  # resident after each step
    t_step = [time.perf_counter()]

    def progress(step: int, kl: float) -> None:
        now = time.perf_counter()
        steps_seen.append(now - t_step[0])
        step_peaks.append(sampler.peak - base)
        step_rss.append(sampler.now() - base)
        t_step[0] = now

    t0 = time.perf_counter()
    r = finetune.finetune(sk, model, ids, teacher, cfg, progress)
    stage = sampler.peak - base
    sampler.close()
    out = {"src": str(a.src), "pack": str(a.pack), "quantized_weights": numel, "vocab": vocab, "hidden": hidden,
           "topk": cfg.e2e_topk, "dtype": r.dtype, "estimate_bytes": finetune.working_bytes(numel, max(per_layer)) + held,
           "held_bytes": held, "rss_before_bytes": base, "student_peak_bytes": built, "stage_peak_bytes": stage,
           "largest_layer_weights": max(per_layer), "build_seconds": round(build_s, 1),
           "step_seconds": [round(s, 1) for s in steps_seen], "step_peak_mib": [p // MIB for p in step_peaks],
           "step_rss_mib": [p // MIB for p in step_rss], "stage_seconds": round(time.perf_counter() - t0, 1),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": machine()}
    print(json.dumps(out))
    print(f"estimate {out['estimate_bytes'] / MIB:.0f} MiB (of which held {held / MIB:.0f}), measured "
          f"{stage / MIB:.0f} MiB above the {base / MIB:.0f} MiB before the stage", file=sys.stderr)
    if not math.isfinite(r.kl_before):
        raise SystemExit("no held-out sequences: use --sequences >= 2")
    if a.write:
        rows = {x["src"]: x for x in (json.loads(RESULTS.read_text()) if RESULTS.exists() else [])}
        rows[out["src"]] = out
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(rows.values(), key=lambda x: x["quantized_weights"]), indent=1))
        tmp.replace(RESULTS)
        write_docs(json.loads(RESULTS.read_text()))


def write_docs(rows: list[dict]) -> None:
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    big = max(rows, key=lambda r: r["quantized_weights"])
    rate = sum(big["step_seconds"][1:]) / max(len(big["step_seconds"]) - 1, 1)
    body = [
        "## End-to-end stage memory (`bench/e2e_memory.py`)", "",
        "Command: `python bench/e2e_memory.py SRC PACK --steps 3 --sequences 6 --write`, PACK a plain 4-bit pack of "
        "SRC with `--rotation 64` (`uc pack SRC PACK --bits 4 --rotation 64`), run on the machine beside each row. "
        "The end-to-end distillation stage of a calibrated pack (compressor/finetune.py) built from the pack's "
        "layers and run for its held-out check and 3 steps of 1024 tokens, with random teacher targets (memory "
        "and time only). \"Stage peak\" is the process's resident set at its highest during the stage, less what "
        "it was before (the skeleton's non-layer tensors in float32, the teacher's targets); \"estimate\" is what "
        "the stage is admitted by (finetune.working_bytes + held_bytes, checked against the memory free); bfloat16 "
        "weights for comparison.", "",
        table(["model (source)", "quantized weights", "as bfloat16", "largest layer", "stage peak", "estimate",
               "s/step", "steps in", "machine"],
              [[Path(r["src"]).name, f"{r['quantized_weights'] / 1e6:,.0f} M", gib(2 * r["quantized_weights"]),
                f"{r['largest_layer_weights'] / 1e6:.1f} M", gib(r["stage_peak_bytes"]),
                gib(finetune.working_bytes(r["quantized_weights"], r["largest_layer_weights"]) + r["held_bytes"]),
                " / ".join(f"{x:.0f}" for x in r["step_seconds"][1:]), r["dtype"],
                r["machine"]] for r in rows]),
        "",
        "The stage holds the whole model as codes (one byte a weight) with their scales, and builds the weights of "
        "one decoder layer at a time: in its held-out checks each layer's when the layer runs; in its steps each "
        "layer keeps only its inputs for backward and runs again there, its weights included (non-reentrant "
        "activation checkpointing), which changes no bit of the pack "
        "(tests/test_calib.py::test_end_to_end_steps_that_rerun_each_layer_in_backward_learn_exactly_the_same). "
        "s/step: wall seconds of steps 2 and 3 (the first also runs the held-out check), on the machine named, "
        f"which other jobs may have shared: upper bounds. At the {Path(big['src']).name} row's rate the default "
        f"{CalibConfig().e2e_steps} steps take about {rate * CalibConfig().e2e_steps / 3600:.1f} hours.",
    ]
    write_section("e2e-memory", "\n".join(body))


if __name__ == "__main__":
    main()
