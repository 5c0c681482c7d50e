"""The low-rank output head of `uc distill --head-rank R`: the teacher's head W [V, Ht] factored as u v, u [V, R],
v [R, Ht], by activation-aware SVD (ASVD) and then fine-tuned with the rest of the student.

The head reads x, the teacher's final-norm output; its error on the calibration inputs is what matters, not the
weights' own. With s_j = sqrt(mean over tokens of x_j^2) (from the teacher targets' head inputs) and S = diag(s):

    W S = U Sigma Q^T  (SVD),    u = U_R Sigma_R^(1/2),    v = Sigma_R^(1/2) Q_R^T S^-1

so u v x = (W S)_R S^-1 x: input channels that carry more energy are kept more faithfully.
"""

from __future__ import annotations

import torch

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
