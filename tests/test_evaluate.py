"""uc eval's KL divergence: the streamed, layer-by-layer measure equals the one from two whole models."""

from __future__ import annotations

import torch

from compressor.checkpoint import SourceCheckpoint
from compressor.config import build_config
from compressor.evaluate import CheckpointSource, PackSource, compare, token_stats
from compressor.pack import pack
from ucformat import PackReader
from ucformat.skeleton import Skeleton


def test_streamed_kl_equals_the_whole_models_kl(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from ucformat.runtime import load

    dst = tmp_path / "p"
    pack(tiny_llama, dst, build_config(bits=3), progress=False)
    windows = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    sk = Skeleton(tiny_llama, dtype=torch.float32)
    base = token_stats(sk, CheckpointSource(SourceCheckpoint(tiny_llama)), windows, batch=2, progress=False, keep=True)
    mine = token_stats(sk, PackSource(PackReader(dst)), windows, batch=2, progress=False, reference=base)
    itself = token_stats(sk, CheckpointSource(SourceCheckpoint(tiny_llama)), windows, progress=False, reference=base)

    with torch.inference_mode():
        p = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)(windows).logits[:, :-1]
        q = load(dst, dtype=torch.float32)(windows).logits[:, :-1]
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    want = (lp.exp() * (lp - lq)).sum(-1).flatten().double()

    assert mine.kl.shape == (3 * 39,) and torch.allclose(mine.kl, want, rtol=1e-3, atol=1e-6)
    assert itself.kl.abs().max() < 1e-6  # a model against itself
    r = compare(mine, base, 40, 3, 0.0)
    assert r.kl == mine.kl.mean().item() > 0 and r.kl_p99 >= r.kl
    assert compare(base, None, 40, 3, 0.0).kl is None  # no base, no KL
