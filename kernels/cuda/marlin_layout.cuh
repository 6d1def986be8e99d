// How a thread reads the marlin_int4_v1 layout (layouts/SPEC.md "marlin_int4_v1", formats.md §1.2-1.3).
//
// Torch-free and host+device: the kernels in marlin_gemm.cu call these, and so does the host emulation
// in tests/cuda/marlin_emulate.cu, which checks them against layouts/marlin.py on a machine without a GPU.
//
// Layout facts used here (W[N, K] is the weight, B = W^T, codes q in 0..15, value (q - 8) * s):
//   qweight int32[K/16, 2N]: packed row r holds k = 16r .. 16r+15. Columns come in chunks of 64
//   (128 int32 words each); lane L = 4g + t (g = L / 4, t = L % 4) of a warp owns words 4L .. 4L+3 of
//   the chunk, one per 16-column subtile j. Word j of lane L holds column n = 16j + 8h + g of the chunk
//   and k = 2t + e + 8f of the row at nibble 4e + 2h + f (e, h, f in {0, 1}).
//   scales fp16[K/g, N]: row = group; within each 64 (grouped) or 32 (one group, g == K) columns the
//   columns are permuted (scale_col below).
// Those nibbles are exactly the B operand of mma.m16n8k16 for the two n8 halves (h) of subtile j:
// register f of half h is (word >> (8h + 4f)) & 0x000f000f, the k pair (2t, 2t+1) + 8f at column g.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#if defined(__CUDACC__)
#define KT_HD __host__ __device__ __forceinline__
#else
#define KT_HD inline
#endif

namespace ktpack {
namespace marlin {

constexpr int kRowK = 16;         // k values per packed row
constexpr int kChunkN = 64;       // columns per chunk
constexpr int kChunkWords = 128;  // int32 words per chunk and row (64 columns x 16 k x 4 bits / 32)
constexpr int kBias = 8;          // uint4b8: value = q - 8

// Column (0..63) of a chunk held by lane group g in subtile j, half h.
KT_HD int chunk_col(int j, int h, int g) { return 16 * j + 8 * h + g; }

// k (0..15) within a packed row held by lane t at (e, f).
KT_HD int row_k(int t, int e, int f) { return 2 * t + e + 8 * f; }

// Nibble index of (e, h, f) within a word.
KT_HD int nibble(int e, int h, int f) { return 4 * e + 2 * h + f; }

KT_HD int code(uint32_t word, int nib) { return static_cast<int>((word >> (4 * nib)) & 0xFu); }

// Where the scale of logical column n sits in its scales row.
//   grouped (several groups): out[8a + b] = in[a + 8b] within 64 columns, so logical i is at 8 (i % 8) + i / 8;
//   single (g == K): out[8a + u] = in[2a + (0,1,8,9,16,17,24,25)[u]] within 32 columns, so logical m is at
//   8 ((m / 2) % 4) + 2 (m / 8) + m % 2.
KT_HD int scale_col(int n, bool single) {
  const int base = n & ~63;
  const int i = n & 63;
  if (!single) return base + 8 * (i & 7) + (i >> 3);
  const int m = i & 31;
  return base + (i & 32) + 8 * ((m >> 1) & 3) + 2 * (m >> 3) + (m & 1);
}

// The two codes of mma B register f of n8 half h, each in the low 4 bits of a 16-bit half of the word.
KT_HD uint32_t b_frag_bits(uint32_t word, int h, int f) { return (word >> (8 * h + 4 * f)) & 0x000F000Fu; }

// fp16/bf16 "magic" dequantization of b_frag_bits: OR-ing a code 0..15 into the mantissa of 1024.0 (fp16
// 0x6400, spacing 1) or 128.0 (bf16 0x4300, spacing 1) gives exactly 1024 + q or 128 + q; subtracting
// 1032 (0x6408) or 136 (0x4308) gives q - 8 exactly. No rounding happens anywhere.
constexpr uint32_t kF16Magic = 0x64006400u;
constexpr uint32_t kF16MagicBias = 0x64086408u;
constexpr uint32_t kBF16Magic = 0x43004300u;
constexpr uint32_t kBF16MagicBias = 0x43084308u;

// mma.m16n8k16 fragment coordinates (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), lane = 4g + t:
//   A (16x16, row-major), register i (0..3) holds row g + 8 (i % 2), columns c, c + 1 with c = 2t + 8 (i / 2);
//   B (16x8, "col"), register f (0..1) holds k = 2t + 8f, 2t + 8f + 1 at column g;
//   C/D (16x8, f32), element i (0..3) is row g + 8 (i / 2), column 2t + i % 2.
KT_HD int a_frag_row(int lane, int i) { return (lane >> 2) + 8 * (i & 1); }
KT_HD int a_frag_col(int lane, int i) { return 2 * (lane & 3) + 8 * (i >> 1); }
KT_HD int c_frag_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
KT_HD int c_frag_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Split [0, total) into `parts` near-equal contiguous ranges; range `i` is [*lo, *hi).
KT_HD void split_range(int total, int parts, int i, int* lo, int* hi) {
  *lo = static_cast<int>(static_cast<int64_t>(total) * i / parts);
  *hi = static_cast<int>(static_cast<int64_t>(total) * (i + 1) / parts);
}

template <typename T>
KT_HD float to_float(T v);
template <>
KT_HD float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
KT_HD float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Four consecutive int32 words (one 16-byte load on the device; p is 16-byte aligned).
KT_HD void load_words(const uint32_t* p, uint32_t w[4]) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
#else
  for (int j = 0; j < 4; ++j) w[j] = p[j];
#endif
}

// One lane's share of the CUDA-core kernel: for MT rows of x (m_valid of them real) and the 8 columns this
// lane owns in `chunk` (slot s = 2j + h is column chunk_col(j, h, g)), accumulate over packed rows
// [r_lo, r_hi) into acc[m][s]. Inside a group the lane sums (q - 8) * x exactly-multiplied in fp32 (a
// 4-bit integer times an fp16/bf16 value is exact in fp32); at each group's end it adds s * partial.
//   qw: the matrix's qweight, row stride 2n words; sc: its scales, row stride n; x: row 0 of the rows, row
//   stride x_stride (elements). group: group size in k (a multiple of 16); single: one group over all of K.
template <typename T, int MT>
KT_HD void simt_lane_rows(const uint32_t* qw, const __half* sc, const T* x, int64_t x_stride, int m_valid, int n,
                          int group, bool single, int chunk, int lane, int r_lo, int r_hi, float acc[MT][8]) {
  const int g = lane >> 2;
  const int t = lane & 3;
  float gacc[MT][8];
  for (int m = 0; m < MT; ++m)
    for (int s = 0; s < 8; ++s) gacc[m][s] = 0.f;
  const int rows_per_group = group / kRowK;
  int cur = r_lo / rows_per_group;
  for (int r = r_lo; r <= r_hi; ++r) {
    const int gi = r / rows_per_group;
    if (r == r_hi || gi != cur) {  // flush the finished group
      if (r > r_lo) {
        for (int s = 0; s < 8; ++s) {
          const int col = chunk * kChunkN + chunk_col(s >> 1, s & 1, g);
          const float scale = __half2float(sc[static_cast<int64_t>(cur) * n + scale_col(col, single)]);
          for (int m = 0; m < MT; ++m) {
            acc[m][s] += scale * gacc[m][s];
            gacc[m][s] = 0.f;
          }
        }
      }
      cur = gi;
      if (r == r_hi) break;
    }
    uint32_t w[4];
    load_words(qw + static_cast<int64_t>(r) * 2 * n + chunk * kChunkWords + lane * 4, w);
    float xv[MT][4];  // x at k = 16r + row_k(t, e, f), index e + 2f
    for (int m = 0; m < MT; ++m) {
      const T* xr = x + m * x_stride + r * kRowK + 2 * t;
      for (int i = 0; i < 4; ++i) xv[m][i] = m < m_valid ? to_float<T>(xr[(i & 1) + 8 * (i >> 1)]) : 0.f;
    }
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < 2; ++h) {
        for (int e = 0; e < 2; ++e) {
          for (int f = 0; f < 2; ++f) {
            const float v = static_cast<float>(code(w[j], nibble(e, h, f)) - kBias);
            for (int m = 0; m < MT; ++m) gacc[m][2 * j + h] += v * xv[m][e + 2 * f];
          }
        }
      }
    }
  }
}

}  // namespace marlin
}  // namespace ktpack
