"""Sampling parameters of one sequence and the batched sampler that applies them to a step's logits.

Order per row (as vLLM): logit_bias -> repetition/presence/frequency penalties -> min_tokens (EOS and stop
ids masked) -> greedy argmax if temperature == 0, else temperature -> min_p -> top_k -> top_p -> one
draw from the row's own torch.Generator, so a seeded request draws the same numbers whatever else is in
the batch. Reported logprobs are those of the model's raw distribution (before any of the above).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

# Above this nucleus size top-p falls back to a full sort of the row (exact either way).
_TOP_P_CANDIDATES = 1024
# Temperatures below this are greedy (as in vLLM): dividing by them would overflow.
_GREEDY_EPS = 1e-5
_BIG = 1e30  # +inf logits (from extreme penalties) are clamped here so softmax stays defined


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus k alternatives
    prompt_logprobs: int | None = None  # same, for every prompt token (completions `echo` with `logprobs`)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class RowState:
    """What the sampler needs of one sequence: its params, generator and tokens so far."""
    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def logprob_entries(logprobs: torch.Tensor, chosen: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logprobs: [n, V] float32 log-softmax rows; one entry per row for its chosen token and its top-k."""
    out = []
    kmax = max(ks) if ks else 0
    top_v, top_i = (logprobs.topk(kmax, dim=-1) if kmax > 0 else (None, None))
    for r, (tok, k) in enumerate(zip(chosen, ks)):
        top = tuple(zip(top_i[r, :k].tolist(), top_v[r, :k].tolist())) if k > 0 else ()
        out.append(TokenLogprob(tok, float(logprobs[r, tok]), top))
    return out


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.eos = eos_token_ids

    def __call__(self, logits: torch.Tensor, rows: list[RowState]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: [n, V'] for n rows (V' >= vocab_size is cut). Returns chosen ids and logprob entries."""
        # on the CPU: per-request generators are CPU generators, and a [rows, vocab] copy is cheap
        logits = logits[:, : self.vocab_size].float().cpu()
        want = [r.params.logprobs for r in rows]
        raw_lp = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want) else None
        logits = self._adjust(logits, rows)
        chosen = [0] * len(rows)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            ids = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, ids):
                chosen[i] = t
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            probs = self._probs(logits[sampled], [rows[i].params for i in sampled])
            for j, i in enumerate(sampled):
                chosen[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
        entries: list[TokenLogprob | None] = [None] * len(rows)
        idx = [i for i, k in enumerate(want) if k is not None]
        if idx:
            ents = logprob_entries(raw_lp[idx], [chosen[i] for i in idx], [want[i] for i in idx])
            for i, e in zip(idx, ents):
                entries[i] = e
        return chosen, entries

    # -- row adjustments ---------------------------------------------------------------------------------
    def _adjust(self, logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        for i, r in enumerate(rows):
            p = r.params
            if p.logit_bias:
                ids = torch.tensor([t for t, _ in p.logit_bias])
                logits[i].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype))
            if p.needs_penalties:
                self._penalize(logits[i], r)
            if len(r.output_ids) < p.min_tokens:
                banned = [t for t in (*(() if p.ignore_eos else self.eos), *p.stop_token_ids) if t < self.vocab_size]
                if banned:
                    logits[i, banned] = float("-inf")
        # extreme penalties or biases can overflow: NaN never wins, +inf ties at a finite top
        return torch.nan_to_num(logits, nan=float("-inf"), posinf=_BIG, neginf=float("-inf"))

    def _penalize(self, row: torch.Tensor, r: RowState) -> None:
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.output_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if r.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(r.output_ids), minlength=row.numel())[: row.numel()].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """[m, V] logits of sampled rows -> [m, V] probabilities after temperature, min_p, top_k, top_p."""
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype).unsqueeze(1)
        logits = torch.nan_to_num(logits / temps, nan=float("-inf"), posinf=_BIG, neginf=float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        bad = ~torch.isfinite(probs).all(dim=-1) | (probs.sum(dim=-1) <= 0)
        if bad.any():  # every logit -inf: fall back to the first token rather than fail the request
            probs[bad] = 0.0
            probs[bad, 0] = 1.0
        for j, p in enumerate(params):
            row = probs[j]
            if p.min_p > 0:
                row[row < p.min_p * row.max()] = 0
            if p.top_k > 0 and p.top_k < row.numel():
                kth = row.topk(p.top_k).values[-1]
                row[row < kth] = 0
            if p.top_p < 1.0:
                _top_p(row, p.top_p)
        return probs  # multinomial renormalises


def _top_p(row: torch.Tensor, top_p: float) -> None:
    """Zero all but the smallest set of most likely tokens whose mass reaches top_p (of the row's mass)."""
    total = row.sum()
    k = min(_TOP_P_CANDIDATES, row.numel())
    vals, ids = row.topk(k)
    if vals.sum() < top_p * total and k < row.numel():
        vals, ids = row.sort(descending=True)
    cum = vals.cumsum(0)
    # keep token i if the mass before it is below top_p: the first token is always kept
    keep = (cum - vals) < top_p * total
    mask = torch.zeros_like(row, dtype=torch.bool)
    mask[ids[keep]] = True
    row[~mask] = 0
