"""The static decode step that CUDA graphs capture (server/graphs.py): on the CPU it runs eagerly and must
give the eager step's logits (padding rows, every allocated column, masks built from static buffers); on
CUDA the replayed graph must give them too."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from server import graphs
from server.kv_cache import KVShape, SlotKVCache
from server.runner import ModelRunner
from test_decoder import PROMPTS, prefill


def pair(model, device: str):
    dtype = next(model.parameters()).dtype
    out = []
    for _ in range(2):
        kv = SlotKVCache(KVShape.of(model.config, dtype, device), 8 << 20, 8)
        kv.ensure(8, 64, 0, 0)
        out.append(ModelRunner(model, kv, cuda_graphs=False))
    eager, static = out
    static.static = graphs.StaticDecode(static.decoder, static._masks, static.kv, capture=device != "cpu")
    return eager, static


def run(runner: ModelRunner, prompts, n: int, grow_at: int | None = None) -> list[torch.Tensor]:
    tokens, lens, out = prefill(runner, prompts).argmax(-1).tolist(), [len(p) for p in prompts], []
    for i in range(n):
        if i == grow_at:  # the cache is reallocated mid-run: the static step must follow it
            runner.kv.ensure(8, 1024, len(prompts), max(lens))
        logits = runner.decode(tokens, lens).float()
        out.append(logits)
        tokens, lens = logits.argmax(-1).tolist(), [x + 1 for x in lens]
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_static_step_equals_eager_step(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path / arch, arch, dtype=torch.float32, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eager, static = pair(model, "cpu")
    for prompts in (PROMPTS[:1], PROMPTS):  # buckets 1 and 4 (3 rows + 1 padding row)
        a = run(eager, prompts, 10)
        b = run(static, prompts, 10, grow_at=5)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    assert static.kv.cap == 1024  # grown in the first run, where bucket 1 was built again for the new buffers
    assert set(static.static.steps) == {1, 4} and static.static.key == graphs._key(static.kv)


def test_buckets_and_refusals(tmp_path, tiny_llama):
    assert [graphs.bucket(r) for r in (1, 2, 3, 5, 16, 17, 256)] == [1, 2, 4, 8, 16, 32, 256]
    assert graphs.bucket(257) is None
    import ucformat
    from compressor.config import PackConfig
    from compressor.pack import pack

    p = tmp_path / "pack"
    pack(tiny_llama, p, PackConfig(bits=4, block_size=32), progress=False)
    assert graphs.usable(ucformat.load(p, residency="packed")) == (True, "")
    floor = ucformat.plan(p, residency="stream", vram_budget="100%").min_stream_bytes
    ok, why = graphs.usable(ucformat.load(p, residency="stream", vram_budget=floor))
    assert not ok and "streamed" in why


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from transformers import AutoModelForCausalLM

    path = make_tiny(tmp_path / "llama", "llama", dtype=torch.float32, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval().cuda()
    eager, static = pair(model, "cuda")
    a, b = run(eager, PROMPTS, 10), run(static, PROMPTS, 10)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert static.static.captures == 1
