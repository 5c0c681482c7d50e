"""Fused CPU ops for the lean decode step (decoder.py): RMSNorm and the rotary embedding, one op each instead
of the six to eight torch ops (and as many Python frames) their transformers forwards take.

Both reproduce the transformers arithmetic, roundings included: RMSNorm computes x * rsqrt(mean(x^2) + eps) in
float32 and then either rounds to x's dtype and multiplies by w (Llama, Qwen, Mistral) or multiplies by
1 + w in float32 and rounds once (Gemma); the rotation q * cos + rotate_half(q) * sin rounds each product
and the sum to the tensor's dtype, as three bfloat16 torch ops do. Only the order of the float32 sum of
squares differs. Built on first use (ucformat/native.py); where that is not possible, or for tensors they
do not take (not CPU, mixed dtypes), `rms_norm` and `rope_` run the torch ops.
"""

from __future__ import annotations

import torch

from ucformat import native

NAME = "uc_cpu_ops_v1"
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

template <typename T> static inline float f(T v) { return static_cast<float>(v); }
template <typename T> static inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

// x [N, H] -> y [N, H]: y = w * T(x * r) (gemma: T(x * r * (1 + w)))
template <typename T>
static void norm_rows(const T* x, const T* w, T* y, int64_t n, int64_t h, float eps, bool gemma) {
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* xi = x + i * h;
      T* yi = y + i * h;
      float ss = 0.f;
      for (int64_t j = 0; j < h; ++j) ss += f(xi[j]) * f(xi[j]);
      const float r = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
      if (gemma)
        for (int64_t j = 0; j < h; ++j) yi[j] = static_cast<T>(f(xi[j]) * r * (1.0f + f(w[j])));
      else
        for (int64_t j = 0; j < h; ++j) yi[j] = static_cast<T>(f(w[j]) * rnd<T>(f(xi[j]) * r));
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, bool gemma) {
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.is_contiguous() && w.is_contiguous(), "rms_norm: dtypes");
  const int64_t h = x.size(-1), n = x.numel() / h;
  TORCH_CHECK(w.numel() == h, "rms_norm: weight size");
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, h,
                        static_cast<float>(eps), gemma);
  });
  return y;
}

// In place: t [R, S, heads, D] (contiguous), cos/sin [R, S, D]: t = T(T(t * cos) + T(rotate_half(t) * sin))
template <typename T>
static void rope_rows(T* t, const T* c, const T* s, int64_t rs, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < rs; ++i) {
    const T* ci = c + i * d;
    const T* si = s + i * d;
    for (int64_t hd = 0; hd < heads; ++hd) {
      T* v = t + (i * heads + hd) * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = f(v[j]), b = f(v[j + half]);
        const float lo = rnd<T>(rnd<T>(a * f(ci[j])) + rnd<T>(-b * f(si[j])));
        const float hi = rnd<T>(rnd<T>(b * f(ci[j + half])) + rnd<T>(a * f(si[j + half])));
        v[j] = static_cast<T>(lo);
        v[j + half] = static_cast<T>(hi);
      }
    }
  }
}

void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rope: layout");
  TORCH_CHECK(q.scalar_type() == cos.scalar_type() && k.scalar_type() == cos.scalar_type() &&
              sin.scalar_type() == cos.scalar_type(), "rope: dtypes");
  const int64_t d = q.size(-1), rs = cos.numel() / d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(q.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), rs, q.size(-2), d);
    rope_rows<scalar_t>(k.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), rs, k.size(-2), d);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm);
  m.def("rope_", &rope_);
}
"""


def _module():
    return native.load(NAME, _SOURCE, "CPU decode ops")[0]


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module, gemma: bool) -> torch.Tensor:
    """The module `norm`'s RMSNorm of x (last dimension), as its transformers forward computes it."""
    w = norm.weight
    if x.device.type == "cpu" and w.dtype == x.dtype and x.is_contiguous() and _module() is not None:
        return _module().rms_norm(x, w, _eps(norm), gemma)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm))
    if gemma:
        return (xf * (1.0 + w.float())).to(x.dtype)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, q [R, S, heads, D] and k [R, S, kv_heads, D] rotated by cos/sin [R, S, D]."""
    if (q.device.type == "cpu" and q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype == cos.dtype
            and _module() is not None):
        _module().rope_(q, k, cos.contiguous(), sin.contiguous())
        return
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    q.copy_(q * c + _rotate_half(q) * s)
    k.copy_(k * c + _rotate_half(k) * s)
