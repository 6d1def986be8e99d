// The engine's two operations over packed weights, parallelized on the thread pool:
// a (possibly stacked) quantized linear, and one layer's routed experts (all NUMA slices).
#pragma once
#include <cstdint>
#include <vector>

#include "engine.h"

namespace ktpack {

// The kernel table in use (chosen by select_isa; "ref" until then).
const Kernels& kernels();
// Select by name: "ref", "avx2", "avx512", "amx". The caller has checked the CPU supports it.
bool select_isa(const char* name);

// Read n bytes (n % 64 == 0) with all pool threads, each a contiguous share; returns a checksum so
// the reads cannot be optimized away.
uint64_t read_all(const uint8_t* p, int64_t n);

// Prefill attention probabilities over a bf16 latent cache, the decode kernels' arithmetic for the scores
// (q rounded to bf16, f32 sums) for M query heads at once (a block of tokens x heads; MLA's heads share the
// cache rows), in parallel over the heads: the score of row m and cache row t is
// scale * (q[m] · c[t] + qr[m] · kr[t]). Row m is head m % H of token m / H at position pos0 + m / H
// (positions ascend by one), which sees the cache rows 0..pos0 + m / H: only those scores are computed,
// and s[m * n + t] is the row's softmax probability there, 0 at every hidden t < n (what a -inf mask and a
// softmax give, in one pass over the row).
void prefill_probs_bf16(const float* q, const float* qr, int64_t M, int64_t H, int64_t D, int64_t R, const uint16_t* c,
                        const uint16_t* kr, int64_t n, int64_t pos0, float scale, float* s);

// Prefill attention values of a block of T queries over n rows: out[t][h][:] = sum_j p[t][h][j] v[j][h][:]
// (p [T][H][n], v [n][H][V], out [T][H][V], f32), heads split over the pool.
void prefill_values(const float* p, int64_t T, int64_t H, int64_t n, const float* v, int64_t V, float* out);

// A stack of `count` matrices of one format, `stride` bytes apart.
struct WStack {
  WMat m;  // matrix 0
  int64_t count = 1;
  int64_t stride = 0;
  WMat at(int64_t i) const {
    WMat w = m;
    w.data = m.data + i * stride;
    return w;
  }
};

// Per-call scratch, reused across calls (no allocation once warm).
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s16;
  // Quantize `rows` rows of `k` values (row stride ldx) for activation block `block`, in parallel.
  QAct quantize(const float* x, int64_t ldx, int64_t rows, int64_t k, int block, bool integer);
};

class LinearOp {
 public:
  explicit LinearOp(const WStack& w) : w_(w) {}
  // x [T, count, K] -> y [T, count, N] (count = 1: a plain linear).
  void forward(const float* x, int64_t T, float* y);
  const WStack& weights() const { return w_; }

 private:
  WStack w_;
  ActBuf act_;
  std::vector<int32_t> idx_;
};

struct ExpertSliceW {
  WStack gate, up, down;  // gate/up [E][I_s][H], down [E][H][I_s]
  int64_t lo = 0, hi = 0;  // the slice's columns of the intermediate dimension
  int node = 0;
};

class ExpertsOp {
 public:
  ExpertsOp(std::vector<ExpertSliceW> slices, int64_t n_experts, int64_t hidden, int64_t inter);
  // out[T, H] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]).
  void forward(const float* x, int64_t T, const int64_t* idx, const float* wts, int64_t k, float* out);

 private:
  std::vector<ExpertSliceW> slices_;
  int64_t n_experts_, hidden_, inter_;
  ActBuf xact_, hact_;
  std::vector<float> g_, u_, y_;
  std::vector<int32_t> pair_tok_, pair_of_;  // pair -> token; (t, j) -> pair
  std::vector<int64_t> e_off_, e_cnt_;
  std::vector<std::vector<float>> tmp_;  // per thread
};

}  // namespace ktpack
