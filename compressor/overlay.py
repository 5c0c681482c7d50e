"""Sparse row overlay: the rows a low-bit code hurts most are stored again at 8 bits and replace it.

The score of output row r is its activation-weighted residual energy, times the loss sensitivity of
that output when known:  score_r = f_r * e_r H e_r^T  (e_r = row r of W - Q, H = E[x x^T]),
i.e. the expected squared output error the row causes. The top rows are stored as int8 with a per-row
fp16 scale (`.ov_rows`, `.ov_q`, `.ov_s`, SPEC.md 2.3); their indices and values count in bpw_allin.
"""

from __future__ import annotations

import torch

from .qweight import QWeight, int8_rows

INDEX_BITS = 32  # int32 row index
SCALE_BITS = 16  # fp16 row scale


def row_bits(cols: int) -> int:
    """Stored bits of one overlay row of `cols` weights."""
    return cols * 8 + INDEX_BITS + SCALE_BITS


def row_scores(resid: torch.Tensor, h: torch.Tensor | None, f: torch.Tensor | None = None) -> torch.Tensor:
    """[R]: expected squared output error of each row of the residual [R, C]."""
    e = resid.float()
    s = (e @ h.float().to(e.device) * e).sum(1) if h is not None else e.square().sum(1)
    return s * f.float().to(e.device) if f is not None else s


def add_overlay(q: QWeight, w: torch.Tensor, k: int, h: torch.Tensor | None, f: torch.Tensor | None = None) -> QWeight:
    """Restore the k highest-scoring rows of w [R, C] at 8 bits (replacing any previous overlay)."""
    q.ov_rows = q.ov_q = q.ov_s = None
    k = min(k, w.shape[0])
    if k <= 0:
        return q
    scores = row_scores(w.float() - q.base(), h, f)
    rows = torch.sort(torch.topk(scores, k).indices).values
    q.ov_rows = rows.to(torch.int64)
    q.ov_q, q.ov_s = int8_rows(w.float()[rows])
    return q
