"""`uc plan`, `uc generate`, `uc bench-run`: the runtime's commands (registered into `uc` by uc/cli.py)."""

from __future__ import annotations

import argparse
import json

from .residency import MODES, BudgetError

ERRORS = (BudgetError,)


def cmd_plan(a) -> int:
    from .runtime import plan

    p = plan(a.pack, device=a.device, residency=a.residency, vram_budget=a.vram_budget)
    print(json.dumps(p.to_dict(), indent=1) if a.json else p.describe())
    return 0


def cmd_generate(a) -> int:
    import torch

    from .assets import load_tokenizer
    from .reader import PackReader
    from .runtime import load

    tok = load_tokenizer(PackReader(a.pack))  # first: a broken tokenizer fails before the weights load
    model = load(a.pack, device=a.device, residency=a.residency, vram_budget=a.vram_budget)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(a.device)
    sample = a.temperature > 0
    if a.seed is not None:
        torch.manual_seed(a.seed)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=a.max_tokens, do_sample=sample,
                             temperature=a.temperature if sample else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model.uc_runtime.close()
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_bench_run(a) -> int:
    from .speed import measure

    results = {}
    for mode in a.modes:
        r = measure(a.pack, mode, device=a.device, vram_budget=a.vram_budget if mode == "stream" else None,
                    prefetch=not a.no_prefetch, prefill_tokens=a.prefill_tokens, decode_steps=a.decode_steps,
                    cold=a.cold)
        results[mode] = r.to_dict()
        if not a.json:
            print(f"{mode:7s} prefill {r.prefill_tok_s:8.1f} tok/s  decode b1 {r.decode_tok_s_b1:7.2f} tok/s  "
                  f"b8 {r.decode_tok_s_b8:7.2f} tok/s  peak resident {r.peak_resident_bytes / 2**20:8.1f} MiB")
    if a.json:
        print(json.dumps(results))
    return 0


def _runtime_flags(s: argparse.ArgumentParser, default_mode: str = "dense") -> None:
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument("--residency", default=default_mode, choices=MODES,
                   help="dense: all layers reconstructed and resident (the reference); packed: stored parts resident, "
                        "the quantized linears computed from them (ucformat/qmatmul.py); stream: a byte budget, the "
                        "rest streamed and prefetched (default %(default)s)")
    s.add_argument("--vram-budget", help="weight budget on the device for --residency stream: 24GiB, 500MB, 25%% (of the "
                                         "dense weights) or auto (free memory minus headroom; the default for stream)")


def register(sub) -> None:
    s = sub.add_parser("plan", help="print the residency plan for a pack, before loading anything",
                       description="Which layers would be resident, in which form, and the bytes moved per forward pass.")
    s.add_argument("pack")
    _runtime_flags(s, "stream")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("generate", help="generate text from a pack (greedy unless --temperature)",
                       description="Prints only the generated text on stdout.")
    s.add_argument("pack")
    s.add_argument("prompt")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--seed", type=int, help="seed for sampling")
    _runtime_flags(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("bench-run", help="prefill and decode throughput of a pack in each residency mode",
                       description="Random prompts, greedy decode with a KV cache; prefill tok/s, decode tok/s at batch "
                                   "1 and 8, peak resident weight bytes, per mode.")
    s.add_argument("pack")
    s.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    _runtime_flags(s)
    s.set_defaults(vram_budget="25%")
    s.add_argument("--no-prefetch", action="store_true", help="stream without prefetching (for comparison)")
    s.add_argument("--cold", action="store_true",
                   help="drop the pack's layer files from the page cache before every forward pass (Linux): "
                        "streamed layers come from disk, as on a host that cannot cache the pack")
    s.add_argument("--prefill-tokens", type=int, default=256)
    s.add_argument("--decode-steps", type=int, default=16)
    s.add_argument("--json", action="store_true", help="one JSON object: {mode: {prefill_tok_s, decode_tok_s_b1, ...}}")
    s.set_defaults(fn=cmd_bench_run)
