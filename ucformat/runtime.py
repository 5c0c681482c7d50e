"""Load a pack as a transformers causal LM that generates.

`dense` residency: every layer dequantized once onto the device. Built from an empty skeleton, one
layer at a time, so the source-precision model never exists in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .reader import PackReader
from .skeleton import Skeleton


def load(pack: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, progress: bool = False):
    reader = PackReader(pack)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    sk = Skeleton(pack, dtype=dtype, device=device)
    sk.load(reader.nonlayer_state_dict(dtype))
    for i in tqdm(range(reader.num_layers), desc="load", unit="layer", disable=not progress):
        sk.load(reader.layer_state_dict(i, dtype))
    missing = sk.missing()
    if missing:
        raise RuntimeError(f"{pack}: weights missing after load: {missing[:5]}")
    return sk.model
