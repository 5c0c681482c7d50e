"""Runtime throughput per residency mode on the real models (CPU by default).

    python bench/runtime.py                                  # both models, 5-bit GSQ packs
    python bench/runtime.py --models smollm2-135m --device cpu

For each model: dense, packed, and stream at 100% / 50% / 25% of the dense weight bytes with prefetch,
and 25% without prefetch; prefill tok/s (256-token prompt, batch 1), decode tok/s at batch 1 and 8
(32-token prompt, 16 greedy steps with a KV cache), peak resident weight bytes, stall seconds. All rows of
a model run in one process, one after another, on the same pack. Writes bench/results/runtime.json and
the "runtime" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat.speed import measure  # noqa: E402

ROWS = [("dense", None, True), ("packed", None, True), ("stream", "100%", True), ("stream", "50%", True),
        ("stream", "25%", True), ("stream", "25%", False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--work", default=str(ROOT / "work" / "bench"))
    a = ap.parse_args()
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    rows = []
    for model in a.models:
        src = fetch_model(model, cache / "models" / model, cache_dir=cache)
        pack = Path(a.work) / f"{model}-gsq{a.bits}-rt"
        if not (pack / "manifest.json").exists():
            subprocess.run([sys.executable, "-m", "uc", "pack", str(src), str(pack), "--bits", str(a.bits), "--resume",
                            "-q"], check=True)
        for mode, budget, prefetch in ROWS:
            r = measure(pack, mode, device=a.device, vram_budget=budget, prefetch=prefetch, decode_steps=a.decode_steps)
            row = {"model": model, "mode": mode, "budget": budget, "prefetch": prefetch, **r.to_dict()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "runtime.json").write_text(json.dumps(rows, indent=1))
    body = [
        f"Command: `python bench/runtime.py --device {a.device}` on {machine()}, {torch.get_num_threads()} torch threads.",
        f"Packs: GSQ {a.bits}-bit, block 64. Compute dtype float32 on CPU. Budget = share of the dense weights "
        "(embeddings + every layer reconstructed). Peak resident = weight bytes on the device at the worst moment "
        "(accounting of the runtime, prefetched layer included).",
        "",
        table(["model", "mode", "budget", "prefetch", "prefill tok/s", "decode tok/s b1", "decode tok/s b8",
               "peak resident", "stall s", "hits/misses"],
              [[r["model"], r["mode"], r["budget"] or "-", "yes" if r["prefetch"] else "no", f"{r['prefill_tok_s']:.1f}",
                f"{r['decode_tok_s_b1']:.2f}", f"{r['decode_tok_s_b8']:.2f}", f"{r['peak_resident_bytes'] / 2**20:.1f} MiB",
                f"{r['stall_seconds']:.2f}", f"{r['prefetch_hits']}/{r['prefetch_misses']}"] for r in rows]),
    ]
    write_section("runtime", "\n".join(body))


if __name__ == "__main__":
    main()
