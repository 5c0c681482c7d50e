"""Fused CPU ops for the lean decode step (decoder.py): RMSNorm and the rotary embedding, one op each instead
of the six to eight torch ops (and as many Python frames) their transformers forwards take; and decode
attention in float32 (the dtype CPUs without fast bfloat16 serve in), which writes the new keys and values
into the slot cache and attends over each row's own columns in one op (instead of two index copies, a
mask and an SDPA call: about 100 us a layer of a SmolLM2 step). And `Body`: every layer of a float32 decode
step in one call (native_step.py says when), the quantized kernels reached by address, these ops between
them.

Both reproduce the transformers arithmetic, roundings included: RMSNorm computes x * rsqrt(mean(x^2) + eps) in
float32 and then either rounds to x's dtype and multiplies by w (Llama, Qwen, Mistral) or multiplies by
1 + w in float32 and rounds once (Gemma); the rotation q * cos + rotate_half(q) * sin rounds each product
and the sum to the tensor's dtype, as three bfloat16 torch ops do. Only the order of the float32 sum of
squares differs. Attention computes scores, softmax and weighted sum in float32 as SDPA does; its sums run
in another order (tests/test_decoder.py bounds the difference). Built on first use (ucformat/native.py);
where that is not possible, or for tensors they do not take (not CPU, mixed dtypes; attention: not
float32), the torch ops run.
"""

from __future__ import annotations

import torch

from ucformat import native

NAME = "uc_cpu_ops_v1"
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

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

// Decode attention of one new token per row against its slot of the KV cache. q [R, heads, D], k/v [R, kvh, D]
// (the new keys and values, contiguous); kc/vc [rows, kvh, cap, D] (a layer's cache); lens [R] int64. Writes
// row r's key and value at column lens[r], then o[r, h] = softmax(scale * K q) V over the columns
// (lens[r] - window, lens[r]] (all of [0, lens[r]] without a window), K and V of kv head h / (heads / kvh).
// Scores, softmax and sums in float32; o rounded once to the cache's dtype. -> [R, heads * D]
__attribute__((target_clones("avx2", "default")))
static float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

__attribute__((target_clones("avx2", "default")))
static void axpy(float p, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += p * x[j];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// The same attention for head sizes that are a multiple of 8, with AVX2: one task per (row, kv head), so
// each key and value row is read once for the query heads that share it; scores four columns at a time
// (their four sums reduced together by horizontal adds) and the weighted sum of values in registers (head
// sizes up to 64; larger ones in 64-column passes). Scores, softmax and sums in float32, as above; the sums
// run in another order (tests/test_decoder.py bounds the difference to SDPA).
__attribute__((target("avx2,fma"))) static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));  // [sum a, sum b, sum c, sum d]
}

__attribute__((target("avx2,fma"))) static void attend_group_avx2(const float* q, const float* kb, const float* vb,
                                                                 float* o, int64_t group, int64_t lo, int64_t len,
                                                                 int64_t d, float scale, std::vector<float>& s) {
  const int64_t n = len + 1 - lo;
  s.resize(group * n);
  for (int64_t j = 0; j < group; ++j) {
    const float* qj = q + j * d;
    float* sj = s.data() + j * n;
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {
      const float* k0 = kb + (lo + c) * d;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 x = _mm256_loadu_ps(qj + i);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + i), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + d + i), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 2 * d + i), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + 3 * d + i), a3);
      }
      _mm_storeu_ps(sj + c, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
    }
    for (; c < n; ++c) {
      const float* kr = kb + (lo + c) * d;
      __m256 a0 = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + i), _mm256_loadu_ps(kr + i), a0);
      sj[c] = _mm_cvtss_f32(hsum4(a0, a0, a0, a0)) * scale;
    }
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sj[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) { sj[t] = std::exp(sj[t] - mx); sum += sj[t]; }
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (int64_t i0 = 0; i0 < d; i0 += 64) {  // the weighted values, 64 columns of the head at a time
      const int64_t w = std::min<int64_t>(64, d - i0) / 8;
      __m256 acc[8];
      for (int64_t i = 0; i < w; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m256 p = _mm256_set1_ps(sj[t]);
        const float* vr = vb + (lo + t) * d + i0;
        for (int64_t i = 0; i < w; ++i) acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * i), acc[i]);
      }
      for (int64_t i = 0; i < w; ++i) _mm256_storeu_ps(o + j * d + i0 + 8 * i, _mm256_mul_ps(acc[i], inv));
    }
  }
}
#endif

static void attend_rows(const float* q, const float* kc, const float* vc, const int64_t* lens, float* o, int64_t R,
                        int64_t heads, int64_t kvh, int64_t cap, int64_t d, int64_t window, float scale) {
  const int64_t group = heads / kvh;
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && d % 8 == 0) {
    at::parallel_for(0, R * kvh, 1, [&](int64_t b, int64_t e) {
      std::vector<float> s;
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = t / kvh, g = t % kvh, len = lens[r];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window + 1) : 0;
        const int64_t h0 = (r * heads + g * group) * d;  // the group's query heads are consecutive
        attend_group_avx2(q + h0, kc + ((r * kvh + g) * cap) * d, vc + ((r * kvh + g) * cap) * d, o + h0, group, lo,
                          len, d, scale, s);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, R * heads, 1, [&](int64_t b, int64_t e) {
    std::vector<float> qf(d), acc(d), s;
    for (int64_t t = b; t < e; ++t) {
      const int64_t r = t / heads, h = t % heads, g = h / group, len = lens[r];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window + 1) : 0;
      const float* kb = kc + ((r * kvh + g) * cap) * d;
      const float* vb = vc + ((r * kvh + g) * cap) * d;
      for (int64_t j = 0; j < d; ++j) qf[j] = q[t * d + j] * scale;
      s.resize(len + 1 - lo);
      float mx = -INFINITY;
      for (int64_t c = lo; c <= len; ++c) {
        s[c - lo] = dot(qf.data(), kb + c * d, d);
        mx = std::max(mx, s[c - lo]);
      }
      float sum = 0.f;
      for (auto& v : s) { v = std::exp(v - mx); sum += v; }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = lo; c <= len; ++c) axpy(s[c - lo], vb + c * d, acc.data(), d);
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < d; ++j) o[t * d + j] = acc[j] * inv;
    }
  });
}

// Row r's new key and value (k/v [R, kvh, D]) into column lens[r] of a layer's cache kc/vc [rows, kvh, cap, D].
static void write_kv(const float* k, const float* v, float* kc, float* vc, const int64_t* lens, int64_t R,
                     int64_t kvh, int64_t cap, int64_t d) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < kvh; ++g) {
      const int64_t at = ((r * kvh + g) * cap + lens[r]) * d, src = (r * kvh + g) * d;
      std::copy_n(k + src, d, kc + at);
      std::copy_n(v + src, d, vc + at);
    }
}

// float32 only (cpu_ops.attend says why).
torch::Tensor attend_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kc, torch::Tensor vc,
                            torch::Tensor lens, int64_t window, double scale) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && kc.is_contiguous() && vc.is_contiguous(),
              "attend: layout");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat &&
              kc.scalar_type() == torch::kFloat && vc.scalar_type() == torch::kFloat, "attend: float32 only");
  TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && lens.scalar_type() == torch::kLong, "attend: cache");
  const int64_t R = lens.numel(), kvh = kc.size(1), cap = kc.size(2), d = kc.size(3);
  const int64_t heads = q.numel() / (R * d);
  TORCH_CHECK(R <= kc.size(0) && q.numel() == R * heads * d && k.numel() == R * kvh * d && v.numel() == k.numel() &&
              heads % kvh == 0, "attend: shapes");
  const torch::Tensor lc = lens.contiguous();
  const int64_t* ln = lc.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ln[r] >= 0 && ln[r] < cap, "attend: position past the cache");
  auto o = torch::empty({R, heads * d}, q.options());
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  write_kv(k.data_ptr<float>(), v.data_ptr<float>(), kp, vp, ln, R, kvh, cap, d);
  attend_rows(q.data_ptr<float>(), kp, vp, ln, o.data_ptr<float>(), R, heads, kvh, cap, d, window,
              static_cast<float>(scale));
  return o;
}

// ---- The layers of a decode step in one call (float32; server/decoder.py builds it where it applies) ------
// The linears are the quantized kernel's group calls (ucformat/cpu_qgemv.cpp `group_at`, reached by address:
// the kernels live in another extension); everything between them is the ops above, on plain buffers.
using GroupFn = std::vector<torch::Tensor> (*)(const torch::Tensor&, const void*, int64_t, bool);

struct Norm {
  torch::Tensor w;  // empty: none
  float eps = 0.f;
  void apply(float* x, float* y, int64_t n, int64_t h, bool gemma) const {
    norm_rows<float>(x, w.data_ptr<float>(), y, n, h, eps, gemma);
  }
};

struct BodyLayer {
  const void *qkv, *o, *gate_up, *down;  // Bounds: q/k/v, o, gate/up, down
  Norm in, post_attn, pre_ff, post_ff, q, k;
  int64_t window, rope;  // attention window (0: none); which cos/sin this layer's type rotates by
};

// act(gate) * up in place of gate, by torch's own CPU kernels (the numbers of the Python step, bit for bit):
// transformers' gelu_pytorch_tanh where `gelu`, else silu.
static void act_mul(torch::Tensor& g, const torch::Tensor& u, bool gelu) {
  if (gelu) g = at::gelu(g, "tanh");
  else at::silu_(g);
  g.mul_(u);
}

struct Body {
  GroupFn fn = nullptr;
  bool gemma = false, sandwich = false, gelu = false;
  int64_t heads = 0, kvh = 0, d = 0;
  float scale = 1.f;
  std::vector<BodyLayer> layers;

  // h [R, H] float32 (not changed) -> h after every layer; cos/sin: [R, D] per rope kind; kc/vc: every
  // layer's cache [rows, kvh, cap, D]; lens [R] (each row's new column).
  torch::Tensor run(torch::Tensor h0, std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin,
                    std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc, torch::Tensor lens, int64_t isa,
                    bool act_int) const {
    TORCH_CHECK(h0.scalar_type() == torch::kFloat && h0.dim() == 2 && lens.scalar_type() == torch::kLong, "body: input");
    TORCH_CHECK(kc.size() == layers.size() && vc.size() == layers.size(), "body: one cache per layer");
    const int64_t R = h0.size(0), H = h0.size(1);
    torch::Tensor h = h0.contiguous().clone(), x = torch::empty_like(h);
    float* hp = h.data_ptr<float>();
    float* xp = x.data_ptr<float>();
    const torch::Tensor lc = lens.contiguous();
    const int64_t* ln = lc.data_ptr<int64_t>();
    for (size_t i = 0; i < layers.size(); ++i) {
      const BodyLayer& L = layers[i];
      const torch::Tensor& kt = kc[i];
      const torch::Tensor& vt = vc[i];
      TORCH_CHECK(kt.scalar_type() == torch::kFloat && kt.is_contiguous() && vt.is_contiguous() && kt.dim() == 4 &&
                  vt.sizes() == kt.sizes() && kt.size(1) == kvh && kt.size(3) == d && R <= kt.size(0), "body: cache");
      const int64_t cap = kt.size(2);
      for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ln[r] >= 0 && ln[r] < cap, "body: position past the cache");
      L.in.apply(hp, xp, R, H, gemma);
      std::vector<torch::Tensor> qkv = fn(x, L.qkv, isa, act_int);
      // the Bounds were built from the same modules as heads/kvh/d; a mismatch would write past the buffers
      TORCH_CHECK(qkv.size() == 3 && qkv[0].numel() == R * heads * d && qkv[1].numel() == R * kvh * d &&
                  qkv[2].numel() == R * kvh * d, "body: q/k/v outputs do not match the attention shape");
      float* q = qkv[0].data_ptr<float>();
      float* k = qkv[1].data_ptr<float>();
      float* v = qkv[2].data_ptr<float>();
      if (L.q.w.defined()) {
        L.q.apply(q, q, R * heads, d, gemma);
        L.k.apply(k, k, R * kvh, d, gemma);
      }
      TORCH_CHECK(L.rope >= 0 && L.rope < static_cast<int64_t>(cos.size()) && cos.size() == sin.size(), "body: rope");
      const torch::Tensor& c = cos[L.rope];
      const torch::Tensor& sn = sin[L.rope];
      rope_rows<float>(q, c.data_ptr<float>(), sn.data_ptr<float>(), R, heads, d);
      rope_rows<float>(k, c.data_ptr<float>(), sn.data_ptr<float>(), R, kvh, d);
      float* kp = kt.data_ptr<float>();
      float* vp = vt.data_ptr<float>();
      write_kv(k, v, kp, vp, ln, R, kvh, cap, d);
      torch::Tensor att = torch::empty({R, heads * d}, h.options());
      attend_rows(q, kp, vp, ln, att.data_ptr<float>(), R, heads, kvh, cap, d, L.window, scale);
      torch::Tensor o = fn(att, L.o, isa, act_int)[0];
      TORCH_CHECK(o.numel() == R * H, "body: o output does not match the hidden size");
      float* op = o.data_ptr<float>();
      if (sandwich) {
        L.post_attn.apply(op, op, R, H, gemma);
        for (int64_t j = 0; j < R * H; ++j) hp[j] += op[j];
        L.pre_ff.apply(hp, xp, R, H, gemma);
      } else {
        for (int64_t j = 0; j < R * H; ++j) hp[j] += op[j];
        L.post_attn.apply(hp, xp, R, H, gemma);
      }
      std::vector<torch::Tensor> gu = fn(x, L.gate_up, isa, act_int);
      TORCH_CHECK(gu.size() == 2 && gu[0].sizes() == gu[1].sizes(), "body: gate/up outputs differ");
      act_mul(gu[0], gu[1], gelu);
      torch::Tensor dn = fn(gu[0], L.down, isa, act_int)[0];
      TORCH_CHECK(dn.numel() == R * H, "body: down output does not match the hidden size");
      float* dp = dn.data_ptr<float>();
      if (sandwich) L.post_ff.apply(dp, dp, R, H, gemma);
      for (int64_t j = 0; j < R * H; ++j) hp[j] += dp[j];
    }
    return h;
  }
};

static Norm norm_of(torch::Tensor w, double eps) {
  Norm n;
  if (w.numel()) {
    TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous(), "body: norm weights float32");
    n.w = w;
    n.eps = static_cast<float>(eps);
  }
  return n;
}

// Without the GIL, as the quantized products: the server's event loop runs meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, py::call_guard<py::gil_scoped_release>());
  m.def("rope_", &rope_, py::call_guard<py::gil_scoped_release>());
  m.def("attend_decode", &attend_decode, py::call_guard<py::gil_scoped_release>());
  py::class_<Body>(m, "Body")
      .def(py::init([](intptr_t fn, bool gemma, bool sandwich, bool gelu, int64_t heads, int64_t kvh, int64_t d,
                       double scale) {
        Body b;
        b.fn = reinterpret_cast<GroupFn>(fn);
        b.gemma = gemma, b.sandwich = sandwich, b.gelu = gelu, b.heads = heads, b.kvh = kvh, b.d = d;
        b.scale = static_cast<float>(scale);
        return b;
      }))
      // norms: (weight or an empty tensor, eps) each
      .def("add_layer", [](Body& b, intptr_t qkv, intptr_t o, intptr_t gate_up, intptr_t down,
                           std::vector<std::pair<torch::Tensor, double>> norms, int64_t window, int64_t rope) {
        TORCH_CHECK(norms.size() == 6, "body: in, post_attn, pre_ff, post_ff, q, k norms");
        BodyLayer L{reinterpret_cast<const void*>(qkv), reinterpret_cast<const void*>(o),
                    reinterpret_cast<const void*>(gate_up), reinterpret_cast<const void*>(down)};
        Norm* slots[6] = {&L.in, &L.post_attn, &L.pre_ff, &L.post_ff, &L.q, &L.k};
        for (int j = 0; j < 6; ++j) *slots[j] = norm_of(norms[j].first, norms[j].second);
        L.window = window;
        L.rope = rope;
        b.layers.push_back(L);
      })
      .def("run", &Body::run, py::call_guard<py::gil_scoped_release>());
}
"""


def module():
    """The built extension, or None (not buildable, UC_NATIVE=0)."""
    return native.load(NAME, _SOURCE, "CPU decode ops")[0]


def eps_of(norm) -> float:
    return float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps"))


def rms_norm(x: torch.Tensor, norm: torch.nn.Module, gemma: bool) -> torch.Tensor:
    """The module `norm`'s RMSNorm of x (last dimension), as its transformers forward computes it."""
    w = norm.weight
    if x.device.type == "cpu" and w.dtype == x.dtype and x.is_contiguous() and module() is not None:
        return module().rms_norm(x, w, eps_of(norm), gemma)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps_of(norm))
    if gemma:
        return (xf * (1.0 + w.float())).to(x.dtype)
    return w * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place, q [R, S, heads, D] and k [R, S, kv_heads, D] rotated by cos/sin [R, S, D]."""
    if (q.device.type == "cpu" and q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype == cos.dtype
            and module() is not None):
        module().rope_(q, k, cos.contiguous(), sin.contiguous())
        return
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    q.copy_(q * c + _rotate_half(q) * s)
    k.copy_(k * c + _rotate_half(k) * s)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           lens: torch.Tensor, window: int | None, scale: float) -> torch.Tensor | None:
    """One new token per row r: its key and value k/v [R, 1, kv_heads, D] written at column lens[r] of the
    layer's cache keys/values [rows, kv_heads, cap, D], then q [R, 1, heads, D] attends over that row's
    columns (the last `window` of them where the layer slides). -> [R, 1, heads * D]; None where the op
    does not apply (not the CPU, not float32, not built): the caller takes its SDPA path. Float32 only: in
    bfloat16, SDPA's roundings (its probabilities rounded before P V) differ from one float32 softmax by
    enough to flip near-tied greedy tokens of the transformers forward the lean step must reproduce."""
    if (q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype == keys.dtype == torch.float32) or not q.is_contiguous()
            or not k.is_contiguous() or not v.is_contiguous() or module() is None):
        return None
    o = module().attend_decode(q, k, v, keys, values, lens, int(window or 0), float(scale))
    return o.unsqueeze(1)
