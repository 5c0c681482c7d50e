"""One generation request as the engine sees it: the request, the outputs it streams back, and each of its
n sequences: tokens, KV position, sampling state, detokenizer and stop strings, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .sampling import RowState, SamplingParams, TokenLogprob, make_generator


@dataclass(frozen=True)
class SequenceOutput:
    """New output of one sequence (choice `index` of request `request_id`) since its previous output."""
    request_id: str
    index: int
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # once, first output, when asked
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None  # "aborted" | "timeout" | "internal" | "pack" (reading the pack failed)
    error_message: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[SequenceOutput], None]
    n: int = 1
    timeout: float | None = None  # seconds from arrival
    arrival: float = field(default_factory=time.monotonic)
    internal: bool = False  # warm-up: no stats


WAITING, PREFILL, RUNNING, DONE = "waiting", "prefill", "running", "done"


class Sequence:
    def __init__(self, req: EngineRequest, index: int, tokenizer) -> None:
        p = req.params
        self.req, self.index, self.params = req, index, p
        self.all_ids = list(req.prompt_ids)
        self.num_prompt = len(req.prompt_ids)
        seed = None if p.seed is None else p.seed + index
        self.rows = RowState(p, make_generator(seed), self.all_ids[: self.num_prompt], [])
        self.detok = IncrementalDetokenizer(tokenizer, self.all_ids, p.skip_special_tokens)
        self.stopper = StopMatcher(p.stop, p.include_stop_str_in_output)
        self.state = WAITING
        self.row: int | None = None
        self.cached = 0
        self.deadline = req.arrival + req.timeout if req.timeout else None
        self.t_admitted: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if p.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False

    @property
    def num_output(self) -> int:
        return len(self.all_ids) - self.num_prompt

    def append(self, tok: int, eos: tuple[int, ...], max_model_len: int) -> tuple[str, str | None]:
        """Take one sampled token: the text it releases and the finish reason, if it ends the sequence."""
        p = self.params
        self.all_ids.append(tok)
        self.rows.output_ids.append(tok)
        finish, text, hit = None, "", False
        if tok in eos and not p.ignore_eos:
            finish = "stop"
        elif tok in p.stop_token_ids:
            finish = "stop"
            if p.include_stop_str_in_output:
                text = self.detok.add(tok)
        else:
            text, hit = self.stopper.feed(self.detok.add(tok))
            if hit:
                finish = "stop"
        if finish is None and (self.num_output >= p.max_tokens or len(self.all_ids) >= max_model_len):
            finish = "length"
        if finish is not None and not hit:  # release what was held back: it did not become a stop string
            tail, hit = self.stopper.feed(self.detok.flush())
            text += tail + ("" if hit else self.stopper.flush())
            finish = "stop" if hit else finish
        return text, finish
