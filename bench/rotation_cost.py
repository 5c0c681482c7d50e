"""What the input rotation (SPEC.md 2.5) costs the reader: reconstruction time of one weight with and
without it, on SmolLM2-135M's linear shapes, at 5 bits, block 64.

    python bench/rotation_cost.py                 # CPU, native dequantization kernel where it builds
    python bench/rotation_cost.py --device cuda

Reconstruction runs once per weight in `dense` residency and on every forward pass of a layer that is not
kept reconstructed (`packed`, `stream`), so this is the per-pass price of rotation there. Median of
--repeats runs after a warm-up. Writes bench/results/rotation_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine  # noqa: E402
from compressor import codecs  # noqa: E402
from ucformat import qtensor  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rotation_cost.json"
SHAPES = {"q/o_proj 576x576": (576, 576), "k/v_proj 192x576": (192, 576), "gate/up_proj 1536x576": (1536, 576),
          "down_proj 576x1536": (576, 1536)}


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    rows, total = [], {0: 0.0, 64: 0.0}
    layer = {"q/o_proj 576x576": 2, "k/v_proj 192x576": 2, "gate/up_proj 1536x576": 2, "down_proj 576x1536": 1}
    for label, shape in SHAPES.items():
        w = torch.randn(*shape) * 0.02
        row = {"shape": label}
        for r in (0, 64):
            q = codecs.quantize(w, a.bits, 64, "gsq", rotation=r, name=label).to(device)
            row[f"ms_rot{r}"] = timed(lambda: qtensor.dequantize(q, torch.float32), device, a.repeats) * 1e3
            total[r] += row[f"ms_rot{r}"] * layer[label]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"machine": machine(), "device": str(device), "bits": a.bits, "rows": rows,
           "layer_ms": {"rot0": total[0], "rot64": total[64]},
           "command": "python bench/rotation_cost.py" + (f" --device {a.device}" if a.device != "cpu" else "")}
    print(json.dumps(out["layer_ms"]))
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
