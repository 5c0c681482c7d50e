"""A training run's state in one safetensors file, written atomically (never pickle): trainable weights,
Adam moments and step counts, the torch RNG state and the step reached. A run killed at any moment (kill -9
included) restarts from the last file written and, with the same settings, ends with the same weights as a
run that was never interrupted: the batch order is a function of the seed and the step (distiller.py), and
every other input of a step is in this file.

    param.<name>           float32  the trainable parameter
    adam.<name>.exp_avg    float32  Adam's first moment
    adam.<name>.exp_avg_sq float32  Adam's second moment
    adam.<name>.step       float32  Adam's step count (a 0-d tensor, as torch keeps it)
    rng.torch              uint8    torch.get_rng_state()
header metadata: {"step": str(int), "settings": JSON}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class TrainStateError(Exception):
    """A training state file that cannot be resumed from; the message says why and what to do."""


@dataclass
class TrainState:
    step: int
    settings: dict


def save(path: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, step: int,
         settings: dict) -> None:
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, p in params.items():
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"adam.{n}.{key}"] = torch.as_tensor(st[key]).detach().cpu().float().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"step": str(step), "settings": json.dumps(settings, sort_keys=True)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def settings_of(path: Path) -> dict:
    """The settings a state file was saved with (to decide what a resumed run needs before load())."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("settings", "{}"))
    except (SafetensorError, ValueError) as exc:
        raise TrainStateError(f"{path}: unreadable training state ({exc}); remove it to start again") from None


def load(path: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
         settings: dict) -> TrainState:
    """Restore params, Adam state and the RNG in place; refuse a state made with other settings."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            old = json.loads(meta.get("settings", "{}"))
            if old != json.loads(json.dumps(settings, sort_keys=True)):
                diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise TrainStateError(f"{path}: made with other settings ({', '.join(diff)}); run with the original "
                                      "settings, or start again in a new output directory")
            keys = set(f.keys())
            with torch.no_grad():
                for n, p in params.items():
                    if f"param.{n}" not in keys:
                        raise TrainStateError(f"{path}: no tensor param.{n}; the file is not this run's state")
                    p.copy_(f.get_tensor(f"param.{n}").to(p.device))
                    if f"adam.{n}.exp_avg" in keys:
                        opt.state[p] = {
                            "step": f.get_tensor(f"adam.{n}.step").clone(),
                            "exp_avg": f.get_tensor(f"adam.{n}.exp_avg").to(p.device),
                            "exp_avg_sq": f.get_tensor(f"adam.{n}.exp_avg_sq").to(p.device),
                        }
            torch.set_rng_state(f.get_tensor("rng.torch"))
            return TrainState(int(meta["step"]), old)
    except (SafetensorError, KeyError, ValueError) as exc:
        raise TrainStateError(f"{path}: unreadable training state ({exc}); remove it to start again") from None
