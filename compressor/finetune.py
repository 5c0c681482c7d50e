"""End-to-end distillation: once every layer is stored, tune the quantized linears of all layers together
so that the compressed model's next-token distribution matches the fp model's.

Per-layer distillation (distill.py) matches each layer's output on its own; the errors it leaves still
compound through the layers, and the loss that matters is at the logits. Here codes stay fixed and, with
Adam (cosine-decayed learning rate), for `e2e_steps` steps of about `E2E_TOKENS` tokens each (whole
sequences: `e2e_samples` of `e2e_len` tokens, by default the calibration sequences themselves):
  log-scale  a multiplier exp(a) on every block scale of every quantized linear
  u, v       the low-rank factors, where a linear has them
  grid       the levels (only with refine_grid, as in distill.py)
minimise  KL( p_teacher || p_student )  over the next-token distributions of the calibration sequences.
The teacher's distributions come from its final hidden states, which the streamed pipeline has already
computed (the fp stream after the last layer), so the fp model is never needed whole.

Sequences are split: the last CHECK_SEQUENCES are held out; the tuned weights, rounded to their stored
dtypes, are kept only if they lower the KL on those. That check is always over the whole vocabulary, also
when the steps' loss is the top-k KL (`e2e_topk`).

Learning rate: `e2e_lr` while the held-out KL before the stage is at least E2E_LR_FULL_KL; below it, in
proportion to that KL (a student closer to its teacher takes smaller steps), down to E2E_LR_MIN_SHARE of it.
Measured on SmolLM2 (bench/e2e_sweep.py): at 4 bpw (KL 0.112) 3e-3 beat 1e-3 (ppl ratio 1.088 against
1.104); at 5 bpw (KL 0.041) 3e-3 raised the held-out KL and was discarded (1.045) where 1e-3 gave 1.027;
at 5 bpw with searched block scales (KL 0.0204) 1e-3 raised it again, 5e-4 lowered it by 4.6% (stop 24).

Skipped when the held-out KL before the stage is below `e2e_min_kl`: a student that close to its teacher
gained nothing from it in measurement (SmolLM2 at 6 bpw), and the stage is most of a calibrated pack's time.

Memory: this is the one stage that holds the whole model, as codes (one byte a weight) with their scales; no
weight is built for more than one decoder layer at a time. In the held-out checks each layer's weights are
rebuilt when it runs; in the steps each layer keeps only its inputs for backward and runs again there
(non-reentrant activation checkpointing that covers the weights' construction too), which changes no bit
of the result and costs one more forward per step. The stage is admitted by working_bytes() + held_bytes()
against the memory free; when that does not fit it is skipped with a warning (`--e2e-steps 0` skips it
always). Measured by bench/e2e_memory.py (docs/BENCHMARKS.md, "End-to-end stage memory").
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ucformat.qtensor import QuantizedTensor, dequantize
from ucformat.residency import auto_budget
from ucformat.skeleton import Skeleton

from . import calibrate, layerwise, train_state
from .config import E2E_LR_FULL_KL, E2E_LR_MIN_SHARE, E2E_TOKENS, E2E_TOPK, CalibConfig
from .distill import FINAL_LR, Trainable, frozen_weights, native_bf16, relative_lr
from .qweight import QWeight

log = logging.getLogger(__name__)

CHECK_SEQUENCES = 4  # held out: the keep-or-discard check
SAVE_EVERY = 5  # steps between training-state files (with `state`): a stage of hours resumes where it stopped
# working_bytes(): measured stage peaks above the process before it, less held_bytes(), were 1.09 GiB (SmolLM2,
# 106 M quantized weights), 2.61 GiB (Qwen2.5-0.5B, 358 M) and 4.49 GiB (Qwen2.5-1.5B, 1.31 G) (bench/e2e_memory.py);
# the formula gives 2.43, 3.56 and 7.40 GiB for them
BYTES_PER_WEIGHT = 3  # per quantized weight: its code, scales and their Adam state, the student's unpacking (2.2
# peak)
LAYER_BYTES_PER_WEIGHT = 40  # per weight of the largest layer, the one built at a time (float32 levels, product,
# rotation, its bfloat16 copy and the gradients of all of them)
OVERHEAD_BYTES = 2 << 30  # a step's activations, a logits chunk's temporaries, the allocator's slack
LOGIT_FLOATS = 16 << 20  # logits per chunk of the KL (64 MiB of float32)
RECOMPUTE_FLOATS = 64 << 20  # a step's student logits beyond this are recomputed in backward, not kept


@dataclass
class FinetuneResult:
    kl_before: float
    kl_after: float
    kept: bool
    steps: int
    seconds: float
    kl_tuned: float = math.nan  # held-out KL of the tuned weights, kept or not (kl_after is before's when discarded)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # tuned norm weights (stored dtype), if kept
    lr: float = math.nan  # the learning rate the stage ran at (learning_rate())
    skipped: str = ""  # why no step ran, when the stage was asked for steps but judged them not worth it
    dtype: str = "float32"  # what its steps computed in: "bfloat16" under autocast (native_bf16), else float32


def working_bytes(numel: int, layer_numel: int) -> int:
    """The stage's working set besides held_bytes(), for `numel` quantized weights of which the largest decoder
    layer holds `layer_numel`."""
    return int(numel * BYTES_PER_WEIGHT + layer_numel * LAYER_BYTES_PER_WEIGHT + OVERHEAD_BYTES)


def fits(need: int, device: torch.device) -> tuple[bool, int, int]:
    """Whether `need` bytes (working_bytes() + held_bytes()) fit the memory free now: (ok, need, free)."""
    free = auto_budget(device, headroom=0.0)
    return need <= free, need, free


def held_bytes(tokens: int, hidden: int, vocab: int, topk: int) -> int:
    """Bytes the stage holds besides the model: the teacher's targets for `tokens` positions (float32 final
    hidden states, or top-k ids and log-probs), and one step's logits as backward keeps them (the student's
    log-softmax and the teacher's probabilities, with room for one more), or one chunk's when recomputed."""
    width = min(topk, vocab) if topk else vocab
    targets = tokens * (topk * 12 if topk else hidden * 4)
    return targets + 3 * 4 * (LOGIT_FLOATS if recomputes(E2E_TOKENS, width) else E2E_TOKENS * width)


def auto_topk(vocab: int, hidden: int, linear_weights: int) -> int:
    """The default of `e2e_topk`: the whole vocabulary (0), unless the output head has more weights than the
    quantized linears of the decoder layers, where the full KL's logits (the student's and the teacher's,
    forward and again in backward, in float32) cost more than the model itself: then the top E2E_TOPK."""
    return E2E_TOPK if vocab * hidden > linear_weights else 0


def stage_topk(cfg: CalibConfig, sk: Skeleton, linear_weights: int) -> int:
    """The k the stage's steps use: `e2e_topk` as given, else auto_topk for sk's output head."""
    if cfg.e2e_topk is not None:
        return cfg.e2e_topk
    vocab, hidden = sk.model.get_output_embeddings().weight.shape
    return auto_topk(vocab, hidden, linear_weights)


def learning_rate(e2e_lr: float, kl_before: float) -> float:
    """The stage's peak learning rate for a student whose held-out KL is kl_before (NaN: none held out)."""
    if not math.isfinite(kl_before):
        return e2e_lr
    return e2e_lr * min(1.0, max(E2E_LR_MIN_SHARE, kl_before / E2E_LR_FULL_KL))


def recomputes(positions: int, width: int) -> bool:
    """Whether a step's logits (positions x width columns) are recomputed in backward rather than kept."""
    return positions * width > RECOMPUTE_FLOATS


class _Head:
    """Student final hidden states (input of the output embedding) from a whole-model forward with the
    quantized linears' weights supplied, and the chunked KL against the teacher's.

    With topk > 0 the KL is taken over each position's k most likely tokens under the teacher, both
    distributions renormalised over them: the head then costs k columns per position instead of the whole
    vocabulary (Gemma-3's 262k-token head is most of that model's arithmetic)."""

    def __init__(self, sk: Skeleton, topk: int) -> None:
        self.sk = sk
        self.head = sk.model.get_output_embeddings()
        vocab, hidden = self.head.weight.shape
        self.topk = min(topk, vocab)
        self.rows = max(1, LOGIT_FLOATS // (self.topk * hidden if self.topk else vocab))

    def student_hidden(self, ids: torch.Tensor, weights_of, recompute: bool = True) -> torch.Tensor:
        """Final hidden states of a whole-model forward in which decoder layer i runs with the parameters
        weights_of(i) gives (names inside the layer -> tensors), built when the layer runs. With `recompute`,
        under autograd each layer keeps only its inputs for backward and runs again there, weights_of(i)
        included: a step holds one layer's weights and activations at a time, not the whole model's."""
        with _layer_weights(self.sk, weights_of, recompute and torch.is_grad_enabled()):
            return layerwise.head_input(self.sk, lambda: self.sk.model(input_ids=ids.to(self.sk.device), use_cache=False))

    @torch.no_grad()
    def targets(self, teacher: torch.Tensor) -> list[torch.Tensor]:
        """What the KL needs of the teacher, per sequence: its hidden states [N, T, H] (full KL), or the
        top-k token ids [N, T, k] and the teacher's log-probs over them [N, T, k]."""
        if not self.topk:
            return [teacher]
        flat = teacher.reshape(-1, teacher.shape[-1])
        rows = max(1, LOGIT_FLOATS // self.head.weight.shape[0])
        ids, logp = [], []
        for a in range(0, flat.shape[0], rows):
            v, i = layerwise.logits(self.sk, flat[a:a + rows].float()).topk(self.topk, -1)
            ids.append(i)
            logp.append(torch.log_softmax(v, -1))
        shape = (*teacher.shape[:-1], self.topk)
        return [torch.cat(ids).reshape(shape), torch.cat(logp).reshape(shape)]

    def kl(self, student: torch.Tensor, target: list[torch.Tensor]) -> torch.Tensor:
        """Mean over positions of KL(teacher || student); student hidden states [B, T, H], target as
        `targets` gives it for the same sequences. Logits are built chunk by chunk, and kept for backward
        unless a step's exceed RECOMPUTE_FLOATS (large vocabularies): then each chunk's, the teacher's with
        them, is recomputed in backward, so that they never all exist at once."""
        s = student.reshape(-1, student.shape[-1])
        t = [x.reshape(s.shape[0], -1).to(s.device) for x in target]
        fn = self._kl_topk if self.topk else self._kl_full
        recompute = recomputes(s.shape[0], self.topk or self.head.weight.shape[0])
        total = s.new_zeros((), dtype=torch.float32)
        for a in range(0, s.shape[0], self.rows):
            args = (s[a:a + self.rows], *(x[a:a + self.rows] for x in t))
            total = total + (checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
        return total / s.shape[0]

    def _kl_full(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s.device.type, enabled=False):
            ls = torch.log_softmax(layerwise.logits(self.sk, s.float()), -1)
            lt = torch.log_softmax(layerwise.logits(self.sk, t.float()), -1)
        return (lt.exp() * (lt - ls)).sum()

    def _kl_topk(self, s: torch.Tensor, ids: torch.Tensor, lt: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s.device.type, enabled=False):
            w = self.head.weight[ids].float()  # [r, k, H]
            lg = torch.einsum("rh,rkh->rk", s.float(), w)
            if self.head.bias is not None:
                lg = lg + self.head.bias[ids].float()
            ls = torch.log_softmax(layerwise.softcap(self.sk, lg), -1)
        return (lt.exp() * (lt - ls)).sum()


@contextmanager
def _attached(module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """module's parameters named in `tensors` replaced by those (plain, differentiable) tensors meanwhile."""
    saved = []
    try:
        for name, t in tensors.items():
            path, _, attr = name.rpartition(".")
            mod = module.get_submodule(path)
            saved.append((mod, attr, getattr(mod, attr)))
            delattr(mod, attr)
            setattr(mod, attr, t)
        yield
    finally:
        for mod, attr, p in reversed(saved):
            delattr(mod, attr)
            mod.register_parameter(attr, p)


def _layer_weights(sk: Skeleton, weights_of, recompute: bool):
    """Every decoder layer of sk runs with weights_of(i) attached, inside a non-reentrant checkpoint when
    `recompute` (the weights are rebuilt with the layer's activations in backward)."""
    def make(i: int):
        layer = sk.layers[i]
        forward = type(layer).forward

        def run(*args, **kwargs):
            with _attached(layer, weights_of(i)):
                return forward(layer, *args, **kwargs)

        if not recompute:
            return run
        return lambda *args, **kwargs: checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return layerwise._forwards(sk.layers, make)


@dataclass
class Student:
    """The compressed model as the stage trains it (all checkpoint names; where each sits beside)."""

    qweights: dict[str, QWeight]  # quantized nn.Linear weights
    param_names: dict[str, tuple[int, str]]  # checkpoint name -> (decoder layer, parameter name inside it)
    norms: dict[str, torch.Tensor]  # decoder layers' normalisation weights, as stored (source dtype)

    def by_layer(self, values: dict) -> dict[int, dict]:
        """Checkpoint-named values grouped per decoder layer, under the parameter names inside it."""
        out: dict[int, dict] = {}
        for k, t in values.items():
            i, local = self.param_names[k]
            out.setdefault(i, {})[local] = t
        return out


def student(sk: Skeleton, layers: list[dict], layer_prefix: str, device) -> Student:
    """Load the stored layers (per layer: checkpoint name -> QuantizedTensor or raw tensor) into sk for the
    stage: quantized nn.Linear weights become QWeights, the 1-D weights of normalisation modules are
    noted; everything else is attached as stored (other quantized tensors, e.g. fused expert stacks,
    reconstructed) and stays fixed."""
    out = Student({}, {}, {})
    for i, tensors in enumerate(layers):
        prefix = f"{layer_prefix}{i}."
        sk.load({n: t for n, t in tensors.items() if not isinstance(t, QuantizedTensor)})
        lin = calibrate.linear_modules(sk.layers[i], list(tensors), prefix)
        for n, path in lin.items():
            if isinstance(tensors[n], QuantizedTensor):
                out.qweights[n], out.param_names[n] = QWeight.from_stored(tensors[n], device), (i, f"{path}.weight")
        for n, t in tensors.items():
            path = n[len(prefix):-len(".weight")] if n.startswith(prefix) and n.endswith(".weight") else None
            if path and not isinstance(t, QuantizedTensor) and t.dim() == 1 and t.is_floating_point() \
                    and "Norm" in type(_submodule(sk.layers[i], path)).__name__:
                out.norms[n], out.param_names[n] = t, (i, f"{path}.weight")
        fixed = {n: dequantize(t, torch.float32) for n, t in tensors.items()
                 if isinstance(t, QuantizedTensor) and n not in out.qweights}
        if fixed:
            sk.load(fixed)
    return out


def _submodule(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def finetune(sk: Skeleton, model: Student, ids: torch.Tensor, teacher_hidden: torch.Tensor, cfg: CalibConfig,
             progress=None, recompute: bool = True, state: Path | None = None) -> FinetuneResult:
    """Tune model.qweights in place (and, with cfg.e2e_norms, the norm weights: returned in the result).
    sk holds every weight of the model but the quantized linears; ids [N, T]; teacher_hidden [N, T, H]
    the fp model's final hidden states (input of the output embedding) for the same sequences.

    With `state`, the stage writes its training state there every SAVE_EVERY steps (train_state.py) and, when
    the file exists, continues from it (model must be the stage's starting point again, as the stored
    layers are until the stage ends): the result is the one of a run never stopped. progress(step, loss)
    is called after every step that runs, from the first step a resumed stage runs."""
    t0 = time.perf_counter()
    qweights = model.qweights
    steps = cfg.e2e_steps
    n = ids.shape[0]
    batch = max(1, E2E_TOKENS // ids.shape[1])  # sequences per step
    held = min(CHECK_SEQUENCES, max(n - 1, 0))
    train_idx, check_idx = torch.arange(n - held), torch.arange(n - held, n)
    head = _Head(sk, stage_topk(cfg, sk, sum(math.prod(q.shape) for q in qweights.values())))
    target = head.targets(teacher_hidden)
    # the held-out check is always over the whole vocabulary: the learning rate, --e2e-min-kl and the keep
    # decision are measured in the full KL whatever the steps' loss is (a top-k KL runs lower)
    judge, judged = (_Head(sk, 0), [teacher_hidden]) if head.topk else (head, target)
    device = next(iter(qweights.values())).codes.device
    autocast = cfg.bf16 and native_bf16(device)
    dtype = torch.bfloat16 if autocast else torch.float32
    ran_in = str(dtype).removeprefix("torch.")

    norms = {k: t.to(device=device, dtype=torch.float32).clone().requires_grad_(True)
             for k, t in model.norms.items()} if cfg.e2e_norms else {}

    layer_q, layer_norms = model.by_layer(qweights), model.by_layer(norms)

    @torch.no_grad()
    def check(norm_values: dict[str, torch.Tensor] | None = None) -> float:
        values = model.by_layer({k: t.to(device=device, dtype=torch.float32) for k, t in (norm_values or {}).items()})

        def weights_of(i: int) -> dict[str, torch.Tensor]:  # what the pack will store, one layer at a time
            return {**frozen_weights(layer_q.get(i, {}), device), **values.get(i, {})}

        total = 0.0
        for rows in check_idx.split(batch):
            total += judge.kl(judge.student_hidden(ids[rows], weights_of), [t[rows] for t in judged]).item() * len(rows)
        return total / max(len(check_idx), 1)

    settings = {"steps": steps, "lr": cfg.e2e_lr, "warmup": cfg.e2e_warmup, "seed": cfg.seed, "topk": head.topk,
                "norms": cfg.e2e_norms, "refine_scales": cfg.refine_scales, "refine_grid": cfg.refine_grid,
                "sequences": list(ids.shape), "dtype": ran_in}
    prior = train_state.settings_of(state) if state is not None and state.is_file() else None
    # a resumed stage's starting point is the one the saved steps began from: its check is not run again
    before = float(prior["kl_before"]) if prior and "kl_before" in prior else check() if held else math.nan
    settings["kl_before"] = before
    peak_lr = learning_rate(cfg.e2e_lr, before)
    close = before < cfg.e2e_min_kl  # NaN (none held out) is never below
    if steps <= 0 or len(train_idx) == 0 or close:
        why = f"held-out KL {before:.4g} below --e2e-min-kl {cfg.e2e_min_kl:g}" if close else ""
        return FinetuneResult(before, before, False, 0, time.perf_counter() - t0, lr=peak_lr, skipped=why,
                              dtype=ran_in)
    saved = {k: (q.scales, q.grid, q.u, q.v) for k, q in qweights.items()}
    train = {k: Trainable(q, cfg, cache=False) for k, q in qweights.items()}
    layer_train = model.by_layer(train)

    def weights_of(i: int) -> dict[str, torch.Tensor]:
        return {**{k: tr.weight(dtype) for k, tr in layer_train.get(i, {}).items()}, **layer_norms.get(i, {})}

    groups = [g for t in train.values() for g in t.groups(peak_lr)]
    groups += [{"params": [t], "lr": relative_lr(t, peak_lr)} for t in norms.values()]
    opt = torch.optim.Adam(groups, foreach=True)
    base_lr = [g["lr"] for g in opt.param_groups]
    params = {f"{k}.{part}": t for k, tr in train.items() for part, t in tr.trainable().items()}
    params.update({f"norm.{k}": t for k, t in norms.items()})
    first = train_state.load(state, params, opt, settings).step if prior else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    for step in range(first, steps):
        start = (step * batch) % len(order)
        rows = order[start:start + batch]
        frac = 0.5 * (1 + math.cos(math.pi * step / steps))
        warm = min(1.0, (step + 1) / cfg.e2e_warmup) if cfg.e2e_warmup else 1.0
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * warm * (FINAL_LR + (1 - FINAL_LR) * frac)
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = head.kl(head.student_hidden(ids[rows], weights_of, recompute), [t[rows] for t in target])
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if state is not None and ((step + 1) % SAVE_EVERY == 0 or step + 1 == steps):
            train_state.save(state, params, opt, step + 1, settings)
        if progress is not None:
            progress(step, loss.item())
    for tr in train.values():
        tr.commit()
    # rounded to their stored dtype, as the pack will hold them
    tuned_norms = {k: t.detach().to(device="cpu", dtype=model.norms[k].dtype) for k, t in norms.items()}
    tuned = after = check(tuned_norms) if held else -math.inf
    kept = not held or after < before
    if not kept:
        for k, q in qweights.items():
            q.scales, q.grid, q.u, q.v = saved[k]
        after, tuned_norms = before, {}
    return FinetuneResult(before, after, kept, steps, time.perf_counter() - t0, tuned, tuned_norms, peak_lr,
                          dtype=ran_in)

