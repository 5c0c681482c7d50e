"""The layers of a CPU decode step in one native call (cpu_ops `Body`), where the model allows it.

The lean step (decoder.py) still pays Python between its kernels: per layer about a dozen small ops
(norms, the rotation, residual adds, the activation) and their frames, 42% of a SmolLM2 4-bit step at
one row on the 2-core CPU of docs/BENCHMARKS.md (bench/native_step.py). `Body` runs the same
arithmetic for every layer in C++ with the GIL released: the quantized kernels by address (their group
calls: q/k/v, o, gate/up, down), the norms, rotation and attention of cpu_ops on plain buffers, the
residual adds and the activation in place. Embedding, rotary tables, final norm and head stay in Python
(once a step, not once a layer).

It applies when every layer's seven linears are QuantLinears the CPU kernel takes whole (packed
residency: no overlay, no low-rank term), nothing is streamed (no runtime hooks to call between layers),
the compute dtype is float32, the activation is SiLU or tanh-GELU, and the rows are decode rows within the
kernel's row limit. Everywhere else the lean step's Python layers run. Its logits are the Python layers'
bit for bit: the same kernels and ops in the same order, and torch's own activation kernels called from
C++ (an exp of our own differed by an ulp, which integer activations turn into a different rounding;
tests/test_decoder.py compares them).
"""

from __future__ import annotations

import operator

import torch

from ucformat import cpu_qgemv, qmatmul
from ucformat.qlinear import QuantLinear

from . import cpu_ops

_Q = operator.attrgetter("q")
ACTIVATIONS = {"SiLUActivation": False, "SiLU": False, "GELUTanh": True}  # module type -> tanh-GELU?
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _norm(layer, path: tuple[str, ...]) -> tuple[torch.Tensor, float]:
    mod = layer
    for name in path:
        mod = getattr(mod, name, None)
        if mod is None:
            return torch.empty(0), 0.0
    return mod.weight, cpu_ops.eps_of(mod)


class NativeBody:
    """body(h [R, 1, H], rope, view) -> h after every layer, or None where the native body does not apply
    (the caller runs its Python layers)."""

    def __init__(self, decoder) -> None:
        self.d = decoder
        self.body = None
        self.qs: list = []  # each linear's QuantizedTensor when the body was built
        self.keep: list = []  # the Bounds whose addresses the body holds
        self.kinds: list[str | None] = decoder.kinds or [None]  # the rope tables, in the body's order
        self.mods = [getattr(getattr(layer, sub), name, None) for layer in decoder.layers for sub, name in LINEARS]
        self.usable = self._static_ok()

    def _static_ok(self) -> bool:
        d = self.d
        if d.windows is None or any(d.hooked) or next(d.model.parameters()).dtype != torch.float32:
            return False
        if not all(type(m) is QuantLinear for m in self.mods):
            return False
        if not all(type(layer.mlp.act_fn).__name__ in ACTIVATIONS for layer in d.layers):
            return False
        return cpu_ops.module() is not None and cpu_qgemv.available()[0]  # built only where they would run

    def _build(self, qs: list) -> None:
        d, r = self.d, self.d.r
        self.body, self.keep = None, []
        if not all(map(qmatmul.cpu_plain, qs)):
            return
        bs = [m.bias for m in self.mods]  # attached with q (at load: nothing is streamed here)
        gelu = {ACTIVATIONS[type(layer.mlp.act_fn).__name__] for layer in d.layers}
        if len(gelu) != 1:
            return
        body = None
        for i, layer in enumerate(d.layers):
            at = 7 * i
            groups = []
            for lo, hi in ((0, 3), (3, 4), (4, 6), (6, 7)):
                bound, entry = cpu_qgemv.handle(list(qs[at + lo:at + hi]), list(bs[at + lo:at + hi]))
                self.keep.append(bound)
                groups.append(bound.address())
            if body is None:
                body = cpu_ops.module().Body(entry, r.gemma_norm, r.sandwich, gelu.pop(), d.heads, d.kv_heads,
                                             d.head_dim, r.scaling)
            norms = [_norm(layer, ("input_layernorm",)), _norm(layer, ("post_attention_layernorm",)),
                     _norm(layer, ("pre_feedforward_layernorm",)), _norm(layer, ("post_feedforward_layernorm",)),
                     _norm(layer, ("self_attn", "q_norm")), _norm(layer, ("self_attn", "k_norm"))]
            if not r.sandwich:
                norms[2] = norms[3] = (torch.empty(0), 0.0)
            if not r.qk_norm:
                norms[4] = norms[5] = (torch.empty(0), 0.0)
            if any(w.numel() and (w.dtype != torch.float32 or not w.is_contiguous()) for w, _ in norms):
                self.keep = []
                return
            kind = r.layer_types[i] if r.layer_types else None
            body.add_layer(*groups, norms, int(d.windows[i] or 0), self.kinds.index(kind))
        self.body = body

    def __call__(self, h: torch.Tensor, rope, view) -> torch.Tensor | None:
        if not self.usable or h.shape[1] != 1 or h.shape[0] > qmatmul.cpu_rows() or not h.is_cpu:
            return None
        qs = list(map(_Q, self.mods))  # a few us: no module __getattr__ (q is a plain attribute)
        if len(qs) != len(self.qs) or not all(map(operator.is_, qs, self.qs)):
            self.qs = qs  # first call, or the runtime attached other parts: bind again
            if None in qs:
                self.qs = []
                return None
            self._build(qs)
        if self.body is None:
            return None
        rows, _, hidden = h.shape
        tables = [rope[k] if k is not None else rope for k in self.kinds]
        cos = [c.reshape(rows, -1).contiguous() for c, _ in tables]
        sin = [s.reshape(rows, -1).contiguous() for _, s in tables]
        cache = view.cache
        out = self.body.run(h.reshape(rows, hidden), cos, sin, cache.k, cache.v, view.lens, cpu_qgemv.cap(),
                            cpu_qgemv.ACT == "int16")
        return out.view(rows, 1, hidden)
