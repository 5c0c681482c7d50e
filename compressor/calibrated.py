"""The calibrated `uc pack` pipeline: streamed activations, allocation, GPTQ rounding, overlays, low-rank
factors and per-layer distillation, one decoder layer at a time; then end-to-end distillation.

  prepare   one pass over the fp model: with a bit budget, profile every linear at every code width
            (GPTQ rounding on a sample of rows); with calibration data, one streamed backward pass
            for the loss gradients that weigh each output (allocation, overlay rows, SVD init); then
            allocate. Plan and gradients are saved under DST/.uc-work so a resumed run keeps them.
  compress  per layer i: teacher output y = fp_layer_i(x_fp); Gram matrices of the inputs the
            compressed layer will see (x_q online, x_fp teacher-forced); quantize each linear under
            its plan; distill the layer; the online stream continues with exactly the stored weights.
  skip      a layer already in the pack (resume): both streams advance through it (fp weights for the
            teacher, the stored weights for the student), so the run continues as if never stopped.
  finetune  after the last layer: end-to-end distillation of every stored layer against the teacher's
            final hidden states (the fp stream's end), then the layers are written again (finetune.py);
            its training state is saved under the work directory every few steps, so a resumed pack
            continues the stage where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from ucformat import qtensor
from ucformat import rotation as rot
from ucformat.manifest import TensorEntry, atomic_write_bytes
from ucformat.skeleton import Skeleton

from . import allocate, calibrate, codecs, distill, finetune, lowrank, overlay, rss
from .activations import ActivationStore, SpillBudget
from .checkpoint import SourceCheckpoint, nonlayer_state_dict
from .config import FISHER_DRAWS, PackConfig
from .qweight import QWeight, quantize_group

log = logging.getLogger(__name__)

WORK_DIR = ".uc-work"  # inside DST while a calibrated pack is unfinished: plan, Fisher weights, spills
E2E_STATE = "e2e-state.safetensors"  # under WORK_DIR: the end-to-end stage's training state (finetune.py)
CHUNK = 4  # calibration sequences per forward


@dataclass
class CalibReport:
    """What the calibrated pipeline did, for the CLI's --json and the benchmark."""

    seconds: dict = field(default_factory=dict)  # phase -> seconds
    # phase -> this process's peak resident bytes when it ended (a running maximum: the first phase whose
    # number is the final one is the phase that set the pack's peak); phases this process ran only
    peak_rss_bytes: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # per compressed layer: distillation losses and time
    allocation: dict = field(default_factory=dict)  # bits -> number of tensors
    plan: dict = field(default_factory=dict)  # tensor -> [bits, rank, overlay rows]
    activation_peak_bytes: int = 0
    spilled_bytes: int = 0
    e2e: dict = field(default_factory=dict)  # end-to-end distillation: KL before/after, kept, steps, seconds

    def to_dict(self) -> dict:
        return asdict(self)


class CalibratedLayers:
    def __init__(self, ckpt: SourceCheckpoint, cfg: PackConfig, work: Path, quantize_fn, progress: bool = True) -> None:
        self.ckpt, self.cfg, self.work, self.progress = ckpt, cfg, Path(work), progress
        self.is_quantized = quantize_fn  # (name, shape, dtype) -> bool
        self.device = torch.device(cfg.device)
        self.report = CalibReport()
        self.budget = SpillBudget(cfg.calib.spill_mb << 20, self.work / "spill")
        self.budget.cleanup()
        self.sk: Skeleton | None = None
        self.plan: dict[str, allocate.Choice] = {}
        self.fisher: dict[str, torch.Tensor] = {}  # linear -> [R] output-gradient energy
        self.x_fp = self.x_q = None
        self.x_e2e = None  # the fp stream of the end-to-end sequences, when they are not the calibration ones
        self.one = None

    # -- setup --------------------------------------------------------------------------------------------
    @property
    def has_data(self) -> bool:
        return self.cfg.calib.file is not None

    def _names(self, i: int) -> list[str]:
        return [n for n in self.ckpt.layers[i] if self.is_quantized(n, *self.ckpt.shape_dtype(n))]

    def prepare(self) -> None:
        t0 = time.perf_counter()
        if self.has_data:
            self.sk = Skeleton(self.ckpt.path, dtype=torch.float32, device=self.device)
            self.sk.load(nonlayer_state_dict(self.ckpt))
            c = self.cfg.calib
            tok = AutoTokenizer.from_pretrained(str(self.ckpt.path))
            text = Path(c.file).read_text(encoding="utf-8")
            self.ids = calibrate.calibration_ids(tok, text, c.samples, c.seq_len, c.articles)
            _, one = calibrate.layerwise.embed(self.sk, self.ids[:1])
            self.one = calibrate.layerwise.Batch(self.ids[:1], calibrate.plain(one.layer_kwargs))
            self.e2e_ids = self.ids
            if c.e2e_steps > 0 and (c.e2e_samples or c.e2e_len):
                self.e2e_ids = calibrate.calibration_ids(tok, text, c.e2e_samples or c.samples, c.e2e_len or c.seq_len,
                                                         c.articles, ("--e2e-samples", "--e2e-len"))
        self.report.seconds["setup"] = time.perf_counter() - t0
        self.report.peak_rss_bytes["setup"] = rss.peak()
        self.plan = self._load_plan() or self._make_plan()
        alloc: dict = {}
        for ch in self.plan.values():
            alloc[ch.bits] = alloc.get(ch.bits, 0) + 1
        self.report.allocation = dict(sorted(alloc.items()))
        self.report.plan = {n: [c.bits, c.rank, c.overlay_rows] for n, c in self.plan.items()}
        if self.has_data:
            self.x_fp = calibrate.embed_stream(self.sk, self.ids, CHUNK, ActivationStore(self.budget, "fp"))
            if self.cfg.calib.inputs == "online":
                self.x_q = calibrate.Stream(self._copy(self.x_fp.store, "q"), self.x_fp.batches)
            if self.e2e_ids is not self.ids:
                self.x_e2e = calibrate.embed_stream(self.sk, self.e2e_ids, CHUNK, ActivationStore(self.budget, "e2e"))

    def _copy(self, store: ActivationStore, name: str) -> ActivationStore:
        out = ActivationStore(self.budget, name)
        for t in store:
            out.append(t.clone())
        return out

    # -- plan ---------------------------------------------------------------------------------------------
    def _load_plan(self) -> dict | None:
        path = self.work / "plan.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        fisher = self.work / "fisher.safetensors"
        if fisher.is_file():
            self.fisher = load_file(str(fisher))
        log.info("resuming with the saved allocation %s", path)
        return {n: allocate.Choice(*c) for n, c in state["plan"].items()}

    def _save_plan(self, plan: dict) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.fisher:
            save_file({k: v.contiguous().cpu() for k, v in self.fisher.items()}, str(self.work / "fisher.safetensors"))
        atomic_write_bytes(self.work / "plan.json", json.dumps(
            {"plan": {n: [c.bits, c.rank, c.overlay_rows] for n, c in plan.items()}}).encode())

    def _make_plan(self) -> dict:
        cfg = self.cfg
        fisher = self.has_data and cfg.calib.fisher_samples > 0
        profiles = {}
        if cfg.target_bpw is not None or fisher:
            t0 = time.perf_counter()
            profiles = self._stats_pass(profile=cfg.target_bpw is not None, keep_fisher_inputs=fisher)
            self.report.seconds["profile"] = time.perf_counter() - t0
            self.report.peak_rss_bytes["profile"] = rss.peak()
        if fisher:
            t0 = time.perf_counter()
            self._fisher_pass()
            self.report.seconds["fisher"] = time.perf_counter() - t0
            self.report.peak_rss_bytes["fisher"] = rss.peak()
        if cfg.target_bpw is None:
            plan = {}
            for i in range(self.ckpt.num_layers):
                for n in self._names(i):
                    rows = self.ckpt.shape_dtype(n)[0][-2]
                    k = round(cfg.overlay * rows) if cfg.bits <= allocate.OVERLAY_MAX_BITS else 0
                    plan[n] = allocate.Choice(cfg.bits, cfg.rank, k)
        else:
            for n, f in self.fisher.items():
                if n in profiles:
                    profiles[n].fisher = f
            opts = {n: allocate.options(p, cfg.block_size, cfg.lowrank_dtype, self._ranks(), overlay=True,
                                        zero_rank=not cfg.rank, scale_bits=cfg.scale_bits)
                    for n, p in profiles.items()}
            numel = sum(p.numel for p in profiles.values())
            plan = allocate.allocate(opts, cfg.target_bpw * numel)
        self._save_plan(plan)
        return plan

    def _ranks(self) -> list[int]:
        """Ranks the allocator may choose: the fixed --rank, else those up to --max-rank (0 stays allowed
        only when no rank is fixed)."""
        cfg = self.cfg
        if cfg.rank:
            return [cfg.rank]
        return [r for r in allocate.RANKS if r <= cfg.max_rank]

    def _stats_pass(self, profile: bool, keep_fisher_inputs: bool) -> dict[str, allocate.Profile]:
        """One pass over the fp model: profile every quantized tensor at every code width (on the fp stream
        when there is data), and keep the inputs of the first sequences for the backward pass."""
        cfg, c = self.cfg, self.cfg.calib
        profiles: dict[str, allocate.Profile] = {}
        widths = allocate.widths(cfg.target_bpw, self._bpw_at(3)) if profile else ()
        stream = None
        if self.has_data:
            stream = calibrate.embed_stream(self.sk, self.ids, CHUNK, ActivationStore(self.budget, "profile"))
            n_fisher = -(-c.fisher_samples // CHUNK) if keep_fisher_inputs else 0
            self._fisher_inputs = []  # per layer: the inputs of the first chunks (for the backward pass)
        bar = tqdm(range(self.ckpt.num_layers), desc="profile" if profile else "statistics", unit="layer",
                   disable=not self.progress)
        for i in bar:
            names = self._names(i)
            grams, st = {}, None
            if stream is not None:
                fp = {n: self.ckpt.get(n) for n in self.ckpt.layers[i]}
                self.sk.load(fp)
                layer = self.sk.layers[i]
                lin = calibrate.linear_modules(layer, names, f"{self.ckpt.layer_prefix}{i}.")
                keep = ActivationStore(self.budget, f"fisher-in-{i}")
                for k in range(min(n_fisher, len(stream.store))):
                    keep.append(stream.store[k].clone())
                self._fisher_inputs.append(keep)
                with calibrate.LinearStats(layer, lin if profile else {}) as st:
                    nxt = calibrate.forward_stream(layer, i, stream, ActivationStore(self.budget, "profile"))
                grams = st.take_means(self.device)  # none without profiling: no module was watched
                stream.store.clear()
                stream = nxt
                self.sk.unload_layer(i)
            for group in _groups(names, st if stream is not None and profile else None) if profile else []:
                two = []
                for n in group:
                    shape = self.ckpt.shape_dtype(n)[0]
                    if len(shape) != 2:
                        profiles[n] = allocate.Profile(shape=shape, fixed=self._fixed_choice(shape))
                    else:
                        two.append(n)
                if two:
                    h = grams.get(two[0])
                    profiles.update(allocate.profile_group(
                        {n: self.ckpt.get(n).to(self.device) for n in two}, h, cfg.block_size, cfg.codec,
                        c.gptq and h is not None, self._ranks(),
                        widths, c.seed, cfg.scale_bits, cfg.rotation_block, cfg.searches_scales))
            self.ckpt.release()  # unmap this layer's pages and trim the heap, as the pack loop does
        bar.close()
        if stream is not None:
            self._last_hidden = stream
        return profiles

    def _bpw_at(self, bits: int) -> float:
        """All-in bpw of every quantized tensor at this code width, nothing else added."""
        shapes = [self.ckpt.shape_dtype(n)[0] for i in range(self.ckpt.num_layers) for n in self._names(i)]
        rotation = self.cfg.rotation_block
        total = sum(allocate.stored_bits(s, allocate.Choice(bits), self.cfg.block_size, self.cfg.lowrank_dtype,
                                         self.cfg.scale_bits, rotation if len(s) == 2 and rot.fits(s[-1], rotation) else 0)
                    for s in shapes)
        return total / max(sum(math.prod(s) for s in shapes), 1)

    def _fixed_choice(self, shape) -> allocate.Choice:
        """Tensors the allocator does not profile (fused 3-D expert stacks): the widest code that fits."""
        numel = 1
        for s in shape:
            numel *= s
        fits = [b for b in allocate.BITS
                if allocate.stored_bits(shape, allocate.Choice(b), self.cfg.block_size, self.cfg.lowrank_dtype,
                                        self.cfg.scale_bits) <= self.cfg.target_bpw * numel]
        return allocate.Choice(max(fits) if fits else min(allocate.BITS))

    def _fisher_pass(self) -> None:
        """F[name][r] = mean over tokens (and label draws) of (dNLL/dy_r)^2 for every profiled linear: one
        streamed backward per kept chunk and draw."""
        top, c = self._last_hidden, self.cfg.calib
        draws = FISHER_DRAWS if c.fisher_labels == "model" else 1
        gen = torch.Generator().manual_seed(c.seed) if c.fisher_labels == "model" else None
        grads, chunk = [], []  # per backward: the gradient at the top, and which kept input chunk it belongs to
        for k in range(len(self._fisher_inputs[0])):
            for _ in range(draws):
                g, _ = calibrate.head_grad(self.sk, top.store[k], top.batches[k], gen)
                grads.append(g)
                chunk.append(k)
        top.store.clear()
        bar = tqdm(reversed(range(self.ckpt.num_layers)), total=self.ckpt.num_layers, desc="fisher", unit="layer",
                   disable=not self.progress)
        for i in bar:
            self.sk.load({n: self.ckpt.get(n) for n in self.ckpt.layers[i]})
            layer = self.sk.layers[i]
            for p in layer.parameters():
                p.requires_grad_(False)
            lin = calibrate.linear_modules(layer, self._names(i), f"{self.ckpt.layer_prefix}{i}.")
            with calibrate.LinearStats(layer, lin, gram=False, fisher=True) as st:
                for j, k in enumerate(chunk):
                    x = self._fisher_inputs[i][k].detach().clone().requires_grad_(True)
                    with torch.enable_grad():
                        out = calibrate.call_layer(layer, x, top.batches[k].layer_kwargs[i])
                        out.backward(grads[j])
                    grads[j] = x.grad.detach()
            for n, f in st.fisher.items():
                self.fisher[n] = (f / max(st.tokens.get(n, 1), 1)).float().cpu()
            self._fisher_inputs[i].clear()
            self.sk.unload_layer(i)
            self.ckpt.release()
        bar.close()

    # -- layers -------------------------------------------------------------------------------------------
    def compress(self, i: int) -> dict[str, qtensor.QuantizedTensor | torch.Tensor]:
        """Every tensor of layer i: quantized ones as QuantizedTensor, the rest raw (source dtype)."""
        t0 = time.perf_counter()
        cfg, c = self.cfg, self.cfg.calib
        src = {n: self.ckpt.get(n) for n in self.ckpt.layers[i]}
        names = self._names(i)
        prefix = f"{self.ckpt.layer_prefix}{i}."
        grams, y, st = {}, None, None
        layer = None
        if self.has_data:
            self.sk.load(src)
            layer = self.sk.layers[i]
            lin = calibrate.linear_modules(layer, names, prefix)
            x_in = self.x_q if self.x_q is not None else self.x_fp
            with calibrate.LinearStats(layer, lin) as st:
                if x_in is self.x_fp:
                    y = calibrate.forward_stream(layer, i, self.x_fp, ActivationStore(self.budget, "y")).store
                else:
                    calibrate.forward_stream(layer, i, x_in, _Discard())
            if y is None:
                y = calibrate.forward_stream(layer, i, self.x_fp, ActivationStore(self.budget, "y")).store
            self._advance_e2e(i)
            grams = st.take_means(self.device)
        out: dict[str, qtensor.QuantizedTensor | torch.Tensor] = {}
        qweights: dict[str, QWeight] = {}
        for group in _groups(names, st):
            two = []
            for n in group:
                if src[n].dim() != 2:  # fused expert stacks: the plain codec at the planned width
                    out[n] = codecs.quantize(src[n].to(self.device), self.plan[n].bits, cfg.block_size, cfg.codec,
                                             cfg.scale_bits, search=cfg.searches_scales)
                else:
                    two.append(n)
            if not two:
                continue
            h = grams.get(two[0])
            ws = {n: src[n].to(self.device) for n in two}
            qs = quantize_group(ws, {n: self.plan[n].bits for n in two}, cfg.block_size, cfg.codec, h, c.gptq,
                                cfg.lowrank_dtype, cfg.scale_bits, cfg.rotation_block, c.seed, cfg.searches_scales)
            for n, q in qs.items():
                ch, f = self.plan[n], self.fisher.get(n)
                if ch.overlay_rows:
                    overlay.add_overlay(q, ws[n], ch.overlay_rows, h, f)
                if ch.rank:
                    q.u, q.v = lowrank.weighted_svd(ws[n].float() - q.base(), ch.rank, h, f)
                qweights[n] = q
        row = {"layer": i}
        if self.has_data and c.steps > 0:
            # tensors distillation cannot train (3-D stacks, non-Linear weights) sit at their stored values
            fixed = {n: qtensor.dequantize(t, torch.float32) for n, t in out.items()}
            fixed.update({n: qtensor.dequantize(q.freeze(), torch.float32) for n, q in qweights.items() if n not in grams})
            if fixed:
                self.sk.load(fixed)
            trainable = {n[len(prefix):]: q for n, q in qweights.items() if n in grams}
            x_in = self.x_q if self.x_q is not None else self.x_fp
            r = distill.distill(layer, i, trainable, x_in, y, self.one, c)
            row.update(loss_before=r.loss_before, loss_after=r.loss_after, kept=r.kept, distill_s=r.seconds)
            log.info("layer %d: distillation loss %.4g -> %.4g%s", i, r.loss_before, r.loss_after,
                     "" if r.kept else " (not kept)")
        for n, q in qweights.items():
            out[n] = q.freeze()
        for n in self.ckpt.layers[i]:
            if n not in out:
                out[n] = src[n]
        if self.has_data:
            self._advance(i, out, y)
        row["seconds"] = time.perf_counter() - t0
        self.report.layers.append(row)
        return out

    def skip(self, i: int, stored: dict[str, qtensor.QuantizedTensor | torch.Tensor]) -> None:
        """Layer i is already in the pack: advance the streams through it."""
        if not self.has_data:
            return
        self.sk.load({n: self.ckpt.get(n) for n in self.ckpt.layers[i]})
        y = calibrate.forward_stream(self.sk.layers[i], i, self.x_fp, ActivationStore(self.budget, "y")).store
        self._advance_e2e(i)
        self._advance(i, stored, y)

    def _advance_e2e(self, i: int) -> None:
        """The end-to-end sequences' fp stream through layer i (its fp weights loaded)."""
        if self.x_e2e is not None:
            nxt = calibrate.forward_stream(self.sk.layers[i], i, self.x_e2e, ActivationStore(self.budget, "e2e"))
            self.x_e2e.store.clear()
            self.x_e2e = nxt

    def _advance(self, i: int, stored: dict, y: ActivationStore) -> None:
        """x_fp <- y (the teacher's output); x_q <- layer_i with exactly the stored weights applied to x_q."""
        layer = self.sk.layers[i]
        if self.x_q is not None:
            self.sk.load({n: qtensor.dequantize(t, torch.float32) if isinstance(t, qtensor.QuantizedTensor) else t
                          for n, t in stored.items()})
            nxt = calibrate.forward_stream(layer, i, self.x_q, ActivationStore(self.budget, "q"))
            self.x_q.store.clear()
            self.x_q = nxt
        self.x_fp.store.clear()
        self.x_fp = calibrate.Stream(y, self.x_fp.batches)
        self.sk.unload_layer(i)
        self.report.activation_peak_bytes = self.budget.peak
        self.report.spilled_bytes = self.budget.spilled_bytes

    # -- end-to-end ---------------------------------------------------------------------------------------
    def finetune(self, read_layer, write_layer) -> None:
        """End-to-end distillation of every finished layer (finetune.py), which are then written again.

        read_layer(i) -> layer i's tensors as stored; write_layer(i, tensors) stores them. Runs once: a marker
        under the work directory makes a resumed pack skip it when it had completed."""
        c = self.cfg.calib
        self.report.peak_rss_bytes["layers"] = rss.peak()
        if not self.has_data or c.e2e_steps <= 0:
            return
        marker = self.work / "e2e.json"
        if marker.is_file():
            self.report.e2e = json.loads(marker.read_text())
            return
        t0 = time.perf_counter()
        layers = [read_layer(i) for i in range(self.ckpt.num_layers)]
        per_layer = [sum(t.numel() for t in tensors.values() if isinstance(t, qtensor.QuantizedTensor)) for tensors in layers]
        numel = sum(per_layer)
        vocab, hidden = self.sk.model.get_output_embeddings().weight.shape
        c = replace(c, e2e_topk=finetune.stage_topk(c, self.sk, numel))
        held = finetune.held_bytes(self.e2e_ids.numel(), hidden, vocab, c.e2e_topk)
        ok, need, free = finetune.fits(finetune.working_bytes(numel, max(per_layer)) + held, self.device)
        if not ok:
            why = f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
            log.warning("end-to-end distillation skipped: it %s (--e2e-steps 0 silences this)", why)
            self.report.e2e = {"skipped": why}
            return
        top = self.x_e2e if self.x_e2e is not None else self.x_fp
        teacher = torch.cat([calibrate.layerwise.final_hidden(self.sk, h, b) for h, b in top.chunks()])
        model = finetune.student(self.sk, layers, self.ckpt.layer_prefix, self.device)
        qweights = model.qweights
        bar = tqdm(total=c.e2e_steps, desc="end-to-end", unit="step", disable=not self.progress)

        def progress(step: int, kl: float) -> None:
            bar.update(step + 1 - bar.n)  # a resumed stage starts at the step it had reached
            bar.set_postfix(kl=f"{kl:.4f}")

        r = finetune.finetune(self.sk, model, self.e2e_ids.to(self.device), teacher, c, progress,
                              state=self.work / E2E_STATE)
        bar.close()
        if r.skipped:
            log.info("end-to-end distillation skipped: %s", r.skipped)
        else:
            log.info("end-to-end distillation (lr %.3g, %s): held-out KL %.4g -> %.4g%s", r.lr, r.dtype, r.kl_before,
                     r.kl_tuned, "" if r.kept else " (not lower: the stage's weights are discarded)")
        for i, tensors in enumerate(layers):
            if r.kept:
                tensors = {n: (qweights[n].freeze() if n in qweights else r.norms.get(n, t)) for n, t in tensors.items()}
                write_layer(i, tensors)
            self.sk.unload_layer(i)
        tuned = r.kl_tuned if math.isfinite(r.kl_tuned) else None  # JSON has no NaN
        self.report.e2e = {"kl_before": r.kl_before, "kl_after": r.kl_after, "kl_tuned": tuned, "kept": r.kept,
                           "steps": r.steps, "seconds": time.perf_counter() - t0, "dtype": r.dtype,
                           "recipe": {"sequences": list(self.e2e_ids.shape), "lr": r.lr, "lr_max": c.e2e_lr,
                                      "warmup": c.e2e_warmup,
                                      "norms": c.e2e_norms, "topk": c.e2e_topk}}
        if r.skipped:
            self.report.e2e["skipped"] = r.skipped
        self.report.seconds["e2e"] = self.report.e2e["seconds"]
        self.report.peak_rss_bytes["e2e"] = rss.peak()
        atomic_write_bytes(marker, json.dumps(self.report.e2e).encode())

    def close(self) -> None:
        self.budget.cleanup()


def _groups(names: list[str], stats: calibrate.LinearStats | None) -> list[list[str]]:
    """names grouped by shared input (one Gram matrix, one GPTQ pass), in order of first appearance."""
    members = stats.groups() if stats is not None else {}
    leader = stats.leader if stats is not None else {}
    out, seen = [], set()
    for n in names:
        if n in seen:
            continue
        group = [m for m in members.get(leader.get(n), [n]) if m in names] if n in leader else [n]
        seen.update(group)
        out.append(group)
    return out


class _Discard:
    """An ActivationStore that keeps nothing (a forward run only for its hooks)."""

    def append(self, t) -> None:
        pass


def read_stored_layer(path: Path, entries: dict[str, TensorEntry]) -> dict[str, qtensor.QuantizedTensor | torch.Tensor]:
    """The tensors of a finished layer file of an unfinished pack, as stored (its hash was checked on resume)."""
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name, e in entries.items():
            if e.kind == "raw":
                out[name] = f.get_tensor(name)
                continue
            parts = {p: f.get_tensor(name + qtensor.SUFFIX[p]) for p in qtensor.entry_part_shapes(e)}
            out[name] = qtensor.from_entry(e, parts)
    return out
