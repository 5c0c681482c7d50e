"""Calibration activations with bounded memory: kept in RAM up to a budget, spilled to disk beyond it.

A stream of hidden states (one tensor [B, T, H] per chunk of calibration sequences) lives in an
`ActivationStore`. All stores of a run share one `SpillBudget`; a chunk that would exceed it is written
to its own safetensors file (never pickle) and read back, memory-mapped, when it is next needed.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class SpillBudget:
    """Bytes of activations all stores together may keep in memory; where the rest goes."""

    def __init__(self, limit_bytes: int, spill_dir: Path) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0
        self.spilled_bytes = 0
        self.dir = Path(spill_dir)
        self._ids = itertools.count()

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes

    def new_path(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"{name}-{next(self._ids):06d}.safetensors"

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ActivationStore:
    """An append-only list of tensors, each in memory or in a safetensors file (see SpillBudget)."""

    def __init__(self, budget: SpillBudget, name: str) -> None:
        self.budget, self.name = budget, name
        self._items: list[torch.Tensor | Path] = []
        self._devices: list[torch.device] = []  # a spilled tensor comes back where it was

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        self._devices.append(t.device)
        if self.budget.take(nbytes):
            self._items.append(t)
            return
        path = self.budget.new_path(self.name)
        save_file({"x": t.contiguous().cpu()}, str(path))
        self.budget.spilled_bytes += nbytes
        self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, Path):
            with safe_open(str(item), framework="pt", device="cpu") as f:
                return f.get_tensor("x").to(self._devices[i])
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def spilled(self) -> int:
        return sum(isinstance(it, Path) for it in self._items)

    def clear(self) -> None:
        for item in self._items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
            else:
                self.budget.give(item.numel() * item.element_size())
        self._items, self._devices = [], []
