"""`uc eval`: perplexity, next-token agreement and KL divergence of a pack against its base, layer by layer.

Both models run over the same non-overlapping windows; only one decoder layer's weights are in memory at
a time (see layerwise.py), so a model far larger than memory can be evaluated.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ucformat import PackReader, conformance
from ucformat.assets import load_tokenizer
from ucformat.skeleton import Skeleton
from ucformat.student import is_student

from . import layerwise
from .checkpoint import SourceCheckpoint, layer_state_dict, nonlayer_state_dict

LOGIT_CHUNK = 256  # positions per logits chunk: bounds the [chunk, vocab] float32 buffer


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 1024  # tokens per window (including BOS where the tokenizer adds one)
    max_windows: int | None = None  # evaluate only the first N windows
    batch: int = 1  # windows per forward
    device: str = "cpu"
    articles: str | None = None  # "17-62": keep only these WikiText articles (1-based, inclusive)


@dataclass
class EvalResult:
    ppl_base: float | None
    ppl: float
    ppl_ratio: float | None
    top1_agreement: float | None
    top10_overlap: float | None
    tokens: int
    ctx: int
    windows: int
    seconds: float
    kl: float | None = None  # mean KL(base || pack) of the next-token distributions, nats per prediction
    kl_p99: float | None = None  # its 99th percentile over the predictions
    # the same agreements over the last prediction of each window only (what a served completion's next token is)
    top1_agreement_last: float | None = None
    top10_overlap_last: float | None = None
    # all-in stored bytes (every part of every tensor), of the body (all but the token embeddings and the output
    # head) and of the whole model, for the pack and its base (the base in its source dtype)
    bytes: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class WeightSource(Protocol):
    num_layers: int

    def nonlayer(self) -> dict[str, torch.Tensor]: ...
    def layer(self, index: int) -> dict[str, torch.Tensor]: ...


class PackSource:
    def __init__(self, reader: PackReader) -> None:
        self.reader, self.num_layers = reader, reader.num_layers

    def nonlayer(self):
        return self.reader.nonlayer_state_dict(torch.float32)

    def layer(self, index):
        return self.reader.layer_state_dict(index, torch.float32)


class CheckpointSource:
    def __init__(self, ckpt: SourceCheckpoint) -> None:
        self.ckpt, self.num_layers = ckpt, ckpt.num_layers

    def nonlayer(self):
        return nonlayer_state_dict(self.ckpt)

    def layer(self, index):
        return layer_state_dict(self.ckpt, index)


def wikitext_articles(text: str, spec: str) -> str:
    """Articles first..last (1-based, inclusive) of WikiText: each starts with a ' = Title = ' line."""
    m = re.fullmatch(r"(\d+)-(\d+)", spec)
    if not m:
        raise ValueError(f"--articles must look like 17-62, got {spec!r}")
    first, last = int(m[1]), int(m[2])
    lines = text.split("\n")
    starts = [i for i, ln in enumerate(lines) if re.fullmatch(r" = [^=].* = ", ln)]
    if not 1 <= first <= last <= len(starts):
        raise ValueError(f"--articles {spec}: the text has {len(starts)} articles")
    end = starts[last] if last < len(starts) else len(lines)
    return "\n".join(lines[starts[first - 1]:end])


def make_windows(tokenizer, text: str, ctx: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows [N, ctx]; each starts with BOS when the tokenizer adds one by default."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id if (tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]) else None
    step = ctx - 1 if bos is not None else ctx
    n = len(ids) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens: not enough for one window of {ctx}")
    body = torch.tensor(ids[: n * step]).reshape(n, step)
    if bos is not None:
        body = torch.cat([torch.full((n, 1), bos), body], dim=1)
    return body


@dataclass
class TokenStats:
    """Per-prediction results of one model over the windows: what comparisons need, not the logits."""

    nll: torch.Tensor  # float64 [P]
    top10: torch.Tensor  # int64 [P, 10], best first
    # with keep: the inputs of the output embedding [P, H] and that embedding (the logits are rebuilt from them,
    # [P, H] instead of [P, vocab]), so that another model's pass can measure its KL to this one
    normed: torch.Tensor | None = None
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weight, bias (copies: the skeleton is reused)
    kl: torch.Tensor | None = None  # float64 [P]: KL(reference || this model), with a reference
    last: torch.Tensor | None = None  # bool [P]: the prediction is its window's last

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.mean().item())


@torch.inference_mode()
def token_stats(sk: Skeleton, src: WeightSource, windows: torch.Tensor, batch: int = 1,
                desc: str = "eval", progress: bool = True, keep: bool = False,
                reference: TokenStats | None = None) -> TokenStats:
    """Run one model over all windows, one decoder layer at a time (only that layer's weights loaded).
    keep: also keep what the KL of another model to this one needs; reference: stats made with keep, whose
    KL to this model is measured per prediction."""
    sk.load(src.nonlayer())
    hidden, batches = [], []
    for c in windows.split(batch):
        h, b = layerwise.embed(sk, c)
        hidden.append(h)
        batches.append(b)
    for i in tqdm(range(src.num_layers), desc=desc, unit="layer", disable=not progress):
        sk.load(src.layer(i))
        hidden = [layerwise.layer(sk, i, h, b) for h, b in zip(hidden, batches)]
        sk.unload_layer(i)
    nll, top10, kept, kl, last = [], [], [], [], []
    done = 0  # predictions so far: where this chunk's rows of reference.normed start
    for h, b in zip(hidden, batches):
        normed = layerwise.final_hidden(sk, h, b)[:, :-1]  # predictions for positions 1..T-1
        targets = b.input_ids[:, 1:].to(normed.device)
        at_end = torch.zeros(targets.shape, dtype=torch.bool)
        at_end[:, -1] = True
        for part, tgt, end in zip(normed.split(LOGIT_CHUNK, dim=1), targets.split(LOGIT_CHUNK, dim=1),
                                  at_end.split(LOGIT_CHUNK, dim=1)):
            logp = torch.log_softmax(layerwise.logits(sk, part), dim=-1)
            last.append(end.flatten())
            nll.append(-logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).flatten().double().cpu())
            top10.append(logp.topk(10, dim=-1).indices.reshape(-1, 10).cpu())
            rows = part.reshape(-1, part.shape[-1])
            if keep:
                kept.append(rows.float().cpu())
            if reference is not None:
                ref = reference.normed[done:done + len(rows)].to(rows.device)
                w, bias = reference.head
                ref_logp = torch.log_softmax(layerwise.softcap(sk, F.linear(ref.to(w.dtype), w, bias).float()), -1)
                kl.append(F.kl_div(logp.reshape(len(rows), -1), ref_logp, reduction="none", log_target=True)
                          .sum(-1).double().cpu())
            done += len(rows)
    return TokenStats(torch.cat(nll), torch.cat(top10), normed=torch.cat(kept) if keep else None,
                      head=_head_copy(sk) if keep else None,
                      kl=torch.cat(kl) if reference is not None else None, last=torch.cat(last))


def _head_copy(sk: Skeleton) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = sk.model.get_output_embeddings()
    return out.weight.detach().clone(), None if out.bias is None else out.bias.detach().clone()


def compare(pack: TokenStats, base: TokenStats | None, ctx: int, windows: int, seconds: float) -> EvalResult:
    r = EvalResult(ppl_base=None, ppl=pack.ppl, ppl_ratio=None, top1_agreement=None, top10_overlap=None,
                   tokens=int(pack.nll.numel()), ctx=ctx, windows=windows, seconds=seconds)
    if base is not None:
        r.ppl_base = base.ppl
        r.ppl_ratio = pack.ppl / base.ppl
        top1 = (pack.top10[:, 0] == base.top10[:, 0]).double()
        same = (pack.top10.unsqueeze(-1) == base.top10.unsqueeze(-2)).any(-1)
        overlap = same.double().sum(-1) / 10
        r.top1_agreement, r.top10_overlap = top1.mean().item(), overlap.mean().item()
        if pack.last is not None:
            r.top1_agreement_last = top1[pack.last].mean().item()
            r.top10_overlap_last = overlap[pack.last].mean().item()
    if pack.kl is not None:
        r.kl, r.kl_p99 = pack.kl.mean().item(), pack.kl.quantile(0.99).item()
    return r


def prepare_windows(pack: str | Path, text: str, cfg: EvalConfig, tokenizer=None) -> torch.Tensor:
    """Token windows of `text` by `tokenizer` (default: the one in the model folder `pack`)."""
    text = text.replace("\r\n", "\n")
    if cfg.articles:
        text = wikitext_articles(text, cfg.articles)
    return make_windows(tokenizer or AutoTokenizer.from_pretrained(str(pack)), text, cfg.ctx, cfg.max_windows)


def evaluate(pack: str | Path, text: str, base: str | Path | None = None, cfg: EvalConfig = EvalConfig(),
             progress: bool = True) -> EvalResult:
    t0 = time.perf_counter()
    reader = PackReader(pack)
    conformance.require(reader)  # the pack is the model its config.json builds
    windows = prepare_windows(pack, text, cfg, load_tokenizer(reader))
    sk = Skeleton(pack, dtype=torch.float32, device=cfg.device)
    base_stats = None
    if base is not None:
        # a distilled student is another architecture than its teacher: the base runs in a skeleton of its own
        base_sk = Skeleton(base, dtype=torch.float32, device=cfg.device) if is_student(sk.config) else sk
        base_stats = token_stats(base_sk, CheckpointSource(SourceCheckpoint(base)), windows, cfg.batch, "eval base",
                                 progress, keep=True)
        del base_sk
    pack_stats = token_stats(sk, PackSource(reader), windows, cfg.batch, "eval pack", progress, reference=base_stats)
    r = compare(pack_stats, base_stats, cfg.ctx, len(windows), time.perf_counter() - t0)
    r.bytes = allin_bytes(reader, SourceCheckpoint(base) if base is not None else None)
    return r


# token embeddings and output heads: what "body" leaves out (Llama, Qwen, Gemma, ... checkpoint names)
VOCAB_RE = re.compile(r"(^|\.)embed_tokens\.weight$|^lm_head\.(weight|u|v)$")


def allin_bytes(reader: PackReader, base: SourceCheckpoint | None) -> dict:
    """{pack,base}_{body,whole} stored bytes and the ratios base / pack (SPEC.md: `stored_bytes` is all-in)."""
    sizes = {n: e.stored_bytes for n, e in reader.manifest.tensors.items()}
    out = {"pack_body": sum(b for n, b in sizes.items() if not VOCAB_RE.search(n)), "pack_whole": sum(sizes.values())}
    if base is not None:
        width = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}
        bsizes = {}
        for n in base.weight_map:
            shape, dtype = base.shape_dtype(n)
            bsizes[n] = math.prod(shape) * width.get(dtype, 4)
        out["base_body"] = sum(b for n, b in bsizes.items() if not VOCAB_RE.search(n))
        out["base_whole"] = sum(bsizes.values())
        out["body_ratio"] = out["base_body"] / max(out["pack_body"], 1)
        out["whole_ratio"] = out["base_whole"] / max(out["pack_whole"], 1)
    return out
