// The native decode step (decode.h). Compiled without ISA flags: vector work goes through the kernel
// table (dot, axpy, the weight formats' GEMMs); what is left here is O(hidden) scalar glue.
#include "decode.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace ktpack {

namespace {

void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
  float ss = 0.f;
  for (; i < n; ++i) ss += x[i] * x[i];
  for (float a : acc) ss += a;
  const float r = 1.f / std::sqrt(ss / float(n) + eps);
  for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (x[j] * r);
}

// Rotate adjacent pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given (n = rope dim).
void rope_pairs(float* x, const float* cos, const float* sin, int64_t n) {
  for (int64_t i = 0; i < n / 2; ++i) {
    const float x1 = x[2 * i], x2 = x[2 * i + 1];
    x[2 * i] = x1 * cos[i] - x2 * sin[i];
    x[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
  }
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Adds the time since the last mark to a phase.
struct Clock {
  int64_t* acc;
  int64_t t = now_ns();
  void to(int phase) {
    const int64_t n = now_ns();
    acc[phase] += n - t;
    t = n;
  }
};

}  // namespace

const char* DecodeStep::phase_name(int p) {
  static const char* const names[kPhases] = {"norms+glue", "attn projections", "attn core", "router",
                                             "routed experts", "shared/dense mlp", "head"};
  return p >= 0 && p < kPhases ? names[p] : "?";
}

void DecodeStep::profile(int64_t* ns, int64_t* steps) const {
  std::copy(prof_, prof_ + kPhases, ns);
  *steps = steps_;
}

void DecodeStep::reset_profile() {
  std::fill(prof_, prof_ + kPhases, 0);
  steps_ = 0;
}

DecodeStep::DecodeStep(const DecodeConfig& cfg, std::vector<DecodeLayer> layers, const float* out_norm, LinearOp* head,
                       void* c_kv, void* k_pe, KvType kv, const float* cos, const float* sin)
    : c_(cfg), L_(std::move(layers)), out_norm_(out_norm), head_(head), kvt_(kv), cos_(cos), sin_(sin) {
  if (kv == KvType::f16 && !__builtin_cpu_supports("f16c"))
    throw std::invalid_argument("decode: an f16 KV cache needs F16C");
  if (kv != KvType::f32) {
    c16_ = static_cast<uint16_t*>(c_kv), k16_ = static_cast<uint16_t*>(k_pe);
  } else {
    c_kv_ = static_cast<float*>(c_kv), k_pe_ = static_cast<float*>(k_pe);
  }
  if (int64_t(L_.size()) != c_.layers) throw std::invalid_argument("decode: one DecodeLayer per layer");
  if (c_.rope % 2 || c_.ctx < 1 || !head_ || !out_norm_ || !c_kv || !k_pe || !cos_ || !sin_)
    throw std::invalid_argument("decode: incomplete configuration");
  for (const DecodeLayer& l : L_) {
    if (!l.attn_norm || !l.ffn_norm || !l.kv_a_norm || !l.q_b || !l.kv_a || !l.k_b || !l.v_b || !l.o ||
        (c_.q_lora && (!l.q_a || !l.q_a_norm)))
      throw std::invalid_argument("decode: a layer's attention is incomplete");
    if (!l.mlp && (!l.experts || !l.router_w)) throw std::invalid_argument("decode: a layer has no FFN");
  }
  const int64_t H = c_.heads, qk = c_.nope + c_.rope;
  x_.resize(size_t(c_.hidden));
  a_.resize(size_t(c_.hidden));
  qa_.resize(size_t(std::max<int64_t>(c_.q_lora, 1)));
  q_.resize(size_t(H * qk));
  kv_.resize(size_t(c_.kv_lora + c_.rope));
  crow_.resize(size_t(c_.kv_lora + c_.rope));
  qnope_.resize(size_t(H * c_.nope));
  qabs_.resize(size_t(H * c_.kv_lora));
  s_.resize(size_t(H * c_.ctx));
  lat_.resize(size_t(H * c_.kv_lora));
  part_.resize(size_t(2 * pool().threads() * H * c_.kv_lora));
  cmax_.resize(size_t(2 * pool().threads() * H));
  csum_.resize(size_t(2 * pool().threads() * H));
  o_.resize(size_t(H * c_.vdim));
  attn_.resize(size_t(c_.hidden));
  f_.resize(size_t(c_.hidden));
  ffn_.resize(size_t(c_.hidden));
  sh_.resize(size_t(c_.hidden));
  rs_.resize(size_t(std::max<int64_t>(c_.n_experts, 1)));
  ch_.resize(size_t(std::max<int64_t>(c_.n_experts, 1)));
  idx_.resize(size_t(std::max<int64_t>(c_.topk, 1)));
  w_.resize(size_t(std::max<int64_t>(c_.topk, 1)));
}

// f32 -> IEEE half, round to nearest even (F16C; the step is only built with an f16 cache where the CPU has it)
__attribute__((target("avx,f16c"))) static void to_f16(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

// f32 -> bf16, round to nearest even (torch's .to(bfloat16) for finite values)
static void to_bf16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    y[i] = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

void DecodeStep::attention(int64_t l, int64_t pos) {
  const DecodeLayer& ly = L_[size_t(l)];
  const int64_t H = c_.heads, D = c_.kv_lora, R = c_.rope, qk = c_.nope + c_.rope;
  Clock clk{prof_};
  rms_norm(x_.data(), ly.attn_norm, a_.data(), c_.hidden, c_.eps);
  clk.to(kNorms);
  if (ly.q_a) {
    ly.q_a->forward(a_.data(), 1, qa_.data());
    rms_norm(qa_.data(), ly.q_a_norm, qa_.data(), c_.q_lora, c_.eps);
    ly.q_b->forward(qa_.data(), 1, q_.data());
  } else {
    ly.q_b->forward(a_.data(), 1, q_.data());
  }
  ly.kv_a->forward(a_.data(), 1, kv_.data());
  clk.to(kAttnProj);
  const float* cs = cos_ + pos * (R / 2);
  const float* sn = sin_ + pos * (R / 2);
  const bool f16 = kvt_ == KvType::f16, half = kvt_ != KvType::f32;
  float* cache_c = half ? nullptr : c_kv_ + (l * c_.ctx) * D;
  float* cache_k = half ? nullptr : k_pe_ + (l * c_.ctx) * R;
  const uint16_t* cache_c16 = half ? c16_ + (l * c_.ctx) * D : nullptr;
  const uint16_t* cache_k16 = half ? k16_ + (l * c_.ctx) * R : nullptr;
  // the new row [c | k_pe]: in the f32 cache itself, or in crow_ and then rounded into the 16-bit cache
  float* cn = half ? crow_.data() : cache_c + pos * D;
  float* kp = half ? crow_.data() + D : cache_k + pos * R;
  rms_norm(kv_.data(), ly.kv_a_norm, cn, D, c_.eps);
  std::copy(kv_.data() + D, kv_.data() + D + R, kp);
  rope_pairs(kp, cs, sn, R);
  if (f16) {
    to_f16(cn, c16_ + (l * c_.ctx + pos) * D, D);
    to_f16(kp, k16_ + (l * c_.ctx + pos) * R, R);
  } else if (half) {
    to_bf16(cn, c16_ + (l * c_.ctx + pos) * D, D);
    to_bf16(kp, k16_ + (l * c_.ctx + pos) * R, R);
  }
  for (int64_t h = 0; h < H; ++h) {
    float* q = q_.data() + h * qk;
    rope_pairs(q + c_.nope, cs, sn, R);
    std::copy(q, q + c_.nope, qnope_.data() + h * c_.nope);
  }
  clk.to(kNorms);
  ly.k_b->forward(qnope_.data(), 1, qabs_.data());  // [H][kv_lora]
  clk.to(kAttnProj);

  // Scores, softmax and the latent sum in tasks of (head group, chunk of cache rows), each task walking its
  // rows in blocks of 128 (flash-decoding): the block's scores, the running softmax (max m, sum of exps l;
  // the sum so far rescaled by e^(m_old - m_new) when the max grows) and the latent sum, while the block's
  // rows are in L2. Head groups first: a task of whole rows needs no combine. Only where there are fewer
  // head groups than threads are the rows cut into chunks too, whose partial sums then combine
  // as lat = sum_j e^(m_j - M) part_j / sum_j e^(m_j - M) l_j, M = max_j m_j.
  const int64_t n = pos + 1;
  const Kernels& kt = kernels();
  const float scale = c_.attn_scale;
  ThreadPool& pl = pool();
  const int64_t T = pl.threads();
  const bool par = T > 1 && n * H * (D + R) >= (int64_t(1) << 15);
  // head groups of >= 8 heads (smaller ones would re-read each row for too little work). Measured, 2 threads,
  // ~600 positions, bf16 cache: R1's 128 heads in 2 groups instead of 4 chunks 2.75 -> 2.35 ms per token
  // (4 layers); the bench model's 16 heads in 2 groups (6 layers): bf16 ~0.05 ms faster, f16 even, f32 ~0.1
  // ms slower (one in-process A/B each).
  const int64_t G = par ? std::max<int64_t>(1, std::min<int64_t>(T, H / 8)) : 1;
  // chunks per group (<= 2 * threads: the partial buffers' count), at least 16 rows each
  const int64_t want = par && G < T ? (2 * T + G - 1) / G : 1;
  const int64_t rows_per = std::max<int64_t>(16, (n + want - 1) / want);
  const int64_t nch = (n + rows_per - 1) / rows_per;
  auto task = [&](int64_t i, int) {
    const int64_t g = i % G, j = i / G;
    const int64_t h0 = g * H / G, hn = (g + 1) * H / G - h0;
    const int64_t t0 = j * rows_per, t1 = std::min(n, t0 + rows_per);
    float* acc = (nch == 1 ? lat_.data() : part_.data() + j * H * D) + h0 * D;
    float* m = cmax_.data() + j * H + h0;
    float* l = csum_.data() + j * H + h0;
    std::fill(acc, acc + hn * D, 0.f);
    std::fill(m, m + hn, -std::numeric_limits<float>::infinity());
    std::fill(l, l + hn, 0.f);
    const float* qa = qabs_.data() + h0 * D;
    const float* qr = q_.data() + h0 * qk + c_.nope;
    float* s = s_.data() + h0 * c_.ctx;
    for (int64_t tb = t0; tb < t1; tb += 128) {
      const int64_t te = std::min(t1, tb + 128);
      if (f16)
        kt.attn_scores16(qa, D, qr, qk, hn, cache_c16, D, cache_k16, R, tb, te, scale, s, c_.ctx);
      else if (half)
        kt.attn_scores_bf16(qa, D, qr, qk, hn, cache_c16, D, cache_k16, R, tb, te, scale, s, c_.ctx);
      else
        kt.attn_scores(qa, D, qr, qk, hn, cache_c, D, cache_k, R, tb, te, scale, s, c_.ctx);
      for (int64_t h = 0; h < hn; ++h) {
        float* sh = s + h * c_.ctx + tb;
        const float mx = std::max(m[h], *std::max_element(sh, sh + (te - tb)));
        if (mx > m[h] && l[h] > 0.f) {  // a larger max: rescale what is summed so far
          const float f = std::exp(m[h] - mx);
          l[h] *= f;
          for (float *a = acc + h * D, *e = a + D; a < e; ++a) *a *= f;
        }
        m[h] = mx;
        l[h] += kt.exp_sum(sh, te - tb, mx);
      }
      if (f16)
        kt.attn_values16(s, c_.ctx, hn, cache_c16, D, tb, te, acc);
      else if (half)
        kt.attn_values_bf16(s, c_.ctx, hn, cache_c16, D, tb, te, acc);
      else
        kt.attn_values(s, c_.ctx, hn, cache_c, D, tb, te, acc);
    }
    if (nch == 1)
      for (int64_t h = 0; h < hn; ++h) {
        const float inv = 1.f / l[h];
        for (float *a = acc + h * D, *e = a + D; a < e; ++a) *a *= inv;
      }
  };
  if (G * nch > 1)
    pl.run(G * nch, task);
  else
    task(0, 0);
  if (nch > 1) {  // the combine, in tasks over heads (each head's partial sums were written by several threads)
    const int64_t hp = std::min<int64_t>(H, T);
    pl.run(hp, [&](int64_t i, int) {
      for (int64_t h = i * H / hp; h < (i + 1) * H / hp; ++h) {
        float M = cmax_[size_t(h)];
        for (int64_t j = 1; j < nch; ++j) M = std::max(M, cmax_[size_t(j * H + h)]);
        float L = 0.f;
        for (int64_t j = 0; j < nch; ++j) L += std::exp(cmax_[size_t(j * H + h)] - M) * csum_[size_t(j * H + h)];
        float* out = lat_.data() + h * D;
        std::fill(out, out + D, 0.f);
        for (int64_t j = 0; j < nch; ++j)
          kt.axpy(std::exp(cmax_[size_t(j * H + h)] - M) / L, part_.data() + (j * H + h) * D, out, D);
      }
    });
  }
  clk.to(kAttnCore);
  ly.v_b->forward(lat_.data(), 1, o_.data());  // [H][vdim]
  ly.o->forward(o_.data(), 1, attn_.data());
  clk.to(kAttnProj);
  for (int64_t i = 0; i < c_.hidden; ++i) x_[size_t(i)] += attn_[size_t(i)];
  clk.to(kNorms);
}

void DecodeStep::route(int64_t layer, const float* f, int64_t* idx, float* w) {
  const DecodeLayer& ly = L_[size_t(layer)];
  const int64_t E = c_.n_experts, Hd = c_.hidden, K = c_.topk;
  if (!ly.router_w) throw std::invalid_argument("decode: layer has no router");
  const Kernels& kt = kernels();
  float* z = rs_.data();
  if (E * Hd < (int64_t(1) << 16)) {
    for (int64_t e = 0; e < E; ++e) z[e] = kt.dot(ly.router_w + e * Hd, f, Hd);
  } else {  // one contiguous range of the [E][hidden] weight per thread (one stream each, as the linears)
    const int64_t parts = std::min<int64_t>(E, pool().threads());
    pool().run(parts, [&](int64_t i, int) {
      for (int64_t e = i * E / parts; e < (i + 1) * E / parts; ++e) z[e] = kt.dot(ly.router_w + e * Hd, f, Hd);
    });
  }
  if (c_.scoring == 0) {
    for (int64_t e = 0; e < E; ++e) z[e] = 1.f / (1.f + std::exp(-z[e]));
  } else {
    float mx = *std::max_element(z, z + E), sum = 0.f;
    for (int64_t e = 0; e < E; ++e) sum += (z[e] = std::exp(z[e] - mx));
    for (int64_t e = 0; e < E; ++e) z[e] /= sum;
  }
  float* ch = ch_.data();
  for (int64_t e = 0; e < E; ++e) ch[e] = z[e] + (ly.router_b ? ly.router_b[e] : 0.f);
  const float ninf = -std::numeric_limits<float>::infinity();
  if (c_.method != 2 && c_.n_group > 1 && c_.topk_group < c_.n_group) {
    const int64_t G = c_.n_group, per = E / G;
    float gs[64];
    bool keep[64];
    if (G > 64) throw std::invalid_argument("decode: more than 64 expert groups");
    for (int64_t g = 0; g < G; ++g) {
      float b1 = ninf, b2 = ninf;
      for (int64_t j = 0; j < per; ++j) {
        const float v = ch[g * per + j];
        if (v > b1) b2 = b1, b1 = v;
        else if (v > b2) b2 = v;
      }
      gs[g] = c_.method == 0 ? b1 + b2 : b1;
      keep[g] = false;
    }
    for (int64_t k = 0; k < c_.topk_group; ++k) {
      int64_t best = -1;
      for (int64_t g = 0; g < G; ++g)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = true;
    }
    for (int64_t g = 0; g < G; ++g)
      if (!keep[g]) std::fill(ch + g * per, ch + (g + 1) * per, ninf);
  }
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) {  // the k best, best first; ties to the lower expert id
    int64_t best = 0;
    for (int64_t e = 1; e < E; ++e)
      if (ch[e] > ch[best]) best = e;
    idx[k] = best;
    w[k] = z[best];
    ch[best] = ninf;
    sum += w[k];
  }
  for (int64_t k = 0; k < K; ++k) {
    if (c_.norm_topk) w[k] = w[k] / (sum + 1e-20f);
    w[k] *= c_.routed_scale;
  }
}

bool DecodeStep::set_embedding(LinearOp* embed) {
  const WMat& m = embed->weights().m;
  if (embed->weights().count != 1 || m.k != c_.hidden || m.n < 1) return false;
  std::vector<float> probe(size_t(m.k));
  if (!kernels().dequant_row(m, 0, probe.data())) return false;
  embed_ = embed;
  emb_.resize(size_t(m.k));
  return true;
}

void DecodeStep::forward_token(int64_t tok, int64_t pos, float* logits) {
  if (!embed_) throw std::logic_error("decode: no embedding set");
  const WMat& m = embed_->weights().m;
  if (tok < 0 || tok >= m.n)
    throw std::out_of_range("token id " + std::to_string(tok) + " outside the vocabulary (0.." +
                            std::to_string(m.n - 1) + ")");
  kernels().dequant_row(m, tok, emb_.data());
  forward(emb_.data(), pos, logits);
}

void DecodeStep::forward(const float* x, int64_t pos, float* logits) {
  if (pos < 0 || pos >= c_.ctx) throw std::out_of_range("decode: position outside the cache");
  std::copy(x, x + c_.hidden, x_.data());
  const int64_t zero = 0;
  const float one = 1.f;
  for (int64_t l = 0; l < c_.layers; ++l) {
    const DecodeLayer& ly = L_[size_t(l)];
    attention(l, pos);
    Clock clk{prof_};
    rms_norm(x_.data(), ly.ffn_norm, f_.data(), c_.hidden, c_.eps);
    clk.to(kNorms);
    if (ly.mlp) {
      ly.mlp->forward(f_.data(), 1, &zero, &one, 1, ffn_.data());
      clk.to(kShared);
    } else {
      route(l, f_.data(), idx_.data(), w_.data());
      clk.to(kRouter);
      ly.experts->forward(f_.data(), 1, idx_.data(), w_.data(), c_.topk, ffn_.data());
      clk.to(kExperts);
      if (ly.shared) {
        ly.shared->forward(f_.data(), 1, &zero, &one, 1, sh_.data());
        for (int64_t i = 0; i < c_.hidden; ++i) ffn_[size_t(i)] += sh_[size_t(i)];
        clk.to(kShared);
      }
    }
    for (int64_t i = 0; i < c_.hidden; ++i) x_[size_t(i)] += ffn_[size_t(i)];
    clk.to(kNorms);
  }
  Clock clk{prof_};
  rms_norm(x_.data(), out_norm_, a_.data(), c_.hidden, c_.eps);
  head_->forward(a_.data(), 1, logits);
  clk.to(kHead);
  ++steps_;
}

}  // namespace ktpack
