// Torch glue for the CUDA kernels: shape/dtype/device checks with messages, then the torch-free launchers.
//
//   torch.ops.ktpack_cuda.marlin_gemm(x, qweight, scales, group_size, kernel=0) -> y
//     2-D weight: qweight int32 [K/16, 2N], scales fp16 [K/g, N], x [..., K] -> y [..., N]
//     stacked:    qweight int32 [B, K/16, 2N], scales fp16 [B, K/g, N], x [T, B, K] -> y [T, B, N]
//     x fp16 or bf16 (y has its dtype); group_size -1 means one group over all of K; kernel 0 auto, 1 CUDA
//     cores, 2 tensor cores.
//   torch.ops.ktpack_cuda.doorbell_start(flags, layer) / doorbell_wait(flags): enqueue the two host nodes of
//     the expert doorbell (doorbell.h) on the current stream; flags is a pinned CPU int64 [8].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <vector>

#include "doorbell.h"
#include "marlin_gemm.h"

namespace {

using ktpack::cuda::ActType;
using ktpack::cuda::MarlinGemmArgs;
using ktpack::cuda::MarlinKernel;

at::Tensor marlin_gemm(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                       int64_t group_size, int64_t kernel) {
  TORCH_CHECK(x_in.is_cuda() && qweight.is_cuda() && scales.is_cuda(),
              "marlin_gemm: x, qweight and scales must be CUDA tensors");
  TORCH_CHECK(x_in.device() == qweight.device() && x_in.device() == scales.device(),
              "marlin_gemm: x, qweight and scales must be on the same device");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "marlin_gemm: x must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "marlin_gemm: qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "marlin_gemm: scales must be float16, got ", scales.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 || qweight.dim() == 3, "marlin_gemm: qweight must be [K/16, 2N] or [B, K/16, 2N]");
  TORCH_CHECK(scales.dim() == qweight.dim(), "marlin_gemm: scales must have the dims of qweight");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "marlin_gemm: qweight and scales must be contiguous");
  TORCH_CHECK(kernel >= 0 && kernel <= 2, "marlin_gemm: kernel must be 0 (auto), 1 (CUDA cores) or 2 (tensor cores)");

  const bool stacked = qweight.dim() == 3;
  const int64_t count = stacked ? qweight.size(0) : 1;
  const int64_t n = qweight.size(-1) / 2;
  const int64_t k = qweight.size(-2) * 16;
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) == k, "marlin_gemm: x has ", x_in.size(-1),
              " inputs but qweight holds K = ", k);
  const int64_t group = group_size == -1 ? k : group_size;
  TORCH_CHECK(group > 0 && k % group == 0, "marlin_gemm: group_size ", group_size, " does not divide K = ", k);
  TORCH_CHECK(scales.size(-2) == k / group && scales.size(-1) == n, "marlin_gemm: scales must be [", k / group, ", ",
              n, "] for K = ", k, ", N = ", n, " and group ", group, ", got ", scales.sizes());
  if (stacked) {
    TORCH_CHECK(scales.size(0) == count, "marlin_gemm: qweight and scales hold different matrix counts");
    TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == count, "marlin_gemm: a stack of ", count,
                " matrices needs x [T, ", count, ", K], got ", x_in.sizes());
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor y = at::empty(out_shape, x.options());
  const int64_t m = stacked ? x.size(0) : x.numel() / k;
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "marlin_gemm: shapes too large");

  MarlinGemmArgs a;
  a.x = x.data_ptr();
  a.x_stride_m = stacked ? count * k : k;
  a.x_stride_b = stacked ? k : 0;
  a.qweight = qweight.data_ptr<int32_t>();
  a.scales = scales.data_ptr();
  a.y = y.data_ptr();
  a.y_stride_m = stacked ? count * n : n;
  a.y_stride_b = stacked ? n : 0;
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.group = static_cast<int>(group);
  a.count = static_cast<int>(count);
  a.act = x.scalar_type() == at::kHalf ? ActType::kF16 : ActType::kBF16;
  if (const char* why = ktpack::cuda::marlin_gemm_check(a)) TORCH_CHECK(false, "marlin_gemm: ", why);
  if (m == 0) return y;

  int sm_count = 0;
  cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device());
  const auto plan = ktpack::cuda::marlin_gemm_plan(a, static_cast<MarlinKernel>(kernel), sm_count);
  at::Tensor workspace;
  if (plan.workspace_floats > 0) {
    workspace = at::empty({plan.workspace_floats}, x.options().dtype(at::kFloat));
    a.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t err = ktpack::cuda::marlin_gemm_launch(a, plan, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "marlin_gemm: launch failed: ", cudaGetErrorString(err));
  return y;
}

void check_flags(const at::Tensor& flags, const char* op) {
  TORCH_CHECK(flags.device().is_cpu() && flags.is_pinned(), op, ": flags must be a pinned CPU tensor");
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.numel() == ktpack::cuda::kDoorbellFlags &&
                  flags.is_contiguous(),
              op, ": flags must be a contiguous int64 tensor of ", ktpack::cuda::kDoorbellFlags, " elements");
}

void doorbell_start(const at::Tensor& flags, int64_t layer) {
  check_flags(flags, "doorbell_start");
  const cudaError_t err =
      ktpack::cuda::doorbell_enqueue_start(flags.data_ptr<int64_t>(), layer, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "doorbell_start: cudaLaunchHostFunc failed: ", cudaGetErrorString(err));
}

void doorbell_wait(const at::Tensor& flags) {
  check_flags(flags, "doorbell_wait");
  const cudaError_t err =
      ktpack::cuda::doorbell_enqueue_wait(flags.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "doorbell_wait: cudaLaunchHostFunc failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY(ktpack_cuda, m) {
  m.def("marlin_gemm(Tensor x, Tensor qweight, Tensor scales, int group_size, int kernel=0) -> Tensor");
  m.def("doorbell_start(Tensor(a!) flags, int layer) -> ()");
  m.def("doorbell_wait(Tensor(a!) flags) -> ()");
}

TORCH_LIBRARY_IMPL(ktpack_cuda, CUDA, m) { m.impl("marlin_gemm", &marlin_gemm); }

TORCH_LIBRARY_IMPL(ktpack_cuda, CPU, m) {
  m.impl("doorbell_start", &doorbell_start);
  m.impl("doorbell_wait", &doorbell_wait);
}
