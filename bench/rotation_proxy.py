"""Would incoherence processing (a rotation of each linear's input dimension before rounding) pay in our
format? A proxy measured without changing the format.

    python bench/rotation_proxy.py                      # SmolLM2, every third layer, 3/4/5 bits
    python bench/rotation_proxy.py --layers 2 --bits 4

For a linear y = W x with input Gram matrix H = sum x x^T (fp model, the pack's calibration sequences:
32 x 256 tokens of WikiText-2 test articles 1-16), any orthogonal R gives y = (W R)(R^T x). Rounding
W' = W R with GPTQ against H' = R^T H R, then rotating back, leaves the output error
    e = tr(dW H dW^T) / tr(W H W^T),   dW = (deq(W') - W') R^T
(the same quantity in either basis). Each variant below rounds with our codec (GSQ grid fitted by
k-means, fp16 absmax scales, GPTQ error feedback) and is compared with no rotation at the same code bits:
  h64        Hadamard blocks of 64 with random signs (aligned with the 64-weight scale blocks)
  h64-b128   the same, one scale per 128 weights (0.11-0.125 bpw fewer: the last block pads)
  orth-row   a dense random orthogonal matrix, one scale per row (about 0.24 bpw fewer)
Per bit width the script prints the geometric mean of e / e(none) over the linears and what it is worth
in bits at the same error, taking the error as falling 4x per bit (-0.5 log2 of the ratio, plus the
scale bits a variant saves). Results go to bench/results/rotation_proxy.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import calibrate, codecs, gptq  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat import rotation  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "rotation_proxy.json"
FP16_BITS = 16


def block_hadamard(cols: int, block: int, seed: int) -> torch.Tensor:
    """diag(random signs) @ blockdiag(H_block, ...): orthogonal [cols, cols]."""
    if cols % block or block & (block - 1):
        raise SystemExit(f"a linear with {cols} inputs does not split into Hadamard blocks of {block}")
    signs = torch.randint(0, 2, (cols,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs.unsqueeze(1) * torch.block_diag(*[rotation.hadamard(block, dtype=torch.float64)] * (cols // block))


def random_orthogonal(cols: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def output_error(w: torch.Tensor, h: torch.Tensor, bits: int, block: int, rot: torch.Tensor | None) -> float:
    """Relative output error of GPTQ rounding W (optionally rotated by rot) onto a k-means grid."""
    w, h = w.double(), h.double()
    if rot is not None:
        w, h = w @ rot, rot.T @ h @ rot
    scales, normed = codecs.block_scales(w.float(), block)
    weight = scales.float().repeat_interleave(block, -1)[:, :w.shape[1]] ** 2
    grid = codecs.kmeans_grid(normed, weight, 2**bits)
    codes, s = gptq.round_gptq(w.float(), h.float(), grid, block)
    deq = (grid[codes.long()] * s.float().repeat_interleave(block, -1)[:, :w.shape[1]]).double()
    dw = deq - w
    return (torch.trace(dw @ h @ dw.T) / torch.trace(w @ h @ w.T)).item()


def scale_bits(cols: int, block: int) -> float:
    """fp16 scale bits per weight of a row of `cols` weights in blocks of `block` (the last one padded)."""
    return FP16_BITS * -(-cols // block) / cols


SCALE_BLOCK = {"none": 64, "h64": 64, "h64-b128": 128, "orth-row": 0}  # weights per scale (0: the whole row)


def bpw_saved(name: str, cols: int) -> float:
    """Scale bits per weight variant `name` saves against one fp16 scale per 64 weights."""
    return scale_bits(cols, 64) - scale_bits(cols, SCALE_BLOCK[name] or cols)


def variants(cols: int, seed: int) -> dict[str, tuple[int, torch.Tensor | None]]:
    """name -> (weights per scale, rotation)."""
    h64 = block_hadamard(cols, 64, seed)
    rot = {"none": None, "h64": h64, "h64-b128": h64, "orth-row": random_orthogonal(cols, seed)}
    return {k: (SCALE_BLOCK[k] or cols, r) for k, r in rot.items()}


def summarise(rows: list[dict]) -> list[dict]:
    """Per bit width and variant: geometric mean (best, worst) of the error ratio to no rotation, and the
    bits it is worth at 4x error per bit plus the scale bits saved."""
    out = []
    for bits in sorted({r["bits"] for r in rows}):
        at = [r for r in rows if r["bits"] == bits]
        for k in at[0]["error"]:
            if k == "none":
                continue
            logs = [math.log2(r["error"][k] / r["error"]["none"]) for r in at]
            ratio = 2 ** (sum(logs) / len(logs))
            saved = sum(r["bpw_saved"][k] for r in at) / len(at)
            out.append({"bits": bits, "variant": k, "error_ratio": ratio, "best": 2 ** min(logs),
                        "worst": 2 ** max(logs), "bits_gained": -0.5 * math.log2(ratio) + saved})
    return out


def print_summary(summary: list[dict]) -> None:
    print(f"{'bits':>4} {'variant':>9} {'error ratio (geo mean)':>23} {'best':>6} {'worst':>6} {'bits gained':>11}")
    for s in summary:
        print(f"{s['bits']:>4} {s['variant']:>9} {s['error_ratio']:>23.3f} {s['best']:>6.3f} {s['worst']:>6.3f} "
              f"{s['bits_gained']:>+11.3f}")


def grams(model, ids: torch.Tensor, layers: list[int]) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, module path) -> summed input Gram matrix (float64) of each nn.Linear in the given layers."""
    with contextlib.ExitStack() as stack:
        stats = {}
        for i in layers:
            layer = model.model.layers[i]
            paths = {p: p for p, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            stats[i] = stack.enter_context(calibrate.LinearStats(layer, paths))
        with torch.no_grad():
            for chunk in ids.split(4):
                model(input_ids=chunk, use_cache=False)
    return {(i, p): g for i, st in stats.items() for p, g in st.gram.items()}


def model_and_calibration(name: str, layers: str | None):
    """(fp32 model, its decoder layers to measure: the comma-separated list or every third, the pack's
    calibration ids: 32 x 256 tokens of WikiText-2 test articles 1-16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    src = fetch_model(name, cache / "models" / name, cache_dir=cache)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    n_layers = len(model.model.layers)
    chosen = [int(x) for x in layers.split(",")] if layers else list(range(0, n_layers, 3))
    return model, chosen, calibrate.calibration_ids(tok, TEXT.read_text(encoding="utf-8"), 32, 256, "1-16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", help="comma-separated decoder layers (default: every third)")
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--resummarise", action="store_true",
                    help="recompute the summary of the rows already in --results (no rounding is rerun)")
    a = ap.parse_args()
    if a.resummarise:
        path = Path(a.results)
        out = json.loads(path.read_text())
        for r in out["rows"]:
            r["bpw_saved"] = {k: bpw_saved(k, r["shape"][1]) for k in r["error"]}
        out["summary"] = summarise(out["rows"])
        print_summary(out["summary"])
        path.write_text(json.dumps(out, indent=1))
        return
    model, layers, ids = model_and_calibration(a.model, a.layers)
    t0 = time.perf_counter()
    g = grams(model, ids, layers)
    rows = []
    for (i, name), h in g.items():
        w = model.model.layers[i].get_submodule(name).weight.detach().float()
        var = variants(w.shape[1], a.seed + i)
        for bits in a.bits:
            errs = {k: output_error(w, h, bits, blk, rot) for k, (blk, rot) in var.items()}
            rows.append({"layer": i, "linear": name, "shape": list(w.shape), "bits": bits, "error": errs,
                         "bpw_saved": {k: bpw_saved(k, w.shape[1]) for k in errs}})
            print(i, name, bits, " ".join(f"{k} {v / errs['none']:.3f}" for k, v in errs.items() if k != "none"), flush=True)
    summary = summarise(rows)
    print_summary(summary)
    out = {"model": a.model, "layers": layers, "bits": a.bits, "seed": a.seed, "calibration": "32 x 256, articles 1-16",
           "seconds": time.perf_counter() - t0, "torch": torch.__version__, "summary": summary, "rows": rows}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
