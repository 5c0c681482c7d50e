"""POST /v1/completions: prompts as text, token ids or lists of either; echo; completions-shaped logprobs."""

from __future__ import annotations

import time
from typing import AsyncIterator

from .engine import SequenceOutput
from .errors import BadRequest
from .protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from .serving import DONE, KEEPALIVE, Prompt, Serving, TokenStrings, failure_error, new_id, sse


class CompletionServing(Serving):
    def __init__(self, state) -> None:
        super().__init__(state)
        self.strings = TokenStrings(self.tokenizer)

    async def create(self, req: CompletionRequest, raw_request) -> CompletionResponse | AsyncIterator[str]:
        self.check_model(req.model)
        if req.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise BadRequest("best_of is not supported (use n)", param="best_of")
        prompts = self.prompts(req)
        vocab = self.engine.vocab_size
        params = [req.sampling_params(self.max_tokens(p.ids, req.max_tokens, "prompt"), vocab) for p in prompts]
        request_id = new_id("cmpl")
        stream = await self.submit(prompts, params, req.n, req.timeout, request_id)
        if req.stream:
            return self.stream(req, prompts, stream, request_id)
        outs = await self.collect(stream, raw_request, len(prompts) * req.n)
        choices, completion_tokens = [], 0
        for idx in range(len(prompts) * req.n):
            prompt = prompts[idx // req.n]
            seq = outs[idx]
            text = "".join(o.text for o in seq)
            logprobs = None
            if req.logprobs is not None:
                logprobs = self.logprobs(seq, prompt if req.echo else None, req.logprobs)
            if req.echo:
                text = prompt.text + text
            completion_tokens += seq[-1].num_output_tokens
            choices.append(CompletionChoice(index=idx, text=text, logprobs=logprobs, finish_reason=seq[-1].finish_reason))
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return CompletionResponse(id=request_id, model=req.model or self.state.model_names[0], choices=choices,
                                  usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))

    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        p = req.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise BadRequest("the prompt is empty", param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer(item, add_special_tokens=req.add_special_tokens is not False).input_ids
                out.append(Prompt(ids, item))
            else:
                self.check_token_ids(item, "prompt")  # before decoding them for echo
                out.append(Prompt(list(item), self.tokenizer.decode(item) if req.echo else None))
        return out

    def logprobs(self, seq: list[SequenceOutput], prompt: Prompt | None, k: int,
                 offset: int = 0) -> CompletionLogprobs:
        """Completions-shaped logprobs of the outputs in seq (and of the prompt's tokens when echoing)."""
        lp = CompletionLogprobs()
        entries = []
        if prompt is not None:
            plps = next((o.prompt_logprobs for o in seq if o.prompt_logprobs is not None), None) or ()
            entries += [(tid, plps[i] if i < len(plps) else None) for i, tid in enumerate(prompt.ids)]
        for o in seq:
            entries += [(e.token_id, e) for e in o.logprobs]
        for tid, e in entries:
            text = self.strings.get(tid)[0]
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            lp.token_logprobs.append(e.logprob if e is not None else None)
            if e is None:
                lp.top_logprobs.append(None)
            else:
                top = {self.strings.get(t)[0]: v for t, v in e.top[:k]}
                top.setdefault(text, e.logprob)
                lp.top_logprobs.append(top)
        return lp

    async def stream(self, req: CompletionRequest, prompts: list[Prompt], stream, request_id: str) -> AsyncIterator[str]:
        created, model = int(time.time()), req.model or self.state.model_names[0]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets: dict[int, int] = {}
        completion_tokens = 0

        def chunk(idx: int, text: str, logprobs, finish: str | None) -> str:
            body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": idx, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        try:
            async for item in self.sse_events(stream):
                if item is None:
                    yield KEEPALIVE
                    continue
                idx, out = item
                if out.error:
                    yield sse(failure_error(out).body())
                    yield DONE
                    return
                first = idx not in offsets
                echo = prompts[idx // req.n] if (req.echo and first) else None
                text = (echo.text if echo else "") + out.text
                logprobs = None
                if req.logprobs is not None and (out.logprobs or echo):
                    lp = self.logprobs([out], echo, req.logprobs, offsets.get(idx, 0))
                    logprobs = lp.model_dump()
                offsets[idx] = offsets.get(idx, 0) + len(text)
                if text or logprobs:
                    yield chunk(idx, text, logprobs, None)
                if out.finish_reason:
                    completion_tokens += out.num_output_tokens
                    yield chunk(idx, "", None, out.finish_reason)
            if include_usage:
                prompt_tokens = sum(len(p.ids) for p in prompts)
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model,
                           "choices": [], "usage": UsageInfo(prompt_tokens=prompt_tokens,
                                                             completion_tokens=completion_tokens,
                                                             total_tokens=prompt_tokens + completion_tokens).model_dump()})
            yield DONE
        except Exception as exc:  # cancellation (a client gone) is a BaseException and passes through
            yield self.stream_failed(exc, stream, request_id)
            yield DONE
        finally:
            stream.close()
