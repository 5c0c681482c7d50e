"""OpenAI API request/response models (completions, chat completions, models) in the spec's field order.

Each request model ends with this server's extensions, fenced off under a comment (the same names vLLM
uses, so clients that send them to vLLM work here). Unknown fields are accepted and logged, never
rejected: clients send new fields all the time. A request model owns its translation to SamplingParams.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .sampling import SamplingParams

log = logging.getLogger(__name__)

TokenId = Annotated[int, Field(ge=0)]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self):
        if self.model_extra:
            log.warning("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False


Stop = Union[str, list[str], None]


def _stop_tuple(stop: Stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


# -- completions ------------------------------------------------------------------------------------------
class CompletionRequest(OpenAIModel):
    model: str | None = None
    prompt: Union[str, list[str], list[TokenId], list[list[TokenId]]]
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = False
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=0)
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- extensions (vLLM names) ---
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(default=0, ge=0)
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    add_special_tokens: bool | None = True
    timeout: float | None = Field(default=None, gt=0.0, description="seconds this request may take in total")

    def sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        return _params(self, max_tokens, vocab_size, logprobs=self.logprobs,
                       prompt_logprobs=self.logprobs if self.echo else None)


# -- chat completions ---------------------------------------------------------------------------------
class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported (text only)")
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(OpenAIModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0, description="deprecated alias of max_completion_tokens")
    n: int = Field(default=1, ge=1, le=128)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-(2 ** 63), lt=2 ** 64)
    stop: Stop = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # --- extensions (vLLM names) ---
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(default=0, ge=0)
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    timeout: float | None = Field(default=None, gt=0.0, description="seconds this request may take in total")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self, max_tokens: int, vocab_size: int) -> SamplingParams:
        k = (self.top_logprobs or 0) if self.logprobs else None
        return _params(self, max_tokens, vocab_size, logprobs=k, prompt_logprobs=None)


def _params(req, max_tokens: int, vocab_size: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    bias = []
    for key, value in (req.logit_bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise ParamError(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise ParamError(f"logit_bias token id {tid} is outside the vocabulary [0, {vocab_size})", "logit_bias")
        bias.append((tid, float(value)))
    for tid in req.stop_token_ids or ():
        if tid >= vocab_size:
            raise ParamError(f"stop_token_ids: {tid} is outside the vocabulary [0, {vocab_size})", "stop_token_ids")
    stop = _stop_tuple(req.stop)
    if any(s == "" for s in stop):
        raise ParamError("stop strings must not be empty", "stop")
    seed = req.seed % (2 ** 63) if req.seed is not None else None
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, logit_bias=tuple(bias), seed=seed, stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=bool(req.ignore_eos),
        min_tokens=min(req.min_tokens or 0, max_tokens), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens is not False,
        include_stop_str_in_output=bool(req.include_stop_str_in_output))


class ParamError(ValueError):
    """A request field whose value is well-typed but unusable; `param` names it."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


# -- tokenizer endpoints (vLLM shapes) ------------------------------------------------------------------
class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- responses ------------------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ultracompress"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
