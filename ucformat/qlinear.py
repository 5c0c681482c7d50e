"""QuantLinear: the module that stands in for an nn.Linear whose weight is stored quantized, and computes from
the stored parts (qmatmul.py) instead of a reconstructed weight.

The runtime (streaming.py) swaps these in for the quantized linears of its non-dense layers and sets
`q` (a QuantizedTensor on the compute device) when the layer's parts are in place: once at load for
`packed` layers, before every forward pass for streamed ones. The bias stays an ordinary parameter,
attached like every raw tensor of the layer.
"""

from __future__ import annotations

import torch

from . import qmatmul
from .qtensor import QuantizedTensor


class QuantLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.q: QuantizedTensor | None = None
        self.bias = linear.bias  # a meta parameter until the runtime attaches the real one
        self._bound: tuple = (None, None, None)  # (q, bias, qmatmul.cpu_call of them)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        q, bias = self.q, self.bias
        if q is None:
            raise RuntimeError("QuantLinear called before its layer's weights were attached")
        if self._bound[0] is not q or self._bound[1] is not bias:  # parts (re)attached: bind once
            self._bound = (q, bias, qmatmul.cpu_call(q, bias))
        call = self._bound[2]
        if call is not None and x.is_cpu and x.numel() <= self.in_features * qmatmul.cpu_rows():
            # decode rows on the CPU: the kernel straight away, what qmatmul.linear would run (about 10 us a
            # call less of Python, 211 calls a SmolLM2 step)
            return call(x)
        return qmatmul.linear(x, q, bias)

    def extra_repr(self) -> str:
        q = self.q
        what = "detached" if q is None else f"{q.bits}-bit, block {q.block_size}" + (f", rotation {q.rotation}" if q.rotation else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {what}"


def swappable(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> tuple[torch.nn.Module, str] | None:
    """(parent, attribute) when checkpoint tensor `name` is exactly the weight of a plain nn.Linear of that
    shape (so the stored parts can serve it directly); None otherwise (renamed or fused on load, stacked
    experts, embeddings...)."""
    mod_name, _, attr = name.rpartition(".")
    if attr != "weight" or len(shape) != 2:
        return None
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return None
    if type(mod) is not torch.nn.Linear or tuple(mod.weight.shape) != tuple(shape):
        return None
    parent_name, _, child = mod_name.rpartition(".")
    return model.get_submodule(parent_name) if parent_name else model, child
