"""Issue 30 ("Track B, uc distill") benchmark: shared-block (FRR) students against a dense baseline of the same
trainable parameter count, and low-rank (ASVD) output heads, all distilled from SmolLM2-135M-Instruct.

    python bench/distill.py                                   # the issue's protocol (hours on a 2-core CPU)
    python bench/distill.py --steps 40 --batch 2 --samples 64 --windows 4 --run-name quick   # a reduced run

Every student trains on WikiText-2 test articles 1-16 only (--samples windows of --seq-len tokens, every window
when 0) with the same token budget and the same number of optimizer steps, from one shared pass of the teacher
(`uc distill --targets`), each in its own process (its training time and peak RSS are its own; --jobs N trains N
at a time, one thread each, and the table says so: their times then include the contention). All rows are
evaluated in this process on the same windows of articles 17-62 (ctx 1024, Track A's windows; --windows N keeps
the first N) against one pass of the teacher. Rows:

- frr-H: one shared block at width H applied scales x iters = 2 x 4 times;
- dense-H: one plain layer at width H: the same body without the loop (its trainable parameters are the frr row's
  minus the 2 x H x 8 gammas and betas);
- frr-H + head-R: the frr row with the output head factored at rank R by ASVD and fine-tuned;
- teacher, no body: the teacher's embeddings, final norm and head with no decoder layer between them (no
  training): what every student keeps of the teacher, so the rows above show what their bodies add;
- teacher + ASVD head R: the teacher's own body with its head factored (no fine-tuning): the head alone;
- teacher + ASVD head R, fine-tuned: the same head trained alone on the teacher targets' head inputs with the
  students' steps, batches and schedule (compressor/lowrank_head.py finetune_head).

Compression is all-in stored bytes (uc eval): the body (everything but the token embeddings and the head) and the
whole model, the teacher's bf16 checkpoint over the student pack. Results go to bench/results/distill.json and
the "distill" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402
from compressor.distiller import DistillConfig  # noqa: E402
from compressor.targets import META_NAME as TARGETS_META  # noqa: E402  (written once the targets are complete)

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "distill.json"
SCALES, ITERS = 2, 4


def rows(widths: list[int], ranks: list[int], block_lr: float | None = None,
         gamma_init: float | None = None) -> list[tuple[str, list[str]]]:
    frr = ["--scales", str(SCALES), "--iters", str(ITERS)]
    frr += ["--block-lr", str(block_lr)] if block_lr is not None else []
    frr += ["--gamma-init", str(gamma_init)] if gamma_init is not None else []
    out = []
    for h in widths:
        out.append((f"frr-{h}", ["--student", "frr", "--width", str(h), *frr]))
        out.append((f"dense-{h}", ["--student", "dense", "--width", str(h), "--layers", "1"]))
    for r in ranks:
        h = max(widths)
        out.append((f"frr-{h} + head-{r}", ["--student", "frr", "--width", str(h), *frr, "--head-rank", str(r)]))
    return out


def teacher_dir(given: str | None) -> Path:
    """--teacher, or SmolLM2-135M-Instruct from `uc fetch-model` (in UC_CACHE)."""
    from compressor.fetch import fetch_model

    if given:
        return Path(given)
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    return fetch_model("smollm2-135m", cache / "models" / "smollm2-135m", cache_dir=cache)


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


class Evaluator:
    """Every row on the same windows of articles 17-62 against one pass of the teacher (made when first needed and
    kept: its head inputs serve the ASVD head rows)."""

    def __init__(self, teacher: Path, windows: int) -> None:
        from compressor.evaluate import EvalConfig, prepare_windows

        self.teacher = teacher
        self.cfg = EvalConfig(ctx=1024, articles="17-62", max_windows=windows or None)
        self.windows = prepare_windows(teacher, TEXT.read_text(encoding="utf-8"), self.cfg)
        self._base = None
        self._teacher_bytes = None
        self.base_seconds = 0.0

    @property
    def base(self):
        from compressor.checkpoint import SourceCheckpoint
        from compressor.evaluate import CheckpointSource, token_stats
        from ucformat.skeleton import Skeleton

        if self._base is None:
            t0 = time.perf_counter()
            self._base = token_stats(Skeleton(self.teacher), CheckpointSource(SourceCheckpoint(self.teacher)),
                                     self.windows, desc="eval teacher", keep=True)
            self.base_seconds = time.perf_counter() - t0
        return self._base

    def summary(self) -> dict:
        return {"ppl": self.base.ppl, "seconds": self.base_seconds, "windows": len(self.windows)}

    def student(self, name: str, pack: Path) -> dict:
        from compressor.checkpoint import SourceCheckpoint
        from compressor.evaluate import PackSource, allin_bytes, compare, token_stats
        from ucformat import PackReader
        from ucformat.skeleton import Skeleton

        reader = PackReader(pack)
        stats = token_stats(Skeleton(pack), PackSource(reader), self.windows, desc=f"eval {name}",
                            reference=self.base)
        r = compare(stats, self.base, self.cfg.ctx, len(self.windows), 0.0)
        r.bytes = allin_bytes(reader, SourceCheckpoint(self.teacher))
        return r.to_dict()

    def teacher_bytes(self, any_pack: Path) -> dict:
        """The teacher's all-in body and whole-model bytes (uc eval's allin_bytes; any student pack will do)."""
        from compressor.checkpoint import SourceCheckpoint
        from compressor.evaluate import allin_bytes
        from ucformat import PackReader

        if self._teacher_bytes is None:
            self._teacher_bytes = allin_bytes(PackReader(any_pack), SourceCheckpoint(self.teacher))
        return self._teacher_bytes

    def no_body(self, any_pack: Path) -> dict:
        """The teacher with no decoder layers: its embeddings, final norm and head alone (what every student keeps
        from the teacher), so the rows above show what their body adds."""
        from compressor.checkpoint import SourceCheckpoint
        from compressor.evaluate import CheckpointSource, compare, token_stats
        from ucformat.skeleton import Skeleton

        source = CheckpointSource(SourceCheckpoint(self.teacher))
        source.num_layers = 0
        stats = token_stats(Skeleton(self.teacher), source, self.windows, progress=False, reference=self.base)
        r = compare(stats, self.base, self.cfg.ctx, len(self.windows), 0.0).to_dict()
        b = self.teacher_bytes(any_pack)
        whole = b["base_whole"] - b["base_body"]
        r["bytes"] = {"pack_body": 0, "pack_whole": whole, "base_body": b["base_body"], "base_whole": b["base_whole"],
                      "body_ratio": None, "whole_ratio": b["base_whole"] / whole}
        return r

    def asvd_heads(self, rank: int, targets: Path, any_pack: Path, tune) -> tuple[dict, dict]:
        """The teacher's own head inputs (kept by the base pass) through an ASVD head of this rank: the head alone as
        factored, and fine-tuned on the teacher targets by compressor.lowrank_head.finetune_head with `tune` (a
        DistillConfig: uc distill's steps, batches and schedule)."""
        from compressor.lowrank_head import asvd_factors, channel_scales, finetune_head
        from compressor.targets import Targets

        t = Targets(targets)
        u, v = asvd_factors(self.base.head[0].float(), channel_scales(t), rank)
        plain = self._head_row(u, v, any_pack)
        u, v, stats = finetune_head(u, v, t, tune)
        tuned = self._head_row(u, v, any_pack)
        tuned["train"] = {"trainable_params": u.numel() + v.numel(), "train_seconds": stats["seconds"],
                          "loss_first": stats["loss_first"], "loss_last": stats["loss_last"]}
        return plain, tuned

    def _head_row(self, u: torch.Tensor, v: torch.Tensor, any_pack: Path) -> dict:
        """The teacher's body with the head u v (stored in bf16) against the teacher, and its all-in bytes."""
        from compressor.checkpoint import SourceCheckpoint
        from compressor.evaluate import TokenStats, compare

        base = self.base
        weight = base.head[0].float()
        u, v = u.bfloat16().float(), v.bfloat16().float()  # as stored
        ids = self.windows[:, 1:].reshape(-1)  # batch 1: predictions are window-major, as token_stats orders them
        nll, top10, kl = [], [], []
        for rows_, tgt in zip(base.normed.split(1024), ids.split(1024)):
            logp = torch.log_softmax(rows_ @ v.T @ u.T, -1)
            ref = torch.log_softmax(rows_ @ weight.T, -1)
            nll.append(-logp.gather(-1, tgt[:, None]).squeeze(-1).double())
            top10.append(logp.topk(10, -1).indices)
            kl.append(F.kl_div(logp, ref, reduction="none", log_target=True).sum(-1).double())
        st = TokenStats(torch.cat(nll), torch.cat(top10), kl=torch.cat(kl), last=base.last)
        r = compare(st, base, self.cfg.ctx, len(self.windows), 0.0).to_dict()
        b = self.teacher_bytes(any_pack)
        extra = (u.numel() + v.numel()) * 2  # u and v in bf16; a tied teacher keeps its embeddings whole
        tied = "lm_head.weight" not in SourceCheckpoint(self.teacher).weight_map
        whole = b["base_whole"] + extra - (0 if tied else weight.numel() * 2)
        r["bytes"] = {"pack_body": b["base_body"], "pack_whole": whole, "base_body": b["base_body"],
                      "base_whole": b["base_whole"], "body_ratio": 1.0, "whole_ratio": b["base_whole"] / whole}
        return r


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 1e5 else f"{x:.1e}"


def render(res: dict) -> str:
    a = res["args"]
    head = ["row", "trainable params", "body x", "whole x", "top-1", "top-10 all", "top-10 last", "top-1 last",
            "PPL ratio", "train s", "peak RSS MiB"]
    lines = []
    for name, ev in res["eval"].items():
        if name.startswith("_"):
            continue
        d = res["distill"].get(name) or ev.get("train", {})
        b = ev["bytes"]
        body = f"{b['body_ratio']:.1f}" if b["body_ratio"] is not None else "no body"
        lines.append([name, f"{d['trainable_params']:,}" if d else "0 (no training)", body,
                      f"{b['whole_ratio']:.2f}", f"{ev['top1_agreement']:.1%}", f"{ev['top10_overlap']:.1%}",
                      f"{ev['top10_overlap_last']:.1%}", f"{ev['top1_agreement_last']:.1%}", ratio(ev["ppl_ratio"]),
                      f"{d['train_seconds']:.0f}" if d else "-",
                      f"{d['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in d else "-"])
    base = res["eval"]["_base"]
    loop_flags = "".join(f" --{k.replace('_', '-')} {a[k]}" for k in ("block_lr", "gamma_init")
                         if a.get(k) is not None)

    def share(v):  # uc distill's default for the loop settings
        return f"{v:g}" if v is not None else f"1/{SCALES * ITERS}"

    text = [f"Run `{res['run']}` on {res['machine']}, {res['date']}.",
            f"`python bench/distill.py --steps {a['steps']} --batch {a['batch']} --seq-len {a['seq_len']} --samples "
            f"{a['samples']} --windows {a['windows']} --lr {a['lr']}{loop_flags}`: every student {a['steps']} AdamW "
            f"steps of {a['batch']} x {a['seq_len']} tokens (peak lr {a['lr']}) on WikiText-2 articles 1-16; evaluated "
            f"on {base['windows']} windows of 1024 tokens of articles 17-62 (teacher PPL {base['ppl']:.2f}). frr: "
            f"scales {SCALES} x iters {ITERS}, the shared block's lr share {share(a.get('block_lr'))}, every "
            f"application's initial gamma {share(a.get('gamma_init'))}."
            + (f" Trained {res['jobs']} rows at a time (`--jobs {res['jobs']}`, one thread each): train s includes the "
               "contention for the machine's memory bandwidth." if res.get("jobs", 1) > 1 else ""),
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
    p.add_argument("--block-lr", type=float, default=None,
                   help="frr rows: uc distill --block-lr (default: uc distill's, 1/(scales x iters))")
    p.add_argument("--gamma-init", type=float, default=None,
                   help="frr rows: uc distill --gamma-init (default: uc distill's, 1/(scales x iters))")
    p.add_argument("--run-name", default="full")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many rows at a time, each its own process (set OMP_NUM_THREADS=1); the first "
                        "row trains alone while it computes the shared teacher targets")
    p.add_argument("--results", default=str(RESULTS),
                   help="the rows' JSON file, kept between runs (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="forget the finished rows of --results")
    p.add_argument("--no-doc", action="store_true")
    a = p.parse_args()
    if a.jobs < 1:
        p.error("--jobs must be at least 1")
    teacher = teacher_dir(a.teacher)
    work = Path(a.work)
    targets = work / "targets"
    protocol = {k: v for k, v in vars(a).items()
                if k not in ("fresh", "no_doc", "work", "teacher", "run_name", "jobs", "results")}
    res = {"run": a.run_name, "args": protocol, "jobs": a.jobs, "distill": {}, "eval": {}}
    results = Path(a.results)
    if results.is_file() and not a.fresh:
        old = json.loads(results.read_text())
        if same_training(old.get("args", {}), protocol):  # the same training protocol: its trained rows stand
            res["distill"] = old["distill"]
            res["jobs"] = max(a.jobs, old.get("jobs", 1))
            if old["args"].get("windows") == a.windows:  # and the same windows: its evaluated rows too
                res["eval"] = {k: v for k, v in old["eval"].items() if k in old["distill"]}
            print(f"kept {len(res['distill'])} trained and {len(res['eval'])} evaluated rows of {results.name} "
                  "(--fresh starts over)", flush=True)
    res.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    table_rows = rows(a.widths, a.ranks, a.block_lr, a.gamma_init)
    packs = {name: work / name.replace(" ", "").replace("+", "_") for name, _ in table_rows}
    todo = [(n, f) for n, f in table_rows if not (n in res["distill"] and (packs[n] / "manifest.json").is_file())]

    def train(name: str, flags: list[str]) -> tuple[str, dict]:
        print(f"distill {name} ...", flush=True)
        return name, distill_row(teacher, packs[name], flags, a, targets)

    def keep(name: str, d: dict) -> None:  # each row kept as it finishes: a long run spans sessions
        res["distill"][name] = d
        res["eval"].pop(name, None)
        print(f"  {name}: {d['train_seconds']:.0f}s  loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}", flush=True)
        save(res, results)

    if todo and a.jobs > 1 and not (targets / TARGETS_META).is_file():
        keep(*train(*todo.pop(0)))  # alone: it writes the teacher targets the others read
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for fut in as_completed([pool.submit(train, n, f) for n, f in todo]):
            keep(*fut.result())
    ev = Evaluator(teacher, a.windows)  # then every row against one pass of the teacher
    for name, pack in packs.items():
        if name not in res["eval"]:
            res["eval"][name] = ev.student(name, pack)
            res["eval"]["_base"] = ev.summary()
            save(res, results)
    res["eval"]["teacher, no body (embeddings, norm, head)"] = ev.no_body(next(iter(packs.values())))
    tune = DistillConfig(steps=a.steps, batch=a.batch, lr=a.lr, seed=0)  # uc distill's schedule for the rows above
    for r in a.ranks:
        plain, tuned = ev.asvd_heads(r, targets, next(iter(packs.values())), tune)
        res["eval"][f"teacher + ASVD head-{r}"] = plain
        res["eval"][f"teacher + ASVD head-{r}, fine-tuned"] = tuned
    res["eval"]["_base"] = ev.summary()
    save(res, results)
    body = render(res)
    print(body)
    if not a.no_doc:
        write_section("distill", body)


def same_training(old: dict, new: dict) -> bool:
    """Whether two runs' arguments train the same students (--windows changes only the evaluation)."""
    return {k: v for k, v in old.items() if k != "windows"} == {k: v for k, v in new.items() if k != "windows"}


def save(res: dict, path: Path = RESULTS) -> None:
    """Atomically: an interrupted run leaves the last finished row's file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
