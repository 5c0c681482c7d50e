"""What searching each block's scale for the learned grid buys over its absmax (compressor/codecs.py
`fitted_scales`, the default for `gsq` since stop 23), measured on a real model's linears.

    python bench/scale_search.py                      # SmolLM2, every third layer, 3/4/5/6 bits
    python bench/scale_search.py --layers 2 --bits 5

Each linear is rotated as the pack rotates it with `--calib` (Hadamard blocks of 64 with random signs) and
rounded onto the same grid (k-means on the absmax-normalised weights, columns weighted by their input
energy) twice: with each block's absmax as its scale, and with the searched scale. For both, the
relative output error e = tr(dW H dW^T) / tr(W H W^T) (H: the fp model's input Gram matrix on the pack's
calibration sequences, 32 x 256 tokens of WikiText-2 test articles 1-16) after nearest rounding and after
GPTQ rounding, and the relative weight error |dW|^2 / |W|^2 of nearest rounding (the data-free pack).
Per bit width the script prints the geometric mean over the linears of searched / absmax for each.
Results go to bench/results/scale_search.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.rotation_proxy import block_hadamard, grams, model_and_calibration  # noqa: E402
from compressor import codecs, gptq  # noqa: E402
from compressor.qweight import fit_grid  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale_search.json"
BLOCK = 64


def errors(w: torch.Tensor, h: torch.Tensor, bits: int) -> dict[str, float]:
    """w float32 [R, C] and h [C, C], both already rotated: the errors of each rounding (see the module doc)."""
    col = torch.diagonal(h).clamp_min(0)
    grid = fit_grid(w, bits, BLOCK, "gsq", col)
    ref_out, ref_w = torch.trace(w @ h @ w.T).item(), w.square().sum().item()

    def out_err(deq: torch.Tensor) -> float:
        dw = deq - w
        return torch.trace(dw @ h @ dw.T).item() / ref_out

    def deq(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return grid[codes.long()] * scales.float().repeat_interleave(BLOCK, -1)[:, :w.shape[1]]

    r = {}
    for name, search in (("absmax", False), ("searched", True)):
        scales = codecs.fitted_scales(w, grid, BLOCK, col, search=search)
        near = deq(codecs.nearest(codecs.normalise(w, scales, BLOCK), grid), scales)
        r[f"nearest_output_{name}"] = out_err(near)
        r[f"gptq_output_{name}"] = out_err(deq(*gptq.round_gptq(w, h, grid, BLOCK, scales=scales if search else None)))
        plain = codecs.fitted_scales(w, grid, BLOCK, None, search=search)  # data-free: columns unweighted
        r[f"nearest_weight_{name}"] = (deq(codecs.nearest(codecs.normalise(w, plain, BLOCK), grid), plain) - w
                                       ).square().sum().item() / ref_w
    return r


KINDS = ("nearest_weight", "nearest_output", "gptq_output")


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for bits in sorted({r["bits"] for r in rows}):
        at = [r for r in rows if r["bits"] == bits]
        s = {"bits": bits}
        for k in KINDS:
            logs = [math.log2(r["error"][f"{k}_searched"] / r["error"][f"{k}_absmax"]) for r in at]
            s[k] = 2 ** (sum(logs) / len(logs))
            s[k + "_worst"] = 2 ** max(logs)
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", help="comma-separated decoder layers (default: every third)")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    model, layers, ids = model_and_calibration(a.model, a.layers)
    t0 = time.perf_counter()
    rows = []
    for (i, name), g in grams(model, ids, layers).items():
        w = model.model.layers[i].get_submodule(name).weight.detach().double()
        rot = block_hadamard(w.shape[1], BLOCK, a.seed + i)
        wr, hr = (w @ rot).float(), (rot.T @ (g.double() / len(ids)) @ rot).float()
        for bits in a.bits:
            e = errors(wr, hr, bits)
            rows.append({"layer": i, "linear": name, "shape": list(w.shape), "bits": bits, "error": e})
            print(i, name, bits, " ".join(f"{k} {e[k + '_searched'] / e[k + '_absmax']:.3f}" for k in KINDS), flush=True)
    summary = summarise(rows)
    print(f"{'bits':>4} " + " ".join(f"{k + ' (geo mean, worst)':>32}" for k in KINDS))
    for s in summary:
        print(f"{s['bits']:>4} " + " ".join(f"{s[k]:>24.3f} {s[k + '_worst']:>7.3f}" for k in KINDS))
    out = {"model": a.model, "layers": layers, "bits": a.bits, "seed": a.seed, "calibration": "32 x 256, articles 1-16",
           "rotation": f"Hadamard blocks of {BLOCK}, random signs", "seconds": time.perf_counter() - t0,
           "torch": torch.__version__, "summary": summary, "rows": rows}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
