// Quantized matrix products straight from a pack's codes (SPEC.md 2.1, 2.2, 2.5): no weight is built.
//
//   y[m, n] = sum_j x'[m, j] * (grid[code[n, j]] * scale[n, j / B])  (+ bias[n])
//
// x' is x, or for a weight stored rotated (rotation n > 0, W = deq(codes) R^T) the rotated input
// R^T x = H (s * x) / sqrt(n) per block of n columns, computed once per call (fast Walsh-Hadamard).
// Two paths. Float (UC_CPU_ACT=float): each weight is the same float32 product grid level x block scale as
// the reference reconstruction; only the order of the sums differs from reconstruct-then-matmul. Integer
// (the default, AVX2, b = 2 .. 6): the grid rounded to 12 bits and each block of activations to 15 bits,
// products summed exactly in int32 (k256::i16_rows): 2-3x faster at one activation row on Zen 3, within
// about 3e-4 of the float sums (docs/SERVER.md states the tolerance). For b <= 5 and the 8-bit head copy,
// weights bound once (cpu_qgemv.py `_bind`, and `linear` after its first call on a weight) carry a second
// copy of their codes with 8 weight rows side by side (`il_pack`, k256::il_rows): the same integer sums,
// 1.1-2x faster at 8 activation rows (bench/qkernels.py), and long prompts up to qmatmul.CPU_MAX_ROWS rows.
//
// Work split: rows of W over torch's intra-op threads; each thread walks its rows once per tile of up
// to 16 activation rows. Within a row, columns go in chunks of 32 (AVX-512) or 16 (AVX2) codes. Every
// plane packs 8/p codes per byte, so a chunk's codes become two index vectors with a few shifts:
// "even" (lane i: the code of column 2i of the chunk) and "odd" (column 2i + 1). The activations are
// laid out once per call in that same even/odd order, so a chunk is two table lookups and 2 FMAs per
// activation row. The table (the grid times the block's scale, set once per block) lives in registers.
// AVX-512: one for b <= 4 (smaller grids repeated to fill 16 lanes, so no masking), two for b = 5, four
// for b = 6. AVX2 (8 lanes): one for b <= 3, then 2^(b-3) registers picked by a tree of blends. Both
// gather b = 8 from the grid (1 KiB, in L1) and multiply by the scale. Columns after the last
// whole chunk, block sizes that do not hold whole chunks, and CPUs without AVX2 take the scalar loop.
// One build runs everywhere: the SIMD code is compiled for its instruction set only (target pragmas)
// and chosen at run time from what the CPU reports. The loops that are the same for every instruction
// set (the "driver", at the end of this file) are written once: the file includes itself inside each
// ISA's namespace with UC_DRIVER defined, so they are compiled under that ISA's target.

#ifndef UC_DRIVER
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define UC_X86 1
#else
#define UC_X86 0
#endif

namespace {

enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

struct Args {
  const uint8_t* codes;    // [N, nbytes] bit planes (SPEC.md 2.1)
  const c10::Half* scales; // [N, nb]
  const float* grid;       // [2^bits]
  const float* xf;         // [M, K] activations (rotated if the weight is), natural order
  const float* xa;         // [M, ldxa] the whole chunks of xf in even/odd order
  const int16_t* xq;       // [M, ldxa] integer path: the whole blocks of xf rounded to 15 bits, i16_order
  const float* xs;         // [M, nb] integer path: each block's activation scale (its max |x| / 16383)
  const float* bias;       // [N] or null
  float* y;                // [M, N]
  const uint8_t* ilc;      // il8 layout (il_pack): [ceil(N/8), whole blocks x block / 8 units, 32] or null
  const uint16_t* ils;     // [ceil(N/8), nb, 8] the scales of 8 rows side by side (float16 bits)
  int64_t M, N, K, nbytes, nb, block, ldxa, nchunks, start1;
  int bits, p0, p1;
};

inline void planes(int bits, int& p0, int& p1) {
  switch (bits) {  // bitpack.PLANES
    case 2: p0 = 2; p1 = 0; break;
    case 3: p0 = 2; p1 = 1; break;
    case 4: p0 = 4; p1 = 0; break;
    case 5: p0 = 4; p1 = 1; break;
    case 6: p0 = 4; p1 = 2; break;
    case 8: p0 = 8; p1 = 0; break;
    default: TORCH_CHECK(false, "unsupported code width ", bits);
  }
}

// The byte-table path's order of a chunk of 32 (k256::bl_levels): float slot i holds code bl_order(i).
inline int64_t bl_order(int64_t i) { return 8 * (i / 8) + 2 * (i % 4) + (i % 8) / 4; }

inline uint32_t code_at(const uint8_t* row, int64_t j, int p0, int p1, int64_t start1) {
  uint32_t c = (row[(j * p0) >> 3] >> ((j * p0) & 7)) & ((1u << p0) - 1u);
  if (p1) c |= ((row[start1 + ((j * p1) >> 3)] >> ((j * p1) & 7)) & ((1u << p1) - 1u)) << p0;
  return c;
}

// The il8 layout (k256::il_tile, il_pack): per group of 8 weight rows, units of 8 columns, 32 bytes each.
// Byte p of a unit holds the code of (row R(p), column C(p)) in its low nibble and of (R(p), C(p) + 4) in
// its high nibble, with q = p % 8, R(p) = 4 (p / 16) + q / 2 and C(p) = 2 ((p / 8) % 2) + q % 2: after a
// vpshufb of the nibbles and the byte unpacks, vector 0 holds columns 0, 1 of the 8 rows (32-bit lane i =
// row i), vector 1 columns 2, 3; the high nibbles columns 4 .. 7.
inline void il_pos(int p, int& row, int& col) {
  const int q = p & 7;
  row = 4 * (p >> 4) + q / 2;
  col = 2 * ((p >> 3) & 1) + (q & 1);
}

// Columns [j0, K) of rows [r0, r1), every activation row; adds to y unless `store`.
void rows_scalar(const Args& a, int64_t r0, int64_t r1, int64_t j0, bool store) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * a.nbytes;
    const c10::Half* srow = a.scales + r * a.nb;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* x = a.xf + m * a.K;
      float acc = 0.f;
      for (int64_t j = j0; j < a.K; ++j) {
        const float w = a.grid[code_at(row, j, a.p0, a.p1, a.start1)] * static_cast<float>(srow[j / a.block]);
        acc += w * x[j];
      }
      float& out = a.y[m * a.N + r];
      out = store ? acc : out + acc;
    }
  }
}

#if UC_X86
// ------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace k512 {

constexpr int CW = 32;     // codes per chunk
constexpr int MAX_MT = 16;  // activation rows per tile (accumulators in 32 zmm registers)
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }

// 32 codes of one plane of width P (4P bytes at p) -> even/odd index vectors (bits above P: garbage)
template <int P>
inline void plane(const uint8_t* p, __m512i& ev, __m512i& od) {
  if constexpr (P == 8) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    ev = _mm512_and_si512(v, _mm512_set1_epi32(0xFF));
    od = _mm512_srli_epi32(v, 8);
  } else if constexpr (P == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    ev = v;
    od = _mm512_srli_epi32(v, 4);
  } else if constexpr (P == 2) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int>(w))),
                                         _mm256_set1_epi32(static_cast<int>(w >> 32)), 1);
    const __m512i sh = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    ev = _mm512_srlv_epi32(v, sh);
    od = _mm512_srlv_epi32(v, _mm512_add_epi32(sh, _mm512_set1_epi32(2)));
  } else {
    static_assert(P == 1, "plane width");
    uint32_t w;
    std::memcpy(&w, p, 4);
    const __m512i v = _mm512_set1_epi32(static_cast<int>(w));
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    ev = _mm512_srlv_epi32(v, sh);
    od = _mm512_srlv_epi32(v, _mm512_add_epi32(sh, _mm512_set1_epi32(1)));
  }
}

template <int BITS>
inline __m512i combine(__m512i lo, __m512i hi) {
  if constexpr (BITS == 3) return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(3)), _mm512_slli_epi32(hi, 2));
  if constexpr (BITS == 5 || BITS == 6)
    return _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(15)), _mm512_slli_epi32(hi, 4));
  return lo;
}

// grid x block scale, in registers. vpermps reads the low 4 index bits, vpermt2ps the low 5.
template <int BITS>
struct Table {
  __m512 g[4], t[4];
  __m512 s;
  const float* grid;
  explicit Table(const float* gp) : grid(gp) {
    if constexpr (BITS <= 4) {
      alignas(64) float rep[16];
      for (int i = 0; i < 16; ++i) rep[i] = gp[i & ((1 << BITS) - 1)];
      g[0] = _mm512_load_ps(rep);
    } else if constexpr (BITS <= 6) {
      for (int k = 0; k < (1 << BITS) / 16; ++k) g[k] = _mm512_loadu_ps(gp + 16 * k);
    }
  }
  inline void scale(float v) {
    if constexpr (BITS <= 4) {
      t[0] = _mm512_mul_ps(g[0], _mm512_set1_ps(v));
    } else if constexpr (BITS <= 6) {
      for (int k = 0; k < (1 << BITS) / 16; ++k) t[k] = _mm512_mul_ps(g[k], _mm512_set1_ps(v));
    } else {
      s = _mm512_set1_ps(v);
    }
  }
  inline __m512 lookup(__m512i idx) const {
    if constexpr (BITS <= 4) return _mm512_permutexvar_ps(idx, t[0]);
    if constexpr (BITS == 5) return _mm512_permutex2var_ps(t[0], idx, t[1]);
    if constexpr (BITS == 6) {
      const __mmask16 high = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
      return _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(t[0], idx, t[1]), _mm512_permutex2var_ps(t[2], idx, t[3]));
    }
    return _mm512_mul_ps(_mm512_i32gather_ps(idx, grid, 4), s);
  }
};

template <int BITS>
inline void weights(const Table<BITS>& tab, const Args& a, const uint8_t* row, int64_t c, __m512& we, __m512& wo) {
  constexpr int P0 = BITS == 8 ? 8 : BITS >= 4 ? 4 : 2;
  constexpr int P1 = BITS - P0;
  __m512i ev, od;
  plane<P0>(row + c * 4 * P0, ev, od);
  if constexpr (P1 > 0) {
    __m512i hev, hod;
    plane<P1>(row + a.start1 + c * 4 * P1, hev, hod);
    ev = combine<BITS>(ev, hev);
    od = combine<BITS>(od, hod);
  }
  we = tab.lookup(ev);
  wo = tab.lookup(od);
}

#define UC_DRIVER
#include __FILE__
#undef UC_DRIVER

}  // namespace k512
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace k256 {

constexpr int CW = 16;
constexpr int MAX_MT = 8;  // 16 ymm registers
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }

// 16 codes of one plane of width P (2P bytes at p) -> even/odd index vectors (bits above P: garbage)
template <int P>
inline void plane(const uint8_t* p, __m256i& ev, __m256i& od) {
  if constexpr (P == 8) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    ev = _mm256_and_si256(v, _mm256_set1_epi32(0xFF));
    od = _mm256_srli_epi32(v, 8);
  } else if constexpr (P == 4) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    ev = v;
    od = _mm256_srli_epi32(v, 4);
  } else if constexpr (P == 2) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    const __m256i v = _mm256_set1_epi32(static_cast<int>(w));
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    ev = _mm256_srlv_epi32(v, sh);
    od = _mm256_srlv_epi32(v, _mm256_add_epi32(sh, _mm256_set1_epi32(2)));
  } else {
    static_assert(P == 1, "plane width");
    uint16_t w;
    std::memcpy(&w, p, 2);
    const __m256i v = _mm256_set1_epi32(static_cast<int>(w));
    const __m256i sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    ev = _mm256_srlv_epi32(v, sh);
    od = _mm256_srlv_epi32(v, _mm256_add_epi32(sh, _mm256_set1_epi32(1)));
  }
}

template <int BITS>
inline __m256i combine(__m256i lo, __m256i hi) {
  if constexpr (BITS == 3) return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(3)), _mm256_slli_epi32(hi, 2));
  if constexpr (BITS == 5)
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(15)),
                           _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), 4));
  if constexpr (BITS == 6)
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi32(15)),
                           _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(3)), 4));
  return lo;
}

// b <= 6: the grid times the scale in 2^(b-3) registers of 8 levels (b <= 3: one, the grid repeated);
// vpermps picks by the low 3 index bits in each, then a tree of blends by bits 3, 4, 5 (each moved to
// the sign bit) picks the register: b = 5 is 4 permutes + 3 blends, about twice the work of b = 4 and,
// measured on Zen, well ahead of an 8-lane gather. b = 8 gathers from the grid (in L1) and scales.
template <int BITS>
struct Table {
  static constexpr int NT = BITS <= 3 ? 1 : BITS <= 6 ? (1 << (BITS - 3)) : 0;
  __m256 g[NT > 0 ? NT : 1], t[NT > 0 ? NT : 1];
  __m256 s;
  const float* grid;
  explicit Table(const float* gp) : grid(gp) {
    if constexpr (BITS <= 3) {
      alignas(32) float rep[8];
      for (int i = 0; i < 8; ++i) rep[i] = gp[i & ((1 << BITS) - 1)];
      g[0] = _mm256_load_ps(rep);
    } else if constexpr (NT > 0) {
      for (int k = 0; k < NT; ++k) g[k] = _mm256_loadu_ps(gp + 8 * k);
    }
  }
  inline void scale(float v) {
    if constexpr (NT > 0) {
      for (int k = 0; k < NT; ++k) t[k] = _mm256_mul_ps(g[k], _mm256_set1_ps(v));
    } else {
      s = _mm256_set1_ps(v);
    }
  }
  inline __m256 lookup(__m256i idx) const {
    if constexpr (NT == 0) return _mm256_mul_ps(_mm256_i32gather_ps(grid, idx, 4), s);
    __m256 p[NT];
    for (int k = 0; k < NT; ++k) p[k] = _mm256_permutevar8x32_ps(t[k], idx);
    int n = NT;
    for (int bit = 3; n > 1; ++bit, n /= 2) {
      const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 31 - bit));
      for (int k = 0; k < n / 2; ++k) p[k] = _mm256_blendv_ps(p[2 * k], p[2 * k + 1], sel);
    }
    return p[0];
  }
};

template <int BITS>
inline void weights(const Table<BITS>& tab, const Args& a, const uint8_t* row, int64_t c, __m256& we, __m256& wo) {
  constexpr int P0 = BITS == 8 ? 8 : BITS >= 4 ? 4 : 2;
  constexpr int P1 = BITS - P0;
  __m256i ev, od;
  plane<P0>(row + c * 2 * P0, ev, od);
  if constexpr (P1 > 0) {
    __m256i hev, hod;
    plane<P1>(row + a.start1 + c * 2 * P1, hev, hod);
    ev = combine<BITS>(ev, hev);
    od = combine<BITS>(od, hod);
  }
  we = tab.lookup(ev);
  wo = tab.lookup(od);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- AVX2, b = 5, 6: byte tables (vpshufb) instead of vpermps blend trees --------------------------------
// A chunk is 32 codes. The grid's float32 levels are split into their 4 bytes; byte k of the 16 levels
// of a set (levels 16s .. 16s+15) is one 16-byte table, so vpshufb looks up byte k of 32 weights at once
// (32 lanes, 1 uop, 2 a cycle on the CPUs measured) and three rounds of byte/word unpacks put the 4 bytes
// back together as 4 vectors of 8 floats. b = 5 and 6 look up 2 and 4 sets and pick per byte by the high
// code bits (vpblendvb). The tables hold the grid alone (set once per matrix); the block scale multiplies
// the block's sums, once per block and activation row. Unpacks work within 128-bit lanes, so the floats
// come out in a fixed shuffled order: the activations are laid out once per call in that order (`bl_order`).
struct ByteTables {
  __m256i t[4][4];  // [set][byte of the float32 level]: 16 levels, the same table in both lanes
};

inline void bl_tables(const float* grid, int bits, ByteTables& bt) {
  const int n = 1 << bits, sets = bits <= 4 ? 1 : 1 << (bits - 4);
  for (int s = 0; s < sets; ++s)
    for (int k = 0; k < 4; ++k) {
      alignas(16) uint8_t b[16];
      for (int i = 0; i < 16; ++i) {
        const int e = 16 * s + i;
        const float v = e < n ? grid[e] : 0.f;
        uint32_t u;
        std::memcpy(&u, &v, 4);
        b[i] = static_cast<uint8_t>(u >> (8 * k));
      }
      bt.t[s][k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
    }
}

// Position p (0..15) of lane L (0, 1) of the byte vectors holds code 2p + L of the chunk; after the
// unpacks, float vector v, lane L, slot j holds code 8v + 2j + L (bl_order, at the top of the file).

// 32 codes of a 4-bit plane (16 bytes, byte i = codes 2i, 2i+1) -> [even codes | odd codes] as bytes
// (the 16 bytes broadcast to both lanes, the upper lane shifted by 4: no shuffle-port work)
inline __m256i bl_idx4(const uint8_t* p) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
}

// 32 codes of a 2-bit plane (8 bytes, byte i = codes 4i .. 4i+3), same order (b = 6: its high bits)
inline __m256i bl_idx2(const uint8_t* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(3);
  const __m128i t0 = _mm_and_si128(v, m), t2 = _mm_and_si128(_mm_srli_epi16(v, 2), m);
  const __m128i t4 = _mm_and_si128(_mm_srli_epi16(v, 4), m), t6 = _mm_and_si128(_mm_srli_epi16(v, 6), m);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(t0, t4)), _mm_unpacklo_epi8(t2, t6), 1);
}

// 32 codes of a 1-bit plane (4 bytes, byte i = codes 8i .. 8i+7) -> 0xFF where the bit is set, same order
// (b = 5: its high bit)
inline __m256i bl_bit1(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                       0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64, 1, 4, 16, 64,
                                       2, 8, 32, -128, 2, 8, 32, -128, 2, 8, 32, -128, 2, 8, 32, -128);
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(w)), sel), bit);
  return _mm256_cmpeq_epi8(b, bit);
}

// The 32 grid levels of chunk c of a row: f[v] = levels of codes 8v + 2j + L (lane L, slot j)
template <int BITS>
inline void bl_levels(const ByteTables& bt, const Args& a, const uint8_t* row, int64_t c, __m256 (&f)[4]) {
  static_assert(BITS == 5 || BITS == 6, "byte tables: b = 5 or 6 (the planes 4 + 1 and 4 + 2)");
  const __m256i idx = bl_idx4(row + c * 16);  // the low 4 bits; the high ones pick the table set
  __m256i m0, m1 = _mm256_setzero_si256();
  if constexpr (BITS == 5) {
    m0 = bl_bit1(row + a.start1 + c * 4);
  } else {
    const __m256i hi = bl_idx2(row + a.start1 + c * 8);
    m0 = _mm256_cmpeq_epi8(_mm256_and_si256(hi, _mm256_set1_epi8(1)), _mm256_set1_epi8(1));
    m1 = _mm256_cmpeq_epi8(_mm256_and_si256(hi, _mm256_set1_epi8(2)), _mm256_set1_epi8(2));
  }
  __m256i b[4];
  for (int k = 0; k < 4; ++k) {
    __m256i r = _mm256_shuffle_epi8(bt.t[0][k], idx);
    r = _mm256_blendv_epi8(r, _mm256_shuffle_epi8(bt.t[1][k], idx), m0);
    if constexpr (BITS == 6)
      r = _mm256_blendv_epi8(r, _mm256_blendv_epi8(_mm256_shuffle_epi8(bt.t[2][k], idx),
                                                   _mm256_shuffle_epi8(bt.t[3][k], idx), m0), m1);
    b[k] = r;
  }
  const __m256i l01 = _mm256_unpacklo_epi8(b[0], b[1]), h01 = _mm256_unpackhi_epi8(b[0], b[1]);
  const __m256i l23 = _mm256_unpacklo_epi8(b[2], b[3]), h23 = _mm256_unpackhi_epi8(b[2], b[3]);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// One weight row against MT activation rows (m0 ..), whole chunks; stores the sums.
template <int BITS, int MT>
inline void bl_row(const ByteTables& bt, const Args& a, const uint8_t* row, const uint16_t* srow, int64_t r,
                   int64_t m0) {
  constexpr int NA = MT == 1 ? 4 : MT == 2 ? 2 : 1;  // chains per activation row: keep the FMAs in flight
  const int64_t cpb = a.block / 32;
  __m256 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < a.nchunks; c0 += cpb) {
    const int64_t c1 = std::min(a.nchunks, c0 + cpb);
    __m256 acc[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int k = 0; k < NA; ++k) acc[m][k] = _mm256_setzero_ps();
    for (int64_t c = c0; c < c1; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 4 * BITS + 2048), _MM_HINT_T0);
      __m256 f[4];
      bl_levels<BITS>(bt, a, row, c, f);
      for (int m = 0; m < MT; ++m) {
        const float* x = a.xa + (m0 + m) * a.ldxa + c * 32;
        for (int v = 0; v < 4; ++v) acc[m][v % NA] = _mm256_fmadd_ps(f[v], _mm256_loadu_ps(x + 8 * v), acc[m][v % NA]);
      }
    }
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(srow[c0 / cpb]));
    for (int m = 0; m < MT; ++m) {
      __m256 sum = acc[m][0];
      for (int k = 1; k < NA; ++k) sum = _mm256_add_ps(sum, acc[m][k]);
      tot[m] = _mm256_fmadd_ps(sum, s, tot[m]);
    }
  }
  for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + r] = hsum(tot[m]);
}

// Rows [r0, r1) of W against every activation row in tiles of 4, 2, 1 (the row's codes stay in L1 for the
// later tiles): row_fn(row codes, row scales, r, first activation row, tile size as a type).
template <class RowFn>
inline void row_tiles(const Args& a, int64_t r0, int64_t r1, RowFn&& row_fn) {
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(a.scales);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = a.codes + r * a.nbytes;
    const uint16_t* srow = scales + r * a.nb;
    for (int64_t m = 0; m < a.M;) {
      const int64_t left = a.M - m;
      if (left >= 4) { row_fn(row, srow, r, m, std::integral_constant<int, 4>{}); m += 4; }
      else if (left >= 2) { row_fn(row, srow, r, m, std::integral_constant<int, 2>{}); m += 2; }
      else { row_fn(row, srow, r, m, std::integral_constant<int, 1>{}); m += 1; }
    }
  }
}

template <int BITS>
void bl_rows(const Args& a, int64_t r0, int64_t r1) {
  ByteTables bt;
  bl_tables(a.grid, BITS, bt);
  row_tiles(a, r0, r1, [&](const uint8_t* row, const uint16_t* srow, int64_t r, int64_t m, auto mt) {
    bl_row<BITS, decltype(mt)::value>(bt, a, row, srow, r, m);
  });
}

// ---- AVX2, integer activations (b <= 6): integer dot products --------------------------------------------
// The float paths above spend their time on lookups, one float per weight. Here the grid is rounded to
// 12-bit integers once per matrix (scale: max |level| / 2047) and the activations of each weight block to
// 15-bit integers once per call (scale: the block's max |x| / 16383). A chunk of 32 codes is two vpshufb
// (the low and the high bytes of the levels; b = 5, 6: per set of 16 levels, then blends by the high code
// bits) and two byte unpacks to 32 int16 weights, then two vpmaddwd per activation row. A block's sums add
// up exactly in int32 (each lane: at most 256 / 8 x 2047 x 16383 < 2^31, so blocks of up to 256 columns) and
// meet the floats once per block: one conversion and one FMA per block and activation row. 15 bits, not
// 8 as in llama.cpp: the activations of real models carry outliers (on SmolLM2 a block's largest |x| is
// 20-200x its mean), and 8-bit activations or an 8-bit grid moved greedy text off the reference on both
// real models (bench/qkernels.py), where these stay within about 1e-4 of the float sums.
// Codes come out of the planes in the byte-table order (bl_idx4: lane 0 the even codes, lane 1 the odd);
// after the unpacks, vector v, lane L, slot t holds code 16v + 2t + L (i16_order), the activations'
// order, laid out once per call.
constexpr int64_t I16_MAX_BLOCK = 256;
inline int64_t i16_order(int64_t j) { return 16 * (j / 16) + 2 * (j % 8) + (j % 16) / 8; }

struct I16Tables {
  __m256i lo[4], hi[4];  // [set]: low / high bytes of 16 int16 levels, the same in both lanes
};

inline float i16_tables(const float* grid, int bits, I16Tables& it) {
  const int n = 1 << bits, sets = bits <= 4 ? 1 : 1 << (bits - 4);
  float mx = 0.f;
  for (int i = 0; i < n; ++i) mx = std::max(mx, std::fabs(grid[i]));
  const float gs = mx > 0.f ? mx / 2047.f : 1.f;
  for (int s = 0; s < sets; ++s) {
    alignas(16) uint8_t lo[16], hi[16];
    for (int i = 0; i < 16; ++i) {
      const int e = 16 * s + i;
      const uint16_t v = static_cast<uint16_t>(static_cast<int16_t>(e < n ? std::lrint(grid[e] / gs) : 0));
      lo[i] = static_cast<uint8_t>(v & 0xFF);
      hi[i] = static_cast<uint8_t>(v >> 8);
    }
    it.lo[s] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    it.hi[s] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
  }
  return gs;
}

// The 32 codes of chunk c of a row looked up in byte tables t (one per set of 16 levels), byte-table order.
template <int BITS>
__attribute__((always_inline)) inline __m256i i16_pick(const __m256i* t, const Args& a, const uint8_t* row,
                                                       int64_t c) {
  if constexpr (BITS == 2) return _mm256_shuffle_epi8(t[0], bl_idx2(row + c * 8));
  if constexpr (BITS == 3) {
    const __m256i hi = _mm256_and_si256(bl_bit1(row + a.start1 + c * 4), _mm256_set1_epi8(4));
    return _mm256_shuffle_epi8(t[0], _mm256_or_si256(bl_idx2(row + c * 8), hi));
  }
  const __m256i idx = bl_idx4(row + c * 16);
  if constexpr (BITS == 4) return _mm256_shuffle_epi8(t[0], idx);
  if constexpr (BITS == 5)
    return _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], idx), _mm256_shuffle_epi8(t[1], idx),
                              bl_bit1(row + a.start1 + c * 4));
  static_assert(BITS >= 2 && BITS <= 6, "integer path: b = 2 .. 6");
  const __m256i h = bl_idx2(row + a.start1 + c * 8);
  const __m256i m0 = _mm256_cmpeq_epi8(_mm256_and_si256(h, _mm256_set1_epi8(1)), _mm256_set1_epi8(1));
  const __m256i m1 = _mm256_cmpeq_epi8(_mm256_and_si256(h, _mm256_set1_epi8(2)), _mm256_set1_epi8(2));
  const __m256i v0 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[0], idx), _mm256_shuffle_epi8(t[1], idx), m0);
  const __m256i v1 = _mm256_blendv_epi8(_mm256_shuffle_epi8(t[2], idx), _mm256_shuffle_epi8(t[3], idx), m0);
  return _mm256_blendv_epi8(v0, v1, m1);
}

// b = 8 with the integer grid (level c - 128: ucformat/qhead.py's 8-bit copies of float weights): the codes
// are the weights, widened and offset (no table), in their natural order.
inline bool integer_grid(const float* grid) {
  for (int c = 0; c < 256; ++c)
    if (grid[c] != static_cast<float>(c - 128)) return false;
  return true;
}

// One weight row against MT activation rows (m0 ..), whole blocks; stores the sums times gs.
template <int BITS, int MT>
__attribute__((always_inline)) inline void i16_row(const I16Tables& it, float gs, const Args& a, const uint8_t* row,
                                                   const uint16_t* srow, int64_t r, int64_t m0) {
  const int64_t cpb = a.block / 32, nblocks = a.nchunks / cpb, ldx = a.ldxa, nb = a.nb;
  const int16_t* xq = a.xq + m0 * ldx;
  const float* xs = a.xs + m0 * nb;
  __m256 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < nblocks; ++k) {
    __m256i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
    for (int64_t c = k * cpb; c < (k + 1) * cpb; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(row + c * 4 * BITS + 2048), _MM_HINT_T0);
      __m256i w0, w1;
      if constexpr (BITS == 8) {
        const __m256i off = _mm256_set1_epi16(128);
        const __m128i* p = reinterpret_cast<const __m128i*>(row + c * 32);
        w0 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p)), off);
        w1 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p + 1)), off);
      } else {
        const __m256i lo = i16_pick<BITS>(it.lo, a, row, c), hi = i16_pick<BITS>(it.hi, a, row, c);
        w0 = _mm256_unpacklo_epi8(lo, hi);
        w1 = _mm256_unpackhi_epi8(lo, hi);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * ldx + c * 32);
        isum[m] = _mm256_add_epi32(isum[m], _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256(x)),
                                                             _mm256_madd_epi16(w1, _mm256_loadu_si256(x + 1))));
      }
    }
    const float sc = _cvtsh_ss(srow[k]);
    for (int m = 0; m < MT; ++m)
      tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_set1_ps(sc * xs[m * nb + k]), tot[m]);
  }
  for (int m = 0; m < MT; ++m) a.y[(m0 + m) * a.N + r] = hsum(tot[m]) * gs;
}

// One activation row (decode at batch 1) against two weight rows r, r + 1 at once: each chunk of
// activations is loaded once for both, and the two rows' sums are independent chains that keep the
// multiply ports busy while the other waits on its lookups. The same integer sums and float roundings as
// i16_row<BITS, 1> for each row (a row's output does not depend on its neighbour: tested bitwise).
template <int BITS>
__attribute__((always_inline)) inline void i16_pair(const I16Tables& it, float gs, const Args& a, int64_t r) {
  const int64_t cpb = a.block / 32, nblocks = a.nchunks / cpb, nb = a.nb;
  const uint8_t* row0 = a.codes + r * a.nbytes;
  const uint8_t* row1 = row0 + a.nbytes;
  const uint16_t* s0 = reinterpret_cast<const uint16_t*>(a.scales) + r * nb;
  const uint16_t* s1 = s0 + nb;
  __m256 tot0 = _mm256_setzero_ps(), tot1 = _mm256_setzero_ps();
  for (int64_t k = 0; k < nblocks; ++k) {
    __m256i i0 = _mm256_setzero_si256(), i1 = _mm256_setzero_si256();
    _mm_prefetch(reinterpret_cast<const char*>(row0 + k * cpb * 4 * BITS + 2048), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row1 + k * cpb * 4 * BITS + 2048), _MM_HINT_T0);
    for (int64_t c = k * cpb; c < (k + 1) * cpb; ++c) {
      const __m256i* x = reinterpret_cast<const __m256i*>(a.xq + c * 32);
      const __m256i x0 = _mm256_loadu_si256(x), x1 = _mm256_loadu_si256(x + 1);
      __m256i a0, a1, b0, b1;
      if constexpr (BITS == 8) {
        const __m256i off = _mm256_set1_epi16(128);
        const __m128i* p = reinterpret_cast<const __m128i*>(row0 + c * 32);
        const __m128i* q = reinterpret_cast<const __m128i*>(row1 + c * 32);
        a0 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p)), off);
        a1 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p + 1)), off);
        b0 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(q)), off);
        b1 = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(q + 1)), off);
      } else {
        const __m256i lo0 = i16_pick<BITS>(it.lo, a, row0, c), hi0 = i16_pick<BITS>(it.hi, a, row0, c);
        const __m256i lo1 = i16_pick<BITS>(it.lo, a, row1, c), hi1 = i16_pick<BITS>(it.hi, a, row1, c);
        a0 = _mm256_unpacklo_epi8(lo0, hi0);
        a1 = _mm256_unpackhi_epi8(lo0, hi0);
        b0 = _mm256_unpacklo_epi8(lo1, hi1);
        b1 = _mm256_unpackhi_epi8(lo1, hi1);
      }
      i0 = _mm256_add_epi32(i0, _mm256_add_epi32(_mm256_madd_epi16(a0, x0), _mm256_madd_epi16(a1, x1)));
      i1 = _mm256_add_epi32(i1, _mm256_add_epi32(_mm256_madd_epi16(b0, x0), _mm256_madd_epi16(b1, x1)));
    }
    const float xk = a.xs[k];
    tot0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_set1_ps(_cvtsh_ss(s0[k]) * xk), tot0);
    tot1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(_cvtsh_ss(s1[k]) * xk), tot1);
  }
  a.y[r] = hsum(tot0) * gs;
  a.y[r + 1] = hsum(tot1) * gs;
}

template <int BITS>
void i16_rows(const Args& a, int64_t r0, int64_t r1) {
  if constexpr (BITS >= 2 && BITS <= 8) {
    I16Tables it;
    const float gs = BITS == 8 ? 1.f : i16_tables(a.grid, BITS, it);  // b = 8: the integer grid
    if (a.M == 1) {  // decode at batch 1: weight rows in pairs
      int64_t r = r0;
      for (; r + 2 <= r1; r += 2) i16_pair<BITS>(it, gs, a, r);
      if (r < r1)
        i16_row<BITS, 1>(it, gs, a, a.codes + r * a.nbytes, reinterpret_cast<const uint16_t*>(a.scales) + r * a.nb,
                         r, 0);
      return;
    }
    row_tiles(a, r0, r1, [&](const uint8_t* row, const uint16_t* srow, int64_t r, int64_t m, auto mt) {
      i16_row<BITS, decltype(mt)::value>(it, gs, a, row, srow, r, m);
    });
  }
}

// ---- AVX2, integer activations, b <= 5: eight weight rows in the lanes (the `il8` layout) ---------------
// The row-major paths above sum each weight row's block in the 8 lanes of a vector: per block and activation
// row they pay an int->float conversion, a broadcast scale and an FMA, and a horizontal sum per output.
// Here a copy of the codes (il_pack, made once when the weights are bound) holds 8 rows side by side: lane
// i of every vector is weight row 8g + i, so one vpmaddwd multiplies 8 rows by the same 2 activation
// columns (broadcast), a block's sums finish in one vector for 8 rows (the scales of 8 rows are one
// float16 load), and the 8 outputs are stored without a horizontal sum. The integer sums are the same as
// the row-major path's; only the float sums over blocks run in another order.
inline __m256i bcast_pair(const int16_t* x) {  // activation columns x[0], x[1] in every 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// Group g (rows 8g .. 8g + 7, `valid` of them real) against activation rows m0 .. m0 + MT - 1.
template <int MT>  // a tile's float sums: zero before its first block, else the earlier pass's (raw, in y)
__attribute__((always_inline)) inline void il_start(const Args& a, float (&tot)[MT][8], int64_t g, int64_t m0,
                                                    int64_t valid, int64_t k0) {
  for (int m = 0; m < MT; ++m) {
    _mm256_store_ps(tot[m], _mm256_setzero_ps());
    if (k0 > 0)
      for (int64_t i = 0; i < valid; ++i) tot[m][i] = a.y[(m0 + m) * a.N + 8 * g + i];
  }
}

template <int MT>
__attribute__((always_inline)) inline void il_end(const Args& a, const float (&tot)[MT][8], int64_t g, int64_t m0,
                                                  int64_t valid, float gs) {
  for (int m = 0; m < MT; ++m)
    for (int64_t i = 0; i < valid; ++i) a.y[(m0 + m) * a.N + 8 * g + i] = tot[m][i] * gs;
}

// b = 5: the low 4 bits as above, then per unit 8 bytes of fifth bits: a 32-bit word for the low nibbles'
// codes (bit p: the code at byte p) and one for the high nibbles'; il_bit5 turns a word into 32 byte masks
// that pick between the two tables of 16 levels.
inline __m256i il_bit5(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                                       1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(w)), sel), bit);
  return _mm256_cmpeq_epi8(b, bit);
}

template <int BITS>  // 4 (codes of 2 .. 4 bits) or 5
__attribute__((always_inline)) inline void il_look(const I16Tables& it, const __m256i idx, const uint8_t* hb,
                                                   __m256i& w0, __m256i& w1) {
  __m256i l = _mm256_shuffle_epi8(it.lo[0], idx), h = _mm256_shuffle_epi8(it.hi[0], idx);
  if constexpr (BITS == 5) {
    const __m256i m = il_bit5(hb);
    l = _mm256_blendv_epi8(l, _mm256_shuffle_epi8(it.lo[1], idx), m);
    h = _mm256_blendv_epi8(h, _mm256_shuffle_epi8(it.hi[1], idx), m);
  }
  w0 = _mm256_unpacklo_epi8(l, h);
  w1 = _mm256_unpackhi_epi8(l, h);
}

// b = 8 over the integer grid (qhead.py's copies): units of 8 rows x 4 columns, one byte a code; bytes
// 0 .. 15 hold columns 0, 1 of rows 0 .. 7 (byte 2i + j: row i, column j), bytes 16 .. 31 columns 2, 3;
// widened to int16 and offset by 128, they are the first two vectors of a unit of the narrower codes.
template <int BITS>  // 4 (codes of 2 .. 4 bits), 5 or 8
constexpr int64_t il_unit_cols = BITS == 8 ? 4 : 8;

// Unit u of a group's codes (gc; gh: b = 5's fifth bits) as int16 weights: w[j] holds columns 2j, 2j + 1 of
// the 8 rows, j < il_unit_cols / 2.
template <int BITS>
__attribute__((always_inline)) inline void il_unit(const I16Tables& it, const uint8_t* gc, const uint8_t* gh, int64_t u,
                                                   __m256i (&w)[4]) {
  _mm_prefetch(reinterpret_cast<const char*>(gc + u * 32 + 2048), _MM_HINT_T0);  // the group's next units
  if constexpr (BITS == 8) {
    const __m256i off = _mm256_set1_epi16(128);
    const __m128i* p = reinterpret_cast<const __m128i*>(gc + u * 32);
    w[0] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p)), off);
    w[1] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(p + 1)), off);
  } else {
    if constexpr (BITS == 5) _mm_prefetch(reinterpret_cast<const char*>(gh + u * 8 + 512), _MM_HINT_T0);
    const __m256i nib = _mm256_set1_epi8(0x0F);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gc + u * 32));
    il_look<BITS>(it, _mm256_and_si256(v, nib), gh + u * 8, w[0], w[1]);
    il_look<BITS>(it, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), gh + u * 8 + 4, w[2], w[3]);
  }
}

// Blocks [k0, k1) of group g against activation rows m0 .. m0 + MT - 1. The float sums start from 0 (k0 = 0)
// or from what the pass before left in y, and are scaled by gs into y after the last block (k1 = all): the
// same float operations in the same order however the columns are split into passes (il_rows).
template <int BITS, int MT>
__attribute__((always_inline)) inline void il_tile(const I16Tables& it, float gs, const Args& a, int64_t g,
                                                   int64_t m0, int64_t valid, int64_t k0, int64_t k1) {
  constexpr int64_t uc = il_unit_cols<BITS>;
  const int64_t upb = a.block / uc, nblk = a.nchunks * 32 / a.block, ldx = a.ldxa, nb = a.nb;
  const uint8_t* gc = a.ilc + g * nblk * upb * (BITS == 5 ? 40 : 32);
  const uint8_t* gh = gc + nblk * upb * 32;  // b = 5: the fifth bits, after the group's nibbles
  const uint16_t* gsc = a.ils + g * nb * 8;
  alignas(32) float tot[MT][8];
  il_start<MT>(a, tot, g, m0, valid, k0);
  for (int64_t k = k0; k < k1; ++k) {
    __m256i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
    for (int64_t u = k * upb; u < (k + 1) * upb; ++u) {
      __m256i w[4];
      il_unit<BITS>(it, gc, gh, u, w);
      for (int m = 0; m < MT; ++m) {
        const int16_t* x = a.xq + (m0 + m) * ldx + u * uc;
        __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w[0], bcast_pair(x)), _mm256_madd_epi16(w[1], bcast_pair(x + 2)));
        if constexpr (uc == 8)
          s = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(w[2], bcast_pair(x + 4)),
                                                   _mm256_madd_epi16(w[3], bcast_pair(x + 6))));
        isum[m] = _mm256_add_epi32(isum[m], s);
      }
    }
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gsc + k * 8)));
    for (int m = 0; m < MT; ++m) {
      const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_mul_ps(sv, _mm256_set1_ps(a.xs[(m0 + m) * nb + k])),
                                       _mm256_load_ps(tot[m]));
      _mm256_store_ps(tot[m], t);
    }
  }
  il_end<MT>(a, tot, g, m0, valid, k1 == nblk ? gs : 1.f);
}

// Rows [r0, r1) (r0 a multiple of 8; r1 one too, or N) in the il8 layout, every activation row. Columns go in
// passes of whole blocks short enough that a tile's activations (up to 4 rows of int16) stay in L1 across the
// groups (16 KiB: 2048 columns at 4 rows, 8192 at one), as rows_blocks does for the float path.
void il_rows(const Args& a, int64_t r0, int64_t r1) {
  I16Tables it;
  const float gs = a.bits == 8 ? 1.f : i16_tables(a.grid, a.bits, it);  // b <= 4: one set (levels past 2^b zero), b = 5 two
  const int64_t tile = std::min<int64_t>(a.M, 4);
  const int64_t nblk = a.nchunks * 32 / a.block, pass = std::max<int64_t>(1, 8192 / tile / a.block);
  for (int64_t k0 = 0; k0 < nblk; k0 += pass) {
    const int64_t k1 = std::min(nblk, k0 + pass);
    for (int64_t g = r0 / 8; 8 * g < r1; ++g) {
      const int64_t valid = std::min<int64_t>(8, r1 - 8 * g);
      for (int64_t m = 0; m < a.M;) {
        const int64_t left = a.M - m;
        const int mt = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (a.bits == 8) {
          if (mt == 4) il_tile<8, 4>(it, gs, a, g, m, valid, k0, k1);
          else if (mt == 2) il_tile<8, 2>(it, gs, a, g, m, valid, k0, k1);
          else il_tile<8, 1>(it, gs, a, g, m, valid, k0, k1);
        } else if (a.bits == 5) {
          if (mt == 4) il_tile<5, 4>(it, gs, a, g, m, valid, k0, k1);
          else if (mt == 2) il_tile<5, 2>(it, gs, a, g, m, valid, k0, k1);
          else il_tile<5, 1>(it, gs, a, g, m, valid, k0, k1);
        } else {
          if (mt == 4) il_tile<4, 4>(it, gs, a, g, m, valid, k0, k1);
          else if (mt == 2) il_tile<4, 2>(it, gs, a, g, m, valid, k0, k1);
          else il_tile<4, 1>(it, gs, a, g, m, valid, k0, k1);
        }
        m += mt;
      }
    }
  }
}

#define UC_DRIVER
#include __FILE__
#undef UC_DRIVER

}  // namespace k256
#pragma GCC pop_options
#endif  // UC_X86

int cpu_isa() {
#if UC_X86
  static const int isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
    return SCALAR;
  }();
  return isa;
#else
  return SCALAR;
#endif
}

template <template <int> class F>
void by_bits(int bits, const Args& a, int64_t r0, int64_t r1) {
  switch (bits) {
    case 2: F<2>::run(a, r0, r1); break;
    case 3: F<3>::run(a, r0, r1); break;
    case 4: F<4>::run(a, r0, r1); break;
    case 5: F<5>::run(a, r0, r1); break;
    case 6: F<6>::run(a, r0, r1); break;
    case 8: F<8>::run(a, r0, r1); break;
    default: TORCH_CHECK(false, "unsupported code width ", bits);
  }
}

#if UC_X86
template <int B> struct Run512 { static void run(const Args& a, int64_t r0, int64_t r1) { k512::rows<B>(a, r0, r1); } };
template <int B> struct Run256 { static void run(const Args& a, int64_t r0, int64_t r1) { k256::rows<B>(a, r0, r1); } };
template <int B> struct Run256I { static void run(const Args& a, int64_t r0, int64_t r1) { k256::i16_rows<B>(a, r0, r1); } };
template <int B> struct Run256B {
  static void run(const Args& a, int64_t r0, int64_t r1) {
    if constexpr (B == 5 || B == 6) k256::bl_rows<B>(a, r0, r1);
  }
};
#endif

// In place on xf [M, K]: x <- H (s * x) / sqrt(n) per block of n columns (the rotation's R^T x).
void rotate_rows(float* xf, int64_t M, int64_t K, const uint8_t* signs, int64_t n) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int64_t m = 0; m < M; ++m) {
    float* x = xf + m * K;
    for (int64_t j = 0; j < K; ++j)
      if ((signs[j >> 3] >> (j & 7)) & 1) x[j] = -x[j];
    for (int64_t b0 = 0; b0 < K; b0 += n)
      for (int64_t h = 1; h < n; h <<= 1)
        for (int64_t i = b0; i < b0 + n; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const float u = x[j], v = x[j + h];
            x[j] = u + v;
            x[j + h] = u - v;
          }
    for (int64_t j = 0; j < K; ++j) x[j] *= norm;
  }
}

}  // namespace

template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One weight's call: its Args, the path chosen, and the calling thread's buffers (activations widened and
// rotated, in the path's order, and the float sums).
struct Call {
  Args a{};
  int use = SCALAR;
  bool ints = false, bytes = false;
  int64_t cw = 0;
  at::ScalarType out_type = at::kFloat;
  torch::Tensor y, bf;
  int64_t rotation = 0;
  const void* signs = nullptr;
  bool natural = false;
  bool il = false;  // the il8 kernel (k256::il_rows) on the bound copy of the codes
  std::vector<float> xf_buf, xa_buf, y_buf, xs_buf;
  std::vector<int16_t> xq_buf;
};

// Weight rows per unit of work: 8 in the il8 layout (a group of rows is one kernel call), else 1.
inline int64_t row_unit(const Call& c) { return c.il ? 8 : 1; }

void finish(Call& c, const torch::Tensor& bias, bool float_out, at::ScalarType xt);

// x rounded to the nearest int16 (ties to even, as lrint), |x| <= 16383 here
inline int16_t round16(float x) {
#if UC_X86
  return static_cast<int16_t>(_mm_cvtss_si32(_mm_set_ss(x)));  // inline, where lrint may be a libm call
#else
  return static_cast<int16_t>(std::lrint(x));
#endif
}

// x [M, K] (float32, bfloat16 or float16, contiguous); codes uint8 [N, ceil(K/8)*bits]; scales float16
// [N, ceil(K/block)]; grid float32 [2^bits]; signs uint8 [ceil(K/8)] with rotation n > 0 (else empty); bias [N]
// or empty. isa: -1 the best this CPU has, else at most 0 scalar / 1 AVX2 / 2 AVX-512 (tests). Sets up `c`
// and its output [M, N] in x's dtype, or float32 with `float_out`. Sums are float32 throughout; inputs and
// outputs are converted on the way in and out, so a call is one op.
// `same`: earlier calls on the same x (a group); where one of them laid the activations out the same way
// (path, block, rotation), c reads its buffers instead of laying them out again.
void prepare(Call& c, const torch::Tensor& xc, const torch::Tensor& codes, const torch::Tensor& scales,
             const torch::Tensor& grid, int64_t bits, int64_t block, const torch::Tensor& signs, int64_t rotation,
             const torch::Tensor& bias, int64_t isa, bool float_out, bool act_int, const Call* same = nullptr,
             size_t nsame = 0, const torch::Tensor* ilc = nullptr, const torch::Tensor* ils = nullptr) {
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2, "codes and scales must be 2-D");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kHalf &&
              grid.scalar_type() == torch::kFloat, "codes uint8, scales float16, grid float32");
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && grid.is_contiguous(), "parts must be contiguous");
  const auto xt = xc.scalar_type();
  TORCH_CHECK(xt == torch::kFloat || xt == torch::kBFloat16 || xt == torch::kHalf, "x must be float32, bfloat16 or float16");
  Args& a = c.a;
  a = Args{};
  a.bits = static_cast<int>(bits);
  planes(a.bits, a.p0, a.p1);
  a.M = xc.size(0);
  a.K = xc.size(1);
  a.N = codes.size(0);
  a.nbytes = codes.size(1);
  a.nb = scales.size(1);
  a.block = block;
  TORCH_CHECK(block > 0 && a.nbytes == (a.K + 7) / 8 * bits && a.nb == (a.K + block - 1) / block &&
              scales.size(0) == a.N && grid.numel() == (int64_t{1} << bits), "parts do not fit a [", a.N, ", ", a.K,
              "] weight of ", bits, " bits in blocks of ", block);
  a.start1 = (a.K + 7) / 8 * a.p0;
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = reinterpret_cast<const c10::Half*>(scales.data_ptr<at::Half>());
  a.grid = grid.data_ptr<float>();

  int use = cpu_isa();
  if (isa >= 0) use = std::min<int>(use, static_cast<int>(isa));
  // AVX2 with b = 5 or 6 and whole 32-code chunks per block: the byte-table path (chunks of 32, its own
  // order). Measured against the vpermps path in one process (docs/BENCHMARKS.md): 1.7-2.4x faster at
  // b = 5 and 6 for 1-4 rows, 1.1-1.25x at 8; at b <= 4 no faster for 1 row and slower for 8.
  // integer activations (AVX2 code, also on AVX-512 CPUs): b = 2 .. 6, blocks of 32 .. 256 whole chunks
  // b = 8 only with the integer grid (level c - 128, qhead.py), whose codes are the weights
  const bool ints = act_int && use >= AVX2 && (bits <= 6 || (bits == 8 && k256::integer_grid(a.grid))) &&
                    block % 32 == 0 && block <= k256::I16_MAX_BLOCK && a.K >= block;
  if (ints) use = AVX2;
  const bool bytes = !ints && use == AVX2 && (bits == 5 || bits == 6) && block % 32 == 0 && a.K >= 32;
  const int64_t cw = ints || bytes ? 32 : use == AVX512 ? 32 : use == AVX2 ? 16 : 0;
  a.nchunks = (cw && block % cw == 0) ? a.K / cw : 0;
  if (ints) a.nchunks = a.K / block * (block / 32);  // whole blocks only (one activation scale each)
  if (a.nchunks == 0) use = SCALAR;
  a.ldxa = a.nchunks * cw;
  c.use = use;
  c.ints = ints;
  c.bytes = bytes;
  c.cw = cw;
  c.rotation = rotation;
  c.signs = rotation > 0 ? signs.data_ptr() : nullptr;
  // the il8 copy where one was bound (b <= 5 or the 8-bit head, the integer path), checked against this weight's shape
  c.il = ints && (bits <= 5 || bits == 8) && ilc != nullptr && ilc->numel() > 0;
  if (c.il) {
    const int64_t groups = (a.N + 7) / 8, nblk = a.nchunks * 32 / block;
    TORCH_CHECK(ilc->scalar_type() == torch::kUInt8 && ilc->is_contiguous() && ilc->numel() == groups * nblk * block * (bits == 8 ? 8 : bits == 5 ? 5 : 4) &&
                ils->scalar_type() == torch::kHalf && ils->is_contiguous() && ils->numel() == groups * a.nb * 8,
                "the il8 copy does not fit a [", a.N, ", ", a.K, "] weight in blocks of ", block);
    a.ilc = ilc->data_ptr<uint8_t>();
    a.ils = reinterpret_cast<const uint16_t*>(ils->data_ptr<at::Half>());
  }
  c.natural = bits == 8 || c.il;  // the integer path lays b = 8 and il8 out in natural order
  for (size_t j = 0; j < nsame; ++j) {
    const Call& o = same[j];
    if (o.use == use && o.ints == ints && o.bytes == bytes && o.cw == cw && o.a.block == block &&
        o.a.nchunks == a.nchunks && o.rotation == rotation && o.signs == c.signs && o.natural == c.natural) {
      a.xf = o.a.xf;
      a.xa = o.a.xa;
      a.xq = o.a.xq;
      a.xs = o.a.xs;
      finish(c, bias, float_out, xc.scalar_type());
      return;
    }
  }

  c.xf_buf.resize(a.M * a.K);
  for (int64_t m = 0; m < a.M; ++m) {
    float* d = c.xf_buf.data() + m * a.K;
    if (xt == torch::kFloat) std::memcpy(d, xc.data_ptr<float>() + m * a.K, a.K * sizeof(float));
    else if (xt == torch::kBFloat16) widen(xc.data_ptr<at::BFloat16>() + m * a.K, d, a.K);
    else widen(xc.data_ptr<at::Half>() + m * a.K, d, a.K);
  }
  if (rotation > 0) {
    TORCH_CHECK(a.K % rotation == 0 && (rotation & (rotation - 1)) == 0 && signs.scalar_type() == torch::kUInt8 &&
                signs.numel() == (a.K + 7) / 8, "bad rotation parts");
    rotate_rows(c.xf_buf.data(), a.M, a.K, signs.contiguous().data_ptr<uint8_t>(), rotation);
  }
  a.xf = c.xf_buf.data();
  if (a.nchunks && ints) {  // each block's whole chunks rounded to 15 bits with one scale, in i16_order
    const int64_t nblk = a.nchunks / (block / 32);
    c.xq_buf.resize(a.M * a.ldxa);
    c.xs_buf.resize(a.M * a.nb);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t k = 0; k < nblk; ++k) {
        const float* s = a.xf + m * a.K + k * block;
        float mx = 0.f;
        for (int64_t i = 0; i < block; ++i) mx = std::max(mx, std::fabs(s[i]));
        const float inv = mx > 0.f ? 16383.f / mx : 0.f;
        int16_t* o = c.xq_buf.data() + m * a.ldxa + k * block;
        if (c.natural)
          for (int64_t i = 0; i < block; ++i) o[i] = round16(s[i] * inv);
        else  // i16_order: per 16, the even columns then the odd ones
          for (int64_t i = 0; i < block; i += 16)
            for (int64_t t = 0; t < 8; ++t) {
              o[i + t] = round16(s[i + 2 * t] * inv);
              o[i + 8 + t] = round16(s[i + 2 * t + 1] * inv);
            }
        c.xs_buf[m * a.nb + k] = mx / 16383.f;
      }
    a.xq = c.xq_buf.data();
    a.xs = c.xs_buf.data();
  } else if (a.nchunks && bytes) {  // the byte-table order within each chunk of 32 (bl_order)
    c.xa_buf.resize(a.M * a.ldxa);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t k = 0; k < a.nchunks; ++k) {
        const float* s = a.xf + m * a.K + k * 32;
        float* o = c.xa_buf.data() + m * a.ldxa + k * 32;
        for (int64_t i = 0; i < 32; ++i) o[i] = s[bl_order(i)];
      }
    a.xa = c.xa_buf.data();
  } else if (a.nchunks) {  // even/odd order within each chunk: [x0 x2 .. x(cw-2) | x1 x3 .. x(cw-1)]
    c.xa_buf.resize(a.M * a.ldxa);
    const int64_t half = cw / 2;
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t k = 0; k < a.nchunks; ++k) {
        const float* s = a.xf + m * a.K + k * cw;
        float* o = c.xa_buf.data() + m * a.ldxa + k * cw;
        for (int64_t i = 0; i < half; ++i) {
          o[i] = s[2 * i];
          o[half + i] = s[2 * i + 1];
        }
      }
    a.xa = c.xa_buf.data();
  }
  finish(c, bias, float_out, xt);
}

// c's bias (as float32) and output tensor.
void finish(Call& c, const torch::Tensor& bias, bool float_out, at::ScalarType xt) {
  Args& a = c.a;
  c.bf = torch::Tensor();
  if (bias.numel()) {
    TORCH_CHECK(bias.numel() == a.N, "bias has ", bias.numel(), " values for ", a.N, " rows");
    c.bf = bias.to(torch::kFloat).contiguous();
    a.bias = c.bf.data_ptr<float>();
  }
  c.out_type = float_out ? torch::kFloat : xt;
  c.y = torch::empty({a.M, a.N}, torch::dtype(c.out_type));
  if (c.out_type == torch::kFloat) {
    a.y = c.y.data_ptr<float>();
  } else {
    c.y_buf.resize(a.M * a.N);
    a.y = c.y_buf.data();
  }
}

// Rows [r0, r1) of c's weight against every activation row, bias added, output in its dtype.
void run_rows(const Call& c, int64_t r0, int64_t r1) {
  const Args& a = c.a;
#if UC_X86
  if (c.il) k256::il_rows(a, r0, r1);
  else if (c.ints) by_bits<Run256I>(a.bits, a, r0, r1);
  else if (c.use == AVX512) by_bits<Run512>(a.bits, a, r0, r1);
  else if (c.use == AVX2 && c.bytes) by_bits<Run256B>(a.bits, a, r0, r1);
  else if (c.use == AVX2) by_bits<Run256>(a.bits, a, r0, r1);
#endif
  const int64_t tail = a.nchunks * c.cw;
  if (c.use == SCALAR) rows_scalar(a, r0, r1, 0, /*store=*/true);
  else if (tail < a.K) rows_scalar(a, r0, r1, tail, /*store=*/false);
  for (int64_t m = 0; m < a.M; ++m) {
    float* row = a.y + m * a.N;
    if (a.bias)
      for (int64_t r = r0; r < r1; ++r) row[r] += a.bias[r];
    if (c.out_type == torch::kBFloat16) narrow(row + r0, c.y.data_ptr<at::BFloat16>() + m * a.N + r0, r1 - r0);
    else if (c.out_type == torch::kHalf) narrow(row + r0, c.y.data_ptr<at::Half>() + m * a.N + r0, r1 - r0);
  }
}

// about 32k weight-rows of work per task, at least 4 rows
inline int64_t grain_of(const Args& a) { return std::max<int64_t>(4, 32768 / std::max<int64_t>(1, a.K * a.M)); }

// The il8 copy of a weight's codes and scales (the layout above k256::il_tile), for b <= 5 and b = 8 over
// the integer grid, blocks of 32 .. 256 columns (the integer path's): (codes [ceil(N/8), whole blocks'
// columns x 4 (b <= 4), x 5 (b = 5), x 8 (b = 8)] uint8, scales [ceil(N/8), nb, 8] float16). Rows past N are zero codes with zero scales; columns past the last whole
// block stay in `codes` (the scalar tail reads them there). Made once per weight (cpu_qgemv.py `_bind`).
std::vector<torch::Tensor> il_pack(torch::Tensor codes, torch::Tensor scales, int64_t bits, int64_t K, int64_t block) {
  TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2 && codes.scalar_type() == torch::kUInt8 &&
              scales.scalar_type() == torch::kHalf && codes.is_contiguous() && scales.is_contiguous(), "il_pack: parts");
  TORCH_CHECK(((bits >= 2 && bits <= 5) || bits == 8) && block % 32 == 0 && block > 0 && K >= block,
              "il_pack: b <= 5 or 8, blocks of 32k");
  const int64_t N = codes.size(0), nbytes = codes.size(1), nb = scales.size(1);
  TORCH_CHECK(nbytes == (K + 7) / 8 * bits && nb == (K + block - 1) / block && scales.size(0) == N, "il_pack: shapes");
  int p0, p1;
  planes(static_cast<int>(bits), p0, p1);
  const int64_t start1 = (K + 7) / 8 * p0, groups = (N + 7) / 8, cols = bits == 8 ? 4 : 8;
  const int64_t units = K / block * block / cols;
  const int64_t ub = bits == 5 ? 40 : 32;  // bytes per unit: b = 5 adds 8 bytes of fifth bits after the nibbles
  torch::Tensor ilc = torch::zeros({groups, units * ub}, torch::kUInt8);
  torch::Tensor ils = torch::zeros({groups, nb, 8}, torch::kHalf);
  const uint8_t* src = codes.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  uint8_t* dst = ilc.data_ptr<uint8_t>();
  uint16_t* ds = reinterpret_cast<uint16_t*>(ils.data_ptr<at::Half>());
  at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int p = 0; p < 32; ++p) {
        int r, col;
        if (bits == 8) {  // k256::il_unit<8>: byte 2i + j of each half: row i, column j (+ 2 in the upper half)
          r = (p & 15) / 2, col = 2 * (p >> 4) + (p & 1);
          if (8 * g + r >= N) continue;
          const uint8_t* row = src + (8 * g + r) * nbytes;
          for (int64_t u = 0; u < units; ++u) dst[(g * units + u) * 32 + p] = row[4 * u + col];
          continue;
        }
        il_pos(p, r, col);
        uint8_t* gd = dst + g * units * ub;
        uint8_t* hd = gd + units * 32;  // b = 5: per unit, bit p of a word for the low nibbles, then the high
        if (8 * g + r >= N) continue;
        const uint8_t* row = src + (8 * g + r) * nbytes;
        for (int64_t u = 0; u < units; ++u) {
          const uint32_t lo = code_at(row, 8 * u + col, p0, p1, start1), hi = code_at(row, 8 * u + col + 4, p0, p1, start1);
          gd[u * 32 + p] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
          if (bits == 5) {
            hd[u * 8 + p / 8] |= static_cast<uint8_t>((lo >> 4) << (p % 8));
            hd[u * 8 + 4 + p / 8] |= static_cast<uint8_t>((hi >> 4) << (p % 8));
          }
        }
      }
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < 8 && 8 * g + i < N; ++i)
        for (int64_t k = 0; k < nb; ++k) ds[(g * nb + k) * 8 + i] = sc[(8 * g + i) * nb + k];
  });
  return {ilc, ils};
}

// x [..., K] (leading dimensions kept) -> [..., N]; the parts as `prepare` takes them (ilc/ils: the il8
// copy, or empty tensors).
torch::Tensor qgemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor grid, int64_t bits,
                    int64_t block, torch::Tensor signs, int64_t rotation, torch::Tensor bias, int64_t isa,
                    bool float_out, bool act_int, const torch::Tensor& ilc = torch::Tensor(),
                    const torch::Tensor& ils = torch::Tensor()) {
  TORCH_CHECK(x.dim() >= 1, "x must have a last dimension");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());  // [..., K] -> [..., N]
  out_shape.back() = codes.size(0);
  const torch::Tensor xc = x.reshape({-1, x.size(-1)}).contiguous();
  static thread_local Call mine;  // the calling thread's buffers, kept between calls
  Call& c = mine;  // (the workers must see this thread's, not their own thread_local)
  const bool il = ilc.defined() && ilc.numel() > 0;
  prepare(c, xc, codes, scales, grid, bits, block, signs, rotation, bias, isa, float_out, act_int, nullptr, 0,
          il ? &ilc : nullptr, il ? &ils : nullptr);
  const int64_t unit = row_unit(c);
  at::parallel_for(0, (c.a.N + unit - 1) / unit, std::max<int64_t>(1, grain_of(c.a) / unit), [&](int64_t b, int64_t e) {
    run_rows(c, b * unit, std::min(e * unit, c.a.N));
  });
  torch::Tensor y = c.y.view(out_shape);
  c.y = torch::Tensor();
  return y;
}

// Weights' parts held on the C++ side (ucformat/cpu_qgemv.py `bound`, `bound_group`): a call converts only
// x, not every part again (about 4 us less per call of a group of three). One entry per weight (checked
// by its constructor, in the module definition below).
struct Bound {
  std::vector<torch::Tensor> codes, scales, grids, signs, biases;
  std::vector<int64_t> bits, blocks, rotations;
  std::vector<torch::Tensor> ilc, ils;  // the il8 copies (il_pack), or empty tensors
};

// Several weights that read the same input (q/k/v, gate/up) in one call and one parallel region: the rows
// of all of them are one range split over the threads. -> one output per weight, [..., N_i].
std::vector<torch::Tensor> qgemv_group(torch::Tensor x, const Bound& w, int64_t isa, bool act_int) {
  const size_t n = w.codes.size();
  TORCH_CHECK(x.dim() >= 1, "x must have a last dimension");
  const torch::Tensor xc = x.reshape({-1, x.size(-1)}).contiguous();
  static thread_local std::vector<Call> mine;
  if (mine.size() < n) mine.resize(n);
  std::vector<Call>& calls = mine;  // (the workers must see this thread's, not their own thread_local)
  std::vector<int64_t> first(n + 1, 0);  // weight i owns units [first[i], first[i + 1]) of the range
  int64_t grain = INT64_MAX;
  for (size_t i = 0; i < n; ++i) {
    const bool il = w.ilc[i].numel() > 0;
    prepare(calls[i], xc, w.codes[i], w.scales[i], w.grids[i], w.bits[i], w.blocks[i], w.signs[i], w.rotations[i],
            w.biases[i], isa, false, act_int, calls.data(), i, il ? &w.ilc[i] : nullptr, il ? &w.ils[i] : nullptr);
    const int64_t unit = row_unit(calls[i]);
    first[i + 1] = first[i] + (calls[i].a.N + unit - 1) / unit;
    grain = std::min(grain, std::max<int64_t>(1, grain_of(calls[i].a) / unit));
  }
  at::parallel_for(0, first[n], grain, [&](int64_t b, int64_t e) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t u0 = std::max(b, first[i]), u1 = std::min(e, first[i + 1]), unit = row_unit(calls[i]);
      if (u0 < u1) run_rows(calls[i], (u0 - first[i]) * unit, std::min((u1 - first[i]) * unit, calls[i].a.N));
    }
  });
  std::vector<torch::Tensor> out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  for (size_t i = 0; i < n; ++i) {
    shape.back() = calls[i].a.N;
    out.push_back(calls[i].y.view(shape));
    calls[i].y = torch::Tensor();
  }
  return out;
}

int64_t isa() { return cpu_isa(); }

// For other extensions that run a whole decode step in C++ (server/cpu_ops.py `Body`): qgemv_group on a
// Bound given by address. Its address (`group_entry`) and a Bound's (`Bound.address`) travel as integers;
// the Python side keeps the Bound alive while they are used.
std::vector<torch::Tensor> group_at(const torch::Tensor& x, const void* w, int64_t isa, bool act_int) {
  return qgemv_group(x, *static_cast<const Bound*>(w), isa, act_int);
}

// The products run without the GIL: a server's event loop thread goes on streaming while the engine's
// thread is in here.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv",
        [](torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor grid, int64_t bits, int64_t block,
           torch::Tensor signs, int64_t rotation, torch::Tensor bias, int64_t isa, bool float_out, bool act_int,
           torch::Tensor ilc, torch::Tensor ils) {
          return qgemv(x, codes, scales, grid, bits, block, signs, rotation, bias, isa, float_out, act_int, ilc, ils);
        },
        py::call_guard<py::gil_scoped_release>());
  m.def("il_pack", &il_pack, py::call_guard<py::gil_scoped_release>());
  py::class_<Bound>(m, "Bound")
      .def(py::init([](std::vector<torch::Tensor> codes, std::vector<torch::Tensor> scales,
                       std::vector<torch::Tensor> grids, std::vector<torch::Tensor> signs,
                       std::vector<torch::Tensor> biases, std::vector<int64_t> bits, std::vector<int64_t> blocks,
                       std::vector<int64_t> rotations, std::vector<torch::Tensor> ilc, std::vector<torch::Tensor> ils) {
        const size_t n = codes.size();
        TORCH_CHECK(n > 0 && scales.size() == n && grids.size() == n && signs.size() == n && biases.size() == n &&
                    bits.size() == n && blocks.size() == n && rotations.size() == n && ilc.size() == n &&
                    ils.size() == n, "Bound: one entry per weight");
        return Bound{codes, scales, grids, signs, biases, bits, blocks, rotations, ilc, ils};
      }))
      .def("one",
           [](const Bound& w, torch::Tensor x, int64_t isa, bool act_int) {
             return qgemv(x, w.codes[0], w.scales[0], w.grids[0], w.bits[0], w.blocks[0], w.signs[0],
                          w.rotations[0], w.biases[0], isa, false, act_int, w.ilc[0], w.ils[0]);
           },
           py::call_guard<py::gil_scoped_release>())
      .def("group", [](const Bound& w, torch::Tensor x, int64_t isa, bool act_int) { return qgemv_group(x, w, isa, act_int); },
           py::call_guard<py::gil_scoped_release>())
      .def("address", [](const Bound& w) { return reinterpret_cast<intptr_t>(&w); });
  m.def("isa", &isa);
  m.def("group_entry", [] { return reinterpret_cast<intptr_t>(&group_at); });
}

#else  // UC_DRIVER: the loops shared by every instruction set, compiled inside its namespace

inline float half(uint16_t h) { return _cvtsh_ss(h); }
constexpr int64_t PREFETCH = 2048;  // bytes ahead

// One chunk of codes against MT activation rows.
template <int BITS, int MT, int NA>
inline void step(const Table<BITS>& tab, const Args& a, const uint8_t* row, const float* xa, int64_t c,
                 vec (&acc)[MT][NA]) {
  vec we, wo;
  weights<BITS>(tab, a, row, c, we, wo);
  const float* x = xa + c * CW;
  for (int m = 0; m < MT; ++m) {
    const float* xm = x + m * a.ldxa;
    acc[m][0] = vfma(we, vload(xm), acc[m][0]);
    acc[m][NA - 1] = vfma(wo, vload(xm + CW / 2), acc[m][NA - 1]);
  }
}

// Chunks [c0, c1) of one weight row against MT activation rows (xa: the first of them), blocks of PB
// chunks (0: a.block / CW, not known at compile time). out[m * N] = (or +=) the sums.
template <int BITS, int MT, int PB>
inline void row_tile(Table<BITS>& tab, const Args& a, const uint8_t* row, const uint16_t* srow, const float* xa,
                     int64_t c0, int64_t c1, float* out, bool store) {
  constexpr int NA = MT <= 4 ? 2 : 1;                           // chains per row: keep the FMAs in flight
  constexpr int NP = (MT == 1 && PB >= 2 && PB % 2 == 0) ? 2 : 1;  // and a second pair of them for one row
  vec acc[NP][MT][NA];
  for (int p = 0; p < NP; ++p)
    for (int m = 0; m < MT; ++m)
      for (int k = 0; k < NA; ++k) acc[p][m][k] = vzero();
  const int64_t pb = PB ? PB : a.block / CW;
  int64_t c = c0;
  for (; c + pb <= c1; c += pb) {  // whole blocks: one scale each
    // the codes of the rows ahead (they follow this one in memory): hide the memory latency
    _mm_prefetch(reinterpret_cast<const char*>(row + c * (CW / 8) * BITS + PREFETCH), _MM_HINT_T0);
    tab.scale(half(srow[c / pb]));
    if constexpr (PB > 0) {
      for (int k = 0; k < PB; ++k) step<BITS, MT, NA>(tab, a, row, xa, c + k, acc[k % NP]);
    } else {
      for (int64_t k = 0; k < pb; ++k) step<BITS, MT, NA>(tab, a, row, xa, c + k, acc[0]);
    }
  }
  if (c < c1) {  // the row's last block, cut short
    tab.scale(half(srow[c / pb]));
    for (; c < c1; ++c) step<BITS, MT, NA>(tab, a, row, xa, c, acc[0]);
  }
  for (int m = 0; m < MT; ++m) {
    vec v = acc[0][m][0];
    if constexpr (NA == 2) v = vadd(v, acc[0][m][1]);
    if constexpr (NP == 2) v = vadd(v, vadd(acc[1][m][0], acc[1][m][NA - 1]));
    const float sum = hsum(v);
    out[m * a.N] = store ? sum : out[m * a.N] + sum;
  }
}

// Rows [r0, r1) of W, every activation row, the whole chunks. Activation rows go in tiles of MT, and
// columns in passes short enough that a tile's activations stay in L1 (about 24 KiB) across the rows.
template <int BITS, int PB>
void rows_blocks(const Args& a, int64_t r0, int64_t r1) {
  Table<BITS> tab(a.grid);
  const int64_t pb = PB ? PB : a.block / CW;
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(a.scales);
  for (int64_t m = 0; m < a.M;) {
    const int64_t left = a.M - m;
    const int mt = left >= 16 && MAX_MT >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const int64_t pass = std::max<int64_t>(1, (24 << 10) / (mt * CW * 4) / pb) * pb;
    const float* xa = a.xa + m * a.ldxa;
    for (int64_t c0 = 0; c0 < a.nchunks; c0 += pass) {
      const int64_t c1 = std::min(a.nchunks, c0 + pass);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = a.codes + r * a.nbytes;
        const uint16_t* srow = scales + r * a.nb;
        float* out = a.y + m * a.N + r;
        switch (mt) {
          case 16: if constexpr (MAX_MT >= 16) row_tile<BITS, MAX_MT, PB>(tab, a, row, srow, xa, c0, c1, out, c0 == 0); break;
          case 8: row_tile<BITS, 8, PB>(tab, a, row, srow, xa, c0, c1, out, c0 == 0); break;
          case 4: row_tile<BITS, 4, PB>(tab, a, row, srow, xa, c0, c1, out, c0 == 0); break;
          case 2: row_tile<BITS, 2, PB>(tab, a, row, srow, xa, c0, c1, out, c0 == 0); break;
          default: row_tile<BITS, 1, PB>(tab, a, row, srow, xa, c0, c1, out, c0 == 0);
        }
      }
    }
    m += mt;
  }
}

template <int BITS>
void rows(const Args& a, int64_t r0, int64_t r1) {
  switch (a.block / CW) {  // the common block sizes with a compile-time number of chunks per block
    case 2: rows_blocks<BITS, 2>(a, r0, r1); break;
    case 4: rows_blocks<BITS, 4>(a, r0, r1); break;
    default: rows_blocks<BITS, 0>(a, r0, r1);
  }
}

#endif  // UC_DRIVER
