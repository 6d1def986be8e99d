// The whole DeepSeek-V3 decode step in the native engine: one call per token, no Python between layers.
//
// The runtime's torch model (runtime/model.py) is the definition; this is the same arithmetic for one
// token, over the same weight operations (the LinearOp / ExpertsOp objects the torch model calls) and
// the same KV cache memory, so prefill can stay in torch and decode continues from its cache:
//
//   per layer:  a = RMSNorm(x);  q = q_b(RMSNorm(q_a a)) (or attn_q a);  [c | k_pe] = kv_a a
//               c = RMSNorm(c);  RoPE(q_pe, k_pe) at pos (adjacent pairs);  cache[pos] = (c, k_pe)
//               q_abs[h] = k_b[h] q_nope[h];  s[h,t] = (q_abs[h]·c_t + q_pe[h]·k_pe_t) * scale, t <= pos
//               p = softmax_t(s);  lat[h] = sum_t p[h,t] c_t;  o[h] = v_b[h] lat[h];  x += o_proj(o)
//               f = RMSNorm(x);  x += dense MLP(f)  |  routed(f; router(f)) + shared(f)
//   logits = head(RMSNorm(x))
//
// Buffers are allocated once (the constructor); a step allocates nothing.
#pragma once
#include <cstdint>
#include <vector>

#include "ops.h"

namespace ktpack {

struct DecodeConfig {
  int64_t layers = 0, hidden = 0, heads = 0, q_lora = 0, kv_lora = 0, nope = 0, rope = 0, vdim = 0, vocab = 0;
  int64_t ctx = 0;  // cache positions
  float eps = 1e-6f, attn_scale = 1.f;
  // router
  int64_t n_experts = 0, topk = 0, n_group = 1, topk_group = 1;
  int scoring = 0;  // 0 sigmoid, 1 softmax
  int method = 0;   // 0 noaux_tc (group score = sum of top 2), 1 group_limited_greedy (max), 2 plain top-k
  bool norm_topk = true;
  float routed_scale = 1.f;
};

struct DecodeLayer {
  const float* attn_norm = nullptr;
  const float* ffn_norm = nullptr;
  const float* q_a_norm = nullptr;  // null without q_lora
  const float* kv_a_norm = nullptr;
  LinearOp* q_a = nullptr;  // null without q_lora (q_b is then attn_q)
  LinearOp* q_b = nullptr;
  LinearOp* kv_a = nullptr;
  LinearOp* k_b = nullptr;  // stack [H][kv_lora][nope]
  LinearOp* v_b = nullptr;  // stack [H][vdim][kv_lora]
  LinearOp* o = nullptr;
  ExpertsOp* mlp = nullptr;  // dense FFN (one expert at weight 1), or null for a MoE layer
  const float* router_w = nullptr;  // [n_experts][hidden] f32
  const float* router_b = nullptr;  // [n_experts] or null
  ExpertsOp* experts = nullptr;
  ExpertsOp* shared = nullptr;  // or null
};

enum class KvType { f32, f16, bf16 };

class DecodeStep {
 public:
  // c_kv [layers][ctx][kv_lora] and k_pe [layers][ctx][rope] are the runtime's cache (written here), of
  // element type `kv`: f32, IEEE half (f16; needs F16C) or bf16, rows written rounded to nearest even as
  // torch's .to(float16 / bfloat16); cos/sin [ctx][rope/2] the RoPE table (attention factor included).
  DecodeStep(const DecodeConfig& cfg, std::vector<DecodeLayer> layers, const float* out_norm, LinearOp* head,
             void* c_kv, void* k_pe, KvType kv, const float* cos, const float* sin);
  // x: the token's embedding [hidden] (not modified); logits: [vocab].
  void forward(const float* x, int64_t pos, float* logits);
  // The same step from a token id: its row of `embed` (a ggml_rows_v1 matrix [vocab][hidden], set with
  // set_embedding) dequantized here, so no interpreter work sits between two steps.
  void forward_token(int64_t tok, int64_t pos, float* logits);
  // false (and nothing set) when the matrix's type has no native row dequantizer.
  bool set_embedding(LinearOp* embed);
  // The router alone (for tests): idx [topk], w [topk] for hidden state f [hidden] of `layer`.
  void route(int64_t layer, const float* f, int64_t* idx, float* w);

  // Where the steps' time went since the last reset (nanoseconds per phase, and the step count): the
  // profile table benchmarks print. Timing costs two clock reads per phase per layer.
  enum Phase { kNorms, kAttnProj, kAttnCore, kRouter, kExperts, kShared, kHead, kPhases };
  static const char* phase_name(int p);
  void profile(int64_t* ns, int64_t* steps) const;
  void reset_profile();

 private:
  void attention(int64_t l, int64_t pos);
  DecodeConfig c_;
  std::vector<DecodeLayer> L_;
  const float* out_norm_;
  LinearOp* head_;
  LinearOp* embed_ = nullptr;
  std::vector<float> emb_;
  KvType kvt_;
  float *c_kv_ = nullptr, *k_pe_ = nullptr;  // an f32 cache
  uint16_t *c16_ = nullptr, *k16_ = nullptr;  // or an f16 / bf16 one
  std::vector<float> crow_;                   // the new cache row in f32 before it is rounded to f16 / bf16
  const float *cos_, *sin_;
  // buffers
  std::vector<float> part_;  // per-chunk partial latent sums [2 * threads][H][kv_lora]
  std::vector<float> cmax_, csum_;  // per-chunk softmax max and sum of exps [2 * threads][H]
  std::vector<float> x_, a_, qa_, q_, kv_, qnope_, qabs_, s_, lat_, o_, attn_, f_, ffn_, sh_, rs_, ch_;
  std::vector<int64_t> idx_;
  std::vector<float> w_;
  int64_t prof_[kPhases] = {};
  int64_t steps_ = 0;
};

}  // namespace ktpack
