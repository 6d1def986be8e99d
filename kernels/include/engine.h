// The native CPU engine's shared vocabulary: a packed weight matrix as stored (WMat), quantized
// activations (QAct), and the kernel table each ISA translation unit fills (Kernels).
//
// Everything here is plain data: no code is compiled with ISA flags from this header, so any
// translation unit may include it (see kernels_isa.inc for why that matters).
#pragma once
#include <cstddef>
#include <cstdint>

namespace ktpack {

// Weight formats with native kernels. The ggml_* ones are `ggml_rows_v1` of that GGUF type; the
// amx_* ones are `amx_<kind>_v1` (layouts/SPEC.md).
enum class WType : int {
  ggml_q8_0 = 0,
  ggml_q4_k,
  ggml_q5_k,
  ggml_q6_k,
  ggml_bf16,
  ggml_f32,
  amx_int4,
  amx_int8,
  amx_bf16,
  ggml_q4_0,
  ggml_q4_1,
  ggml_q5_0,
  ggml_q5_1,
  lanes_q4_k,  // `ggml_lanes_v1` of Q4_K / Q6_K / Q8_0: the blocks of 16 rows side by side, one row per lane
  lanes_q6_k,
  lanes_q8_0,
  count
};

inline bool is_lanes_type(WType t) {
  return t == WType::lanes_q4_k || t == WType::lanes_q6_k || t == WType::lanes_q8_0;
}
// Bytes of one lane block (16 rows x one source block: 256 values, 32 for Q8_0).
inline int lanes_block_bytes(WType t) {
  return t == WType::lanes_q4_k ? 2368 : t == WType::lanes_q6_k ? 3360 : 544;
}

inline bool is_amx_type(WType t) { return t == WType::amx_int4 || t == WType::amx_int8 || t == WType::amx_bf16; }

// One N x K matrix in its packed layout, read where it lies (a memory-mapped shard).
struct WMat {
  WType type = WType::ggml_f32;
  const uint8_t* data = nullptr;
  int64_t n = 0, k = 0;
  int rows = 8;      // ggml_rows: rows interleaved per group (ggml_lanes: 16)
  int n_block = 4;   // amx: tiles per N-block
  int group = 128;   // amx_int4: values per scale group
};

// Values of one GGUF block / bytes of one block, for the ggml types.
int ggml_block_values(WType t);
int ggml_block_bytes(WType t);
// Rows a task must start at a multiple of (interleave group or N-block), and whether a format is
// integer (its activations are quantized), and the activation block (values per scale) it uses.
int64_t row_align(const WMat& w);
bool is_integer(WType t);
int act_block(const WMat& w);
// Bytes of one N x K matrix of this format (the stride between the matrices of a stack).
int64_t matrix_bytes(const WMat& w);

// Quantized activations: rows of `k` values (k is the row stride; a view may start inside a row, at a
// multiple of `block`, and the weights' own K says how many values a dot product reads), symmetric int8 in blocks of `block` values with one
// f32 scale each (d = amax / 127), plus the sum of every 16 codes (the offset corrections need them).
// Row r of the weights' view is row `idx ? idx[r] : r` of these arrays.
struct QAct {
  int64_t k = 0;
  int block = 32;
  const int8_t* q = nullptr;     // [rows][k]
  const float* d = nullptr;      // [rows][k / block]
  const int32_t* s16 = nullptr;  // [rows][k / 16]
  const float* x = nullptr;      // [rows][ldx] f32 values (float formats read these instead)
  int64_t ldx = 0;
  const int32_t* idx = nullptr;  // optional row indirection
  int m = 0;                     // rows used by this call
  int64_t row(int r) const { return idx ? idx[r] : r; }
};

// y[r * ldy + j] for j in [n0, n1) and r in [0, a.m): the dot products of the weight rows with the
// activation rows. n0 and n1 are multiples of row_align(w) (n1 may be w.n).
using GemmFn = void (*)(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy);
// Quantize one row of k values (k a multiple of block, block a multiple of 16).
using QuantFn = void (*)(const float* x, int64_t k, int block, int8_t* q, float* d, int32_t* s16);

// h = silu(g) * u, elementwise.
using SiluMulFn = void (*)(const float* g, const float* u, float* h, int64_t n);

// f32 dot product for the decode step's router (fixed summation order per ISA).
using DotFn = float (*)(const float* a, const float* b, int64_t n);
// y[i] += a * x[i] for i < n (the decode attention's combine of its chunks' partial sums).
using AxpyFn = void (*)(float a, const float* x, float* y, int64_t n);
// s[i] = exp(s[i] - shift) for i < n; returns the sum (softmax's denominator).
using ExpSumFn = float (*)(float* s, int64_t n, float shift);

// MLA decode attention over the latent cache, rows t0..t1-1 of it (c: [t][D], kr: [t][R]), all H heads:
//   scores: s[h * lds + t] = scale * (q[h * ldq + 0..D) · c[t] + qr[h * ldqr + 0..R) · kr[t])
//   values: out[h * D + d] += sum_t p[h * ldp + t] * c[t * D + d]
using AttnScoresFn = void (*)(const float* q, int64_t ldq, const float* qr, int64_t ldqr, int64_t H, const float* c,
                              int64_t D, const float* kr, int64_t R, int64_t t0, int64_t t1, float scale, float* s,
                              int64_t lds);
using AttnValuesFn = void (*)(const float* p, int64_t ldp, int64_t H, const float* c, int64_t D, int64_t t0,
                              int64_t t1, float* out);
// The same over an f16 cache (IEEE half bits; each value widened to f32 exactly, then the f32 arithmetic).
using AttnScores16Fn = void (*)(const float* q, int64_t ldq, const float* qr, int64_t ldqr, int64_t H,
                                const uint16_t* c, int64_t D, const uint16_t* kr, int64_t R, int64_t t0, int64_t t1,
                                float scale, float* s, int64_t lds);
using AttnValues16Fn = void (*)(const float* p, int64_t ldp, int64_t H, const uint16_t* c, int64_t D, int64_t t0,
                                int64_t t1, float* out);
// And over a bf16 cache (the values' bf16 bits), with q, qr and p rounded to bf16 (nearest even) first, so
// every product is exact in f32: the arithmetic of vdpbf16ps, which does twice the f32 FMA's products per
// instruction and reads half the f32 cache's bytes. Same function types as the f16 ones.

// A prefill's attention values for one head: out[t * ldo + i] = sum_j p[t * ldp + j] * v[j * ldv + i] for
// t < T, i < V, j < n (f32; the probabilities of T queries against n rows of that head's values).
using HeadValuesFn = void (*)(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, int64_t T, int64_t V,
                              float* out, int64_t ldo);

// Row n of a ggml_rows_v1 matrix as f32 (out[0, k)), the values gguf-py's dequantizer gives, bit for bit;
// false for a type it does not take (the lanes and amx layouts: no embedding is stored in them).
using DequantRowFn = bool (*)(const WMat& w, int64_t n, float* out);

// XOR of the 64-bit words of p[0, n) (n % 64 == 0): a read-only pass for measuring bandwidth.
using ReadFn = uint64_t (*)(const uint8_t* p, int64_t n);

struct Kernels {
  const char* name;
  ReadFn read;
  GemmFn gemm[static_cast<int>(WType::count)];
  QuantFn quantize;
  SiluMulFn silu_mul;
  DotFn dot;
  AxpyFn axpy;
  ExpSumFn exp_sum;
  AttnScoresFn attn_scores;
  AttnValuesFn attn_values;
  AttnScores16Fn attn_scores16;
  AttnValues16Fn attn_values16;
  AttnScores16Fn attn_scores_bf16;
  AttnValues16Fn attn_values_bf16;
  HeadValuesFn head_values;
  DequantRowFn dequant_row;
};

// Filled by each ISA translation unit (kernels_<isa>.cpp).
void fill_kernels_ref(Kernels* k);
void fill_kernels_avx2(Kernels* k);
void fill_kernels_avx512(Kernels* k);
void fill_kernels_amx(Kernels* k);

}  // namespace ktpack
