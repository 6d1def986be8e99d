// W4A16 GEMM over the marlin_int4_v1 layout as packed: y[M, N] = x[M, K] . W[N, K]^T.
//
// Torch-free (CUDA runtime headers only); binding.cpp is the torch glue. Weights: qweight int32[K/16, 2N] and
// scales fp16[K/g, N] exactly as layouts/marlin.py packs them (uint4b8, no zero point). Activations and the
// output are fp16 or bf16; products are exact in fp32 and sums are fp32: within a group of g k-values the
// kernel sums (q - 8) * x, then adds scale * partial to the fp32 accumulator.
//
// A stack of `count` matrices (qweight [count, K/16, 2N], scales [count, K/g, N]) multiplies x rows
// x + b * x_stride_b (one matrix per b), writing y + b * y_stride_b: the per-head k_b / v_b products.
//
// Two kernels: a CUDA-core one (one warp per 64 columns and a K range, lanes reduced with shuffles; best for
// small M, i.e. decode) and a tensor-core one (mma.m16n8k16, fp32 accumulators; for M > 8). Both can split K
// across thread blocks into an fp32 workspace, summed in a fixed order by a second kernel (deterministic, no
// atomics), so one call is capturable in a CUDA Graph as long as the workspace address is fixed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ktpack {
namespace cuda {

enum class ActType : int { kF16 = 0, kBF16 = 1 };
enum class MarlinKernel : int { kAuto = 0, kSimt = 1, kMma = 2 };

struct MarlinGemmArgs {
  const void* x = nullptr;  // ActType elements; row m of matrix b at x + b * x_stride_b + m * x_stride_m
  int64_t x_stride_m = 0;
  int64_t x_stride_b = 0;
  const int32_t* qweight = nullptr;  // [count, K/16, 2N], 16-byte aligned
  const void* scales = nullptr;      // fp16 [count, K/group, N]
  void* y = nullptr;                 // ActType elements, same addressing as x with the y strides
  int64_t y_stride_m = 0;
  int64_t y_stride_b = 0;
  float* workspace = nullptr;  // plan.workspace_floats floats (may be null when that is 0)
  int m = 0;
  int n = 0;
  int k = 0;
  int group = 128;  // resolved group size: 32, 64, 128 or k (one group)
  int count = 1;
  ActType act = ActType::kF16;
};

struct MarlinPlan {
  MarlinKernel kernel = MarlinKernel::kSimt;
  int splits = 1;               // K ranges computed by separate blocks
  int64_t workspace_floats = 0;  // splits * count * M * N when splits > 1
};

// nullptr when the arguments are valid, else a one-line reason.
const char* marlin_gemm_check(const MarlinGemmArgs& a);

// Kernel and split-K choice for these shapes on a device with `sm_count` multiprocessors. `want` forces a
// kernel (kAuto: CUDA cores for M <= 8, tensor cores above).
MarlinPlan marlin_gemm_plan(const MarlinGemmArgs& a, MarlinKernel want, int sm_count);

// Enqueue the GEMM on `stream`. The caller checked the arguments with marlin_gemm_check.
cudaError_t marlin_gemm_launch(const MarlinGemmArgs& a, const MarlinPlan& plan, cudaStream_t stream);

}  // namespace cuda
}  // namespace ktpack
