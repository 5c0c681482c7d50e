"""Per-expert reconstruction of MoE layers against whole-layer reconstruction (CPU by default).

    python bench/moe_stream.py            # ~5 minutes on 2 cores

There is no real MoE model among the bundled ones, so this builds a random Qwen3-MoE-shaped checkpoint
(8 layers, hidden 512, 32 experts of 256, top-4; about 111 M parameters, 91% of them in experts) and packs it
with the 4-bit uniform codec. For `packed` and for `stream` at the planner's floor (every layer streamed),
with per-expert reconstruction on and off (`ucformat.load(..., per_expert=...)`): decode tok/s at batch 1
and 8 (32-token prompt, 16 greedy steps), experts rebuilt per layer call and pack bytes read per token
processed (prompt and decoded tokens), both over the prompt pass and the decode steps. Writes the "moe" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import machine, table, write_section  # noqa: E402
from compressor.config import PackConfig  # noqa: E402
from compressor.pack import pack  # noqa: E402
from ucformat.runtime import load, plan  # noqa: E402
from ucformat.speed import decode_tok_s  # noqa: E402

SHAPE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
             decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024, tie_word_embeddings=True)


def build(root: Path, shape: dict = SHAPE, device: str = "cpu") -> Path:
    """A random Qwen3-MoE checkpoint of `shape` (bf16) under root/src, packed 4-bit uniform into root/pack."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**shape)).to(torch.bfloat16)
    model.save_pretrained(root / "src")
    pack(root / "src", root / "pack", PackConfig(bits=4, codec="uniform", device=device), progress=False)
    return root / "pack"


def row(p: Path, mode: str, budget, per_expert: bool, device: str, steps: int) -> dict:
    model = load(p, device=device, residency=mode, vram_budget=budget, per_expert=per_expert)
    rt, dev = model.uc_runtime, torch.device(device)
    out = {"mode": mode if budget is None else f"{mode} (floor)", "per_expert": "yes" if per_expert else "no"}
    try:
        decode_tok_s(model, 1, 8, 2, SHAPE["vocab_size"], dev)  # warm-up
        for batch in (1, 8):
            before = rt.stats()
            out[f"b{batch}"] = round(decode_tok_s(model, batch, 32, steps, SHAPE["vocab_size"], dev), 2)
            s = rt.stats()
            tokens = batch * steps + batch * 32  # decode steps plus the prompt's prefill pass
            calls = steps + 1
            out[f"experts_per_call_b{batch}"] = round((s.experts_reconstructed - before.experts_reconstructed)
                                                      / calls / SHAPE["num_hidden_layers"], 1) if per_expert else "all"
            out[f"read_MiB_per_token_b{batch}"] = round((s.bytes_transferred - before.bytes_transferred) / tokens / 2**20, 3)
    finally:
        rt.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        p = build(Path(d))
        full = plan(p, device=a.device, residency="stream", vram_budget="100%")
        floor = full.min_stream_bytes
        rows = []
        for mode, budget in (("packed", None), ("stream", floor)):
            for per_expert in (True, False):
                rows.append(row(p, mode, budget, per_expert, a.device, a.decode_steps))
                print(rows[-1], flush=True)
    cols = ["mode", "per_expert", "b1", "b8", "experts_per_call_b1", "experts_per_call_b8", "read_MiB_per_token_b1",
            "read_MiB_per_token_b8"]
    heads = ["mode", "per expert", "decode tok/s b1", "decode tok/s b8", "experts rebuilt per layer call b1",
             "same b8", "pack MiB read per token processed b1", "same b8"]
    body = [f"Machine: {machine()}. Command: `python bench/moe_stream.py`. Synthetic Qwen3-MoE (random weights, "
            f"{SHAPE['num_hidden_layers']} layers, {SHAPE['num_experts']} experts of {SHAPE['moe_intermediate_size']}, "
            f"top-{SHAPE['num_experts_per_tok']}), 4-bit uniform codec, float32 compute. A layer call of the prompt "
            "(32 tokens x batch) routes many tokens, so it hits more experts than a decode step.", "",
            table(heads, [[r[c] for c in cols] for r in rows])]
    if not a.no_docs:
        write_section("moe", "## MoE: experts reconstructed one by one (`bench/moe_stream.py`)\n\n" + "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
