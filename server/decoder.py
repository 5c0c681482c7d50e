"""A lean step for the common decoder-only architectures: the arithmetic of the transformers modules (their
weights, norms, activation, rotary embedding and SDPA attention) without their Python layers, for both
forwards of the engine (decode: one new token per running row; prefill: prompt segments packed in one row).

A decode step of a stock transformers model calls a few thousand small torch ops and as many Python
frames: on a 2-core CPU, with the linears computed from the codes, that host work was most of a 25 ms
SmolLM2 step (docs/BENCHMARKS.md). This step does per layer only what the arithmetic needs: one norm,
the projections (QuantLinears straight to their bound kernel, no module call; q/k/v and gate/up as one
kernel call each where the CPU kernel takes all of them), one rotation of q and k, the cache write and
attention (at decode on the CPU, one op, cpu_ops.attend; else the view's cache write and one SDPA call
under the view's mask), the output projection, the MLP; the head only at the positions whose logits
are wanted. A short prompt's rows go through the same kernels as decode rows (qmatmul's row limit); a
long one's linears reconstruct and call the GEMM, as the transformers forward does. It reads the model's
own modules for every weight and constant, so whatever the runtime attaches (dense, packed or streamed
layers; the runtime's enter/leave are called around each streamed layer as its forward hooks would) is
what runs.

What differs between the supported architectures is data (`Recipe`): how RMSNorm applies its weight
(Llama casts then scales by w; Gemma scales by 1 + w in float32), q/k norms (Qwen3, Gemma 3), norms after
attention and MLP (Gemma 3), the attention scale, rotary and mask per layer type
(Gemma 3's local/global layers), the final logit soft-cap. Any other model (MoE, Phi-3's fused qkv, ...)
keeps the transformers forward: `recipe_of` returns None. tests/test_decoder.py checks the logits
against the transformers forward for every supported architecture.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ucformat import qmatmul
from ucformat.qlinear import QuantLinear

from .cpu_ops import attend, rms_norm, rope_
from .kv_cache import DecodeView, PrefillView
from .native_step import NativeBody

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GEMMA = ("gemma3_text",)


@dataclass(frozen=True)
class Recipe:
    gemma_norm: bool  # RMSNorm: (x * r * (1 + w)) in float32, else (x * r).to(dtype) * w
    qk_norm: bool  # per-head RMSNorm of q and k before the rotation
    sandwich: bool  # norms on the attention and MLP outputs, and before the MLP (Gemma 3)
    scaling: float  # attention scale
    final_softcap: float | None
    layer_types: tuple[str, ...] | None  # rotary and mask per layer type (Gemma 3); None: one for all


def recipe_of(model) -> Recipe | None:
    """The recipe for a transformers causal LM this step can run, or None."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if kind not in LLAMA_LIKE + GEMMA or layers is None or not len(layers):
        return None
    attn = layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return None
    if getattr(cfg, "attn_logit_softcapping", None):  # sliding windows are in the masks; soft-capped scores are not
        return None
    gemma = kind in GEMMA
    return Recipe(gemma_norm=gemma, qk_norm=hasattr(attn, "q_norm"), sandwich=gemma, scaling=float(attn.scaling),
                  final_softcap=getattr(cfg, "final_logit_softcapping", None),
                  layer_types=tuple(cfg.layer_types) if gemma else None)


def _linear(mod, x: torch.Tensor) -> torch.Tensor:
    if type(mod) is QuantLinear:
        return mod.forward(x)  # decode rows on the CPU: its bound kernel call
    if type(mod) is torch.nn.Linear:
        return F.linear(x, mod.weight, mod.bias)
    return mod(x)


class Siblings:
    """Linears that read the same input (q/k/v, gate/up): one kernel call for all of them where each is a
    QuantLinear whose parts the CPU kernel takes (qmatmul.cpu_group_call; bound once, rebound when the
    runtime attaches other parts, as for streamed layers), else one call each."""

    __slots__ = ("parts", "call")

    def __init__(self) -> None:
        self.parts: list = []
        self.call = None

    def __call__(self, mods: tuple, x: torch.Tensor) -> list[torch.Tensor]:
        if x.is_cpu and x.numel() <= x.shape[-1] * qmatmul.cpu_rows() and all(type(m) is QuantLinear for m in mods):
            parts = [p for m in mods for p in (m.q, m.bias)]
            if len(parts) != len(self.parts) or not all(map(operator.is_, parts, self.parts)):
                self.parts = parts
                self.call = None if None in parts[::2] else qmatmul.cpu_group_call(parts[::2], parts[1::2])
            if self.call is not None:
                return self.call(x)
        return [_linear(m, x) for m in mods]


STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rope types whose tables do not change with the length


class RopeTables:
    """On the CPU, the rotary module's cos/sin of positions [0, n) from one call of it, indexed per step (a
    call costs about 0.5 ms of small torch ops on the 2-core CPU, a twelfth of a SmolLM2 step); n doubles
    when a position passes it. Each position's values are the module's own (its outer product has one term
    per element; cos and sin are elementwise). None where the rope type depends on the length (dynamic
    NTK, LongRoPE), or off the CPU (a CUDA graph cannot grow a table): the caller runs the module."""

    def __init__(self, rotary, kinds: list[str] | None) -> None:
        self.rotary, self.kinds = rotary, kinds
        kind = getattr(rotary, "rope_type", None)
        types = [kind[k] for k in kinds] if isinstance(kind, dict) and kinds else [kind]
        self.usable = all(t in STATIC_ROPE for t in types)
        self.n, self.dtype, self.cos, self.sin = 0, None, {}, {}

    def __call__(self, h: torch.Tensor, pos: torch.Tensor):
        if not self.usable or not h.is_cpu:
            return None
        need = int(pos.max()) + 1
        if need > self.n or h.dtype != self.dtype:
            n = max(need, 2 * self.n, 256)
            at = torch.arange(n).unsqueeze(0)
            for k in self.kinds or [None]:
                c, s = self.rotary(h[:1, :1], at) if k is None else self.rotary(h[:1, :1], at, k)
                self.cos[k], self.sin[k] = c[0], s[0]
            self.n, self.dtype = n, h.dtype
        if self.kinds is None:
            return self.cos[None][pos], self.sin[None][pos]
        return {k: (self.cos[k][pos], self.sin[k][pos]) for k in self.kinds}


class Decoder:
    """decode / prefill for the model `recipe_of` accepted."""

    def __init__(self, model, recipe: Recipe, windows: list[int | None] | None = None) -> None:
        self.model, self.r = model, recipe
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.head = model.get_output_embeddings()
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.runtime = getattr(model, "uc_runtime", None)
        self.hooked = [self.runtime is not None and self.runtime.hooked(i) for i in range(len(self.layers))]
        # each layer's attention window (None: all columns), the one its mask has; None: masks only (SDPA)
        self.windows = windows
        self.qkv = [Siblings() for _ in self.layers]
        self.gate_up = [Siblings() for _ in self.layers]
        self.kinds = sorted(set(recipe.layer_types)) if recipe.layer_types else None
        self.tables = RopeTables(self.rotary, self.kinds)
        self.native = NativeBody(self)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, view: DecodeView, masks) -> torch.Tensor:
        """One new token per running row: ids [R] -> logits [R, V]."""
        return self.forward(ids.unsqueeze(1), view, masks, None)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, view: PrefillView, masks, keep: torch.Tensor) -> torch.Tensor:
        """Prompt segments packed in one row: ids [1, T] -> logits [len(keep), V] at the positions keep."""
        return self.forward(ids, view, masks, keep)

    def forward(self, ids: torch.Tensor, view, masks, keep: torch.Tensor | None) -> torch.Tensor:
        r = self.r
        h = self.embed(ids)  # [R, S, H] (Gemma's module applies its scale)
        pos = view.position_ids()  # [R, S]
        rope = self.tables(h, pos)
        if rope is None:
            rope = self.rotary(h, pos) if r.layer_types is None else {t: self.rotary(h, pos, t) for t in self.kinds}
        out = self.native(h, rope, view) if keep is None else None  # every layer in one native call
        for i, layer in enumerate(self.layers if out is None else ()):
            if self.hooked[i]:
                self.runtime.enter(i)
            try:
                kind = r.layer_types[i] if r.layer_types else None
                h = self._layer(layer, i, h, rope[kind] if kind else rope, masks[kind] if kind else masks, view)
            finally:
                if self.hooked[i]:
                    self.runtime.leave(i)
        if out is not None:
            h = out
        h = h[:, -1] if keep is None else h[0, keep]  # the head only where logits are wanted
        h = rms_norm(h, self.norm, r.gemma_norm)
        logits = _linear(self.head, h)
        if r.final_softcap:
            logits = torch.tanh(logits / r.final_softcap) * r.final_softcap
        return logits

    def _layer(self, layer, index: int, h: torch.Tensor, rope, mask, view: DecodeView) -> torch.Tensor:
        r, attn, mlp = self.r, layer.self_attn, layer.mlp
        rows, seq = h.shape[:2]
        x = rms_norm(h, layer.input_layernorm, r.gemma_norm)
        q, k, v = self.qkv[index]((attn.q_proj, attn.k_proj, attn.v_proj), x)
        q = q.view(rows, seq, self.heads, self.head_dim)
        k = k.view(rows, seq, self.kv_heads, self.head_dim)
        v = v.view(rows, seq, self.kv_heads, self.head_dim)
        if r.qk_norm:
            q, k = rms_norm(q, attn.q_norm, r.gemma_norm), rms_norm(k, attn.k_norm, r.gemma_norm)
        rope_(q, k, *rope)  # in place, before the heads move to dimension 1
        cache = view.cache
        o = None
        if self.windows is not None and isinstance(view, DecodeView):
            o = attend(q, k, v, cache.k[index], cache.v[index], view.lens, self.windows[index], r.scaling)
        if o is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [R, heads, S, head_dim]
            keys, values = view.update(k, v, index)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=r.scaling,
                                               enable_gqa=self.heads != self.kv_heads)
            o = o.transpose(1, 2).reshape(rows, seq, self.heads * self.head_dim)
        o = _linear(attn.o_proj, o)
        if r.sandwich:
            h = h + rms_norm(o, layer.post_attention_layernorm, True)
            x = rms_norm(h, layer.pre_feedforward_layernorm, True)
        else:
            h = h + o
            x = rms_norm(h, layer.post_attention_layernorm, False)
        gate, up = self.gate_up[index]((mlp.gate_proj, mlp.up_proj), x)
        x = _linear(mlp.down_proj, mlp.act_fn(gate) * up)
        if r.sandwich:
            x = rms_norm(x, layer.post_feedforward_layernorm, True)
        return h + x
