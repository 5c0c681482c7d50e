"""The lean step (server/decoder.py: decode and prefill) against the transformers forward it replaces: same
logits for every architecture it accepts (float32: to float tolerance; bfloat16: same greedy tokens, logits within a
few bfloat16 steps), including models whose linears compute from the codes (packed residency)."""

from __future__ import annotations

import pytest
import torch

import ucformat
from compressor.config import PackConfig
from compressor.pack import pack
from conftest import make_tiny
from server.decoder import recipe_of
from server.kv_cache import KVShape, SlotKVCache
from server.runner import ModelRunner
from ucformat import cpu_qgemv

LEAN = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]


def runners(model):
    dtype = next(model.parameters()).dtype
    out = []
    for lean in (True, False):
        kv = SlotKVCache(KVShape.of(model.config, dtype, "cpu"), 8 << 20, 4)
        out.append(ModelRunner(model, kv, lean_decode=lean))
    assert out[0].decoder is not None and out[1].decoder is None
    return out


def prefill(runner: ModelRunner, prompts: list[list[int]], chunk: int | None = None) -> torch.Tensor:
    """The prompts prefilled in packed forwards, one cache row each (all of them in one forward, or in
    forwards of up to `chunk` tokens of each prompt, the later ones attending to the cached columns): the
    logits at each prompt's last token [len(prompts), V]."""
    done = [0] * len(prompts)
    last = [None] * len(prompts)
    while any(d < len(p) for d, p in zip(done, prompts)):
        segments, flat, keep, rows = [], [], [], []
        for r, p in enumerate(prompts):
            take = p[done[r]:done[r] + (chunk or len(p))]
            if not take:
                continue
            segments.append((r, done[r], len(take)))
            flat += take
            keep.append(len(flat) - 1)
            rows.append(r)
            done[r] += len(take)
        logits = runner.prefill(segments, flat, keep)
        for i, r in enumerate(rows):
            last[r] = logits[i]
    return torch.stack(last).float()


def steps(runner: ModelRunner, prompts: list[list[int]], n: int, chunk: int | None = None) -> list[torch.Tensor]:
    """Prefill the prompts (one row each), then n greedy decode steps of all rows: the prefill logits at each
    prompt's last token, then each step's decode logits."""
    runner.kv.ensure(len(prompts), 64, 0, 0)
    first = prefill(runner, prompts, chunk)
    tokens, lens = first.argmax(-1).tolist(), [len(p) for p in prompts]
    out = [first]
    for _ in range(n):
        logits = runner.decode(tokens, lens)
        out.append(logits.float())
        lens = [x + 1 for x in lens]
        tokens = logits.argmax(-1).tolist()
    return out


PROMPTS = [[5, 9, 11, 3, 7, 1, 2, 60, 61, 62], [100, 4, 8], [17, 18, 19, 20, 21, 22]]


@pytest.mark.parametrize("arch", LEAN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_matches_transformers(arch, dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path / arch, arch, dtype=dtype, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    assert recipe_of(model) is not None
    lean, stock = runners(model)
    # 12 steps: past Gemma's sliding window of 8; prompts whole, and in chunks of 3 tokens (later chunks
    # attend to the cached columns, and past the window; the last forward prefills one token)
    a, b = steps(lean, PROMPTS, 12), steps(stock, PROMPTS, 12)
    a2, b2 = steps(lean, PROMPTS, 2, chunk=3), steps(stock, PROMPTS, 2, chunk=3)
    for x, y in zip(a + a2, b + b2):
        if dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(x.argmax(-1), y.argmax(-1))
            assert (x - y).abs().max() <= 0.05 * y.abs().max()


def test_unsupported_models_keep_the_transformers_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    for arch in ("phi3", "mixtral"):
        path = make_tiny(tmp_path / arch, arch, dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        assert recipe_of(model) is None


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lean_step_on_codes_matches_stock_forward(arch, tmp_path, monkeypatch):
    """Packed and streamed residency with the quantized kernels: the lean step and the transformers forward
    (both computing from the codes) agree, and both stay close to the dense reconstruction. Float
    activations: integer rounding of inputs that differ at float rounding would hide a real difference."""
    monkeypatch.setattr(cpu_qgemv, "ACT", "float")
    src = make_tiny(tmp_path / "src", arch, dtype=torch.float32, num_hidden_layers=4, hidden_size=128,
                    intermediate_size=256)
    p = tmp_path / "pack"
    pack(src, p, PackConfig(bits=4, block_size=32), progress=False)
    dense = steps(runners(ucformat.load(p, residency="dense"))[1], PROMPTS, 6)
    for mode, budget in (("packed", None), ("stream", "60%")):
        model = ucformat.load(p, residency=mode, vram_budget=budget)
        assert model.uc_runtime.stats().linears_from_codes == 4 * 7
        lean, stock = runners(model)
        a, b = steps(lean, PROMPTS, 6), steps(stock, PROMPTS, 6)
        for x, y, d in zip(a, b, dense):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x, d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", LEAN)
@pytest.mark.parametrize("act", ["int16", "float"])
def test_native_body_is_the_python_step_bit_for_bit(arch, act, tmp_path, monkeypatch):
    """Packed float32 decode runs every layer in one native call (native_step.py); its logits are those of
    the lean step's Python layers bit for bit (the same kernels, norms, rotation, attention and torch's own
    activation), for every architecture: q/k/v biases (Qwen2), q/k norms (Qwen3, Gemma 3), sandwich norms,
    tanh-GELU and sliding windows (Gemma 3, past its window of 8), grouped kv heads. Not in stream
    residency (its layers are attached between calls) and not in bfloat16."""
    monkeypatch.setattr(cpu_qgemv, "ACT", act)
    src = make_tiny(tmp_path / "src", arch, dtype=torch.float32, num_hidden_layers=3, hidden_size=128,
                    intermediate_size=256)
    p = tmp_path / "pack"
    pack(src, p, PackConfig(bits=4, block_size=32), progress=False)
    model = ucformat.load(p, residency="packed")
    native, python = runners(model)[0], runners(model)[0]
    python.decoder.native.usable = False
    a, b = steps(native, PROMPTS, 12), steps(python, PROMPTS, 12)
    assert native.decoder.native.body is not None and python.decoder.native.body is None
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    floor = ucformat.runtime.plan(p, residency="dense").min_stream_bytes
    stream = runners(ucformat.load(p, residency="stream", vram_budget=floor))[0]
    assert any(stream.decoder.hooked)
    steps(stream, PROMPTS, 2)
    assert stream.decoder.native.body is None and not stream.decoder.native.usable
    half = runners(ucformat.load(p, residency="packed", dtype=torch.bfloat16))[0]
    steps(half, PROMPTS, 2)
    assert half.decoder.native.body is None


@pytest.mark.parametrize("d", [32, 64, 256, 36])
@pytest.mark.parametrize("window", [None, 16])
def test_decode_attention_op_matches_sdpa(window, d):
    """cpu_ops.attend (the lean step's cache write + attention on the CPU) against the index copy and SDPA
    it replaces: rows at different lengths, grouped kv heads, a sliding window; the cache written alike.
    Head sizes: multiples of 8 take the AVX2 loop (256: values summed in 64-column passes), 36 the plain one."""
    import torch.nn.functional as F

    from server import cpu_ops
    from server.kv_cache import decode_mask

    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, cap = 3, 6, 2, 256
    keys, values = (torch.randn(4, kv_heads, cap, d, generator=g) for _ in range(2))
    q = torch.randn(rows, 1, heads, d, generator=g)
    k, v = (torch.randn(rows, 1, kv_heads, d, generator=g) for _ in range(2))
    lens = torch.tensor([0, 41, 200])  # 1, 42 and 201 columns: whole fours of columns and a tail
    got_k, got_v = keys.clone(), values.clone()
    o = cpu_ops.attend(q, k, v, got_k, got_v, lens, window, 0.2)
    if o is None:
        pytest.skip("native CPU decode ops unavailable")
    for r in range(rows):
        keys[r, :, lens[r]], values[r, :, lens[r]] = k[r, 0], v[r, 0]
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    width = int(lens.max()) + 1
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:rows, :, :width], values[:rows, :, :width],
                                         attn_mask=decode_mask(lens, width, window), scale=0.2, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(rows, 1, heads * d)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    assert cpu_ops.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), keys.bfloat16(), values.bfloat16(), lens,
                          window, 0.2) is None  # bfloat16: SDPA's roundings, the caller's path
