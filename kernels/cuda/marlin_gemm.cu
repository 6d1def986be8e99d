// W4A16 GEMM kernels over the marlin_int4_v1 layout (see marlin_gemm.h for the contract and
// marlin_layout.cuh for how a lane reads the packed words). Written from the layout facts in
// shared/reference/formats.md §1 and layouts/SPEC.md; CUDA headers only, no torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "marlin_gemm.h"
#include "marlin_layout.cuh"

namespace ktpack {
namespace cuda {
namespace {

using marlin::kChunkN;
using marlin::kChunkWords;
using marlin::kRowK;

struct Params {
  const void* x;
  int64_t x_stride_m, x_stride_b;
  const uint32_t* qweight;
  const __half* scales;
  void* y;
  int64_t y_stride_m, y_stride_b;
  float* workspace;
  int m, n, k, group, count, splits;
};

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Writes one finished sum: straight to y when K is not split, else to this split's workspace slice.
template <typename T>
__device__ __forceinline__ void store_out(const Params& p, int b, int split, int row, int col, float v) {
  if (p.splits == 1) {
    T* y = static_cast<T*>(p.y);
    y[b * p.y_stride_b + row * p.y_stride_m + col] = from_float<T>(v);
  } else {
    p.workspace[((static_cast<int64_t>(split) * p.count + b) * p.m + row) * p.n + col] = v;
  }
}

// ------------------------------------------------------------------------------------------------------------
// CUDA-core kernel. Block (chunk, m tile, b * splits + split): W warps share one 64-column chunk and the
// split's K rows (warp w takes the w-th contiguous part). Each lane accumulates its 8 columns for MT rows
// (simt_lane_rows), the 4 lanes of a column group are summed with shuffles, then the W warps through shared
// memory.
template <typename T, int MT, int W>
__global__ void __launch_bounds__(W * 32) marlin_simt_kernel(Params p) {
  const int chunk = blockIdx.x;
  const int m0 = blockIdx.y * MT;
  const int b = blockIdx.z / p.splits;
  const int split = blockIdx.z % p.splits;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int m_valid = min(MT, p.m - m0);

  int s_lo, s_hi, r_lo, r_hi;
  marlin::split_range(p.k / kRowK, p.splits, split, &s_lo, &s_hi);
  marlin::split_range(s_hi - s_lo, W, warp, &r_lo, &r_hi);

  const int64_t qw_stride = static_cast<int64_t>(p.k / kRowK) * 2 * p.n;
  const int64_t sc_stride = static_cast<int64_t>(p.k / p.group) * p.n;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b + m0 * p.x_stride_m;

  float acc[MT][8];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int s = 0; s < 8; ++s) acc[m][s] = 0.f;
  marlin::simt_lane_rows<T, MT>(p.qweight + b * qw_stride, p.scales + b * sc_stride, x, p.x_stride_m, m_valid, p.n,
                                p.group, p.group == p.k, chunk, lane, s_lo + r_lo, s_lo + r_hi, acc);

  __shared__ float red[W][MT][kChunkN];
  const int g = lane >> 2;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      float v = acc[m][s];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      if ((lane & 3) == 0) red[warp][m][marlin::chunk_col(s >> 1, s & 1, g)] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * kChunkN; i += W * 32) {
    const int m = i / kChunkN;
    const int col = i % kChunkN;
    if (m >= m_valid) continue;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) v += red[w][m][col];
    store_out<T>(p, b, split, m0 + m, chunk * kChunkN + col, v);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Tensor-core kernel (sm_80+). Block of 4 warps: warp w takes chunk 4 * blockIdx.x + w (64 columns = 8 n8
// tiles) for MT16 m16 tiles starting at row 16 * MT16 * blockIdx.y, over the split's K rows. Per packed row:
// one 16-byte load of the lane's 4 words gives the B fragments of all 8 tiles (b_frag_bits + magic dequant to
// exact q - 8), A fragments come straight from x (L1/L2), mma accumulates a group's partial in fp32, and at the
// group's end the partial times the fp16 scale (as fp32) is added to the fp32 accumulator.
constexpr int kMmaWarps = 4;

template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t bits);
template <>
__device__ __forceinline__ uint32_t dequant_pair<__half>(uint32_t bits) {
  uint32_t v = bits | marlin::kF16Magic;
  const uint32_t bias = marlin::kF16MagicBias;
  __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&bias));
  return *reinterpret_cast<uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t dequant_pair<__nv_bfloat16>(uint32_t bits) {
  uint32_t v = bits | marlin::kBF16Magic;
  const uint32_t bias = marlin::kBF16MagicBias;
  __nv_bfloat162 r =
      __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), *reinterpret_cast<const __nv_bfloat162*>(&bias));
  return *reinterpret_cast<uint32_t*>(&r);
}

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T, int MT16>
__global__ void __launch_bounds__(kMmaWarps * 32) marlin_mma_kernel(Params p) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int chunk = blockIdx.x * kMmaWarps + warp;
  if (chunk * kChunkN >= p.n) return;  // no block-wide synchronisation below
  const int m0 = blockIdx.y * 16 * MT16;
  const int b = blockIdx.z / p.splits;
  const int split = blockIdx.z % p.splits;
  const int t = lane & 3;
  const bool single = p.group == p.k;

  int r_lo, r_hi;
  marlin::split_range(p.k / kRowK, p.splits, split, &r_lo, &r_hi);
  const uint32_t* qw = p.qweight + b * static_cast<int64_t>(p.k / kRowK) * 2 * p.n;
  const __half* sc = p.scales + b * static_cast<int64_t>(p.k / p.group) * p.n;
  const T* x = static_cast<const T*>(p.x) + b * p.x_stride_b;

  float acc[MT16][8][4];
  float gacc[MT16][8][4];
#pragma unroll
  for (int mt = 0; mt < MT16; ++mt)
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][s][i] = gacc[mt][s][i] = 0.f;

  const int rows_per_group = p.group / kRowK;
  int cur = r_lo / rows_per_group;
  for (int r = r_lo; r <= r_hi; ++r) {
    const int gi = r / rows_per_group;
    if (r == r_hi || gi != cur) {
      if (r > r_lo) {
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          const int col = chunk * kChunkN + marlin::chunk_col(s >> 1, s & 1, 0) + 2 * t;
          const __half* srow = sc + static_cast<int64_t>(cur) * p.n;
          const float s0 = __half2float(srow[marlin::scale_col(col, single)]);
          const float s1 = __half2float(srow[marlin::scale_col(col + 1, single)]);
#pragma unroll
          for (int mt = 0; mt < MT16; ++mt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[mt][s][i] += ((i & 1) ? s1 : s0) * gacc[mt][s][i];
              gacc[mt][s][i] = 0.f;
            }
          }
        }
      }
      cur = gi;
      if (r == r_hi) break;
    }
    uint32_t w[4];
    marlin::load_words(qw + static_cast<int64_t>(r) * 2 * p.n + chunk * kChunkWords + lane * 4, w);
    uint32_t a[MT16][4];
#pragma unroll
    for (int mt = 0; mt < MT16; ++mt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + 16 * mt + marlin::a_frag_row(lane, i);
        const int col = r * kRowK + marlin::a_frag_col(lane, i);
        a[mt][i] = row < p.m ? __ldg(reinterpret_cast<const uint32_t*>(x + row * p.x_stride_m + col)) : 0u;
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t b0 = dequant_pair<T>(marlin::b_frag_bits(w[j], h, 0));
        const uint32_t b1 = dequant_pair<T>(marlin::b_frag_bits(w[j], h, 1));
#pragma unroll
        for (int mt = 0; mt < MT16; ++mt) mma16816<T>(gacc[mt][2 * j + h], a[mt], b0, b1);
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT16; ++mt) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + 16 * mt + marlin::c_frag_row(lane, i);
        const int col = chunk * kChunkN + marlin::chunk_col(s >> 1, s & 1, 0) + marlin::c_frag_col(lane, i);
        if (row < p.m) store_out<T>(p, b, split, row, col, acc[mt][s][i]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Split-K epilogue: y = sum over splits (in split order) of the workspace slices.
template <typename T>
__global__ void splitk_reduce_kernel(Params p) {
  const int64_t total = static_cast<int64_t>(p.count) * p.m * p.n;
  const int64_t slice = total;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += p.workspace[s * slice + i];
    const int64_t b = i / (static_cast<int64_t>(p.m) * p.n);
    const int64_t rem = i % (static_cast<int64_t>(p.m) * p.n);
    T* y = static_cast<T*>(p.y);
    y[b * p.y_stride_b + (rem / p.n) * p.y_stride_m + rem % p.n] = from_float<T>(v);
  }
}

constexpr int kSimtWarps = 4;

int simt_rows_per_block(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; }
int mma_tiles(int m) { return m <= 16 ? 1 : 2; }

template <typename T, int MT>
void launch_simt(const Params& p, cudaStream_t stream) {
  const dim3 grid(p.n / kChunkN, (p.m + MT - 1) / MT, p.count * p.splits);
  marlin_simt_kernel<T, MT, kSimtWarps><<<grid, kSimtWarps * 32, 0, stream>>>(p);
}

template <typename T, int MT16>
void launch_mma(const Params& p, cudaStream_t stream) {
  const int chunks = p.n / kChunkN;
  const dim3 grid((chunks + kMmaWarps - 1) / kMmaWarps, (p.m + 16 * MT16 - 1) / (16 * MT16), p.count * p.splits);
  marlin_mma_kernel<T, MT16><<<grid, kMmaWarps * 32, 0, stream>>>(p);
}

template <typename T>
void launch_all(const Params& p, const MarlinPlan& plan, cudaStream_t stream) {
  if (plan.kernel == MarlinKernel::kMma) {
    if (mma_tiles(p.m) == 1) {
      launch_mma<T, 1>(p, stream);
    } else {
      launch_mma<T, 2>(p, stream);
    }
  } else {
    switch (simt_rows_per_block(p.m)) {
      case 1:
        launch_simt<T, 1>(p, stream);
        break;
      case 2:
        launch_simt<T, 2>(p, stream);
        break;
      case 4:
        launch_simt<T, 4>(p, stream);
        break;
      default:
        launch_simt<T, 8>(p, stream);
        break;
    }
  }
  if (p.splits > 1) {
    const int64_t total = static_cast<int64_t>(p.count) * p.m * p.n;
    const int blocks = static_cast<int>(std::min<int64_t>((total + 255) / 256, 65535));
    splitk_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p);
  }
}

}  // namespace

const char* marlin_gemm_check(const MarlinGemmArgs& a) {
  if (a.m < 0 || a.count < 1) return "M must be >= 0 and the matrix count >= 1";
  if (a.m > 65535 * 8 || a.count > 65535) return "M or the matrix count is too large for one launch";
  if (a.n <= 0 || a.n % 64 != 0) return "N must be a positive multiple of 64 (marlin_int4_v1)";
  if (a.k <= 0 || a.k % 128 != 0) return "K must be a positive multiple of 128 (marlin_int4_v1)";
  if (!(a.group == 32 || a.group == 64 || a.group == 128 || a.group == a.k)) {
    return "group size must be 32, 64, 128 or K";
  }
  if (a.k % a.group != 0) return "K must be a multiple of the group size";
  if (a.act != ActType::kF16 && a.act != ActType::kBF16) return "activations must be fp16 or bf16";
  if (reinterpret_cast<uintptr_t>(a.qweight) % 16 != 0) return "qweight must be 16-byte aligned";
  if (reinterpret_cast<uintptr_t>(a.x) % 4 != 0 || a.x_stride_m % 2 != 0 || a.x_stride_b % 2 != 0) {
    return "x must be 4-byte aligned with even strides";
  }
  if (reinterpret_cast<uintptr_t>(a.scales) % 2 != 0 || reinterpret_cast<uintptr_t>(a.y) % 2 != 0) {
    return "scales and y must be 2-byte aligned";
  }
  return nullptr;
}

MarlinPlan marlin_gemm_plan(const MarlinGemmArgs& a, MarlinKernel want, int sm_count) {
  MarlinPlan plan;
  plan.kernel = want != MarlinKernel::kAuto ? want : (a.m <= 8 ? MarlinKernel::kSimt : MarlinKernel::kMma);
  const int chunks = a.n / kChunkN;
  const int rows = a.k / kRowK;
  int64_t blocks;
  int min_rows;  // fewest packed rows a split may have
  if (plan.kernel == MarlinKernel::kMma) {
    const int mrows = 16 * mma_tiles(a.m);
    blocks = static_cast<int64_t>((chunks + kMmaWarps - 1) / kMmaWarps) * ((a.m + mrows - 1) / mrows) * a.count;
    min_rows = 8;
  } else {
    const int mt = simt_rows_per_block(a.m);
    blocks = static_cast<int64_t>(chunks) * ((a.m + mt - 1) / mt) * a.count;
    min_rows = 4 * kSimtWarps;
  }
  const int64_t target = 2 * static_cast<int64_t>(std::max(sm_count, 1));
  int64_t splits = blocks >= target ? 1 : (target + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, std::max(1, rows / min_rows));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, 65535 / a.count));
  splits = std::min<int64_t>(splits, 64);
  plan.splits = static_cast<int>(std::max<int64_t>(splits, 1));
  plan.workspace_floats = plan.splits > 1 ? static_cast<int64_t>(plan.splits) * a.count * a.m * a.n : 0;
  return plan;
}

cudaError_t marlin_gemm_launch(const MarlinGemmArgs& a, const MarlinPlan& plan, cudaStream_t stream) {
  if (a.m == 0) return cudaSuccess;
  if (plan.splits > 1 && a.workspace == nullptr) return cudaErrorInvalidValue;
  const Params p{a.x,          a.x_stride_m, a.x_stride_b,
                 reinterpret_cast<const uint32_t*>(a.qweight), static_cast<const __half*>(a.scales),
                 a.y,          a.y_stride_m, a.y_stride_b,
                 a.workspace,  a.m,          a.n,
                 a.k,          a.group,      a.count,
                 plan.splits};
  if (a.act == ActType::kF16) {
    launch_all<__half>(p, plan, stream);
  } else {
    launch_all<__nv_bfloat16>(p, plan, stream);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ktpack
