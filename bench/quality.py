"""Codec quality on the real models: every (model, codec, bits) row on the same WikiText-2 windows.

    python bench/quality.py                       # both models, bits 3 4 5 6 8, codecs gsq + uniform
    python bench/quality.py --models smollm2-135m --bits 4 5 --windows 4

Each pack runs in its own `uc pack` process (so its peak RSS is its own); evaluation runs here, the base
model once per model. Writes bench/results/quality.jsonl (one row per line; --resume skips rows already there) and the "quality" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402
from compressor.checkpoint import SourceCheckpoint  # noqa: E402
from compressor.evaluate import CheckpointSource, EvalConfig, PackSource, compare, prepare_windows, token_stats  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat import PackReader  # noqa: E402
from ucformat.skeleton import Skeleton  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def run_pack(src: Path, dst: Path, bits: int, codec: str, keep: bool = False) -> dict:
    """`uc pack` in its own process (its peak RSS is its own); returns its --json result."""
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-m", "uc", "pack", str(src), str(dst), "--bits", str(bits), "--codec", codec,
                          "--json", "-q"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    if not keep:
        shutil.rmtree(dst, ignore_errors=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 4, 5, 6, 8])
    ap.add_argument("--codecs", nargs="+", default=["gsq", "uniform"])
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--work", default=str(ROOT / "work" / "bench"))
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    ap.add_argument("--resume", action="store_true", help="keep rows already in bench/results/quality.jsonl")
    ap.add_argument("--doc-only", action="store_true", help="only rewrite the docs section from quality.jsonl")
    ap.add_argument("--refresh-pack", action="store_true",
                    help="re-run only the packs of the rows already there, updating pack time and peak memory "
                         "(quality numbers are deterministic; timings want an idle machine)")
    a = ap.parse_args()
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    work = Path(a.work)
    cfg = EvalConfig(ctx=a.ctx, max_windows=a.windows, articles="17-62")
    rows_file = ROOT / "bench" / "results" / "quality.jsonl"
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if a.resume and rows_file.exists() else []
    done = {(r["model"], r["codec"], r["bits"]) for r in rows}
    if a.refresh_pack or a.doc_only:
        rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
        for row in [] if a.doc_only else rows:
            src = cache / "models" / row["model"]
            dst = work / f"{row['model']}-{row['codec']}{row['bits']}"
            p = run_pack(src, dst, row["bits"], row["codec"])
            row.update(pack_seconds=p["seconds"], peak_rss_bytes=p["peak_rss_bytes"],
                       baseline_rss_bytes=p["baseline_rss_bytes"])
            print(json.dumps(row), flush=True)
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        a.resume, done = True, {(r["model"], r["codec"], r["bits"]) for r in rows}
    elif not a.resume:
        rows_file.write_text("")
    for model in a.models:
        src = fetch_model(model, cache / "models" / model, cache_dir=cache)
        windows = None
        base = None
        for codec in a.codecs:
            for bits in a.bits:
                if (model, codec, bits) in done:
                    continue
                dst = work / f"{model}-{codec}{bits}"
                p = run_pack(src, dst, bits, codec, keep=True)
                if windows is None:
                    windows = prepare_windows(dst, TEXT.read_text(encoding="utf-8"), cfg)
                    sk = Skeleton(dst)
                    base = token_stats(sk, CheckpointSource(SourceCheckpoint(src)), windows, progress=False)
                t0 = time.perf_counter()
                st = token_stats(Skeleton(dst), PackSource(PackReader(dst)), windows, progress=False)
                r = compare(st, base, cfg.ctx, len(windows), time.perf_counter() - t0)
                row = {"model": model, "codec": codec, "bits": bits, "bpw_allin": p["bpw_allin"],
                       "pack_bytes": p["pack_bytes"], "source_bytes": p["source_bytes"],
                       "pack_seconds": p["seconds"], "peak_rss_bytes": p["peak_rss_bytes"],
                       "baseline_rss_bytes": p["baseline_rss_bytes"], **r.to_dict()}
                rows.append(row)
                print(json.dumps(row), flush=True)
                with rows_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                shutil.rmtree(dst, ignore_errors=True)
    if a.no_doc:
        return
    body = [
        f"Command: `python bench/quality.py --windows {a.windows}` on {machine()}"
        + ("; pack time and peak memory then re-measured by `python bench/quality.py --refresh-pack` with the "
           "machine otherwise idle." if a.refresh_pack else "."),
        f"WikiText-2 raw test, articles 17-62 (CRLF normalised to LF), {a.windows} non-overlapping windows of "
        f"{a.ctx} tokens (the same windows for every row of a model), predictions on every position after the "
        "first. bpw_allin counts codes + fp16 scales + fp32 grids of every quantized linear. Peak RSS is the "
        "whole `uc pack` process; \"above libs\" subtracts what the process held before reading any weight "
        "(Python, torch, transformers: about 400 MiB), i.e. the job's own memory.",
        "",
        table(["model", "codec", "bits", "bpw_allin", "PPL base", "PPL pack", "ratio", "top-1", "top-10", "pack size",
               "pack s", "peak RSS (above libs)"],
              [[r["model"], r["codec"], r["bits"], f"{r['bpw_allin']:.3f}", f"{r['ppl_base']:.3f}", f"{r['ppl']:.3f}",
                f"{r['ppl_ratio']:.4f}", f"{r['top1_agreement']:.1%}", f"{r['top10_overlap']:.1%}",
                f"{r['pack_bytes'] / 2**20:.1f} MiB", f"{r['pack_seconds']:.0f}" if "baseline_rss_bytes" in r else f"({r['pack_seconds']:.0f})",
                f"{r['peak_rss_bytes'] / 2**20:.0f} MiB ({(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:.0f})"
                if "baseline_rss_bytes" in r else "not measured"]
               for r in rows]),
    ]
    if any("baseline_rss_bytes" not in r for r in rows):
        body += ["", "Rows without a peak RSS were packed before the memory measurement was fixed (ru_maxrss is "
                 "inherited across fork+exec, so a child reported its parent's size); their pack seconds, in "
                 "parentheses, were measured with 3-5 other jobs on the 2 cores. Rerun `python bench/quality.py "
                 "--refresh-pack` on an idle machine to measure both again (the quality columns are deterministic)."]
    write_section("quality", "\n".join(body))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
