"""Per-layer distillation: refine a decoder layer's quantized linears so that the *whole layer* matches
the teacher.

Codes stay fixed. Trained, with Adam (cosine-decayed learning rate), for `steps` steps of one
calibration sequence each:
  u, v      low-rank factors (learning rate relative to their RMS at init)
  log-scale a multiplier exp(a) on every block scale            (refine_scales, default on)
  grid      the levels                                           (refine_grid, default off)
to minimise  MSE( layer_q(x_in), y_teacher )  where x_in is the layer's calibration input (online or
teacher-forced) and y_teacher the fp layer's output on the fp stream. A check on the first few
calibration sequences, with every part rounded to its stored dtype, keeps the refinement only if it
lowered that loss.

Measured on SmolLM2 layer 5 (teacher-forced, 4-bit, 200 steps): scales alone cut the layer loss by
27%; training the grid as well, at any step size tried, added nothing or undid the gain (the grid is
shared by every weight of the matrix), hence off by default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ucformat.qtensor import dequantize

from .activations import ActivationStore
from .calibrate import Stream, call_layer
from .config import CalibConfig
from .qweight import QWeight, storable

CHECK_SEQUENCES = 4  # sequences of the before/after check
FINAL_LR = 0.1  # cosine decay to this share of the initial learning rate
GRID_LR = 0.05  # grid steps relative to the level spacing (one level moves every weight that uses it)


@dataclass
class DistillResult:
    loss_before: float
    loss_after: float
    kept: bool
    steps: int
    seconds: float


class Trainable:
    """The trainable tensors of one QWeight and how to rebuild its weight from them."""

    def __init__(self, q: QWeight, cfg: CalibConfig, cache: bool = True) -> None:
        self.q, self.cache = q, cache  # cache: keep the levels grid[code] between steps (QWeight.base)
        self.log_s = torch.zeros_like(q.scales, requires_grad=cfg.refine_scales)
        self.grid = q.grid.clone().requires_grad_(cfg.refine_grid)
        self.u = None if q.u is None else q.u.clone().requires_grad_(True)
        self.v = None if q.v is None else q.v.clone().requires_grad_(True)

    def groups(self, lr: float) -> list[dict]:
        out = []
        if self.log_s.requires_grad:
            out.append({"params": [self.log_s], "lr": lr})
        if self.grid.requires_grad:
            out.append({"params": [self.grid], "lr": lr * GRID_LR * _spacing(self.q.grid)})
        for t in (self.u, self.v):
            if t is not None:
                out.append({"params": [t], "lr": relative_lr(t, lr)})
        return out

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        scales = storable(self.q.scales * torch.exp(self.log_s), self.q.scale_bits)
        return self.q.weight(scales, self.grid, self.u, self.v, dtype, self.cache)

    def trainable(self) -> dict[str, torch.Tensor]:
        """The tensors the optimizer updates, by part name."""
        parts = {"log_s": self.log_s, "grid": self.grid, "u": self.u, "v": self.v}
        return {k: t for k, t in parts.items() if t is not None and t.requires_grad}

    def commit(self) -> None:
        with torch.no_grad():
            self.q.scales = (self.q.scales * torch.exp(self.log_s)).detach()
            self.q.grid = self.grid.detach()  # codes index it: never re-sorted
            if self.u is not None:
                self.q.u, self.q.v = self.u.detach(), self.v.detach()


def relative_lr(t: torch.Tensor, lr: float) -> float:
    """A step size relative to the tensor's RMS at init (factors, norm weights)."""
    return lr * max(t.detach().square().mean().sqrt().item(), 1e-8)


def _spacing(grid: torch.Tensor) -> float:
    """Mean distance between levels: grid steps are sized to it (a 2-bit grid moves further than 8-bit)."""
    return (grid.max() - grid.min()).item() / max(grid.numel() - 1, 1)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls are fast here (AMX/AVX512-BF16 on CPU, any CUDA device)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def frozen_weights(qweights: dict[str, QWeight], device) -> dict[str, torch.Tensor]:
    """Local param name -> exactly what the pack will store, reconstructed (SPEC.md 2.2)."""
    return {k: dequantize(q.freeze(), torch.float32).to(device) for k, q in qweights.items()}


@torch.no_grad()
def check_loss(layer, index: int, x_in: Stream, y: ActivationStore, weights: dict, n_seq: int) -> float:
    total, count = 0.0, 0
    for (h, b), t in zip(x_in.chunks(), y):
        take = min(n_seq - count, h.shape[0])
        if take <= 0:
            break
        out = call_layer(layer, h[:take], b.layer_kwargs[index], weights)
        total += (out.float() - t[:take]).square().mean().item() * take
        count += take
    return total / max(count, 1)


def distill(layer: torch.nn.Module, index: int, qweights: dict[str, QWeight], x_in: Stream,
            y: ActivationStore, one: "object", cfg: CalibConfig, steps: int | None = None) -> DistillResult:
    """Refine qweights (local param name -> QWeight) in place. `one` is a Batch of one sequence (its
    layer kwargs serve every step). Returns the losses on the check sequences before and after."""
    t0 = time.perf_counter()
    steps = cfg.steps if steps is None else steps
    if not qweights:
        return DistillResult(0.0, 0.0, False, 0, 0.0)
    for p in layer.parameters():
        p.requires_grad_(False)
    device = next(iter(qweights.values())).codes.device
    before = check_loss(layer, index, x_in, y, frozen_weights(qweights, device), CHECK_SEQUENCES)
    if steps <= 0:
        return DistillResult(before, before, False, 0, time.perf_counter() - t0)
    saved = {k: (q.scales, q.grid, q.u, q.v) for k, q in qweights.items()}
    train = {k: Trainable(q, cfg) for k, q in qweights.items()}
    groups = [g for t in train.values() for g in t.groups(cfg.lr)]
    if not groups:
        return DistillResult(before, before, False, 0, time.perf_counter() - t0)
    opt = torch.optim.Adam(groups, foreach=True)
    base_lr = [g["lr"] for g in opt.param_groups]
    # sequence order: a fixed permutation per layer, cycled
    index_of = [(c, j) for c in range(len(x_in.batches)) for j in range(x_in.batches[c].input_ids.shape[0])]
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + index)
    order = torch.randperm(len(index_of), generator=gen).tolist()
    kwargs = one.layer_kwargs[index]
    autocast = cfg.bf16 and native_bf16(device)
    for step in range(steps):
        c, j = index_of[order[step % len(order)]]
        x = x_in.store[c][j:j + 1]
        t = y[c][j:j + 1]
        frac = 0.5 * (1 + math.cos(math.pi * step / steps))
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * (FINAL_LR + (1 - FINAL_LR) * frac)
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            dtype = torch.bfloat16 if autocast else torch.float32
            out = call_layer(layer, x, kwargs, {k: tr.weight(dtype) for k, tr in train.items()})
            loss = (out.float() - t).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    for tr in train.values():
        tr.commit()
    after = check_loss(layer, index, x_in, y, frozen_weights(qweights, device), CHECK_SEQUENCES)
    kept = after < before
    if not kept:
        for k, q in qweights.items():
            q.scales, q.grid, q.u, q.v = saved[k]
        after = before
    return DistillResult(before, after, kept, steps, time.perf_counter() - t0)
