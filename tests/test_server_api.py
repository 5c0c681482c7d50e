"""End to end: a real `uc serve` (uvicorn) subprocess on a free port serving a real SmolLM2 pack, driven by
the official `openai` SDK (sync, async, streaming; completions and chat). Expected outputs come from the
slow reference: transformers' generate on the same pack in this process (float32, greedy).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

KEY = "test-key"
_PACKS: dict[str, Path] = {}


def smol_pack_dir(smollm2: Path, root: Path) -> Path:
    """SmolLM2 packed at 5 bits, once per test session (shared by every server test module).
    UC_TEST_PACK=DIR reuses an existing pack of it instead (for quick local runs)."""
    if os.environ.get("UC_TEST_PACK"):
        return Path(os.environ["UC_TEST_PACK"])
    if "smol" not in _PACKS:
        from compressor.config import PackConfig
        from compressor.pack import pack

        dst = root / "smollm2-gsq5"
        if not (dst / "manifest.json").exists():
            pack(smollm2, dst, PackConfig(bits=5), resume=True, progress=False)
        _PACKS["smol"] = dst
    return _PACKS["smol"]


@pytest.fixture(scope="session")
def smol_pack(smollm2, tmp_path_factory) -> Path:
    return smol_pack_dir(smollm2, tmp_path_factory.getbasetemp())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m uc serve PACK --port N ...` with its log in a file."""

    def __init__(self, pack: Path, *args: str, log: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "uc", "serve", str(pack), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300) -> None:
        """Poll until ready, noting what the server answered while it was still loading."""
        self.while_loading: list[tuple[int, int, dict, str | None]] = []  # (live, ready, ready body, Retry-After)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                r = httpx.get(self.url + "/health/ready", timeout=2)
                if r.status_code == 200:
                    return
                live = httpx.get(self.url + "/health/live", timeout=2).status_code
                self.while_loading.append((live, r.status_code, r.json(), r.headers.get("retry-after")))
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def __enter__(self) -> "ServerProcess":
        """Ready (or stopped and raised); stopped on leaving."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        total = None
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        if total is None:
            raise KeyError(name)
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(smol_pack, tmp_path_factory):
    with ServerProcess(smol_pack, "--api-key", KEY, "--dtype", "float32", "--max-num-seqs", "8",
                       "--sse-keepalive", "0.3", "--served-model-name", "smol",
                       log=tmp_path_factory.mktemp("srv") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref(smol_pack):
    """Greedy continuations by transformers' generate on the same pack (the slow reference)."""
    import torch
    from transformers import AutoTokenizer

    from ucformat.runtime import load

    model = load(smol_pack, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(smol_pack))

    class Ref:
        tokenizer = tok

        def chat_ids(self, messages) -> list[int]:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False).input_ids

        def generate(self, ids: list[int], n: int) -> tuple[list[int], str]:
            """Generated ids (EOS included when hit) and the finish reason."""
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=2,
                                     eos_token_id=2)
            gen = out[0, len(ids):].tolist()
            if 2 in gen:
                return gen[: gen.index(2) + 1], "stop"
            return gen, "length"

        def deltas(self, gen: list[int]) -> list[str]:
            """Text added by each token, as a client would see it streamed (empty pieces dropped)."""
            gen = [t for t in gen if t != 2]
            out = [tok.decode(gen[: i + 1]) [len(tok.decode(gen[:i])):] for i in range(len(gen))]
            return [d for d in out if d]

    return Ref()


PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


# -- health, models, auth ---------------------------------------------------------------------------------
def test_health_version_models(server, client, smol_pack):
    assert httpx.get(server.url + "/health/live").json() == {"status": "live"}
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200
    v = httpx.get(server.url + "/version").json()
    assert v["version"] and v["pack_format"]
    ids = [m.id for m in client.models.list().data]
    assert ids == ["smol", smol_pack.name]
    assert client.models.list().data[0].max_model_len == 8192


def test_printed_examples_work_as_printed(server):
    """`uc serve` prints a curl and an openai SDK command once ready (what `make run` shows): run them."""
    import shutil

    lines = [ln.strip() for ln in server.log.read_text().splitlines()]
    curl = next(ln for ln in lines if ln.startswith("curl "))
    sdk = next(ln for ln in lines if " -c 'import os; from openai import OpenAI" in ln)
    env = {**os.environ, "UC_API_KEY": KEY}
    todo = [sdk] + ([curl] if shutil.which("curl") else [])
    for cmd in todo:
        r = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip(), (cmd, r.stdout, r.stderr)
    if shutil.which("curl"):
        r = subprocess.run(curl, shell=True, env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(r.stdout)["choices"][0]["message"]["content"]


def test_api_key(server):
    import openai

    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="smol", prompt="hi", max_tokens=1)
        assert e.value.status_code == 401
        assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
    # probes and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.post(server.url + "/tokenize", json={"prompt": "hi"}).status_code == 401


# -- completions ------------------------------------------------------------------------------------------
def test_completion_matches_reference(client, ref):
    ids = ref.tokenizer(PROMPT).input_ids
    gen, finish = ref.generate(ids, 10)
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "smol"
    assert r.choices[0].text == "".join(ref.deltas(gen))
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(gen), len(ids) + len(gen))


def test_completion_stream_exact_chunks(client, ref):
    ids = ref.tokenizer(PROMPT).input_ids
    gen, finish = ref.generate(ids, 10)
    chunks = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks[:-2]]
    assert texts == ref.deltas(gen)
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in chunks[:-2])
    fin = chunks[-2]
    assert fin.choices[0].text == "" and fin.choices[0].finish_reason == finish and fin.usage is None
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(gen)
    assert usage.usage.prompt_tokens == len(ids) and usage.usage.total_tokens == len(ids) + len(gen)
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing_and_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln and not ln.startswith(":")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]


def test_token_id_prompts_list_and_n(client, ref):
    a, b = ref.tokenizer(PROMPT).input_ids, ref.tokenizer("Water boils at").input_ids
    r = client.completions.create(model="smol", prompt=[a, b], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    ga, gb = ("".join(ref.deltas(ref.generate(ids, 4)[0])) for ids in (a, b))
    assert [c.text for c in r.choices] == [ga, ga, gb, gb]
    assert r.usage.prompt_tokens == len(a) + len(b) and r.usage.completion_tokens == 16


def test_list_of_string_prompts(client, ref):
    prompts = [PROMPT, "Water boils at"]
    ids = [ref.tokenizer(p).input_ids for p in prompts]
    expected = ["".join(ref.deltas(ref.generate(i, 4)[0])) for i in ids]
    r = client.completions.create(model="smol", prompt=prompts, max_tokens=4, temperature=0)
    assert [(c.index, c.text) for c in r.choices] == list(enumerate(expected))
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 8
    streamed = {0: "", 1: ""}
    for c in client.completions.create(model="smol", prompt=prompts, max_tokens=4, temperature=0, stream=True):
        streamed[c.choices[0].index] += c.choices[0].text
    assert [streamed[0], streamed[1]] == expected


def test_echo_and_prompt_logprobs(client, ref):
    ids = ref.tokenizer(PROMPT).input_ids
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs[1:])
    assert c.logprobs.text_offset[0] == 0 and r.usage.completion_tokens == 0


def test_completion_logprobs(client):
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and abs(top[tok] - val) < 1e-5 and max(top.values()) == pytest.approx(val)
        assert len(top) == 3
    assert "".join(lp.tokens) == r.choices[0].text


# -- chat -------------------------------------------------------------------------------------------------
def test_chat_matches_reference(client, ref):
    ids = ref.chat_ids(CHAT)
    gen, finish = ref.generate(ids, 12)
    r = client.chat.completions.create(model="smol", messages=CHAT, max_completion_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "".join(ref.deltas(gen))
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(gen))


def test_chat_stream_exact_chunks(client, ref):
    ids = ref.chat_ids(CHAT)
    gen, finish = ref.generate(ids, 12)
    chunks = list(client.chat.completions.create(model="smol", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    contents = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert contents == ref.deltas(gen)
    assert all(c.choices[0].delta.role is None for c in chunks[1:-2])
    fin = chunks[-2].choices[0]
    assert fin.finish_reason == finish and fin.delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(gen)
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_async_concurrent_equals_alone(server, ref):
    """Four different requests at once through the async client: each as if it ran alone."""
    import openai

    prompts = [PROMPT, "Water boils at", "def fibonacci(n):", "Once upon a time"]
    expected = ["".join(ref.deltas(ref.generate(ref.tokenizer(p).input_ids, 8)[0])) for p in prompts]

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(p, stream):
            if not stream:
                r = await c.completions.create(model="smol", prompt=p, max_tokens=8, temperature=0)
                return r.choices[0].text
            parts = []
            async for ch in await c.completions.create(model="smol", prompt=p, max_tokens=8, temperature=0,
                                                         stream=True):
                parts.append(ch.choices[0].text)
            return "".join(parts)

        return await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts)))

    assert asyncio.run(main()) == expected


def test_async_chat_stream_and_not(server, ref):
    import openai

    expected = "".join(ref.deltas(ref.generate(ref.chat_ids(CHAT), 8)[0]))

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def streamed():
            chunks = [ch async for ch in await c.chat.completions.create(model="smol", messages=CHAT, max_tokens=8,
                                                                          temperature=0, stream=True)]
            assert chunks[0].choices[0].delta.role == "assistant"
            return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason

        whole, (text, finish) = await asyncio.gather(
            c.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=0), streamed())
        return whole, text, finish

    whole, text, finish = asyncio.run(main())
    assert whole.choices[0].message.content == expected and text == expected
    assert finish == whole.choices[0].finish_reason


# -- stop strings, seeds --------------------------------------------------------------------------------------
def test_stop_string_across_tokens(client, ref):
    ids = ref.tokenizer(PROMPT).input_ids
    deltas = ref.deltas(ref.generate(ids, 12)[0])
    full = "".join(deltas)
    stop = deltas[1][-2:] + deltas[2][:2]  # spans a token boundary
    expected = full[: full.index(stop)]
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="smol", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_determinism(client):
    def run(seed, n=1):
        r = client.completions.create(model="smol", prompt="My favourite animal is", max_tokens=12, temperature=1.0,
                                      seed=seed, n=n)
        return [c.text for c in r.choices]

    a = run(1234)
    assert run(1234) == a
    assert run(99) != a
    two = run(5, n=2)
    assert two == run(5, n=2) and two[0] != two[1]
    chat = [client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, seed=3, top_p=0.9)
            .choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_stop_token_ids(client, ref):
    ids = ref.tokenizer(PROMPT).input_ids
    gen, _ = ref.generate(ids, 10)
    i = next(i for i in range(2, len(gen)) if gen[i] not in gen[:i])  # its first occurrence is at i
    kw = dict(model="smol", prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"stop_token_ids": [gen[i]]})
    r = client.completions.create(**kw)
    # the stop token ends the choice: counted, its text not sent
    assert r.choices[0].text == "".join(ref.deltas(gen[:i])) and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == i + 1
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_presence_penalty_changes_the_output(client):
    """Greedy, so only the penalty can change the tokens: every token already generated loses 2 logits."""
    def tokens(**kw):
        r = client.completions.create(model="smol", prompt="Once upon a time", max_tokens=12, temperature=0,
                                      logprobs=0, **kw)
        return r.choices[0].logprobs.tokens

    plain, penalised = tokens(), tokens(presence_penalty=2.0)
    assert plain != penalised
    assert len(set(penalised)) > len(set(plain))  # fewer repeats (8 and 12 distinct of 12 when written)


# -- errors -----------------------------------------------------------------------------------------------
def _err(fn):
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


def test_error_shapes(client):
    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, temperature=3))
    assert e.status_code == 400 and e.body["param"] == "temperature" and e.body["type"] == "invalid_request_error"
    assert set(e.body) == {"message", "type", "param", "code"}
    e = _err(lambda: client.completions.create(model="nope", prompt=PROMPT))
    assert e.status_code == 404 and e.body["code"] == "model_not_found" and e.body["param"] == "model"
    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, max_tokens=10 ** 6))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    assert "8192" in e.body["message"] and "5 in the prompt" in e.body["message"]
    e = _err(lambda: client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x " * 9000}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages"
    e = _err(lambda: client.completions.create(model="smol", prompt=""))
    assert e.status_code == 400 and e.body["param"] == "prompt"
    e = _err(lambda: client.completions.create(model="smol", prompt=[10 ** 7]))
    assert e.status_code == 400 and e.body["param"] == "prompt"
    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, logit_bias={"abc": 1}))
    assert e.status_code == 400 and e.body["param"] == "logit_bias"
    e = _err(lambda: client.chat.completions.create(model="smol", messages=[]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, stop=[""]))
    assert e.status_code == 400 and e.body["param"] == "stop"
    # a value matching no member of a union names the field, not pydantic's member (prompt.str, prompt.list[str])
    for bad in (123, ["a", 5], [[1], "x"]):
        e = _err(lambda: client.completions.create(model="smol", prompt=bad))
        assert e.status_code == 400 and e.body["param"] == "prompt", e.body
        assert e.body["message"].startswith("prompt: str: ") and "list[int]" in e.body["message"]
    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, stop=5))
    assert e.status_code == 400 and e.body["param"] == "stop"
    e = _err(lambda: client.chat.completions.create(model="smol", messages=[{"role": "user", "content": 5}]))
    assert e.status_code == 400 and e.body["param"] == "messages.0.content"
    r = httpx.post(str(client.base_url) + "completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(str(client.base_url) + "nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_context_length_exceeded_is_a_400_before_streaming(server, client):
    """With stream=true too: a plain JSON error, never an SSE stream."""
    import openai

    h = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 10 ** 6}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 9000}]})):
        r = httpx.post(server.url + path, json={**body, "stream": True}, headers=h, timeout=60)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt=PROMPT, max_tokens=10 ** 6, stream=True)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"


def test_unknown_fields_are_ignored(client, server):
    r = client.completions.create(model="smol", prompt=PROMPT, max_tokens=2, temperature=0,
                                  extra_body={"some_future_field": {"x": 1}, "top_k": 1, "repetition_penalty": 1.1})
    assert r.choices[0].finish_reason == "length"
    assert "ignoring unknown fields ['some_future_field']" in server.log.read_text()


def test_tokenize_detokenize(server, ref):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}, headers=h).json()
    assert r["tokens"] == ref.tokenizer(PROMPT).input_ids and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 8192
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}, headers=h).json()
    assert chat["tokens"] == ref.chat_ids(CHAT)
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}, headers=h).json()
    assert d == {"prompt": PROMPT}


def test_timeout_is_an_error_mid_stream(client):
    import openai

    e = _err(lambda: client.completions.create(model="smol", prompt=PROMPT, max_tokens=2000, temperature=0,
                                               extra_body={"timeout": 0.5, "ignore_eos": True}))
    assert e.status_code == 408 and e.body["code"] == "request_timeout"
    stream = client.completions.create(model="smol", prompt=PROMPT, max_tokens=2000, temperature=0, stream=True,
                                       extra_body={"timeout": 1.0, "ignore_eos": True})
    got = []
    with pytest.raises(openai.APIError) as err:
        for c in stream:
            got.append(c.choices[0].text)
    assert got and "timed out" in str(err.value)


def test_keepalive_comments_during_long_prefill(server, ref):
    # ~1500 prompt tokens in 512-token chunks: seconds of prefill with nothing to send but keep-alives
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "stream": True},
                      timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    data = [i for i, ln in enumerate(lines) if ln.startswith("data:")]
    comments = [i for i, ln in enumerate(lines) if ln.startswith(":")]
    assert comments and data[0] < comments[0] < data[1]  # after the role chunk, before the first content
    assert lines[-1] == "data: [DONE]"


def test_metrics_after_traffic(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("uc:time_to_first_token_seconds_bucket", "uc:inter_token_latency_seconds_bucket",
                 "uc:e2e_request_latency_seconds_bucket", "uc:request_queue_time_seconds_bucket",
                 "uc:request_prompt_tokens_bucket", "uc:request_generation_tokens_bucket", "uc:prompt_tokens_total",
                 "uc:generation_tokens_total", "uc:num_requests_running", "uc:num_requests_waiting",
                 "uc:kv_cache_usage_perc", 'uc:device_memory_bytes{device="cpu",kind="total"',
                 'use="weights"', 'use="kv_cache"', "uc:resident_weight_bytes", "uc:model_info{"):
        assert name in text, name
    assert 'le="0.001"' in text and 'le="2560.0"' in text  # vLLM's TTFT buckets
    assert server.metric("uc:request_success_total", finished_reason="length") >= 10
    assert server.metric("uc:request_failure_total", reason="validation") >= 9
    assert server.metric("uc:request_failure_total", reason="timeout") >= 2
    info = next(ln for ln in text.splitlines() if ln.startswith("uc:model_info{"))
    assert 'bits="5"' in info and 'codec="gsq"' in info and 'dtype="float32"' in info and 'residency="packed"' in info  # --residency auto on this float32 CPU


def test_stream_residency_matches_dense(smol_pack, ref, tmp_path):
    """--residency stream under a budget of 30% of the dense weights: dense's tokens, and /metrics shows
    that most layers stay off the device and are streamed in."""
    with ServerProcess(smol_pack, "--residency", "stream", "--vram-budget", "30%", "--dtype", "float32",
                       "--kv-cache-memory", "64MiB", log=tmp_path / "server.log") as s:
        ids = ref.tokenizer(PROMPT).input_ids
        gen, finish = ref.generate(ids, 4)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                       timeout=120).json()
        assert r["choices"][0]["text"] == "".join(ref.deltas(gen)) and r["choices"][0]["finish_reason"] == finish
        resident, total = s.metric("uc:resident_layers", mode="stream"), s.metric("uc:total_layers", mode="stream")
        assert total == 30 and resident < total
        assert s.metric("uc:weight_bytes_transferred_total", mode="stream") > 0
        assert 'residency="stream"' in httpx.get(s.url + "/metrics").text


# -- a small server: overload, cancellation, drain ----------------------------------------------------------------
@pytest.fixture(scope="module")
def small(smol_pack, tmp_path_factory):
    with ServerProcess(smol_pack, "--max-num-seqs", "2", "--max-queue", "2", "--dtype", "float32",
                       "--drain-timeout", "60", log=tmp_path_factory.mktemp("small") / "server.log") as s:
        yield s


def _wait_metric(server, name, want, timeout=20, **labels):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric(name, **labels) == want:
            return
        time.sleep(0.1)
    assert server.metric(name, **labels) == want


def test_not_ready_while_loading(small):
    """Up (live) at once; ready only after the weights loaded and the warm-up token passed."""
    assert small.while_loading, "the server was never seen loading"
    live, ready, body, retry = small.while_loading[-1]
    assert (live, ready) == (200, 503) and retry == "5"
    assert body["error"]["code"] == "not_ready" and "loading" in body["error"]["message"]


def test_overload_gets_429_and_nothing_is_lost(small):
    """10 concurrent requests at 2 running + 2 queued: every one is served or refused with 429."""
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(10)))

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 429} and codes.count(200) >= 4 and 429 in codes
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    assert small.metric("uc:request_failure_total", reason="overloaded") == codes.count(429)


def test_disconnects_abort_and_free_slots(small):
    before = small.metric("uc:request_failure_total", reason="aborted")
    body = {"prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    for _ in range(2):  # streaming: read a few chunks, then hang up
        with httpx.stream("POST", small.url + "/v1/completions", json={**body, "stream": True}) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 4:
                    assert small.metric("uc:kv_cache_usage_perc") > 0  # its tokens are cached meanwhile
                    break  # closing the line iterator closes the connection
    # non-streaming: the client gives up while the server generates
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small.url + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=1.5))
    _wait_metric(small, "uc:num_requests_running", 0)
    _wait_metric(small, "uc:num_requests_waiting", 0)
    _wait_metric(small, "uc:kv_cache_usage_perc", 0)
    assert small.metric("uc:request_failure_total", reason="aborted") == before + 3


def test_sigterm_drains_then_exits(small):
    """Last test of the module: it stops the small server. The stream is long enough (about 4 s at 100
    tok/s) to still be running while the drain is checked, however fast decoding gets."""
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", small.url + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(lines)
        small.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert httpx.get(small.url + "/health/ready").status_code == 503
        assert httpx.get(small.url + "/health/live").status_code == 200
        refused = httpx.post(small.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    texts = [json.loads(ln[6:])["choices"][0]["text"] for ln in rest[:-1]]
    assert len([t for t in texts if t]) >= 30  # the running stream finished
    assert small.proc.wait(60) == 0
