"""The learning-rate study behind `uc distill`'s defaults (issue 30): is the frr student's loss to the dense
baseline a property of the loop, or of a learning rate tuned for neither?

    python bench/distill_lr.py                          # frr-128 and dense-128, the grid below (~1 h, 1 thread)
    python bench/distill_lr.py --lrs 3e-3 --block-lrs 1 --steps 10 --windows 1 --no-doc   # a smoke run

A frr student applies one shared block scales x iters = 8 times, so one optimizer step moves all eight
applications at once: with the same AdamW step size as a plain layer, its function moves about eight times as
far; and with every gamma at 1 the untrained loop starts as eight whole updates of a random block. The grid
crosses the peak learning rate (--lrs) with every application's initial gamma (--gammas, `uc distill
--gamma-init`) and the shared block's share of the learning rate (--block-lrs, `uc distill --block-lr`), and
trains the dense baseline at the same learning rates. Every row: the same training
windows, steps, batch and seed (bench/distill.py's protocol, shortened), evaluated on the first --windows windows of
articles 17-62. Rows are kept in bench/results/distill_lr.json as they finish (a rerun skips them; --fresh starts
over). Writes the "distill-lr" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.distill import ITERS, SCALES, Evaluator, distill_row, save, teacher_dir  # noqa: E402
from bench.report import machine, table, write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "distill_lr.json"


def grid(a) -> list[tuple[str, float, list[str]]]:
    out = []
    for lr in a.lrs:
        for gamma in a.gammas:
            for share in a.block_lrs:
                out.append((f"frr-{a.width} lr {lr:g} gamma {gamma:g} block x{share:g}", lr,
                            ["--student", "frr", "--width", str(a.width), "--scales", str(SCALES), "--iters",
                             str(ITERS), "--gamma-init", str(gamma), "--block-lr", str(share)]))
        out.append((f"dense-{a.width} lr {lr:g}", lr,
                    ["--student", "dense", "--width", str(a.width), "--layers", "1"]))
    return out


def render(res: dict) -> str:
    a = res["args"]
    head = ["row", "peak lr", "initial gamma", "block share", "train loss first -> last", "top-1", "top-10 all",
            "PPL ratio", "train s"]
    lines = []
    for name, row in res["rows"].items():
        d, ev = row["distill"], row["eval"]
        frr = name.startswith("frr")
        lines.append([name, f"{row['lr']:g}", f"{row['gamma']:g}" if frr else "-",
                      f"{row['block_lr']:g}" if frr else "-",
                      f"{d['loss_first']:.3f} -> {d['loss_last']:.3f}", f"{ev['top1_agreement']:.1%}",
                      f"{ev['top10_overlap']:.1%}", f"{ev['ppl_ratio']:.2f}", f"{d['train_seconds']:.0f}"])
    cmd = (f"python bench/distill_lr.py --width {a['width']} --steps {a['steps']} --batch {a['batch']} --seq-len "
           f"{a['seq_len']} --samples {a['samples']} --windows {a['windows']} --lrs {' '.join(map(str, a['lrs']))} "
           f"--gammas {' '.join(map(str, a['gammas']))} --block-lrs {' '.join(map(str, a['block_lrs']))}")
    return "\n".join([f"Last row run on {res['machine']}, {res['date']}, one thread per process.",
                      f"`{cmd}`: every row {a['steps']} AdamW steps of {a['batch']} x {a['seq_len']} tokens on WikiText-2 "
                      f"articles 1-16 ({a['samples']} windows), warmup 10 steps then cosine decay to 10% of the peak "
                      f"learning rate; evaluated on {a['windows']} windows of 1024 tokens of articles 17-62 (teacher "
                      f"PPL {res['teacher_ppl']:.2f}). frr: scales {SCALES} x iters {ITERS}; block share: the shared "
                      "block's learning rate as a share of the peak (`uc distill --block-lr`).", "", table(head, lines)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: uc fetch-model smollm2-135m)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--gammas", type=float, nargs="+", default=[1.0, 0.125], help="frr: initial gammas")
    p.add_argument("--block-lrs", type=float, nargs="+", default=[1.0, 0.125], help="frr: the block's lr shares")
    p.add_argument("--work", default=str(ROOT / "work" / "bench-distill-lr"))
    p.add_argument("--fresh", action="store_true", help="forget the finished rows")
    p.add_argument("--no-doc", action="store_true")
    a = p.parse_args()
    teacher = teacher_dir(a.teacher)
    work = Path(a.work)
    targets = work / "targets"
    args = {k: v for k, v in vars(a).items() if k not in ("fresh", "no_doc", "work", "teacher")}
    res = {"args": args, "rows": {}}
    if RESULTS.is_file() and not a.fresh:
        old = json.loads(RESULTS.read_text())
        if {k: old["args"].get(k) for k in ("width", "steps", "batch", "seq_len", "samples", "windows")} == \
                {k: args[k] for k in ("width", "steps", "batch", "seq_len", "samples", "windows")}:
            res["rows"] = old["rows"]  # the same protocol: its rows stand
            res.update({k: old[k] for k in ("teacher_ppl", "machine", "date") if k in old})
    ev = Evaluator(teacher, a.windows)
    for name, lr, flags in grid(a):
        if name in res["rows"]:
            continue
        dst = work / name.replace(" ", "_")
        print(f"distill {name} ...", flush=True)
        d = distill_row(teacher, dst, flags, argparse.Namespace(**{**vars(a), "lr": lr}), targets)
        r = ev.student(name, dst)
        def flag(f: str) -> float:
            return float(flags[flags.index(f) + 1]) if f in flags else 0.0

        res["rows"][name] = {"lr": lr, "gamma": flag("--gamma-init"), "block_lr": flag("--block-lr"), "distill": d,
                             "eval": r}
        res.update(teacher_ppl=ev.summary()["ppl"], machine=machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))  # of the last row run
        print(f"  loss {d['loss_first']:.3f} -> {d['loss_last']:.3f}  top-1 {r['top1_agreement']:.1%}  "
              f"PPL ratio {r['ppl_ratio']:.2f}", flush=True)
        save(res, RESULTS)
    args_order = {name: i for i, (name, _, _) in enumerate(grid(a))}
    res["rows"] = dict(sorted(res["rows"].items(), key=lambda kv: args_order.get(kv[0], len(args_order))))
    body = render(res)
    print(body)
    if not a.no_doc:
        write_section("distill-lr", body)


if __name__ == "__main__":
    main()
