"""Load a pack as a transformers causal LM that generates, under a residency plan.

    model = ucformat.load("pack/", device="cuda", residency="stream", vram_budget="24GiB")
    model.generate(...)              # or a plain forward, with or without a KV cache
    model.uc_runtime.stats()         # RuntimeStats: resident bytes, transfers, prefetch, stalls

The skeleton is built on the meta device and weights are attached layer by layer, so the whole
dequantized model never exists unless the plan (residency="dense") asks for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import conformance
from .errors import PackError
from .reader import PackReader
from .residency import ResidencyPlan, make_plan
from .skeleton import Skeleton
from .streaming import Runtime


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def plan(pack: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, residency: str = "dense",
         vram_budget: str | int | None = None) -> ResidencyPlan:
    reader = PackReader(pack, check_hashes=False)
    conformance.require(reader)
    return make_plan(reader, residency, device, dtype or default_dtype(device), vram_budget)


def load(pack: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, residency: str = "dense",
         vram_budget: str | int | None = None, prefetch: bool = True, progress: bool = False,
         cudnn_attention: bool = False, per_expert: bool = True, kernels: bool = True):
    """`kernels`: in `packed` and `stream` residency the quantized linears compute from their stored parts
    (qmatmul.py: native CPU / Triton kernels for decode, reconstruct + GEMM for long prompts); False
    rebuilds every weight before its layer runs, which gives the same logits as `dense` bit for bit.
    `per_expert`: MoE layers that are not dense rebuild only the routed experts (experts.py); False
    rebuilds whole layers. On CUDA, unless `cudnn_attention`, this turns off PyTorch's cuDNN attention
    backend for the whole process (see `avoid_cudnn_attention`)."""
    device = str(device)
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked but CUDA is not available")
        if not cudnn_attention:
            avoid_cudnn_attention()
    dtype = dtype or default_dtype(device)
    reader = PackReader(pack)
    conformance.require(reader)  # the pack is the model its config.json builds, before a weight is read
    the_plan = make_plan(reader, residency, device, dtype, vram_budget)
    sk = Skeleton(pack, dtype=dtype, device=device)
    runtime = Runtime(reader, sk, the_plan, prefetch=prefetch, progress=progress, per_expert=per_expert,
                      kernels=kernels)
    missing = [n for n in sk.missing() if not _is_streamed(n, the_plan, reader)]
    if missing:
        raise PackError(f"{pack}: weights missing after load: {missing[:5]}")
    sk.model.uc_runtime = runtime
    return sk.model


def avoid_cudnn_attention() -> None:
    """Decoding grows the KV length by one every step, and cuDNN's SDPA builds a new graph for every new
    shape. On an H200 (torch 2.11) decode steps of a 0.6B model at shapes not seen before took about
    65 ms against 16 ms at shapes seen once (bench/gpu_check.py, docs/BENCHMARKS.md "CUDA check").
    Flash and memory-efficient attention have no per-shape build; SDPA picks them once cuDNN is off."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def _is_streamed(name: str, the_plan: ResidencyPlan, reader: PackReader) -> bool:
    prefix = reader.manifest.layer_prefix
    if not name.startswith(prefix):
        return False
    index = int(name[len(prefix):].split(".", 1)[0])
    return the_plan.layers[index].where != "dense"
