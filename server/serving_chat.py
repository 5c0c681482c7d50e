"""POST /v1/chat/completions: messages through the tokenizer's chat template; chat-shaped logprobs."""

from __future__ import annotations

import time
from typing import AsyncIterator

from .engine import SequenceOutput
from .errors import BadRequest
from .protocol import (
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprob, ChatResponseMessage, ChoiceLogprobs,
    TopLogprob, UsageInfo,
)
from .serving import DONE, KEEPALIVE, Prompt, Serving, TokenStrings, failure_error, new_id, sse


class ChatServing(Serving):
    def __init__(self, state) -> None:
        super().__init__(state)
        self.strings = TokenStrings(self.tokenizer)

    def prompt(self, messages, add_generation_prompt: bool = True, template_kwargs: dict | None = None) -> Prompt:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise BadRequest("this model has no chat template, so it cannot take chat requests; send a plain "
                             "prompt to /v1/completions instead", param="messages", code="no_chat_template")
        try:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **(template_kwargs or {}))
        except Exception as exc:  # jinja raise_exception() in templates, bad kwargs
            raise BadRequest(f"the chat template rejected these messages: {exc}", param="messages") from None
        return Prompt(tok(text, add_special_tokens=False).input_ids, text)

    async def create(self, req: ChatCompletionRequest, raw_request) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        prompt = self.prompt(req.messages, req.add_generation_prompt is not False, req.chat_template_kwargs)
        max_tokens = self.max_tokens(prompt.ids, req.requested_max_tokens, "messages")
        params = req.sampling_params(max_tokens, self.engine.vocab_size)
        request_id = new_id("chatcmpl")
        stream = await self.submit([prompt], [params], req.n, req.timeout, request_id)
        if req.stream:
            return self.stream(req, prompt, stream, request_id)
        outs = await self.collect(stream, raw_request, req.n)
        choices, completion_tokens = [], 0
        for idx in range(req.n):
            seq = outs[idx]
            logprobs = self.logprobs(seq, req.top_logprobs or 0) if req.logprobs else None
            completion_tokens += seq[-1].num_output_tokens
            choices.append(ChatChoice(index=idx, message=ChatResponseMessage(content="".join(o.text for o in seq)),
                                      logprobs=logprobs, finish_reason=seq[-1].finish_reason))
        usage = UsageInfo(prompt_tokens=len(prompt.ids), completion_tokens=completion_tokens,
                          total_tokens=len(prompt.ids) + completion_tokens)
        return ChatCompletionResponse(id=request_id, model=req.model or self.state.model_names[0], choices=choices,
                                      usage=usage)

    def logprobs(self, seq: list[SequenceOutput], k: int) -> ChoiceLogprobs:
        content = []
        for o in seq:
            for e in o.logprobs:
                text, raw = self.strings.get(e.token_id)
                top = []
                for t, v in e.top[:k]:
                    tt, tb = self.strings.get(t)
                    top.append(TopLogprob(token=tt, logprob=v, bytes=tb))
                content.append(ChatLogprob(token=text, logprob=e.logprob, bytes=raw, top_logprobs=top))
        return ChoiceLogprobs(content=content)

    async def stream(self, req: ChatCompletionRequest, prompt: Prompt, stream, request_id: str) -> AsyncIterator[str]:
        created, model = int(time.time()), req.model or self.state.model_names[0]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens = 0

        def chunk(idx: int, delta: dict, logprobs=None, finish: str | None = None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": idx, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        try:
            for idx in range(req.n):
                yield chunk(idx, {"role": "assistant", "content": ""})
            async for item in self.sse_events(stream):
                if item is None:
                    yield KEEPALIVE
                    continue
                idx, out = item
                if out.error:
                    yield sse(failure_error(out).body())
                    yield DONE
                    return
                logprobs = self.logprobs([out], req.top_logprobs or 0).model_dump() if req.logprobs and out.logprobs else None
                if out.text or logprobs:
                    yield chunk(idx, {"content": out.text}, logprobs)
                if out.finish_reason:
                    completion_tokens += out.num_output_tokens
                    yield chunk(idx, {}, None, out.finish_reason)
            if include_usage:
                n = len(prompt.ids)
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": UsageInfo(prompt_tokens=n, completion_tokens=completion_tokens,
                                                             total_tokens=n + completion_tokens).model_dump()})
            yield DONE
        except Exception as exc:  # cancellation (a client gone) is a BaseException and passes through
            yield self.stream_failed(exc, stream, request_id)
            yield DONE
        finally:
            stream.close()
