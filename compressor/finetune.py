"""End-to-end distillation: once every layer is stored, tune the quantized linears of all layers together
so that the compressed model's next-token distribution matches the fp model's.

Per-layer distillation (distill.py) matches each layer's output on its own; the errors it leaves still
compound through the layers, and the loss that matters is at the logits. Here codes stay fixed and, with
Adam (cosine-decayed learning rate), for `e2e_steps` steps of `E2E_BATCH` calibration sequences each:
  log-scale  a multiplier exp(a) on every block scale of every quantized linear
  u, v       the low-rank factors, where a linear has them
  grid       the levels (only with refine_grid, as in distill.py)
minimise  KL( p_teacher || p_student )  over the next-token distributions of the calibration sequences.
The teacher's distributions come from its final hidden states, which the streamed pipeline has already
computed (the fp stream after the last layer), so the fp model is never needed whole.

Sequences are split: the last CHECK_SEQUENCES are held out; the tuned weights, rounded to their stored
dtypes, are kept only if they lower the KL on those.

Memory: this is the one stage that holds the whole model (its codes, and per step its weights and
activations) instead of one layer, about `BYTES_PER_WEIGHT` bytes per quantized weight. When that does
not fit the memory available, the stage is skipped with a warning (`--e2e-steps 0` skips it always).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ucformat.residency import auto_budget
from ucformat.skeleton import Skeleton

from . import layerwise
from .config import CalibConfig
from .distill import FINAL_LR, Trainable, frozen_weights, native_bf16
from .qweight import QWeight

log = logging.getLogger(__name__)

E2E_BATCH = 4  # calibration sequences per step
CHECK_SEQUENCES = 4  # held out: the keep-or-discard check
BYTES_PER_WEIGHT = 16  # codes, their levels, the weight and its gradient (bf16), the fp32 check weights
LOGIT_FLOATS = 16 << 20  # logits per chunk of the KL (64 MiB of float32)


@dataclass
class FinetuneResult:
    kl_before: float
    kl_after: float
    kept: bool
    steps: int
    seconds: float


def fits(numel: int, device: torch.device) -> tuple[bool, int, int]:
    """Whether the stage's working set for `numel` quantized weights fits the memory free now."""
    need, free = numel * BYTES_PER_WEIGHT, auto_budget(device, headroom=0.0)
    return need <= free, need, free


class _Head:
    """Student final hidden states (input of the output embedding) from a whole-model forward with the
    quantized linears' weights supplied, and the chunked KL against the teacher's.

    With topk > 0 the KL is taken over each position's k most likely tokens under the teacher, both
    distributions renormalised over them: the head then costs k columns per position instead of the whole
    vocabulary (Gemma-3's 262k-token head is most of that model's arithmetic)."""

    def __init__(self, sk: Skeleton, topk: int) -> None:
        self.sk = sk
        self.head = sk.model.get_output_embeddings()
        vocab, hidden = self.head.weight.shape
        self.topk = min(topk, vocab)
        self.rows = max(1, LOGIT_FLOATS // (self.topk * hidden if self.topk else vocab))

    def student_hidden(self, ids: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return layerwise.head_input(self.sk, lambda: torch.func.functional_call(
            self.sk.model, weights, (ids.to(self.sk.device),), {"use_cache": False}, strict=False))

    @torch.no_grad()
    def targets(self, teacher: torch.Tensor) -> list[torch.Tensor]:
        """What the KL needs of the teacher, per sequence: its hidden states [N, T, H] (full KL), or the
        top-k token ids [N, T, k] and the teacher's log-probs over them [N, T, k]."""
        if not self.topk:
            return [teacher]
        flat = teacher.reshape(-1, teacher.shape[-1])
        rows = max(1, LOGIT_FLOATS // self.head.weight.shape[0])
        ids, logp = [], []
        for a in range(0, flat.shape[0], rows):
            v, i = layerwise.logits(self.sk, flat[a:a + rows].float()).topk(self.topk, -1)
            ids.append(i)
            logp.append(torch.log_softmax(v, -1))
        shape = (*teacher.shape[:-1], self.topk)
        return [torch.cat(ids).reshape(shape), torch.cat(logp).reshape(shape)]

    def kl(self, student: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
        """Mean over positions of KL(teacher || student); student hidden states [B, T, H], target as
        `targets` gives it for the same sequences. Logits are built chunk by chunk and recomputed in
        backward (never all of them at once)."""
        s = student.reshape(-1, student.shape[-1])
        t = [x.reshape(s.shape[0], -1).to(s.device) for x in target]
        fn = self._kl_topk if self.topk else self._kl_full
        total = s.new_zeros((), dtype=torch.float32)
        for a in range(0, s.shape[0], self.rows):
            total = total + checkpoint(fn, s[a:a + self.rows], *(x[a:a + self.rows] for x in t), use_reentrant=False)
        return total / s.shape[0]

    def _kl_full(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s.device.type, enabled=False):
            ls = torch.log_softmax(layerwise.logits(self.sk, s.float()), -1)
            lt = torch.log_softmax(layerwise.logits(self.sk, t.float()), -1)
        return (lt.exp() * (lt - ls)).sum()

    def _kl_topk(self, s: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s.device.type, enabled=False):
            w = self.head.weight[ids].float()  # [r, k, H]
            lg = torch.einsum("rh,rkh->rk", s.float(), w)
            if self.head.bias is not None:
                lg = lg + self.head.bias[ids].float()
            ls = torch.log_softmax(layerwise.softcap(self.sk, lg), -1)
        return (lt.exp() * (lt - ls)).sum()


def finetune(sk: Skeleton, qweights: dict[str, QWeight], param_names: dict[str, str], ids: torch.Tensor,
             teacher_hidden: torch.Tensor, cfg: CalibConfig, progress=None) -> FinetuneResult:
    """Tune qweights (checkpoint name -> QWeight) in place. sk holds every weight of the model but the
    quantized linears, whose module parameter names param_names gives; ids [N, T]; teacher_hidden [N, T, H]
    the fp model's final hidden states (input of the output embedding) for the same sequences."""
    t0 = time.perf_counter()
    steps = cfg.e2e_steps
    n = ids.shape[0]
    held = min(CHECK_SEQUENCES, max(n - 1, 0))
    train_idx, check_idx = torch.arange(n - held), torch.arange(n - held, n)
    head = _Head(sk, cfg.e2e_topk)
    target = head.targets(teacher_hidden)
    device = next(iter(qweights.values())).codes.device
    autocast = cfg.bf16 and native_bf16(device)

    @torch.no_grad()
    def check() -> float:
        weights = {param_names[k]: w for k, w in frozen_weights(qweights, device).items()}
        total = 0.0
        for rows in check_idx.split(E2E_BATCH):
            total += head.kl(head.student_hidden(ids[rows], weights), [t[rows] for t in target]).item() * len(rows)
        return total / max(len(check_idx), 1)

    before = check() if held else math.nan
    if steps <= 0 or len(train_idx) == 0:
        return FinetuneResult(before, before, False, 0, time.perf_counter() - t0)
    saved = {k: (q.scales, q.grid, q.u, q.v) for k, q in qweights.items()}
    train = {k: Trainable(q, cfg) for k, q in qweights.items()}
    groups = [g for t in train.values() for g in t.groups(cfg.e2e_lr)]
    opt = torch.optim.Adam(groups, foreach=True)
    base_lr = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(cfg.seed)
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    dtype = torch.bfloat16 if autocast else torch.float32
    for step in range(steps):
        start = (step * E2E_BATCH) % len(order)
        rows = order[start:start + E2E_BATCH]
        frac = 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * (FINAL_LR + (1 - FINAL_LR) * frac)
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            weights = {param_names[k]: tr.weight(dtype) for k, tr in train.items()}
            loss = head.kl(head.student_hidden(ids[rows], weights), [t[rows] for t in target])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    for tr in train.values():
        tr.commit()
    after = check() if held else -math.inf
    kept = not held or after < before
    if not kept:
        for k, q in qweights.items():
            q.scales, q.grid, q.u, q.v = saved[k]
        after = before
    return FinetuneResult(before, after, kept, steps, time.perf_counter() - t0)

