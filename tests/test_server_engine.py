"""The engine without HTTP: continuous batching parity with transformers' own generate (the slow
reference), chunked prefill, preemption, stop strings, UTF-8 safety, sampling, aborts and failures.

Most tests run a tiny random Llama that uses the SmolLM2 tokenizer (fast); the parity test also runs the
real SmolLM2 pack at float32, where outputs must be token-identical alone and in a busy batch.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_tiny
from server.detokenizer import IncrementalDetokenizer, StopMatcher
from server.engine import Engine, EngineRequest, QueueFull
from server.kv_cache import KVShape, SlotKVCache
from server.sampling import SamplingParams
from server.stats import IterationStats, RequestRecord
from test_server_api import smol_pack  # noqa: F401  (the real pack, packed once per session)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away, there lived",
           "1, 2, 3, 4,", "Water boils at"]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", dtype=torch.float32, vocab_size=49152,
                     max_position_embeddings=512)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_engine(model, tokenizer, budget=64 << 20, max_len=512, records=None, **kw) -> Engine:
    dtype = next(model.parameters()).dtype
    seqs = kw.pop("max_num_seqs", 8)
    kv = SlotKVCache(KVShape.of(model.config, dtype, "cpu"), budget, seqs)
    eng = Engine(model, tokenizer, kv, max_num_seqs=seqs, max_model_len=min(max_len, kv.max_len), eos_token_ids=(2,),
                 stats_sink=records.append if records is not None else None, **kw)
    eng.start()
    return eng


class Collector:
    def __init__(self) -> None:
        self.outs, self.done = [], threading.Event()

    def __call__(self, out) -> None:
        self.outs.append(out)
        if out.finished:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outs)

    @property
    def last(self):
        return self.outs[-1]


def submit(eng, tokenizer, prompt, params, rid=None, **kw) -> Collector:
    c = Collector()
    ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
    eng.submit(EngineRequest(rid or f"r{time.monotonic_ns()}", ids, params, c, **kw))
    return c


def generate_all(eng, tokenizer, prompts, params, timeout=300) -> list[Collector]:
    cs = [submit(eng, tokenizer, p, params) for p in prompts]
    for c in cs:
        assert c.done.wait(timeout)
    return cs


def reference(model, tokenizer, prompt, n) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def test_batched_greedy_equals_generate_tiny(tiny_model, tokenizer):
    refs = [reference(tiny_model, tokenizer, p, 20) for p in PROMPTS]
    eng = make_engine(tiny_model, tokenizer)
    try:
        alone = [generate_all(eng, tokenizer, [p], GREEDY)[0].tokens for p in PROMPTS]
        busy = [c.tokens for c in generate_all(eng, tokenizer, PROMPTS, GREEDY)]
    finally:
        eng.shutdown()
    assert alone == refs
    assert busy == refs


def test_chunked_prefill_and_preemption_keep_outputs(tiny_model, tokenizer):
    # two prompts of ~245 tokens: both fit a 512-position budget at 256 columns each, but not once they
    # grow past 256, so the newer one is preempted and later recomputed from its tokens
    words = " ".join(PROMPTS * 12).split()
    prompts = [" ".join(words[:150]), " ".join(words[10:160])]
    lens = [len(tokenizer(p).input_ids) for p in prompts]
    assert all(230 < n < 250 for n in lens), lens
    refs = [reference(tiny_model, tokenizer, p, 40) for p in prompts]
    records = []
    per_token = KVShape.of(tiny_model.config, torch.float32, "cpu").bytes_per_token
    eng = make_engine(tiny_model, tokenizer, budget=512 * per_token, prefill_chunk=16, records=records)
    try:
        got = [c.tokens for c in generate_all(eng, tokenizer, prompts, SamplingParams(
            max_tokens=40, temperature=0.0, ignore_eos=True))]
    finally:
        eng.shutdown()
    assert got == refs
    its = [r for r in records if isinstance(r, IterationStats)]
    assert max(r.prompt_tokens for r in its) <= 16
    assert sum(r.preempted for r in its) > 0, "the budget was meant to force preemption"


@pytest.mark.slow
def test_batched_greedy_equals_generate_smollm2(smol_pack, tokenizer):  # noqa: F811
    """The real model at float32: token-identical to transformers' generate, alone and in a busy batch."""
    from ucformat.runtime import load

    model = load(smol_pack, dtype=torch.float32)
    n = 16
    refs = [reference(model, tokenizer, p, n) for p in PROMPTS]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    eng = make_engine(model, tokenizer, budget=256 << 20)
    try:
        alone = [generate_all(eng, tokenizer, [p], params)[0].tokens for p in PROMPTS[:2]]
        busy = [c.tokens for c in generate_all(eng, tokenizer, PROMPTS, params)]
    finally:
        eng.shutdown()
    assert alone == refs[:2]
    assert busy == refs


@pytest.mark.slow
def test_packed_residency_through_the_loader(smol_pack):  # noqa: F811
    """The loader passes the residency plan to the runtime: packed gives dense's tokens, and its stats."""
    from server.config import EngineConfig
    from server.loader import build_engine

    outs = {}
    for mode in ("dense", "packed"):
        eng, info = build_engine(str(smol_pack), EngineConfig(dtype="float32", residency=mode,
                                                              kv_cache_memory="64MiB"), "smol")
        eng.start()
        try:
            c = submit(eng, eng.tokenizer, PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            assert c.done.wait(300)
            outs[mode] = c.tokens
            runtime = getattr(eng.model, "uc_runtime", None)
            if runtime is not None:
                assert runtime.stats().mode == mode
            assert info.residency == mode
        finally:
            eng.shutdown()
    assert outs["packed"] == outs["dense"] and len(outs["dense"]) == 6


@pytest.mark.gpu
def test_cuda_engine_matches_generate(tiny_model, tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny_model.to("cuda")
    try:
        refs = [reference_on(model, tokenizer, p, 12, "cuda") for p in PROMPTS]
        dtype = next(model.parameters()).dtype
        kv = SlotKVCache(KVShape.of(model.config, dtype, "cuda"), 64 << 20, 8)
        eng = Engine(model, tokenizer, kv, max_num_seqs=8, max_model_len=512, eos_token_ids=(2,))
        eng.start()
        try:
            got = [c.tokens for c in generate_all(eng, tokenizer, PROMPTS, SamplingParams(max_tokens=12,
                                                                                          temperature=0.0,
                                                                                          ignore_eos=True))]
        finally:
            eng.shutdown()
        assert got == refs
    finally:
        tiny_model.to("cpu")


def reference_on(model, tokenizer, prompt, n, device) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_stop_string_spanning_tokens_is_never_emitted(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    try:
        free = generate_all(eng, tokenizer, [PROMPTS[0]], GREEDY)[0]
        deltas = [o.text for o in free.outs if o.text]
        assert len(deltas) >= 4
        # a stop string made of the end of one token's text and the start of the next
        a, b = deltas[2], deltas[3]
        stop = a[-2:] + b[:2]
        expected = free.text[: free.text.index(stop)]
        got = generate_all(eng, tokenizer, [PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0.0,
                                                                          stop=(stop,)))[0]
    finally:
        eng.shutdown()
    assert got.text == expected
    assert got.last.finish_reason == "stop"
    assert all(stop not in o.text for o in got.outs)


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(("STOP", "halt"))
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)  # not a stop after all: released
    assert m.feed(" ha") == (" ", False)
    assert m.feed("lt now") == ("", True)
    m = StopMatcher(("\n\n",), include_stop=True)
    assert m.feed("a\n") == ("a", False)
    assert m.feed("\nb") == ("\n\n", True)


def test_detokenizer_never_cuts_a_character(tokenizer):
    text = "Ünïcödé ✓ 日本語 🎉 done"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some tokens were held until their character completed


def test_sampling_seed_bias_and_penalties(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    try:
        def run(**kw):
            p = SamplingParams(max_tokens=12, ignore_eos=True, **kw)
            return generate_all(eng, tokenizer, [PROMPTS[1]], p)[0].tokens

        a, b, c = run(temperature=1.0, seed=7), run(temperature=1.0, seed=7), run(temperature=1.0, seed=8)
        assert a == b and a != c
        # the same seed is unaffected by what else is in the batch
        busy = generate_all(eng, tokenizer, [PROMPTS[1], *PROMPTS],
                            SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=7))
        assert busy[0].tokens == a
        assert run(temperature=0.8, top_k=1, seed=1) == run(temperature=0.0)
        assert set(run(temperature=0.0, logit_bias=((1234, 100.0),))) == {1234}
        rep = run(temperature=0.0, repetition_penalty=5.0, frequency_penalty=2.0)
        assert len(set(rep)) > len(rep) // 2
        assert run(temperature=1.0, top_p=1e-6, seed=3) == run(temperature=0.0)  # nucleus of one token
        assert run(temperature=1.0, min_p=1.0, seed=4) == run(temperature=0.0)
        # overflowing inputs (found by schemathesis) sample something instead of failing the request
        assert len(run(temperature=1.0, repetition_penalty=5e-324, seed=1)) == 12
        assert run(temperature=1e-300, seed=2) == run(temperature=0.0)
    finally:
        eng.shutdown()


def test_top_k_samples_only_the_k_most_likely(tiny_model, tokenizer):
    """The random model's distribution is nearly flat, so unrestricted draws almost never hit its top 2;
    with top_k=2 every draw is one of the two (per the raw logprobs reported beside it), both occur."""
    eng = make_engine(tiny_model, tokenizer)
    try:
        def ranks(seed, **kw):
            p = SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=seed, logprobs=2, **kw)
            c = generate_all(eng, tokenizer, [PROMPTS[1]], p)[0]
            return [[t for t, _ in e.top].index(e.token_id) if e.token_id in [t for t, _ in e.top] else None
                    for o in c.outs for e in o.logprobs]

        top2 = [r for seed in (1, 2, 3) for r in ranks(seed, top_k=2)]
        free = ranks(1)
    finally:
        eng.shutdown()
    assert len(top2) == 48 and set(top2) == {0, 1}
    assert free.count(None) > len(free) // 2


def test_logprobs_and_prompt_logprobs(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    try:
        c = generate_all(eng, tokenizer, [PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2,
                                                                      prompt_logprobs=1))[0]
    finally:
        eng.shutdown()
    n_prompt = len(tokenizer(PROMPTS[0]).input_ids)
    plp = c.outs[0].prompt_logprobs
    assert len(plp) == n_prompt and plp[0] is None and all(e is not None for e in plp[1:])
    lps = [e for o in c.outs for e in o.logprobs]
    assert len(lps) == 3
    for e in lps:
        assert e.top[0][0] == e.token_id and abs(e.top[0][1] - e.logprob) < 1e-5  # greedy picks the argmax
        assert len(e.top) == 2 and e.top[0][1] >= e.top[1][1]


def test_abort_frees_slot_and_counts(tiny_model, tokenizer):
    records = []
    eng = make_engine(tiny_model, tokenizer, records=records)
    try:
        c = submit(eng, tokenizer, PROMPTS[0], SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
                   rid="victim")
        while not c.outs:
            time.sleep(0.01)
        eng.abort("victim")
        assert c.done.wait(10)
        assert c.last.error == "aborted"
        deadline = time.monotonic() + 5
        while eng.scheduler_stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert eng.scheduler_stats().running == 0 and eng.num_unfinished() == 0
    finally:
        eng.shutdown()
    assert any(isinstance(r, RequestRecord) and r.outcome == "aborted" for r in records)


def test_timeout_queue_full_and_internal_error(tiny_model, tokenizer):
    records = []
    eng = make_engine(tiny_model, tokenizer, max_num_seqs=1, max_queue=2, records=records)
    try:
        slow = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        t = submit(eng, tokenizer, PROMPTS[0], slow, timeout=0.3)
        q = submit(eng, tokenizer, PROMPTS[1], SamplingParams(max_tokens=2, temperature=0.0))
        # one running + max_queue waiting: the batch and the queue fill within a few more submissions
        with pytest.raises(QueueFull):
            for i in range(5):
                submit(eng, tokenizer, PROMPTS[2], slow, rid=f"slow{i}")
        assert t.done.wait(30) and t.last.error == "timeout"
        assert q.done.wait(30) and q.last.finish_reason == "length"
        for i in range(5):
            eng.abort(f"slow{i}")
        # a forward that raises fails the sequences in it, and the engine keeps serving
        real = eng.runner.decode
        eng.runner.decode = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        bad = submit(eng, tokenizer, PROMPTS[3], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert bad.done.wait(30) and bad.last.error == "internal" and "boom" in bad.last.error_message
        eng.runner.decode = real
        while eng.num_unfinished():
            time.sleep(0.05)
        ok = submit(eng, tokenizer, PROMPTS[4], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        assert ok.done.wait(30) and ok.last.finish_reason == "length" and len(ok.tokens) == 3
    finally:
        eng.shutdown()
    outcomes = {r.outcome for r in records if isinstance(r, RequestRecord)}
    assert {"timeout", "internal", "length"} <= outcomes


def test_kv_cache_is_released_when_idle(tiny_model, tokenizer):
    eng = make_engine(tiny_model, tokenizer)
    try:
        generate_all(eng, tokenizer, PROMPTS, SamplingParams(max_tokens=4, temperature=0.0))
        deadline = time.monotonic() + 5
        while eng.kv.allocated_bytes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.kv.allocated_bytes == 0
    finally:
        eng.shutdown()


def test_gemma3_sliding_window_parity(tmp_path, tokenizer):
    """A model mixing sliding and full attention (masks passed per layer type) still matches generate."""
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path / "gemma3", "gemma3", dtype=torch.float32, vocab_size=49152)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = PROMPTS[:3]  # longer than the window of 8
    refs = [reference(model, tokenizer, p, 12) for p in prompts]
    eng = make_engine(model, tokenizer, prefill_chunk=5)
    try:
        got = [c.tokens for c in generate_all(eng, tokenizer, prompts, SamplingParams(max_tokens=12, temperature=0.0,
                                                                                      ignore_eos=True))]
    finally:
        eng.shutdown()
    assert got == refs

