"""Variants of the end-to-end distillation stage, each run from the same GPTQ-rounded pack.

    python bench/e2e_sweep.py --bpw 4 --variants default len1024 steps200

The starting pack is `uc pack SRC DST --target-bpw X --calib TEXT --calib-articles 1-16 --e2e-steps 0`
(made once under --work). Each variant runs the stage in memory from the stored layers (finetune.py,
the same code `uc pack` runs) on its own calibration sequences, then the tuned model is evaluated on
the quality_a protocol: WikiText-2 test articles 17-62, 12 windows of 1024 tokens, against the base
model on the same windows. The teacher's final hidden states come from the whole fp model here (a
small model fits); `uc pack` streams them. Results are appended to bench/results/e2e_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import calibrate, finetune, layerwise  # noqa: E402
from compressor.checkpoint import SourceCheckpoint, layer_state_dict, nonlayer_state_dict  # noqa: E402
from compressor.config import CalibConfig  # noqa: E402
from compressor.evaluate import CheckpointSource, EvalConfig, compare, prepare_windows, token_stats  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat import PackReader, qtensor  # noqa: E402
from ucformat.manifest import layer_file  # noqa: E402
from ucformat.skeleton import Skeleton  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "e2e_sweep.json"

# name -> (sequences, their length, CalibConfig overrides). A step holds finetune.E2E_TOKENS tokens whatever
# the length, so every variant but the *steps200 ones costs the same: 100 steps of 1024 tokens.
VARIANTS = {
    "default": (32, 256, {}),
    "data128": (128, 256, {}),
    "len1024": (32, 1024, {}),
    "len1024-data64": (64, 1024, {}),
    "lr2e-3": (32, 256, {"e2e_lr": 2e-3}),
    "norms": (32, 256, {"e2e_norms": True}),
    "steps200": (32, 256, {"e2e_steps": 200}),
    "len1024-steps200": (64, 1024, {"e2e_steps": 200}),
    "len1024-data64-norms": (64, 1024, {"e2e_norms": True}),
    "len1024-data64-norms-lr3e-3": (64, 1024, {"e2e_norms": True, "e2e_lr": 3e-3, "e2e_warmup": 10}),
    # from here on relative to the current defaults (64 x 1024, norms, lr 3e-3, warmup 10). An e2e_lr is the
    # peak: the stage scales it by its starting KL (finetune.learning_rate); rows record the rate run ("lr").
    "current": (64, 1024, {}),
    "current-lr1e-3": (64, 1024, {"e2e_lr": 1e-3}),
    # articles 1-16 (the protocol's calibration text) hold 75 windows of 1024 tokens, so this is all of it
    # (71 trained on, 4 held out): 100 steps then see each sequence 1.4 times instead of 1.7
    "current-data75": (75, 1024, {}),
    # shorter sequences, half the teacher's stream; with --tokens 512 one a step, so a step costs about half
    # of one of 1024 (without it, two a step: the same tokens as 1024)
    "current-len512": (64, 512, {}),
    # the current defaults, plus sequences the fp model samples itself (GENERATED) added to the training set,
    # so that 100 steps see no sequence twice (60 + 40); the 4 held-out sequences stay real text. Not yet run to
    # the end: on 2 CPU cores the sampling alone ran over 30 minutes (docs/BENCHMARKS.md, e2e-stage section)
    "current-gen40": (64, 1024, {}),
}
GENERATED = {"current-gen40": 40}  # variant -> sampled sequences (prompt: PROMPT tokens of a real one)
PROMPT = 32


class MemorySource:
    """Evaluation weights: the pack's non-layer tensors and layers, tuned linears substituted."""

    def __init__(self, reader: PackReader, layers: list[dict], tuned: dict[str, torch.Tensor]) -> None:
        self.reader, self.layers, self.tuned, self.num_layers = reader, layers, tuned, len(layers)

    def nonlayer(self):
        return self.reader.nonlayer_state_dict(torch.float32)

    def layer(self, index):
        out = {}
        for n, t in self.layers[index].items():
            if n in self.tuned:
                out[n] = self.tuned[n]
            elif isinstance(t, qtensor.QuantizedTensor):
                out[n] = qtensor.dequantize(t, torch.float32)
            else:
                out[n] = t.float()
        return out


@torch.no_grad()
def sample_sequences(src: Path, real: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """[count, T] sequences of the fp model's own text: PROMPT tokens from the middle of a real sequence,
    then T - PROMPT tokens sampled at temperature 1 (no top-k / top-p, end of text suppressed)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    length = real.shape[1]
    mid = (length - PROMPT) // 2
    prompts = real[torch.arange(count) % len(real), mid:mid + PROMPT]
    torch.manual_seed(seed)
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, max_new_tokens=length - PROMPT, min_new_tokens=length - PROMPT,
                         pad_token_id=model.config.eos_token_id)
    return out[:, :length]


@torch.no_grad()
def teacher_hidden(src: Path, ids: torch.Tensor) -> torch.Tensor:
    ckpt = SourceCheckpoint(src)
    sk = Skeleton(src)
    sk.load(nonlayer_state_dict(ckpt))
    for i in range(ckpt.num_layers):
        sk.load(layer_state_dict(ckpt, i))
    return torch.cat([layerwise.head_input(sk, lambda c=c: sk.model(input_ids=c, use_cache=False))
                      for c in ids.split(4)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bpw", type=float, default=4.0)
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--work", default=str(ROOT / "work" / "sweep"))
    ap.add_argument("--steps", type=int, help="override every variant's step count (a quick check)")
    ap.add_argument("--tokens", type=int, help="override the tokens per step (finetune.E2E_TOKENS, whole sequences)")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    if a.tokens is not None:
        finetune.E2E_TOKENS = a.tokens
    torch.set_grad_enabled(False)
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    src = fetch_model(a.model, cache / "models" / a.model, cache_dir=cache)
    pack = Path(a.work) / f"{a.model}-{a.bpw:g}-noe2e"  # the GPTQ-rounded starting point
    if not (pack / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "uc", "pack", str(src), str(pack), "--target-bpw", f"{a.bpw:g}",
                        "--calib", str(TEXT), "--calib-articles", "1-16", "--e2e-steps", "0", "-q"], check=True)
    reader = PackReader(pack)
    cfg = EvalConfig(ctx=1024, max_windows=a.windows, articles="17-62")
    text = TEXT.read_text(encoding="utf-8")
    windows = prepare_windows(src, text, cfg)
    sk_eval = Skeleton(src)
    base = token_stats(sk_eval, CheckpointSource(SourceCheckpoint(src)), windows, progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    for name in a.variants:
        samples, seq_len, over = VARIANTS[name]
        if a.steps is not None:
            over = {**over, "e2e_steps": a.steps}
        ccfg = replace(CalibConfig(), **{"e2e_min_kl": 0.0, **over})  # the sweep measures the stage: it always runs
        t0 = time.perf_counter()
        ids = calibrate.calibration_ids(tok, text, samples, seq_len, "1-16")
        if name in GENERATED:  # sampled sequences go in before the held-out ones (the last CHECK_SEQUENCES)
            held = finetune.CHECK_SEQUENCES
            gen = sample_sequences(src, ids[:-held], GENERATED[name], ccfg.seed)
            ids = torch.cat([ids[:-held], gen, ids[-held:]])
        teacher = teacher_hidden(src, ids)
        layers = [reader.read_parts(layer_file(i)) for i in range(reader.num_layers)]
        sk = Skeleton(src)
        sk.load(reader.nonlayer_state_dict(torch.float32))
        model = finetune.student(sk, layers, reader.manifest.layer_prefix, "cpu")
        losses = []
        r = finetune.finetune(sk, model, ids, teacher, ccfg, lambda step, kl: losses.append(round(kl, 5)))
        tuned = {n: qtensor.dequantize(q.freeze(), torch.float32) for n, q in model.qweights.items()}
        tuned.update({n: t.float() for n, t in r.norms.items()})
        st = token_stats(sk_eval, MemorySource(reader, layers, tuned), windows, progress=False)
        ev = compare(st, base, cfg.ctx, len(windows), 0.0)
        row = {"model": a.model, "bpw": a.bpw, "variant": name, "samples": samples, "seq_len": seq_len,
               "tokens_per_step": finetune.E2E_TOKENS, "rotation": reader.manifest.quant.get("rotation", 0),
               "generated": GENERATED.get(name, 0),
               **over,
               "lr": r.lr, "kl_before": r.kl_before, "kl_after": r.kl_after, "kl_tuned": r.kl_tuned, "kept": r.kept,
               "e2e_seconds": r.seconds,
               "seconds": time.perf_counter() - t0, "ppl": ev.ppl, "ppl_ratio": ev.ppl_ratio,
               "top1_agreement": ev.top1_agreement, "train_kl": losses}
        print(json.dumps(row), flush=True)
        results = Path(a.results)
        rows = json.loads(results.read_text()) if results.exists() else []
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
