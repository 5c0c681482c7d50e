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
from ucformat.runtime import plan  # noqa: E402
from ucformat.speed import measure  # noqa: E402

# (mode, budget, prefetch, cold): cold rows drop the layer files from the page cache before every forward
ROWS = [("dense", None, True, False), ("packed", None, True, False), ("stream", "100%", True, False),
        ("stream", "50%", True, False), ("stream", "25%", True, False), ("stream", "25%", False, False),
        ("stream", "25%", True, True), ("stream", "25%", False, True)]


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
        floor = plan(pack, device=a.device, residency="dense").min_stream_bytes
        for mode, budget, prefetch, cold in ROWS:
            label, vram = budget, budget
            if budget is not None:
                dense = plan(pack, device=a.device, residency="dense").dense_model_bytes
                if dense * float(budget[:-1]) / 100 < floor:  # below embeddings + one layer: the smallest accepted
                    vram, label = floor, f"{budget} -> {floor / dense:.0%} (floor)"
            r = measure(pack, mode, device=a.device, vram_budget=vram, prefetch=prefetch, decode_steps=a.decode_steps,
                        cold=cold)
            row = {"model": model, "mode": mode, "budget": label, "prefetch": prefetch, "cold": cold, **r.to_dict()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "runtime.json").write_text(json.dumps(rows, indent=1))
    body = [
        f"Command: `python bench/runtime.py --device {a.device}` on {machine()}, {torch.get_num_threads()} torch threads.",
        f"Packs: GSQ {a.bits}-bit, block 64. Compute dtype float32 on CPU. Budget = share of the dense weights "
        "(embeddings + every layer reconstructed); a share below the smallest budget the planner accepts (embeddings + "
        "one layer: Gemma-3's 262k-token embeddings alone are 63% of its dense weights) runs at that floor, marked. "
        "On CPU, prefetch reads the next streamed layer's bytes ahead; reconstruction runs on the compute thread. "
        "Peak resident = weight bytes on the device at the worst moment "
        "(accounting of the runtime, prefetched layer included). \"cold\": the layer files are dropped from the page "
        "cache (posix_fadvise DONTNEED) before every forward pass, so streamed layers are read from disk, as on a "
        "host whose RAM cannot cache the pack.",
        "",
        table(["model", "mode", "budget", "prefetch", "page cache", "prefill tok/s", "decode tok/s b1", "decode tok/s b8",
               "peak resident", "stall s", "hits/misses"],
              [[r["model"], r["mode"], r["budget"] or "-", "yes" if r["prefetch"] else "no",
                "cold" if r["cold"] else "warm", f"{r['prefill_tok_s']:.1f}",
                f"{r['decode_tok_s_b1']:.2f}", f"{r['decode_tok_s_b8']:.2f}", f"{r['peak_resident_bytes'] / 2**20:.1f} MiB",
                f"{r['stall_seconds']:.2f}", f"{r['prefetch_hits']}/{r['prefetch_misses']}"] for r in rows]),
    ]
    body += ["", "Targets (batch-8 decode, same run):"] + [line for m in dict.fromkeys(r["model"] for r in rows)
                                                          for line in _targets([r for r in rows if r["model"] == m])]
    write_section("runtime", "\n".join(body))


def _targets(rows: list[dict]) -> list[str]:
    def b8(mode, budget_prefix=None, prefetch=True, cold=False):
        for r in rows:
            if (r["mode"] == mode and r["prefetch"] == prefetch and r["cold"] == cold
                    and (budget_prefix is None or (r["budget"] or "").startswith(budget_prefix))):
                return r["decode_tok_s_b8"]
        return None

    dense, packed, s25, s25n = b8("dense"), b8("packed"), b8("stream", "25%"), b8("stream", "25%", False)
    c25, c25n = b8("stream", "25%", True, True), b8("stream", "25%", False, True)
    m = rows[0]["model"]
    out = []
    if dense and packed:
        out.append(f"- {m}: packed / dense = {packed / dense:.2f} (target >= 0.5): **{'met' if packed >= dense / 2 else 'missed'}**")
    if dense and s25:
        out.append(f"- {m}: stream 25% with prefetch / dense = {s25 / dense:.2f} (target >= 0.5): "
                   f"**{'met' if s25 >= dense / 2 else 'missed'}**")
    if s25 and s25n:
        out.append(f"- {m}: stream 25% prefetch / no prefetch = {s25 / s25n:.2f} (target: visibly > 1): "
                   f"**{'met' if s25 > 1.05 * s25n else 'missed'}**")
    if c25 and c25n:
        out.append(f"- {m}: stream 25%, cold page cache, prefetch / no prefetch = {c25 / c25n:.2f} (target: visibly > 1): "
                   f"**{'met' if c25 > 1.05 * c25n else 'missed'}**")
    return out


if __name__ == "__main__":
    main()
