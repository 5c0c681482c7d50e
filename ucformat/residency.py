"""Residency plans: which decoder layers live on the device, in which form, under a byte budget.

A layer is in one of three places:
  dense   reconstructed once, kept on the device in the compute dtype (no per-token work)
  packed  its stored parts (codes, scales, grids, raw norms) kept on the device; reconstructed just
          before the layer runs, freed after
  host    its stored parts kept in host memory (pinned, for CUDA) or left memory-mapped on disk (CPU);
          copied and reconstructed just in time, the next layers prefetched in the background
The non-layer weights (embeddings, final norm, lm_head) are always resident: every token needs them.

The planner for `stream` fills the budget greedily with the upgrade that saves the most time per byte
(host -> packed saves the copy, host/packed -> dense saves the reconstruction), keeping room for one
streamed layer being computed. A second streamed layer may be in flight (the prefetch), so the
measured peak is at most budget + one layer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .manifest import NONLAYER_FILE, layer_file
from .reader import PackReader, torch_dtype

MODES = ("dense", "packed", "stream")

# Rough throughputs for the planner's cost model (bytes of stored parts per second). Only their ratio
# matters for the ranking; bench/gpu_check.py measures the real ones on a card.
COST_MODEL = {
    "cpu": {"copy": 8e9, "dequant": 1.5e9},
    "cuda": {"copy": 20e9, "dequant": 300e9},
}


class BudgetError(ValueError):
    """The budget cannot hold what the chosen residency needs; the message says how much is missing."""


@dataclass(frozen=True)
class Placement:
    index: int
    where: str  # "dense" | "packed" | "host"
    dense_bytes: int  # the layer reconstructed in the compute dtype
    packed_bytes: int  # the layer as stored

    @property
    def resident_bytes(self) -> int:
        return {"dense": self.dense_bytes, "packed": self.packed_bytes, "host": 0}[self.where]


@dataclass(frozen=True)
class ResidencyPlan:
    mode: str
    device: str
    dtype: str
    budget_bytes: int | None
    nonlayer_bytes: int
    layers: tuple[Placement, ...]
    working_bytes: int  # room kept for one non-dense layer being reconstructed and computed

    @property
    def resident_bytes(self) -> int:
        return self.nonlayer_bytes + sum(p.resident_bytes for p in self.layers) + self.working_bytes

    @property
    def bytes_moved_per_token(self) -> int:
        """Stored bytes copied to the device for every forward pass (host layers)."""
        return sum(p.packed_bytes for p in self.layers if p.where == "host")

    @property
    def min_stream_bytes(self) -> int:
        """The smallest budget `stream` accepts: non-layer weights plus the largest layer being computed."""
        return self.nonlayer_bytes + max((p.dense_bytes for p in self.layers), default=0)

    @property
    def dense_model_bytes(self) -> int:
        return self.nonlayer_bytes + sum(p.dense_bytes for p in self.layers)

    def count(self, where: str) -> int:
        return sum(p.where == where for p in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(resident_bytes=self.resident_bytes, bytes_moved_per_token=self.bytes_moved_per_token,
                 dense_model_bytes=self.dense_model_bytes)
        return d

    def describe(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        budget = mib(self.budget_bytes) if self.budget_bytes is not None else "none"
        lines = [
            f"residency {self.mode} on {self.device} ({self.dtype}), budget {budget}",
            f"  embeddings / norm / lm_head: resident, {mib(self.nonlayer_bytes)}",
            f"  layers: {self.count('dense')} dense, {self.count('packed')} packed, {self.count('host')} streamed "
            f"from host (of {len(self.layers)})",
            f"  working room for one reconstructed layer: {mib(self.working_bytes)}",
            f"  planned resident weights: {mib(self.resident_bytes)} (dense model: {mib(self.dense_model_bytes)})",
            f"  bytes moved per forward pass: {mib(self.bytes_moved_per_token)}",
        ]
        runs, start = [], 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i].where != self.layers[start].where:
                runs.append(f"{start}-{i - 1}: {self.layers[start].where}" if i - 1 > start else f"{start}: {self.layers[start].where}")
                start = i
        lines.append("  " + ", ".join(runs))
        return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_budget(text: str | int | None, dense_model_bytes: int, device: torch.device) -> int | None:
    """'24GiB', '500MB', '25%' (of the dense model's weights), 'auto' (free memory minus headroom), None."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().lower().replace(" ", "")
    if t == "auto":
        return auto_budget(device)
    if t.endswith("%"):
        try:
            return int(dense_model_bytes * float(t[:-1]) / 100)
        except ValueError:
            pass
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", t)
    if not m or m[2] not in _UNITS:
        raise BudgetError(f"--vram-budget {text!r}: expected a size like 24GiB, 500MB, 25% or auto")
    return int(float(m[1]) * _UNITS[m[2]])


def auto_budget(device: torch.device, headroom: float = 0.2) -> int:
    """Free device memory minus `headroom` of it, left for the KV cache and activations."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _mem_available()
    return int(free * (1 - headroom))


def _mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def layer_sizes(reader: PackReader, dtype: torch.dtype) -> tuple[int, list[tuple[int, int]]]:
    """(non-layer bytes in the compute dtype, [(dense bytes, stored bytes) per layer])."""
    elem = torch.tensor([], dtype=dtype).element_size()
    by_file: dict[str, list[int]] = {}
    for e in reader.manifest.tensors.values():
        numel = 1
        for s in e.shape:
            numel *= s
        dense = numel * elem
        stored = e.stored_bytes or numel * torch.tensor([], dtype=torch_dtype(e.dtype)).element_size()
        acc = by_file.setdefault(e.file, [0, 0])
        acc[0] += dense
        acc[1] += stored
    nonlayer = by_file.get(NONLAYER_FILE, [0, 0])[0]
    return nonlayer, [tuple(by_file.get(layer_file(i), [0, 0])) for i in range(reader.num_layers)]


def make_plan(reader: PackReader, mode: str, device: str | torch.device, dtype: torch.dtype,
              budget: str | int | None = None) -> ResidencyPlan:
    if mode not in MODES:
        raise BudgetError(f"--residency must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    nonlayer, sizes = layer_sizes(reader, dtype)
    dense_total = nonlayer + sum(d for d, _ in sizes)
    budget_bytes = parse_budget(budget, dense_total, device)
    if mode == "stream" and budget_bytes is None:
        budget_bytes = auto_budget(device)
    biggest = max(d for d, _ in sizes)
    where = {"dense": "dense", "packed": "packed", "stream": "host"}[mode]
    layers = [Placement(i, where, d, p) for i, (d, p) in enumerate(sizes)]
    working = 0 if mode == "dense" else biggest
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731

    if mode == "stream":
        floor = nonlayer + biggest
        if budget_bytes < floor:
            raise BudgetError(
                f"--vram-budget {mib(budget_bytes)} is smaller than the embeddings/lm_head ({mib(nonlayer)}) plus one "
                f"decoder layer being computed ({mib(biggest)}); give at least {mib(floor)}")
        layers = _fill(layers, budget_bytes - floor, COST_MODEL["cuda" if device.type == "cuda" else "cpu"])
    plan = ResidencyPlan(mode, str(device), str(dtype).removeprefix("torch."), budget_bytes, nonlayer, tuple(layers), working)
    if budget_bytes is not None and mode != "stream" and plan.resident_bytes > budget_bytes:
        raise BudgetError(f"--residency {mode} needs {mib(plan.resident_bytes)} of weights on the device, more than the "
                          f"budget {mib(budget_bytes)}; use --residency stream to fit it")
    return plan


def _fill(layers: list[Placement], room: int, cost: dict) -> list[Placement]:
    """Greedy upgrades by time saved per byte until nothing more fits."""
    while True:
        best = None
        for p in layers:
            for target in ("packed", "dense"):
                if (p.where, target) in (("host", "packed"), ("host", "dense"), ("packed", "dense")):
                    extra = Placement(p.index, target, p.dense_bytes, p.packed_bytes).resident_bytes - p.resident_bytes
                    saved = (p.packed_bytes / cost["copy"] if p.where == "host" else 0.0)
                    saved += p.packed_bytes / cost["dequant"] if target == "dense" else 0.0
                    if 0 < extra <= room and saved > 0:
                        score = saved / extra
                        if best is None or score > best[0]:
                            best = (score, p.index, target, extra)
        if best is None:
            return layers
        _, i, target, extra = best
        layers[i] = Placement(i, target, layers[i].dense_bytes, layers[i].packed_bytes)
        room -= extra
