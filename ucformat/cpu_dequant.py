"""A native CPU kernel for the first step of reconstruction (SPEC.md, "Reconstruction"): bit-packed codes
-> grid level -> times the block scale, in float32, for every element in one pass.

The torch version (qtensor.dequantize) unpacks each plane into a wider tensor, widens the codes to int32,
gathers the levels and multiplies by the scales: five passes over memory and a scalar gather, about
7 ns per weight on this 2-core CPU. Packed and streamed residency reconstruct every layer at every
forward pass, so that time is the whole gap to dense residency there. This kernel reads each code's
planes, looks the level up in a grid that sits in L1 and multiplies by the block scale, one output write
per weight, rows split over torch's intra-op threads.

The results are the same floats, bit for bit, as the torch path: each element is one float32 multiply of
the same two float32 operands (the grid level, and the float16 scale widened exactly). The extension is
compiled on first use (native.py); where that fails the torch path runs and `available()` says why.
"""

from __future__ import annotations

import torch

from . import native

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

// 8 codes of one group: plane W0 (low bits) then plane W1 (high bits, 0 if none); a plane of width w
// holds 8 codes in w bytes, code k in bits [k*w, k*w+w) counting from the first byte's lowest bit.
template <int W>
static inline void plane(const uint8_t* b, uint32_t* c, int low) {
  if constexpr (W == 8) {
    for (int k = 0; k < 8; ++k) c[k] |= (uint32_t)b[k] << low;
  } else {
    for (int k = 0; k < 8; ++k) c[k] |= ((uint32_t)(b[(k * W) >> 3] >> ((k * W) & 7)) & ((1u << W) - 1u)) << low;
  }
}

template <int W0, int W1>
static void rows(const uint8_t* cp, const c10::Half* sp, const float* gp, float* op, int64_t begin, int64_t end,
                 int64_t R, int64_t nbytes, int64_t nb, int64_t L, int64_t cols, int64_t block) {
  const int64_t n8 = (cols + 7) / 8 * 8, start1 = n8 * W0 / 8;
  for (int64_t mr = begin; mr < end; ++mr) {
    const uint8_t* row = cp + mr * nbytes;
    const c10::Half* srow = sp + mr * nb;
    const float* g = gp + (mr / R) * L;
    float* o = op + mr * cols;
    for (int64_t b0 = 0; b0 < cols; b0 += block) {
      const float s = static_cast<float>(srow[b0 / block]);
      const int64_t bend = b0 + block < cols ? b0 + block : cols;
      for (int64_t j0 = b0; j0 < bend; j0 += 8) {  // block % 8 == 0: a group never spans two blocks
        uint32_t c[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        plane<W0>(row + (j0 / 8) * W0, c, 0);
        if constexpr (W1 > 0) plane<W1>(row + start1 + (j0 / 8) * W1, c, W0);
        if (j0 + 8 <= bend) {
          for (int k = 0; k < 8; ++k) o[j0 + k] = g[c[k]] * s;
        } else {
          for (int64_t k = 0; j0 + k < bend; ++k) o[j0 + k] = g[c[k]] * s;
        }
      }
    }
  }
}

// codes: uint8 [M, R, nbytes]; scales: half [M, R, nb]; grid: float [M, L] -> float [M, R, cols]
torch::Tensor dequant(torch::Tensor codes, torch::Tensor scales, torch::Tensor grid, int64_t bits, int64_t block,
                      int64_t cols) {
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && scales.dtype() == torch::kHalf && grid.dtype() == torch::kFloat);
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous() && grid.is_contiguous());
  TORCH_CHECK(block % 8 == 0, "block size must be a multiple of 8");
  const int64_t M = codes.size(0), R = codes.size(1), nbytes = codes.size(2), nb = scales.size(2), L = grid.size(1);
  TORCH_CHECK(nbytes == (cols + 7) / 8 * bits, "codes row has ", nbytes, " bytes");
  auto out = torch::empty({M, R, cols}, torch::dtype(torch::kFloat));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scales.data_ptr<c10::Half>();
  const float* gp = grid.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M * R, 8, [&](int64_t begin, int64_t end) {
    switch (bits) {
      case 2: rows<2, 0>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      case 3: rows<2, 1>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      case 4: rows<4, 0>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      case 5: rows<4, 1>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      case 6: rows<4, 2>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      case 8: rows<8, 0>(cp, sp, gp, op, begin, end, R, nbytes, nb, L, cols, block); break;
      default: TORCH_CHECK(false, "unsupported code width ", bits);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dequant", &dequant); }
"""

NAME = "uc_cpu_dequant_v2"  # bump with the source: the build cache is keyed by name


def _build():
    return native.load(NAME, _SOURCE, "CPU dequantization kernel")[0]


def available() -> tuple[bool, str | None]:
    """(usable, why not) — builds the extension on first call."""
    module, why = native.load(NAME, _SOURCE, "CPU dequantization kernel")
    return module is not None, why


def dequant_levels(codes: torch.Tensor, scales: torch.Tensor, grid: torch.Tensor, bits: int, block: int,
                   shape: tuple[int, ...]) -> torch.Tensor | None:
    """grid[code] * scale for every element, float32 of `shape`; None where the kernel cannot run (not
    CPU, unavailable), and the caller takes the torch path."""
    if (codes.device.type != "cpu" or scales.dtype != torch.float16 or grid.dtype != torch.float32 or block % 8
            or grid.requires_grad or scales.requires_grad or _build() is None):
        return None
    *lead, rows, cols = shape
    m = 1
    for d in lead:
        m *= d
    out = _build().dequant(codes.reshape(m, rows, -1).contiguous(), scales.reshape(m, rows, -1).contiguous(),
                           grid.reshape(m, -1).contiguous(), bits, block, cols)
    return out.reshape(shape)
