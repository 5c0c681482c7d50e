"""The distillation loss of `uc distill` (docs: README "Distilled students"), exactly:

For position t the teacher kept its k most likely next tokens K_t with their log-probabilities l_j under its
whole vocabulary (targets.py); its remaining mass is P_t = 1 - sum_j exp(l_j). The student's log-probabilities
over the whole vocabulary, gathered at K_t, are s_j, its remaining mass Q_t = 1 - sum_j exp(s_j). The KL term
is the KL divergence between the two distributions coarsened to k + 1 outcomes (the k tokens and "any other";
Q_t is computed in log space as the student's mass on the tokens outside K_t):

    KL_t = sum_j exp(l_j) (l_j - s_j) + P_t (log P_t - log Q_t)          (nats; 0 log 0 = 0)

a lower bound of the full-vocabulary KL(teacher || student) that is exact when the teacher's tail is empty,
averaged over every position of every sequence of the step. With a hidden weight alpha > 0, for each
alignment point (student depth n_j, teacher depth D_j) the student's state after n_j applications or layers,
mapped to the teacher's space (lm_head.teacher_space(model.norm(h)), ucformat/student.py), is compared with
the teacher's head input at depth D_j (targets.py) by the mean squared error relative to the target's mean
square:

    H_j = mean_t |a_t - b_t|^2 / mean_t |b_t|^2,      loss = mean_t KL_t + alpha * mean_j H_j
"""

from __future__ import annotations

import torch

LOG_FLOOR = -1e4  # log of a remaining mass that is numerically zero (keeps 0 * log 0 terms finite)
TAIL_EPS = 1e-6  # a teacher tail below this is float32 rounding of 1 - sum of k probabilities: taken as empty


def topk_kl(student_logits: torch.Tensor, topk_idx: torch.Tensor, topk_logp: torch.Tensor) -> torch.Tensor:
    """Mean coarsened KL over positions. student_logits [.., V]; topk_idx [.., k] (int); topk_logp [.., k].
    The student's remaining mass is taken in log space over the tokens outside K_t (not as 1 - sum, which
    rounds to 0 and loses its gradient when the student puts nearly everything on K_t)."""
    z = student_logits.float()
    idx = topk_idx.long()
    log_z = torch.logsumexp(z, dim=-1)  # [..]
    s = z.gather(-1, idx) - log_z.unsqueeze(-1)  # [.., k]
    log_q_tail = (torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1) - log_z).clamp_min(LOG_FLOOR)
    lt = topk_logp.float()
    p = lt.exp()
    head = (p * (lt - s)).sum(-1)
    p_tail = 1 - p.sum(-1)
    p_tail = torch.where(p_tail > TAIL_EPS, p_tail, torch.zeros_like(p_tail))
    tail = p_tail * (p_tail.clamp_min(1e-30).log().clamp_min(LOG_FLOOR) - log_q_tail)
    return (head + tail).mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """|a - b|^2 / |b|^2 over all positions (both [.., Ht])."""
    b = teacher.float()
    return (student.float() - b).square().mean() / b.square().mean().clamp_min(1e-12)
