"""`uc distill`: the compressor's command registered into `uc` as a plugin (uc/cli.py, PLUGINS).
Defaults come from compressor.distiller.DistillConfig."""

from __future__ import annotations

import json

from .train_state import TrainStateError

ERRORS = (TrainStateError,)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_distill(a) -> int:
    from .distiller import DistillConfig, distill

    cfg = DistillConfig(student=a.student, width=a.width, scales=a.scales, iters=a.iters, layers=a.layers, ffn=a.ffn,
                        head_rank=a.head_rank,
                        calib=a.calib, articles=a.calib_articles, seq_len=a.seq_len, samples=a.calib_samples,
                        steps=a.steps, batch=a.batch, lr=a.lr, block_lr=a.block_lr, gamma_init=a.gamma_init,
                        warmup=a.warmup, seed=a.seed, topk=a.topk,
                        hidden_weight=a.hidden_weight, align_points=a.align_points,
                        tune_teacher_parts=a.tune_teacher_parts, save_every=a.save_every, spill_mb=a.spill_mb,
                        device=a.device)
    r = distill(a.src, a.dst, cfg, resume=a.resume, progress=not a.quiet, targets_dir=a.targets)
    if a.json:
        print(json.dumps({"path": str(r.path), "steps_done": r.steps_done, "steps_resumed": r.steps_resumed,
                          "seconds": r.seconds, "train_seconds": r.train_seconds, "target_seconds": r.target_seconds,
                          "trainable_params": r.trainable_params, "loss_first": r.loss_first, "loss_last": r.loss_last,
                          "peak_rss_bytes": r.peak_rss_bytes, **r.stats}))
        return 0
    s = r.stats
    print(f"distilled {a.src} -> {r.path} in {r.seconds:.1f}s ({r.steps_done} steps run, {r.steps_resumed} resumed; "
          f"teacher targets {r.target_seconds:.1f}s, training {r.train_seconds:.1f}s)")
    loss = f"loss {r.loss_first:.4f} -> {r.loss_last:.4f}" if r.loss_first is not None else "no step run"
    print(f"  {cfg.student} student, {r.trainable_params:,} trainable params; {loss}")
    print(f"  body {_size(s['body_bytes'])} (teacher's {_size(s['teacher_body_bytes'])}, {s['body_ratio']:.1f}x)  "
          f"whole {_size(s['whole_bytes'])} (teacher's {_size(s['teacher_whole_bytes'])}, {s['whole_ratio']:.2f}x)  "
          f"peak RSS {_size(r.peak_rss_bytes)}")
    return 0


def register(sub) -> None:
    from .distiller import DistillConfig

    D = DistillConfig()
    s = sub.add_parser("distill", help="train a small student (shared-block frr or dense) from a teacher checkpoint",
                       description="Distil SRC (an HF safetensors checkpoint of a Llama-style model) into a student "
                       "pack DST (ucformat/SPEC.md section 8): the teacher's targets are computed once, one layer at a "
                       "time, and spilled to DST/.uc-work; the student keeps the teacher's embeddings, final norm and "
                       "head (frozen) around a new body. Interrupted? Run the same command with --resume.")
    s.add_argument("src")
    s.add_argument("dst")
    g = s.add_argument_group("student")
    g.add_argument("--student", choices=("frr", "dense"), default=D.student,
                   help="frr: one shared block applied scales x iters times, each with its own gamma/beta; "
                   "dense: --layers distinct layers (the baseline) (default %(default)s)")
    g.add_argument("--width", type=int, default=D.width, help="hidden size, a multiple of 64 (default %(default)s)")
    g.add_argument("--scales", type=int, default=D.scales, help="frr: scales S (default %(default)s)")
    g.add_argument("--iters", type=int, default=D.iters, help="frr: iterations per scale I (default %(default)s)")
    g.add_argument("--layers", type=int, default=D.layers, help="dense: layers (default %(default)s)")
    g.add_argument("--ffn", type=int, default=D.ffn, help="MLP width; 0 = 8*width/3 rounded up to 64 (default)")
    g.add_argument("--head-rank", type=int, default=D.head_rank, help="factor the output head at this rank by "
                   "activation-aware SVD and fine-tune it with the body; 0 = the teacher's head, frozen (default)")
    g = s.add_argument_group("training")
    g.add_argument("--calib", metavar="FILE", help="training text (UTF-8); required")
    g.add_argument("--calib-articles", help="keep only these WikiText articles of FILE, e.g. 1-16")
    g.add_argument("--calib-samples", type=int, default=D.samples,
                   help="training sequences, evenly spaced over the text; 0 = every window (default)")
    g.add_argument("--seq-len", type=int, default=D.seq_len, help="tokens per sequence (default %(default)s)")
    g.add_argument("--steps", type=int, default=D.steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch", type=int, default=D.batch, help="sequences per step (default %(default)s)")
    g.add_argument("--lr", type=float, default=D.lr, help="peak AdamW learning rate (default %(default)s)")
    g.add_argument("--block-lr", type=float, default=None, help="frr: the shared block's learning rate as a share of "
                   "--lr (one step of the block moves all scales x iters applications); default 1/(scales x iters)")
    g.add_argument("--gamma-init", type=float, default=None, help="frr: every application's initial gamma; default "
                   "1/(scales x iters): the loop starts as one layer's worth of update")
    g.add_argument("--warmup", type=int, default=D.warmup, help="linear warmup steps before the cosine decay "
                   "(default %(default)s)")
    g.add_argument("--seed", type=int, default=D.seed, help="initialisation and batch order (default %(default)s)")
    g.add_argument("--topk", type=int, default=D.topk, help="teacher tokens per position in the KL (default %(default)s)")
    g.add_argument("--hidden-weight", type=float, default=D.hidden_weight,
                   help="weight of the hidden-state alignment term; 0 = KL only (default %(default)s)")
    g.add_argument("--align-points", type=int, default=D.align_points,
                   help="alignment points of that term; 0 = scales (frr) or 1 (dense) (default %(default)s)")
    g.add_argument("--tune-teacher-parts", action="store_true",
                   help="also train the teacher's embeddings, final norm and head (frozen by default)")
    g.add_argument("--save-every", type=int, default=D.save_every, help="steps between training-state saves "
                   "(default %(default)s)")
    g.add_argument("--spill-mb", type=int, default=D.spill_mb, help="teacher activations kept in memory before "
                   "spilling to disk (default %(default)s)")
    g.add_argument("--targets", metavar="DIR", help="keep the teacher targets in DIR and reuse them when they match "
                   "(several students of one teacher; default: inside DST, removed when done)")
    s.add_argument("--device", default=D.device, help="cpu or cuda (default %(default)s)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_distill)
