"""Does the allocator's loss model rank tensors the way the model's real loss does?

For a pack and its source, this script compares, group by group (every linear of one kind, every linear
of one layer), two numbers:
- predicted: the allocator's second-order estimate  D = sum_t sum_r f_r e_r H e_r^T  of the pack's actual
  residuals e = W - deq (factors and overlay rows included), with H the mean input Gram on the
  calibration sequences and f either the empirical Fisher (squared NLL gradients at the true next tokens,
  what `uc pack` uses) or the true Fisher (labels drawn from the model's own distribution, whose
  expectation is the Hessian of the KL to the original model);
- measured: how much the KL to the original model (and its NLL) falls when that group alone is put back
  to its original weights, on windows of the calibration articles (never the evaluation articles).

If the measured/predicted ratio differs a lot between kinds (q_proj against v_proj, say), the allocator
spends its bits in the wrong places. One run on SmolLM2 at 5 bpw takes about 29 minutes on 2 cores:

    python bench/alloc_check.py --pack work/sweep/smollm2-135m-5-noe2e
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from compressor import calibrate  # noqa: E402
from compressor.evaluate import make_windows, wikitext_articles  # noqa: E402
from compressor.fetch import fetch_model  # noqa: E402
from ucformat import PackReader  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
RESULTS = ROOT / "bench" / "results" / "alloc_check.json"


def statistics(model, names: list[str], ids: torch.Tensor, fisher_seqs: int, true_samples: int, seed: int):
    """Mean input Gram per linear over all sequences; per-output Fisher (empirical and true) over the
    first fisher_seqs, as per-token means."""
    mods = dict(model.named_modules())
    lin = {n: mods[n.removesuffix(".weight")] for n in names}
    gram = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in lin.items()}
    tokens = 0
    hooks = []

    def fwd(name):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            gram[name] += x.T @ x
        return hook

    for n, m in lin.items():
        hooks.append(m.register_forward_hook(fwd(n)))
    with torch.no_grad():
        for s in ids:
            model(input_ids=s[None], use_cache=False)
            tokens += s.numel()
    for h in hooks:
        h.remove()
    gram = {n: (g / tokens).float() for n, g in gram.items()}

    fishers = {}
    gen = torch.Generator().manual_seed(seed)
    for kind in ("empirical", "true"):
        acc = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in lin.items()}
        count = 0

        def grad_hook(name):
            def add(g):
                acc[name].add_(g.detach().reshape(-1, g.shape[-1]).double().square().sum(0))

            def hook(mod, inp, out):
                out.register_hook(add)
            return hook

        hooks = [m.register_forward_hook(grad_hook(n)) for n, m in lin.items()]
        for s in ids[:fisher_seqs]:
            reps = 1 if kind == "empirical" else true_samples
            for _ in range(reps):
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=s[None], use_cache=False).logits[0, :-1].float()
                if kind == "empirical":
                    target = s[1:]
                else:
                    with torch.no_grad():
                        target = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
                torch.nn.functional.cross_entropy(logits, target, reduction="sum").backward()
            count += (s.numel() - 1) * reps
        for h in hooks:
            h.remove()
        fishers[kind] = {n: (a / count).float() for n, a in acc.items()}
    model.zero_grad(set_to_none=True)
    return gram, fishers


@torch.no_grad()
def teacher_logprobs(model, windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """The model's next-token log-probabilities per window ([T-1, vocab] each) and its mean NLL."""
    logps, nll, n = [], 0.0, 0
    for w in windows:
        logp = model(input_ids=w[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
        nll -= logp.gather(-1, w[1:, None]).sum().item()
        n += logp.shape[0]
        logps.append(logp)
    return logps, nll / n


@torch.no_grad()
def measure(model, windows: torch.Tensor, teacher: list[torch.Tensor]) -> dict:
    """KL(teacher || model), the model's NLL and its top-1 agreement with the teacher, per prediction."""
    kl = nll = agree = n = 0.0
    for w, t in zip(windows, teacher):
        logp = model(input_ids=w[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
        kl += (t.exp() * (t - logp)).sum().item()
        nll -= logp.gather(-1, w[1:, None]).sum().item()
        agree += (logp.argmax(-1) == t.argmax(-1)).sum().item()
        n += logp.shape[0]
    return {"kl": kl / n, "nll": nll / n, "top1": agree / n}


def group_of(name: str) -> tuple[str, int]:
    m = re.search(r"layers\.(\d+)\.[a-z_]+\.([a-z_]+)\.weight$", name)
    return m[2], int(m[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--fisher-seqs", type=int, default=4, help="sequences for the Fisher (the pack's default: 4)")
    ap.add_argument("--true-samples", type=int, default=4, help="label draws per position for the true Fisher")
    ap.add_argument("--windows", type=int, default=4, help="1024-token windows of articles 1-16 for the measurement")
    ap.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args()
    torch.manual_seed(0)
    cache = Path(os.environ.get("UC_CACHE", ROOT / ".uc-cache"))
    src = fetch_model(a.model, cache / "models" / a.model, cache_dir=cache)
    tok = AutoTokenizer.from_pretrained(str(src))
    text = TEXT.read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    reader = PackReader(a.pack)
    names = [n for n, e in reader.manifest.tensors.items() if e.kind == "quantized"]
    bits = {n: reader.manifest.tensors[n].bits for n in names}
    params = dict(model.named_parameters())
    orig = {n: params[n].detach().clone() for n in names}

    t0 = time.perf_counter()
    ids = calibrate.calibration_ids(tok, text, a.calib_samples, a.calib_len, "1-16")
    model.get_input_embeddings().weight.requires_grad_(True)  # so every linear's output has a grad
    gram, fishers = statistics(model, names, ids, a.fisher_seqs, a.true_samples, 0)
    model.get_input_embeddings().weight.requires_grad_(False)
    print(f"statistics {time.perf_counter() - t0:.0f} s", flush=True)

    quant = {}
    for i in range(reader.num_layers):
        for n, t in reader.layer_state_dict(i, torch.float32).items():
            if n in bits:
                quant[n] = t
    predicted = {k: {} for k in fishers}
    for n in names:
        e = orig[n] - quant[n]
        row = ((e @ gram[n]) * e).sum(1)
        for k in fishers:
            predicted[k][n] = 0.5 * (fishers[k][n] * row).sum().item()

    windows = make_windows(tok, wikitext_articles(text.replace("\r\n", "\n"), "1-16"), 1024, a.windows)
    t0 = time.perf_counter()
    teacher, _ = teacher_logprobs(model, windows)

    def load(restored: set[str]) -> None:
        with torch.no_grad():
            for n in names:
                params[n].copy_(orig[n] if n in restored else quant[n])

    load(set())
    base = measure(model, windows, teacher)
    print(f"all quantized: {base}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    groups: dict[str, set[str]] = {}
    for n in names:
        kind, layer = group_of(n)
        groups.setdefault(f"kind {kind}", set()).add(n)
        groups.setdefault(f"layer {layer:02d}", set()).add(n)
    rows = []
    for g, members in sorted(groups.items()):
        load(members)
        m = measure(model, windows, teacher)
        numel = sum(orig[n].numel() for n in members)
        row = {"group": g, "tensors": len(members), "params": numel,
               "mean_bits": sum(bits[n] * orig[n].numel() for n in members) / numel,
               "pred_empirical": sum(predicted["empirical"][n] for n in members),
               "pred_true": sum(predicted["true"][n] for n in members),
               "dkl": base["kl"] - m["kl"], "dnll": base["nll"] - m["nll"], "dtop1": m["top1"] - base["top1"]}
        rows.append(row)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    load(set())

    def pearson(x, y):
        x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
        x, y = x - x.mean(), y - y.mean()
        return (x @ y / (x.norm() * y.norm())).item()

    def spearman(x, y):
        rx = torch.tensor(x).argsort().argsort().double()
        ry = torch.tensor(y).argsort().argsort().double()
        return pearson(rx.tolist(), ry.tolist())

    summary = {"pack": str(a.pack), "base": base, "seconds": time.perf_counter() - t0, "rows": rows, "fit": {}}
    for which in ("kind", "layer"):
        sel = [r for r in rows if r["group"].startswith(which)]
        for pred in ("pred_empirical", "pred_true"):
            for meas in ("dkl", "dnll"):
                x, y = [r[pred] for r in sel], [r[meas] for r in sel]
                summary["fit"][f"{which}/{pred}/{meas}"] = {"pearson": pearson(x, y), "spearman": spearman(x, y)}
    print(json.dumps(summary["fit"], indent=1))
    out = Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
