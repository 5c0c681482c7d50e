"""The runtime behind a loaded pack: puts each decoder layer's weights in place just before it runs.

Dense layers are attached once. For every other layer a forward pre-hook attaches its reconstructed
weights (waiting for the prefetch if it is still in flight) and a forward hook drops them again. The
next non-dense layer is prefetched while the current one computes:

- on CUDA a worker thread enqueues the host-to-device copy from pinned memory and the reconstruction on a side
  stream and records an event the compute stream waits on: copy and reconstruction overlap compute;
- on CPU there is no worker: the next streamed layer's file is handed to the kernel's read-ahead
  (posix_fadvise WILLNEED), so a disk read overlaps compute without taking a core, and the layer is
  reconstructed on the compute thread from the memory-mapped file. Reconstruction is CPU work: on a
  second thread it only oversubscribes the same cores (measured on 2 cores: batch-8 decode 0.66x of
  no prefetch with reconstruction on a worker, 0.72x with a worker that only copied the bytes ahead,
  its torch copy spinning up a second OpenMP team).

MoE layers that are not dense get their experts one by one: the layer's pre-hook attaches everything
else, and the experts module's own pre-hook reconstructs only the experts the router picked (experts.py).

Everything that happens is counted in `RuntimeStats`, a plain record the server maps to metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from . import experts as moe
from . import cpu_qgemv, qhead, qtensor
from .manifest import layer_file
from .qlinear import QuantLinear, swappable
from .reader import PackReader
from .residency import ResidencyPlan
from .skeleton import Skeleton

log = logging.getLogger(__name__)

Parts = dict[str, "qtensor.QuantizedTensor | torch.Tensor"]


@dataclass
class RuntimeStats:
    mode: str
    device: str
    total_layers: int
    resident_layers: int  # dense or packed on the device
    layers_dense: int
    layers_packed: int
    layers_streamed: int
    resident_bytes: int  # weight bytes on the device now
    peak_resident_bytes: int
    bytes_transferred: int  # stored bytes copied host -> device (or read from the mmap-ed pack on CPU)
    prefetch_hits: int
    prefetch_misses: int
    stall_seconds: float  # time the compute waited for a layer
    dequant_seconds: float  # time spent reconstructing weights (all threads)
    experts_reconstructed: int = 0  # MoE experts rebuilt for a call (non-dense layers)
    experts_skipped: int = 0  # MoE experts of those calls that the router did not pick, so never rebuilt
    linears_from_codes: int = 0  # linears of non-dense layers computed from their stored parts (qmatmul.py)

    def to_dict(self) -> dict:
        return asdict(self)


def _nbytes(t: "torch.Tensor | qtensor.QuantizedTensor | None") -> int:
    if isinstance(t, qtensor.QuantizedTensor):
        return t.nbytes()
    return 0 if t is None else t.numel() * t.element_size()


def _tensors(values):
    """Every tensor among `values`, the parts of quantized ones included."""
    for v in values:
        if isinstance(v, qtensor.QuantizedTensor):
            yield from v._held().values()
        else:
            yield v


def parts_bytes(parts: Parts) -> int:
    """Bytes the parts hold in memory (what residency budgets and host-to-device copies move)."""
    return sum(_nbytes(p) for p in parts.values())


class Runtime:
    def __init__(self, reader: PackReader, sk: Skeleton, plan: ResidencyPlan, prefetch: bool = True,
                 progress: bool = False, per_expert: bool = True, kernels: bool = True) -> None:
        self.reader, self.sk, self.plan = reader, sk, plan
        self.per_expert = per_expert
        self.kernels = kernels
        self._linears: dict[int, dict[str, QuantLinear]] = {}  # layer -> its linears computed from codes
        self._mapped: dict[int, tuple[tuple[int, int], Parts]] = {}  # CPU: streamed layers' mapped parts
        self._hooked: set[int] = set()  # layers whose weights are put in place around every forward
        self.device = sk.device
        self.cuda = self.device.type == "cuda"
        self.prefetch = prefetch
        self._lock = threading.Lock()
        self._resident = 0
        self._peak = 0
        self._transferred = 0
        self._hits = self._misses = 0
        self._stall = self._dequant = 0.0
        self._stores: dict[int, Parts] = {}  # packed (on device) and host (pinned) parts
        self._inflight: dict[int, Future] = {}
        self._attached: dict[int, int] = {}  # layer -> bytes attached now (non-dense layers)
        self._meta: dict[int, dict[str, tuple[torch.nn.Module, str, torch.nn.Parameter]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uc-prefetch") if prefetch and self.cuda else None
        self._ahead: set[int] = set()  # CPU: layers whose read-ahead was requested
        self._side = torch.cuda.Stream(self.device) if self.cuda else None
        self._groups: dict[int, list[moe.ExpertGroup]] = {}  # non-dense MoE layers streamed per expert
        self._layer_only: dict[int, list[str]] = {}  # MoE layers streamed per expert: the names the layer attaches
        self._experts_built = self._experts_skipped = 0

        self._add(sum(_nbytes(t) for t in self._attach_nonlayer()))
        self.head8 = self._prepare_head()
        self._order = [p.index for p in plan.layers if p.where != "dense"]
        for p in plan.layers:
            if p.where == "dense":
                sd = self._reconstruct(self._parts(p.index, to_device=True))
                self._add(sum(_nbytes(t) for t in sd.values()))
                sk.load(sd)
            else:
                self._prepare_experts(p.index)
                self._prepare_kernels(p.index)
                self._prepare_fast_path(p.index)
                if p.where == "packed" and self._static(p.index):  # attached once: nothing to do per pass
                    self._attach(p.index, self._reconstruct(self._parts(p.index, to_device=True), p.index))
                    continue
                if p.where == "packed":
                    self._stores[p.index] = self._parts(p.index, to_device=True)
                    self._add(parts_bytes(self._stores[p.index]))
                elif self.cuda:
                    self._stores[p.index] = {k: _pin(v) for k, v in self.reader.read_parts(layer_file(p.index)).items()}
                layer = sk.layers[p.index]
                layer.register_forward_pre_hook(self._make_pre(p.index))
                layer.register_forward_hook(self._make_post(p.index))
                self._hooked.add(p.index)

    # -- accounting -----------------------------------------------------------------------------------
    def _add(self, n: int) -> None:
        with self._lock:
            self._resident += n
            self._peak = max(self._peak, self._resident)

    def stats(self) -> RuntimeStats:
        with self._lock:
            return RuntimeStats(
                mode=self.plan.mode, device=str(self.device), total_layers=len(self.plan.layers),
                resident_layers=self.plan.count("dense") + self.plan.count("packed"),
                layers_dense=self.plan.count("dense"), layers_packed=self.plan.count("packed"),
                layers_streamed=self.plan.count("host"), resident_bytes=self._resident, peak_resident_bytes=self._peak,
                bytes_transferred=self._transferred, prefetch_hits=self._hits, prefetch_misses=self._misses,
                stall_seconds=self._stall, dequant_seconds=self._dequant,
                experts_reconstructed=self._experts_built, experts_skipped=self._experts_skipped,
                linears_from_codes=sum(len(v) for v in self._linears.values()))

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._resident

    # -- weights --------------------------------------------------------------------------------------
    def _attach_nonlayer(self) -> list[torch.Tensor]:
        sd = self.reader.nonlayer_state_dict(self.sk.dtype, self.device)
        self.sk.load(sd)
        return list(sd.values())

    def _prepare_head(self) -> bool:
        """CPU, integer kernels (cpu_qgemv.ACT), layers computed from their codes: a float output head is
        computed from an 8-bit copy made here (qhead.py). A tied head's float weight stays (the embeddings
        use it); an untied one's is dropped."""
        if self.cuda or not self.kernels or cpu_qgemv.ACT != "int16" or all(p.where == "dense" for p in self.plan.layers):
            return False
        model = self.sk.model
        out = model.get_output_embeddings()
        if type(out) is not torch.nn.Linear or out.weight.device.type == "meta" or not cpu_qgemv.available()[0]:
            return False
        inp = model.get_input_embeddings()
        tied = inp is not None and out.weight is inp.weight
        head = QuantLinear(out)
        head.q = qhead.int8_copy(out.weight)
        model.set_output_embeddings(head)
        self._add(head.q.nbytes() - (0 if tied else _nbytes(out.weight)))
        return True

    def _parts(self, index: int, to_device: bool) -> Parts:
        parts = self.reader.read_parts(layer_file(index))
        return {k: v.to(self.device) for k, v in parts.items()} if to_device else parts

    def _reconstruct(self, parts: Parts, index: int | None = None) -> Parts:
        """Stored parts -> what the layer's modules take: tensors in the compute dtype, except the quantized
        weights of layer `index` that its QuantLinear modules compute from (kept as stored)."""
        t0 = time.perf_counter()
        keep = self._linears.get(index, {})
        out = {}
        for name, p in parts.items():
            if name in keep:
                out[name] = p
            elif isinstance(p, qtensor.QuantizedTensor):
                out[name] = qtensor.dequantize(p, self.sk.dtype)
            else:
                out[name] = p.to(self.sk.dtype) if p.is_floating_point() else p
        with self._lock:
            self._dequant += time.perf_counter() - t0
        return out

    def _read_host(self, index: int, names: list[str] | None = None) -> Parts:
        """CPU: a streamed layer's stored parts (all, or `names`), memory-mapped from its file. The file's
        size and mtime are re-checked at every read (re-hashed if they changed); the mapping is kept while
        they hold, so a read is a stat and the pages come from the page cache or the disk as they are
        touched. Mapped pages are file-backed: the kernel can drop them under memory pressure."""
        rel = layer_file(index)
        path = self.reader.check_file(rel)
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        mapped = self._mapped.get(index)
        if mapped is None or mapped[0] != stamp:
            mapped = self._mapped[index] = (stamp, self.reader.read_parts(rel))
        parts = _subset(mapped[1], names)
        with self._lock:
            self._transferred += parts_bytes(parts)
        return parts

    def check_files(self) -> None:
        """Re-check every pack file still read while serving (the streamed layers' on the CPU; on CUDA they were
        copied to pinned memory at load): a stat each, a re-hash where it changed. Raises the file's PackError."""
        if self.cuda:
            return
        for p in self.plan.layers:
            if p.where == "host":
                self.reader.check_file(layer_file(p.index))

    def _readahead(self, index: int) -> None:
        """CPU: ask the kernel to bring the layer's file into the page cache in the background."""
        if fadvise(self.reader.path / layer_file(index), "WILLNEED"):
            self._ahead.add(index)

    def _layer_names(self, index: int) -> list[str] | None:
        """The names a layer's pre-hook attaches: all (None), or all but the per-expert ones."""
        return self._layer_only.get(index)

    def _materialize(self, index: int):
        """Stored parts -> reconstructed tensors on the device. Runs on the prefetch thread (CUDA) or inline."""
        where = self.plan.layers[index].where
        names = self._layer_names(index)
        if where == "packed":
            return self._reconstruct(_subset(self._stores[index], names), index), None
        if not self.cuda:
            return self._reconstruct(self._read_host(index, names), index), None
        with torch.cuda.stream(self._side):
            host = _subset(self._stores[index], names)
            dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            sd = self._reconstruct(dev, index)
            event = torch.cuda.Event()
            event.record(self._side)
        with self._lock:
            self._transferred += parts_bytes(host)
        return sd, event

    def _prepare_experts(self, index: int) -> None:
        if not self.per_expert:
            return
        prefix = self.reader.manifest.layer_prefix + f"{index}."
        groups = moe.find_groups(self.sk.model, self.sk._mapping, prefix, self.reader.layer_tensor_names(index))
        if not groups:
            return
        self._groups[index] = groups
        per_expert = set().union(*(g.names() for g in groups))
        self._layer_only[index] = [n for n in self.reader.layer_tensor_names(index) if n not in per_expert]
        for g in groups:
            g.module.register_forward_pre_hook(self._make_expert_pre(index, g), with_kwargs=True)
            g.module.register_forward_hook(self._make_expert_post(g))

    def _prepare_kernels(self, index: int) -> None:
        """Swap in a QuantLinear for every quantized weight of the layer that is a plain nn.Linear's."""
        if not self.kernels:
            return
        found = {}
        for name in self._layer_only.get(index, self.reader.layer_tensor_names(index)):
            e = self.reader.manifest.tensors[name]
            spot = swappable(self.sk.model, name, e.shape) if e.kind == "quantized" else None
            if spot is not None:
                parent, child = spot
                found[name] = QuantLinear(getattr(parent, child))
                setattr(parent, child, found[name])
        if found:
            self._linears[index] = found

    def _static(self, index: int) -> bool:
        """Whether every quantized weight of the layer is computed from its parts (nothing to rebuild per
        pass), so a packed layer can be attached once."""
        if index in self._groups:
            return False
        linears = self._linears.get(index, {})
        return all(n in linears for n in self.reader.layer_tensor_names(index)
                   if self.reader.manifest.tensors[n].kind == "quantized")

    def _prepare_fast_path(self, index: int) -> None:
        """Checkpoint names that are module parameters one to one are attached by assignment (fast);
        layers whose weights transformers converts on load (renamed, or fused MoE experts not streamed
        per expert) go through the skeleton. Weights computed from codes are set on their QuantLinear."""
        linears = self._linears.get(index, {})
        names = [n for n in self._layer_only.get(index, self.reader.layer_tensor_names(index)) if n not in linears]
        params = dict(self.sk.model.named_parameters())
        fused = {id(p) for g in self._groups.get(index, []) for p in g.meta.values()}
        prefix = self.reader.manifest.layer_prefix + f"{index}."
        if set(names) != {n for n, p in params.items() if n.startswith(prefix) and id(p) not in fused}:
            return
        slots = {}
        for n in names:
            mod_name, _, attr = n.rpartition(".")
            slots[n] = (self.sk.model.get_submodule(mod_name), attr, params[n])
        self._meta[index] = slots

    def _attach(self, index: int, sd: Parts) -> None:
        linears = self._linears.get(index, {})
        for n in linears.keys() & sd.keys():
            linears[n].q = sd[n]
        rest = {n: t for n, t in sd.items() if n not in linears}
        slots = self._meta.get(index)
        if slots is None:
            self.sk.load(rest)
        else:
            for n, t in rest.items():
                mod, attr, _ = slots[n]
                mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
        n = sum(_nbytes(t) for t in sd.values())
        self._attached[index] = n
        self._add(n)

    def _detach(self, index: int) -> None:
        for lin in self._linears.get(index, {}).values():
            lin.q = None
        slots = self._meta.get(index)
        if slots is None:
            self.sk.unload_layer(index)
        else:
            for mod, attr, meta in slots.values():
                mod._parameters[attr] = meta
        self._add(-self._attached.pop(index, 0))

    # -- hooks ----------------------------------------------------------------------------------------
    def _schedule(self, after: int) -> None:
        if not self.prefetch or not self._order:
            return
        pos = self._order.index(after) if after in self._order else -1
        nxt = self._order[(pos + 1) % len(self._order)]
        if not self.cuda:  # packed layers have nothing to transfer; streamed ones get the kernel's read-ahead
            if nxt != after and self.plan.layers[nxt].where == "host":
                self._readahead(nxt)
            return
        if nxt != after and nxt not in self._inflight and nxt not in self._attached:
            self._inflight[nxt] = self._pool.submit(self._prefetch_job, nxt)

    def _prefetch_job(self, index: int):
        """CUDA: copy and reconstruct on the side stream; (tensors, event)."""
        sd, event = self._materialize(index)
        self._add(sum(_nbytes(t) for t in sd.values()))  # in flight: counted while it waits
        return sd, event

    def hooked(self, index: int) -> bool:
        """Whether layer `index` needs enter()/leave() around its forward (its weights are put in place per
        pass); the layer's own forward hooks call them, a caller that runs the layer's arithmetic without
        calling the module (server/decoder.py) calls them itself."""
        return index in self._hooked

    def enter(self, index: int) -> None:
        """Attach layer `index`'s weights (waiting for its prefetch if in flight) and schedule the next."""
        fut = self._inflight.pop(index, None)
        t0 = time.perf_counter()
        if fut is not None:
            ready = fut.done()
            sd, event = fut.result()
            self._add(-sum(_nbytes(t) for t in sd.values()))  # re-counted by _attach
            if event is not None:
                if not event.query():
                    ready = False
                    event.synchronize()
                stream = torch.cuda.current_stream(self.device)
                for t in _tensors(sd.values()):
                    t.record_stream(stream)
            with self._lock:
                self._hits += ready
                self._misses += not ready
        else:  # CPU (read-ahead requested or not), or nothing in flight
            ahead = index in self._ahead
            self._ahead.discard(index)
            sd, event = self._materialize(index)
            if event is not None:
                event.synchronize()
            with self._lock:
                self._hits += ahead
                self._misses += not ahead
        with self._lock:
            self._stall += time.perf_counter() - t0
        for t in sd.values():  # bound for this pass only: no il8 copy (its making costs more than one pass saves)
            if isinstance(t, qtensor.QuantizedTensor):
                cpu_qgemv.per_pass(t)
        self._attach(index, sd)
        self._schedule(index)

    def leave(self, index: int) -> None:
        self._detach(index)

    def _make_pre(self, index: int):
        def pre(module, args):
            self.enter(index)
        return pre

    def _make_post(self, index: int):
        def post(module, args, output):
            self.leave(index)
        return post

    # -- MoE experts, one by one ------------------------------------------------------------------------
    def _expert_tensors(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        where = self.plan.layers[index].where
        if where == "packed":
            parts = {n: self._stores[index][n] for n in names}
        elif not self.cuda:
            parts = self._read_host(index, names)
        else:
            host = {n: self._stores[index][n] for n in names}
            parts = {n: v.to(self.device, non_blocking=True) for n, v in host.items()}
            with self._lock:
                self._transferred += parts_bytes(host)
        return self._reconstruct(parts)

    def _make_expert_pre(self, index: int, g: moe.ExpertGroup):
        def pre(module, args, kwargs):
            idx, as_kw = moe.routed(args, kwargs)
            hit = [e for e in torch.unique(idx).tolist() if 0 <= e < g.num_experts] or [0]
            stacks = moe.compact_stacks(g, hit, self._expert_tensors(index, g.names_of(hit)))
            for attr, t in stacks.items():
                module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
            module.num_experts = len(hit)
            n = sum(_nbytes(t) for t in stacks.values())
            g.attached = n
            self._add(n)
            with self._lock:
                self._experts_built += len(hit)
                self._experts_skipped += g.num_experts - len(hit)
            new = moe.remap(idx, hit, g.num_experts)
            if as_kw:
                return args, {**kwargs, "top_k_index": new}
            return (args[0], new, *args[2:]), kwargs
        return pre

    def _make_expert_post(self, g: moe.ExpertGroup):
        def post(module, args, output):
            for attr, meta in g.meta.items():
                module._parameters[attr] = meta
            module.num_experts = g.num_experts
            self._add(-g.attached)
            g.attached = 0
        return post

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._inflight.values():
                fut.cancel()
            self._pool.shutdown(wait=True)
            self._inflight.clear()


def fadvise(path, advice: str) -> bool:
    """posix_fadvise(POSIX_FADV_<advice>) over the whole file; False where the OS has no fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, getattr(os, f"POSIX_FADV_{advice}"))
    finally:
        os.close(fd)
    return True


def _subset(parts: Parts, names: list[str] | None) -> Parts:
    return parts if names is None else {n: parts[n] for n in names}


def _pin(p):
    """Page-locked host copy (CUDA only) so copies to the device are asynchronous."""
    if isinstance(p, qtensor.QuantizedTensor):
        return p.apply(torch.Tensor.pin_memory)
    return p.pin_memory()
