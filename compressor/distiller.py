"""`uc distill SRC DST`: train a small student (ucformat/student.py) to imitate a teacher checkpoint and write
it as a student pack (SPEC.md section 8).

    1. training sequences: the calibration text (optionally some WikiText articles), cut into windows;
    2. teacher targets (targets.py): streamed through the teacher one layer at a time, spilled to DST/.uc-work;
    3. the student: the teacher's embeddings, final norm and head (frozen unless `tune_teacher_parts`) around a
       new body (`frr`: one shared block applied scales * iters times; `dense`: `layers` distinct layers);
    4. `steps` AdamW steps of `batch` sequences on the loss of objective.py, with linear warmup and cosine decay;
       the batch of step t is a function of (seed, t), and the state is saved every `save_every` steps
       (train_state.py), so a resumed run ends where an uninterrupted one does;
    5. the pack, written by ucformat's PackWriter (manifest last); DST/.uc-work is removed.
DST is an unfinished pack from the first moment (its journal is written first): readers refuse it until the
manifest exists, and `--resume` continues it.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ucformat.student import KINDS, StudentConfig, StudentForCausalLM
from ucformat.writer import PackWriter

from . import objective, rss, train_state
from .calibrate import calibration_ids
from .checkpoint import CheckpointError, SourceCheckpoint
from .evaluate import make_windows, wikitext_articles
from .targets import TargetSpec, Targets, align_depths, compute

WORK_DIR = ".uc-work"
STATE_NAME = "train-state.safetensors"
TEACHER_PARTS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.norm.weight")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")  # teachers whose final norm is x * w / rms(x), as the student's
HEAD_DIM = 64
SHARED_PREFIX = "model.shared."  # a frr student's shared block (ucformat/student.py)
FINAL_LR = 0.1  # cosine decay to this share of the peak learning rate


@dataclass(frozen=True)
class DistillConfig:
    student: str = "frr"  # frr | dense
    width: int = 256  # the student's hidden size H
    scales: int = 2  # frr: S
    iters: int = 4  # frr: I (S * I applications of the shared block)
    layers: int = 2  # dense: L
    ffn: int = 0  # MLP width; 0 = 8H/3 rounded up to a multiple of 64
    head_rank: int = 0  # > 0: the output head factored at this rank by ASVD (lowrank_head.py) and fine-tuned
    calib: str | None = None  # calibration text (UTF-8)
    articles: str | None = None  # WikiText articles to keep, e.g. 1-16
    seq_len: int = 256  # tokens per training sequence
    samples: int = 0  # sequences; 0 = every window of the text
    steps: int = 200
    batch: int = 4  # sequences per step
    lr: float = 3e-3
    # frr, both None = 1 / (scales * iters) (bench/distill_lr.py): the shared block's learning rate as a share of lr
    # (one step of the block moves every application), and every application's initial gamma (the loop starts as
    # N steps of 1/N of the block's update, about one layer's worth, instead of N whole ones)
    block_lr: float | None = None
    gamma_init: float | None = None
    warmup: int = 10
    seed: int = 0
    topk: int = 64  # teacher tokens kept per position
    hidden_weight: float = 0.0  # alpha of objective.py (0: KL only)
    align_points: int = 0  # alignment points of the hidden term; 0 = scales (frr) or 1 (dense)
    tune_teacher_parts: bool = False  # also train the teacher's embeddings, final norm and head
    save_every: int = 25  # steps between training-state files
    spill_mb: int = 1024  # teacher activations kept in memory before spilling to disk
    device: str = "cpu"

    def check(self) -> None:
        if self.student not in KINDS:
            raise ValueError(f"--student {self.student}: one of {', '.join(KINDS)}")
        if self.width < HEAD_DIM or self.width % HEAD_DIM:
            raise ValueError(f"--width {self.width}: a positive multiple of {HEAD_DIM} (the head size)")
        for flag, v in (("--scales", self.scales), ("--iters", self.iters), ("--layers", self.layers),
                        ("--steps", self.steps), ("--batch", self.batch), ("--seq-len", self.seq_len),
                        ("--topk", self.topk), ("--save-every", self.save_every)):
            if v < 1:
                raise ValueError(f"{flag} {v}: must be at least 1")
        if self.block_lr is not None and self.block_lr <= 0:
            raise ValueError(f"--block-lr {self.block_lr}: must be > 0 (a share of --lr)")
        if self.lr <= 0 or self.hidden_weight < 0 or self.samples < 0 or self.align_points < 0 or self.head_rank < 0:
            raise ValueError("--lr must be > 0; --hidden-weight, --calib-samples, --align-points and --head-rank >= 0")
        if not self.calib:
            raise ValueError("uc distill needs --calib FILE (training text)")

    @property
    def applications(self) -> int:
        return self.scales * self.iters if self.student == "frr" else self.layers

    def loop_share(self, value: float | None) -> float:
        """block_lr or gamma_init as used: the value given, else 1 / applications (frr) or 1 (dense)."""
        if value is not None:
            return value
        return 1.0 / self.applications if self.student == "frr" else 1.0

    def points(self) -> int:
        if self.hidden_weight == 0:
            return 0
        return self.align_points or (self.scales if self.student == "frr" else 1)

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues (all but device and save cadence)."""
        d = asdict(self)
        for k in ("device", "save_every", "spill_mb"):
            d.pop(k)
        return d


@dataclass
class DistillResult:
    path: Path
    steps_done: int
    steps_resumed: int
    seconds: float
    train_seconds: float
    target_seconds: float
    trainable_params: int
    loss_first: float | None
    loss_last: float | None
    peak_rss_bytes: int
    stats: dict = field(default_factory=dict)


def student_config(teacher: SourceCheckpoint, cfg: DistillConfig) -> StudentConfig:
    t = teacher.config
    if t.get("model_type") not in LLAMA_LIKE:
        raise CheckpointError(f"{teacher.path}: teacher model_type {t.get('model_type')!r}; uc distill takes "
                              f"{', '.join(LLAMA_LIKE)} teachers (their final norm is the one a student reuses)")
    h = cfg.width
    ffn = cfg.ffn or -(-(8 * h // 3) // 64) * 64
    extra = {k: t[k] for k in ("rope_parameters", "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id",
                               "pad_token_id") if t.get(k) is not None}
    return StudentConfig(
        vocab_size=t["vocab_size"], hidden_size=h, intermediate_size=ffn, num_hidden_layers=cfg.applications,
        num_attention_heads=h // HEAD_DIM, num_key_value_heads=h // HEAD_DIM, head_dim=HEAD_DIM,
        max_position_embeddings=t.get("max_position_embeddings", 2048), rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)) and not cfg.head_rank,
        teacher_hidden_size=t["hidden_size"], head_rank=cfg.head_rank,
        student_kind=cfg.student, scales=cfg.scales if cfg.student == "frr" else 1,
        iters=cfg.iters if cfg.student == "frr" else 1, dtype=str(teacher.dtype()).removeprefix("torch."),
        architectures=["StudentForCausalLM"], **extra)


def build_student(teacher: SourceCheckpoint, cfg: DistillConfig) -> StudentForCausalLM:
    """A freshly initialised student (seeded) holding the teacher's embeddings, final norm and head, float32."""
    torch.manual_seed(cfg.seed)
    model = StudentForCausalLM(student_config(teacher, cfg)).float()
    if cfg.student == "frr":
        with torch.no_grad():
            for application in model.model.layers:
                application.gamma.fill_(cfg.loop_share(cfg.gamma_init))
    names = ["model.embed_tokens.weight"]
    if not cfg.head_rank and not teacher.config.get("tie_word_embeddings"):
        names.append("lm_head.weight")
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).copy_(teacher.get(name).float())
        model.lm_head.norm.weight.copy_(teacher.get("model.norm.weight").float())
    return model


def trainable(model: StudentForCausalLM, cfg: DistillConfig) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, p in model.named_parameters():
        train = cfg.tune_teacher_parts or name not in TEACHER_PARTS
        p.requires_grad_(train)
        if train:
            out[name] = p
    return out


def training_ids(teacher_dir: Path, cfg: DistillConfig) -> torch.Tensor:
    from transformers import AutoTokenizer

    text_path = Path(cfg.calib)
    if not text_path.is_file():
        raise FileNotFoundError(f"--calib {cfg.calib}: no such file")
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    text = text_path.read_text(encoding="utf-8")
    if cfg.samples:
        return calibration_ids(tok, text, cfg.samples, cfg.seq_len, cfg.articles, ("--calib-samples", "--seq-len"))
    text = text.replace("\r\n", "\n")
    if cfg.articles:
        text = wikitext_articles(text, cfg.articles)
    return make_windows(tok, text, cfg.seq_len, None)


def param_groups(params: dict[str, torch.nn.Parameter], cfg: DistillConfig) -> list[dict]:
    """AdamW groups, each with its share of the scheduled learning rate: the shared block of a frr student (every
    application sees the same step) at its share (DistillConfig.block_lr), everything else at 1."""
    block = [p for n, p in params.items() if n.startswith(SHARED_PREFIX)]
    rest = [p for n, p in params.items() if not n.startswith(SHARED_PREFIX)]
    shares = ((block, cfg.loop_share(cfg.block_lr)), (rest, 1.0))
    return [{"params": ps, "share": share} for ps, share in shares if ps]


def optimizer(params, cfg: DistillConfig) -> torch.optim.AdamW:
    """The optimizer of every `uc distill` run (and of lowrank_head.finetune_head): AdamW, betas 0.9/0.95, no weight
    decay; the learning rate is set every step by lr_at."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """The sequences of step `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    out = []
    pos = step * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[off:off + batch - len(out)]
        out += take
        pos += len(take)
    return out


def lr_at(step: int, cfg: DistillConfig) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    cos = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return cfg.lr * warm * (FINAL_LR + (1 - FINAL_LR) * cos)


def align_pairs(cfg: DistillConfig, teacher_layers: int) -> list[tuple[int, int]]:
    """(student application index whose output is compared, teacher depth) for each alignment point."""
    k = cfg.points()
    if k == 0:
        return []
    depths = align_depths(teacher_layers, k)
    n = cfg.applications
    return [(max(1, round(j * n / len(depths))) - 1, d) for j, d in enumerate(depths, start=1)]


def step_loss(model: StudentForCausalLM, batch: dict[str, torch.Tensor], pairs: list[tuple[int, int]],
              hidden_weight: float) -> tuple[torch.Tensor, float]:
    """The loss of objective.py on one batch (on the model's device); returns it and its KL part."""
    caught: dict[int, torch.Tensor] = {}
    handles = [model.model.layers[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
               for i, _ in pairs]
    try:
        logits = model(input_ids=batch["ids"], use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    kl = objective.topk_kl(logits, batch["topk_idx"], batch["topk_logp"])
    loss = kl
    if pairs and hidden_weight:
        terms = [objective.hidden_mse(model.lm_head.teacher_space(model.model.norm(caught[i])), batch[f"hidden.{d}"])
                 for i, d in pairs]
        loss = loss + hidden_weight * torch.stack(terms).mean()
    return loss, kl.item()


def distill(src: str | Path, dst: str | Path, cfg: DistillConfig, resume: bool = False,
            progress: bool = True, targets_dir: str | Path | None = None) -> DistillResult:
    """targets_dir: where the teacher targets live (default DST/.uc-work/targets, removed at the end); targets
    there made with the same teacher, sequences and settings are reused (several students, one teacher pass)."""
    cfg.check()
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    teacher = SourceCheckpoint(src)
    model = build_student(teacher, cfg)  # before anything is written: a bad teacher leaves no directory behind
    writer = PackWriter(dst, {"distill": cfg.settings(), "teacher": str(src.resolve())}, resume=resume)
    work = dst / WORK_DIR
    ids = training_ids(src, cfg)
    pairs = align_pairs(cfg, teacher.num_layers)
    spec = TargetSpec(topk=cfg.topk, depths=align_depths(teacher.num_layers, cfg.points()), chunk=8)
    t1 = time.perf_counter()
    targets = compute(src, ids, Path(targets_dir) if targets_dir else work / "targets", spec, cfg.spill_mb,
                      cfg.device, progress)
    target_seconds = time.perf_counter() - t1
    if cfg.head_rank:
        from .lowrank_head import asvd_factors, channel_scales

        name = "lm_head.weight" if "lm_head.weight" in teacher.weight_map else "model.embed_tokens.weight"
        u, v = asvd_factors(teacher.get(name), channel_scales(targets), cfg.head_rank)
        with torch.no_grad():
            model.lm_head.u.copy_(u)
            model.lm_head.v.copy_(v)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked but CUDA is not available")
    model.to(device)
    params = trainable(model, cfg)
    opt = optimizer(param_groups(params, cfg), cfg)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_NAME
    start = 0
    if resume and state_path.is_file():
        start = train_state.load(state_path, params, opt, cfg.settings()).step
    depths = tuple(d for _, d in pairs)
    first = last = None
    t2 = time.perf_counter()
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=f"distill {cfg.student}", unit="step", disable=not progress,
               initial=start, total=cfg.steps)
    for step in bar:
        batch = targets.sequences(batch_indices(step, targets.num_sequences, cfg.batch, cfg.seed), depths)
        batch = {k: v.to(device) for k, v in batch.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g["share"]
        loss, kl = step_loss(model, batch, pairs, cfg.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        first = value if first is None else first
        last = value
        bar.set_postfix(loss=f"{value:.4f}", kl=f"{kl:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            train_state.save(state_path, params, opt, step + 1, cfg.settings())
    train_seconds = time.perf_counter() - t2
    model.eval()
    from .student_pack import write_student

    stats = write_student(writer, model, teacher, src, {
        "trainable_params": sum(p.numel() for p in params.values()), "steps": cfg.steps,
        "tokens_per_step": cfg.batch * cfg.seq_len, "train_sequences": targets.num_sequences,
        "loss_last": last})
    shutil.rmtree(work, ignore_errors=True)
    return DistillResult(dst, cfg.steps - start, start, time.perf_counter() - t0, train_seconds, target_seconds,
                         sum(p.numel() for p in params.values()), first, last, rss.peak(), stats)


__all__ = ["DistillConfig", "DistillResult", "distill", "Targets"]
