"""Issue 30 ("Track B, uc distill") benchmark: shared-block (FRR) students against a dense baseline of the same
trainable parameter count, and low-rank (ASVD) output heads, all distilled from SmolLM2-135M-Instruct.

    python bench/distill.py                                   # the issue's protocol (hours on a 2-core CPU)
    python bench/distill.py --steps 40 --batch 2 --samples 64 --windows 4 --run-name quick   # a reduced run

Every student trains on WikiText-2 test articles 1-16 only (--samples windows of --seq-len tokens, every window
when 0) with the same token budget and the same number of optimizer steps, from one shared pass of the teacher
(`uc distill --targets`), each in its own process (its training time and peak RSS are its own). All rows are
evaluated in this process on the same windows of articles 17-62 (ctx 1024, Track A's windows; --windows N keeps
the first N) against one pass of the teacher. Rows:

- frr-H: one shared block at width H applied scales x iters = 2 x 4 times;
- dense-H: one plain layer at width H: the same body without the loop (its trainable parameters are the frr row's
  minus the 2 x H x 8 gammas and betas);
- frr-H + head-R: the frr row with the output head factored at rank R by ASVD and fine-tuned;
- teacher + ASVD head R: the teacher's own body with its head factored (no fine-tuning): the head alone.

Compression is all-in stored bytes (uc eval): the body (everything but the token embeddings and the head) and the
whole model, the teacher's bf16 checkpoint over the student pack. Results go to bench/results/distill.json and
the "distill" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "distill.json"
SCALES, ITERS = 2, 4


def rows(widths: list[int], ranks: list[int]) -> list[tuple[str, list[str]]]:
    out = []
    for h in widths:
        out.append((f"frr-{h}", ["--student", "frr", "--width", str(h), "--scales", str(SCALES), "--iters", str(ITERS)]))
        out.append((f"dense-{h}", ["--student", "dense", "--width", str(h), "--layers", "1"]))
    for r in ranks:
        h = max(widths)
        out.append((f"frr-{h} + head-{r}", ["--student", "frr", "--width", str(h), "--scales", str(SCALES),
                                              "--iters", str(ITERS), "--head-rank", str(r)]))
    return out


def distill_row(teacher: Path, dst: Path, flags: list[str], a, targets: Path) -> dict:
    cmd = [sys.executable, "-m", "uc", "distill", str(teacher), str(dst), *flags, "--calib", str(TEXT),
           "--calib-articles", "1-16", "--calib-samples", str(a.samples), "--seq-len", str(a.seq_len),
           "--steps", str(a.steps), "--batch", str(a.batch), "--lr", str(a.lr), "--seed", "0",
           "--targets", str(targets), "--json", "-q"]
    if dst.exists():
        shutil.rmtree(dst)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def evaluate_rows(teacher: Path, packs: dict[str, Path], a, targets: Path) -> dict[str, dict]:
    from compressor.checkpoint import SourceCheckpoint
    from compressor.evaluate import (CheckpointSource, EvalConfig, PackSource, TokenStats, allin_bytes, compare,
                                     prepare_windows, token_stats)
    from compressor.lowrank_head import asvd_factors, channel_scales
    from compressor.targets import Targets
    from ucformat import PackReader
    from ucformat.skeleton import Skeleton

    cfg = EvalConfig(ctx=1024, articles="17-62", max_windows=a.windows or None)
    windows = prepare_windows(teacher, TEXT.read_text(encoding="utf-8"), cfg)
    t0 = time.perf_counter()
    base = token_stats(Skeleton(teacher), CheckpointSource(SourceCheckpoint(teacher)), windows, desc="eval teacher",
                       keep=True)
    base_seconds = time.perf_counter() - t0
    out = {}
    for name, pack in packs.items():
        reader = PackReader(pack)
        stats = token_stats(Skeleton(pack), PackSource(reader), windows, desc=f"eval {name}", reference=base)
        r = compare(stats, base, cfg.ctx, len(windows), 0.0)
        r.bytes = allin_bytes(reader, SourceCheckpoint(teacher))
        out[name] = r.to_dict()
    # the ASVD head alone: the teacher's own head inputs (kept by the base pass) through u v
    weight, _ = base.head
    scales = channel_scales(Targets(targets))
    ids = windows[:, 1:].reshape(-1)  # batch 1: predictions are window-major, as token_stats orders them
    teacher_bytes = allin_bytes(PackReader(next(iter(packs.values()))), SourceCheckpoint(teacher))
    for rank in a.ranks:
        u, v = asvd_factors(weight.float(), scales, rank)
        u, v = u.bfloat16().float(), v.bfloat16().float()  # as stored
        nll, top10, kl = [], [], []
        for rows_, tgt in zip(base.normed.split(1024), ids.split(1024)):
            logp = torch.log_softmax(rows_ @ v.T @ u.T, -1)
            ref = torch.log_softmax(rows_ @ weight.float().T, -1)
            nll.append(-logp.gather(-1, tgt[:, None]).squeeze(-1).double())
            top10.append(logp.topk(10, -1).indices)
            kl.append(F.kl_div(logp, ref, reduction="none", log_target=True).sum(-1).double())
        st = TokenStats(torch.cat(nll), torch.cat(top10), kl=torch.cat(kl), last=base.last)
        r = compare(st, base, cfg.ctx, len(windows), 0.0).to_dict()
        extra = rank * sum(weight.shape) * 2  # u and v in bf16; a tied teacher keeps its embeddings whole
        tied = "lm_head.weight" not in SourceCheckpoint(teacher).weight_map
        whole = teacher_bytes["base_whole"] + extra - (0 if tied else weight.numel() * 2)
        r["bytes"] = {"pack_body": teacher_bytes["base_body"], "pack_whole": whole,
                      "base_body": teacher_bytes["base_body"], "base_whole": teacher_bytes["base_whole"],
                      "body_ratio": 1.0, "whole_ratio": teacher_bytes["base_whole"] / whole}
        out[f"teacher + ASVD head-{rank}"] = r
    out["_base"] = {"ppl": base.ppl, "seconds": base_seconds, "windows": len(windows)}
    return out


def render(res: dict) -> str:
    a = res["args"]
    head = ["row", "trainable params", "body x", "whole x", "top-1", "top-10 all", "top-10 last", "top-1 last",
            "PPL ratio", "train s", "peak RSS MiB"]
    lines = []
    for name, ev in res["eval"].items():
        if name.startswith("_"):
            continue
        d = res["distill"].get(name, {})
        b = ev["bytes"]
        lines.append([name, f"{d['trainable_params']:,}" if d else "0 (no training)", f"{b['body_ratio']:.1f}",
                      f"{b['whole_ratio']:.2f}", f"{ev['top1_agreement']:.1%}", f"{ev['top10_overlap']:.1%}",
                      f"{ev['top10_overlap_last']:.1%}", f"{ev['top1_agreement_last']:.1%}", f"{ev['ppl_ratio']:.2f}",
                      f"{d['train_seconds']:.0f}" if d else "-",
                      f"{d['peak_rss_bytes'] / 2**20:.0f}" if d else "-"])
    base = res["eval"]["_base"]
    text = [f"Run `{res['run']}` on {res['machine']}, {res['date']}.",
            f"`python bench/distill.py --steps {a['steps']} --batch {a['batch']} --seq-len {a['seq_len']} --samples "
            f"{a['samples']} --windows {a['windows']}`: every student {a['steps']} AdamW steps of {a['batch']} x "
            f"{a['seq_len']} tokens (lr {a['lr']}) on WikiText-2 articles 1-16; evaluated on {base['windows']} windows "
            f"of 1024 tokens of articles 17-62 (teacher PPL {base['ppl']:.2f}). frr: scales {SCALES} x iters {ITERS}.",
            "", table(head, lines)]
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: uc fetch-model smollm2-135m)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=0, help="training windows; 0 = every window of articles 1-16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 256])
    p.add_argument("--windows", type=int, default=0, help="evaluate the first N windows only; 0 = all")
    p.add_argument("--work", default=str(ROOT / "work" / "bench-distill"))
    p.add_argument("--run-name", default="full")
    p.add_argument("--no-doc", action="store_true")
    a = p.parse_args()
    from compressor.fetch import fetch_model

    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    teacher = Path(a.teacher) if a.teacher else fetch_model("smollm2-135m", cache / "models" / "smollm2-135m",
                                                              cache_dir=cache)
    work = Path(a.work)
    targets = work / "targets"
    res = {"run": a.run_name, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "args": vars(a), "distill": {}, "eval": {}}
    packs = {}
    for name, flags in rows(a.widths, a.ranks):
        dst = work / name.replace(" ", "").replace("+", "_")
        print(f"distill {name} ...", flush=True)
        res["distill"][name] = distill_row(teacher, dst, flags, a, targets)
        print(f"  {res['distill'][name]['train_seconds']:.0f}s  loss {res['distill'][name]['loss_first']:.3f} -> "
              f"{res['distill'][name]['loss_last']:.3f}", flush=True)
        packs[name] = dst
    res["eval"] = evaluate_rows(teacher, packs, a, targets)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    body = render(res)
    print(body)
    if not a.no_doc:
        write_section("distill", body)


if __name__ == "__main__":
    main()
