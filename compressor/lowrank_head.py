"""The low-rank output head of `uc distill --head-rank R`: the teacher's head W [V, Ht] factored as u v, u [V, R],
v [R, Ht], by activation-aware SVD (ASVD) and then fine-tuned with the rest of the student (or alone, on the
teacher's own body: `finetune_head`).

The head reads x, the teacher's final-norm output; its error on the calibration inputs is what matters, not the
weights' own. With s_j = sqrt(mean over tokens of x_j^2) (from the teacher targets' head inputs) and S = diag(s):

    W S = U Sigma Q^T  (SVD),    u = U_R Sigma_R^(1/2),    v = Sigma_R^(1/2) Q_R^T S^-1

so u v x = (W S)_R S^-1 x: input channels that carry more energy are kept more faithfully.
"""

from __future__ import annotations

import time

import torch

from . import objective
from .distiller import batch_indices, lr_at, optimizer
from .targets import Targets

STAT_SEQUENCES = 64  # sequences of targets whose head inputs give the channel scales


def channel_scales(targets: Targets) -> torch.Tensor:
    """s [Ht]: the RMS of every head-input channel over (up to) STAT_SEQUENCES sequences of the targets."""
    final = targets.depths[-1]
    n = min(STAT_SEQUENCES, targets.num_sequences)
    x = targets.sequences(list(range(n)), depths=(final,))[f"hidden.{final}"].float()
    return x.reshape(-1, x.shape[-1]).square().mean(0).sqrt()


@torch.no_grad()
def asvd_factors(weight: torch.Tensor, scales: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u [V, R], v [R, Ht] with u v ~ weight, the error weighted by the input scales (module docstring)."""
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"--head-rank {rank}: between 1 and {min(weight.shape)}")
    s = scales.float().clamp_min(1e-6 * scales.max().item() + 1e-12)
    U, sigma, Qt = torch.linalg.svd(weight.float() * s, full_matrices=False)
    root = sigma[:rank].sqrt()
    return (U[:, :rank] * root).contiguous(), (root[:, None] * Qt[:rank] / s).contiguous()


def finetune_head(u: torch.Tensor, v: torch.Tensor, targets: Targets, cfg) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The head alone fine-tuned on the teacher's own body: u v trained on the targets' head inputs (the teacher's
    final-norm output) with the KL term of objective.py, on the same batches, learning-rate schedule and optimizer
    as `uc distill` with DistillConfig `cfg` (steps, batch, lr, warmup, seed). The body is the teacher's, so no
    body forward is needed. Returns the trained (u, v) and {loss_first, loss_last, seconds}."""
    final = targets.depths[-1]
    u, v = u.detach().float().clone().requires_grad_(True), v.detach().float().clone().requires_grad_(True)
    opt = optimizer([u, v], cfg)
    first = last = None
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = targets.sequences(batch_indices(step, targets.num_sequences, cfg.batch, cfg.seed), (final,))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = batch[f"hidden.{final}"].float() @ v.T @ u.T
        loss = objective.topk_kl(logits, batch["topk_idx"], batch["topk_logp"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if first is None else first
    stats = {"loss_first": first, "loss_last": last, "seconds": time.perf_counter() - t0}
    return u.detach(), v.detach(), stats
