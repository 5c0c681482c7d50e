"""Prepacked linear weights for oneDNN on the CPU.

`F.linear` on a bf16 CPU tensor hands oneDNN a plain row-major weight, which its AMX/AVX-512 matmul
reorders into its blocked layout on every call: for decode-sized inputs (a few rows) that reorder costs
more than the product. Packing each weight once at load (what torch.compile's CPU freezing does) gives the
same results, bit for bit (checked at load on every packed layer; on a mismatch nothing is packed), and
a faster step. Only plain `nn.Linear` modules with real CPU weights are replaced, so it is applied only to
the dense residency plan, whose weights never change after load.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def supported(model) -> bool:
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@torch.inference_mode()
def prepack(model, batch_hint: int = 16) -> int:
    """Replace every CPU bf16 nn.Linear by a PackedLinear; returns how many (0 if unsupported)."""
    if not supported(model):
        return 0
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear and child.weight.device.type == "cpu":
                swaps.append((parent, name, child))
    probe = torch.randn(3, 1, dtype=torch.bfloat16)
    packed = []
    try:
        for parent, name, child in swaps:
            new = PackedLinear(child, batch_hint)
            x = probe.expand(3, child.in_features).contiguous() * torch.linspace(-1, 1, child.in_features,
                                                                                   dtype=torch.bfloat16)
            if not torch.equal(new(x), torch.nn.functional.linear(x, child.weight, child.bias)):
                raise ValueError(f"packed {name} differs from F.linear")
            packed.append((parent, name, new))
    except Exception as exc:  # an op missing from this torch build, or a kernel that disagrees
        log.warning("not prepacking linear weights: %s", exc)
        return 0
    for parent, name, new in packed:
        setattr(parent, name, new)
    return len(packed)
