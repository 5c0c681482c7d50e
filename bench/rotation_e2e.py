"""Incoherence processing measured on the whole model, not per linear: would Hadamard rotation of every
linear's input dimension move the perplexity ratio and top-1 agreement of a budgeted pack?

    python bench/rotation_e2e.py --pack work/sweep/smollm2-135m-5-noe2e

bench/rotation_proxy.py measured each linear's output error alone. Here every quantized linear of the
model is re-rounded at the code width the pack's allocator gave it, twice, with the same codec (GSQ grid
fitted with column weights, fp16 absmax scales per 64 weights, GPTQ against the fp model's input Gram
matrix on the pack's 32 x 256 calibration tokens, articles 1-16):
  control   W as it is
  h64       W R, R = random signs times 64-point Hadamard blocks; dequantized and rotated back (x R^T)
The pack's overlay rows are put back to their original values in both (the pack stores them at 8 bits);
low-rank factors are left out of both (the pack gives them to a few tensors). Then the fp model, the pack
as stored, the control and the rotated model run over the quality-a windows (WikiText-2 test articles
17-62, 12 windows of 1024 tokens), reporting KL to the fp model, the perplexity ratio and top-1 agreement.
No format change: the rotated weights are dequantized to dense float32 for the measurement. About 30
minutes on 2 cores for SmolLM2. Results: bench/results/rotation_e2e.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.alloc_check import measure, teacher_logprobs  # noqa: E402
from bench.rotation_proxy import block_hadamard, grams  # noqa: E402
from compressor import calibrate  # noqa: E402
from compressor.evaluate import make_windows, wikitext_articles  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from compressor.qweight import quantize_matrix  # noqa: E402
from ucformat import PackReader  # noqa: E402
from ucformat.manifest import layer_file  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "rotation_e2e.json"
BLOCK = 64


def reround(w: torch.Tensor, h: torch.Tensor, bits: int, rot: torch.Tensor | None) -> torch.Tensor:
    """GPTQ rounding of w (rotated by rot when given) at `bits`, dequantized back to w's basis."""
    if rot is None:
        return quantize_matrix(w, bits, BLOCK, "gsq", h).weight()
    r = rot.float()
    return quantize_matrix(w @ r, bits, BLOCK, "gsq", r.T @ h @ r).weight() @ r.T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    src = fetch_model(a.model, cache / "models" / a.model, cache_dir=cache)
    tok = AutoTokenizer.from_pretrained(str(src))
    text = TEXT.read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    reader = PackReader(a.pack)
    prefix = reader.manifest.layer_prefix
    params = dict(model.named_parameters())
    names = [n for n, e in reader.manifest.tensors.items() if e.kind == "quantized"]
    orig = {n: params[n].detach().clone() for n in names}

    t0 = time.perf_counter()
    ids = calibrate.calibration_ids(tok, text, 32, 256, "1-16")
    g = grams(model, ids, list(range(reader.num_layers)))
    variants = {"pack": {}, "control": {}, "h64": {}}
    for i in range(reader.num_layers):
        stored = reader.layer_state_dict(i, torch.float32)
        parts = reader.read_parts(layer_file(i))
        for n in names:
            if not n.startswith(f"{prefix}{i}."):
                continue
            path = n.removeprefix(f"{prefix}{i}.").removesuffix(".weight")
            w, h, q = orig[n].float(), g[(i, path)].float(), parts[n]
            variants["pack"][n] = stored[n]
            for k, rot in (("control", None), ("h64", block_hadamard(w.shape[1], BLOCK, a.seed + i))):
                d = reround(w, h, q.bits, rot)
                if q.ov_rows is not None:
                    rows = q.ov_rows.long()
                    d[rows] = w[rows]
                variants[k][n] = d
        print(f"layer {i} rounded ({time.perf_counter() - t0:.0f} s)", flush=True)
    rounding_s = time.perf_counter() - t0

    windows = make_windows(tok, wikitext_articles(text.replace("\r\n", "\n"), "17-62"), 1024, a.windows)
    teacher, base_nll = teacher_logprobs(model, windows)
    out = {"pack": str(a.pack), "windows": len(windows), "rounding_seconds": rounding_s, "ppl_base": math.exp(base_nll),
           "rows": {}}
    for k, weights in variants.items():
        with torch.no_grad():
            for n in names:
                params[n].copy_(weights[n])
        m = measure(model, windows, teacher)
        m["ppl_ratio"] = math.exp(m["nll"] - base_nll)
        out["rows"][k] = m
        print(k, json.dumps(m), flush=True)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
