"""8-bit copies of float weights that a pack keeps unquantized, for the CPU kernel: the output head.

A pack stores the embeddings and the output head in the source's precision (`uc pack` quantizes them
only with --quantize-embeddings), and on the CPU every decode step reads the whole head: SmolLM2-135M's
49,152 x 576 in float32 is 113 MB a token, Gemma-3-270M's 262,144 x 640 is 671 MB, more than all its
layers from the codes. `packed` and `stream` residency on the CPU give the head an 8-bit copy made at load
(runtime `head8`): per block of 64 columns one float16 scale (max |w| / 127) and the weights rounded to
it, stored as a QuantizedTensor of 8-bit codes c = round(w / scale) + 128 over the integer grid
(level c - 128), which the integer kernel (cpu_qgemv.cpp, k256::integer_grid) reads without a table.
Every weight moves by at most half a step (1/254 of its block's largest); the float weight stays
where the embeddings need it (tied heads), and an untied head's float copy is dropped.

    q = int8_copy(weight)              # [N, K] float -> QuantizedTensor, 8 bits, block 64
"""

from __future__ import annotations

import torch

from . import bitpack
from .qtensor import QuantizedTensor

BLOCK = 64
GRID = torch.arange(256, dtype=torch.float32) - 128  # the integer grid: level c - 128


def int8_copy(weight: torch.Tensor, block: int = BLOCK) -> QuantizedTensor:
    """weight [N, K] (any float dtype) -> 8-bit codes over the integer grid, one float16 scale per block."""
    if weight.dim() != 2:
        raise ValueError(f"int8_copy takes a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    w = weight.detach().to("cpu", torch.float32)
    pad = (-k) % block
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(n, -1, block)
    scales = (wp.abs().amax(-1) / 127).half()  # rounded first, so the codes use the scale the kernel sees
    s = scales.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wp / torch.where(s > 0, s, 1)), 0).clamp_(-127, 127)
    codes = (q.reshape(n, -1)[:, :k] + 128).to(torch.uint8)
    return QuantizedTensor(shape=(n, k), bits=8, block_size=block, codes=bitpack.pack(codes, 8),
                           scales=scales.contiguous(), grid=GRID.clone())
