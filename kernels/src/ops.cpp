// Linear and routed-expert operations on the thread pool. Compiled without ISA flags: all SIMD
// work goes through the selected kernel table.
#include "ops.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace ktpack {

// ---- format facts ----

int ggml_block_values(WType t) {
  switch (t) {
    case WType::ggml_q8_0:
    case WType::ggml_q4_0:
    case WType::ggml_q4_1:
    case WType::ggml_q5_0:
    case WType::ggml_q5_1:
    case WType::lanes_q8_0: return 32;
    case WType::ggml_q4_k:
    case WType::ggml_q5_k:
    case WType::ggml_q6_k:
    case WType::lanes_q4_k:
    case WType::lanes_q6_k: return 256;
    default: return 1;
  }
}

int ggml_block_bytes(WType t) {
  switch (t) {
    case WType::ggml_q8_0: return 34;
    case WType::ggml_q4_k: return 144;
    case WType::ggml_q5_k: return 176;
    case WType::ggml_q6_k: return 210;
    case WType::ggml_bf16: return 2;
    case WType::ggml_f32: return 4;
    case WType::ggml_q4_0: return 18;
    case WType::ggml_q4_1: return 20;
    case WType::ggml_q5_0: return 22;
    case WType::ggml_q5_1: return 24;
    default: return 0;
  }
}

static bool is_amx(WType t) { return is_amx_type(t); }

int64_t row_align(const WMat& w) {
  return is_amx(w.type) ? int64_t(w.n_block) * 16 : (is_lanes_type(w.type) ? 16 : w.rows);
}

bool is_integer(WType t) { return t != WType::ggml_bf16 && t != WType::ggml_f32 && t != WType::amx_bf16; }

int act_block(const WMat& w) {
  if (w.type == WType::amx_int4) return w.group;
  if (w.type == WType::amx_int8) return 64;
  const int block = ggml_block_values(w.type);  // ggml and lanes quant types: one scale per source block
  return block > 1 ? block : 16;
}

int64_t matrix_bytes(const WMat& w) {
  if (is_lanes_type(w.type)) return (w.n / 16) * (w.k / ggml_block_values(w.type)) * lanes_block_bytes(w.type);
  if (!is_amx(w.type)) return w.n * (w.k / ggml_block_values(w.type)) * ggml_block_bytes(w.type);
  const int64_t kb = w.type == WType::amx_bf16 ? 32 : (w.type == WType::amx_int8 ? 64 : 128);
  const int64_t weight = (w.n / 16) * (w.k / kb) * 1024;
  const int64_t scale = w.type == WType::amx_bf16 ? 0 : (w.type == WType::amx_int8 ? 4 * w.n : 4 * w.n * (w.k / w.group));
  return weight + (scale + 63) / 64 * 64;
}

// ---- kernel tables ----

namespace {
struct Tables {
  Kernels ref{}, avx2{}, avx512{}, amx{};
  const Kernels* cur = nullptr;
  Tables() {
    fill_kernels_ref(&ref);
    fill_kernels_avx2(&avx2);
    fill_kernels_avx512(&avx512);
    fill_kernels_amx(&amx);
    cur = &ref;
  }
};
Tables& tables() {
  static Tables t;
  return t;
}
}  // namespace

const Kernels& kernels() { return *tables().cur; }

bool select_isa(const char* name) {
  Tables& t = tables();
  for (const Kernels* k : {&t.ref, &t.avx2, &t.avx512, &t.amx})
    if (std::strcmp(k->name, name) == 0) {
      t.cur = k;
      return true;
    }
  return false;
}

uint64_t read_all(const uint8_t* p, int64_t n) {
  ThreadPool& pl = pool();
  const int64_t parts = pl.threads();
  const int64_t per = (n / parts) / 64 * 64;
  std::vector<uint64_t> sums(size_t(parts), 0);
  const ReadFn rd = kernels().read;
  pl.run(parts, [&](int64_t t, int) {
    const int64_t lo = t * per, hi = t == parts - 1 ? n : lo + per;
    sums[size_t(t)] = rd(p + lo, hi - lo);
  });
  uint64_t x = 0;
  for (uint64_t s : sums) x ^= s;
  return x;
}

void prefill_probs_bf16(const float* q, const float* qr, int64_t M, int64_t H, int64_t D, int64_t R, const uint16_t* c,
                        const uint16_t* kr, int64_t n, int64_t pos0, float scale, float* s) {
  ThreadPool& p = pool();
  const Kernels& kt = kernels();
  // query-head rows in ranges of multiples of 4 (the score kernels' register block), two per thread
  const int64_t units = (M + 3) / 4, tasks = std::max<int64_t>(1, std::min<int64_t>(units, 2 * p.threads()));
  auto body = [&](int64_t i, int) {
    const int64_t h0 = std::min(M, i * units / tasks * 4), h1 = std::min(M, (i + 1) * units / tasks * 4);
    for (int64_t t = h0 / H; t * H < h1; ++t) {  // the rows of query token t (position pos0 + t) in h0..h1
      const int64_t r0 = std::max(h0, t * H), r1 = std::min(h1, (t + 1) * H);
      const int64_t lim = std::min(n, std::max<int64_t>(0, pos0 + t + 1));  // keys 0..pos0+t are visible
      if (lim > 0)
        kt.attn_scores_bf16(q + r0 * D, D, qr + r0 * R, R, r1 - r0, c, D, kr, R, 0, lim, scale, s + r0 * n, n);
      for (int64_t r = r0; r < r1; ++r) {
        float* row = s + r * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < lim; ++j) mx = std::max(mx, row[j]);
        const float inv = lim > 0 ? 1.f / kt.exp_sum(row, lim, mx) : 0.f;
        for (int64_t j = 0; j < lim; ++j) row[j] *= inv;
        std::fill(row + lim, row + n, 0.f);
      }
    }
  };
  if (tasks == 1)
    body(0, 0);
  else
    p.run(tasks, body);
}

void prefill_values(const float* p, int64_t T, int64_t H, int64_t n, const float* v, int64_t V, float* out) {
  ThreadPool& pl = pool();
  const Kernels& kt = kernels();
  // Head h's value rows lie H * V floats apart (64 KiB on R1's 128 heads: a page per row); the kernel walks
  // them once per pair of queries, so they are first copied together (n x V, in L2) per head.
  thread_local std::vector<float> rows;
  auto body = [&](int64_t h, int) {
    rows.resize(size_t(n * V));
    for (int64_t j = 0; j < n; ++j) std::memcpy(rows.data() + j * V, v + j * H * V + h * V, size_t(V) * sizeof(float));
    kt.head_values(p + h * n, H * n, rows.data(), V, n, T, V, out + h * V, H * V);
  };
  if (T * H * n * V < (int64_t(1) << 18)) {
    for (int64_t h = 0; h < H; ++h) body(h, 0);
  } else {
    pl.run(H, body);
  }
}

// ---- activations ----

QAct ActBuf::quantize(const float* x, int64_t ldx, int64_t rows, int64_t k, int block, bool integer) {
  QAct a;
  a.k = k;
  a.block = block;
  a.x = x;
  a.ldx = ldx;
  a.m = int(rows);
  if (!integer) return a;
  if (k % block || block % 16) throw std::invalid_argument("activation row of " + std::to_string(k) +
                                                           " values is not a multiple of the block " + std::to_string(block));
  q.resize(size_t(rows * k));
  d.resize(size_t(rows * (k / block)));
  s16.resize(size_t(rows * (k / 16)));
  const Kernels& kt = kernels();
  const int64_t per = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(k, 1));  // ~64K values a task
  const int64_t tasks = (rows + per - 1) / per;
  auto body = [&](int64_t t, int) {
    for (int64_t r = t * per; r < std::min(rows, (t + 1) * per); ++r)
      kt.quantize(x + r * ldx, k, block, q.data() + r * k, d.data() + r * (k / block), s16.data() + r * (k / 16));
  };
  if (tasks == 1) body(0, 0);
  else pool().run(tasks, body);
  a.q = q.data();
  a.d = d.data();
  a.s16 = s16.data();
  return a;
}

// Row chunks of [0, n) aligned to `align`, about `want` of them.
static int64_t chunk_rows(int64_t n, int64_t align, int64_t want) {
  const int64_t units = (n + align - 1) / align;
  const int64_t per = std::max<int64_t>(1, (units + want - 1) / want);
  return per * align;
}

// ---- linear ----

void LinearOp::forward(const float* x, int64_t T, float* y) {
  const WMat& m = w_.m;
  const int64_t C = w_.count, K = m.k, N = m.n;
  const QAct a = act_.quantize(x, K, T * C, K, act_block(m), is_integer(m.type));
  idx_.resize(size_t(C * T));
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < T; ++t) idx_[c * T + t] = int32_t(t * C + c);
  ThreadPool& p = pool();
  const GemmFn gemm = kernels().gemm[int(m.type)];
  // Tasks are contiguous ranges of the C matrices' row groups (the matrices lie one after another), so a
  // task streams one range of bytes. One token (decode): one task per thread, one prefetch stream each
  // (+5-6% of the read bandwidth on 0.6-5 MB Q4_K matrices against 4 interleaved chunks per thread); more
  // tokens: 4 per thread, for balance. Below ~256 KiB of weights x tokens the wake-up of the other threads
  // costs more than it saves: one task on the caller.
  const int64_t al = row_align(m), per_mat = (N + al - 1) / al, units = C * per_mat;
  const int64_t tasks =
      w_.stride * C * T < (int64_t(1) << 18) ? 1 : std::min<int64_t>(units, p.threads() * (T == 1 ? 1 : 4));
  auto task_fn = [&](int64_t i, int) {
    for (int64_t u = i * units / tasks, u1 = (i + 1) * units / tasks; u < u1;) {
      const int64_t c = u / per_mat, j0 = u % per_mat, j1 = std::min(per_mat, j0 + (u1 - u));
      QAct ac = a;
      ac.idx = idx_.data() + c * T;
      ac.m = int(T);
      gemm(w_.at(c), ac, j0 * al, std::min(N, j1 * al), y + c * N, C * N);
      u += j1 - j0;
    }
  };
  if (tasks == 1) task_fn(0, 0);
  else p.run(tasks, task_fn);
}

// ---- routed experts ----

ExpertsOp::ExpertsOp(std::vector<ExpertSliceW> slices, int64_t n_experts, int64_t hidden, int64_t inter)
    : slices_(std::move(slices)), n_experts_(n_experts), hidden_(hidden), inter_(inter) {
  if (slices_.empty()) throw std::invalid_argument("experts: no slices");
  for (const auto& s : slices_) {
    const int64_t w = s.hi - s.lo;
    if (s.gate.m.n != w || s.up.m.n != w || s.gate.m.k != hidden || s.up.m.k != hidden || s.down.m.n != hidden ||
        s.down.m.k != w || s.lo < 0 || s.hi > inter)
      throw std::invalid_argument("experts: slice shapes do not match hidden/intermediate sizes");
    if (s.gate.count != n_experts || s.up.count != n_experts || s.down.count != n_experts)
      throw std::invalid_argument("experts: slice has the wrong number of experts");
    if (s.gate.m.type != s.up.m.type || act_block(s.gate.m) != act_block(s.up.m))
      throw std::invalid_argument("experts: gate and up must share one format");
    if (s.down.m.type != slices_[0].down.m.type || s.gate.m.type != slices_[0].gate.m.type)
      throw std::invalid_argument("experts: all slices must share formats");
    if (is_integer(s.down.m.type) && s.lo % act_block(s.down.m))
      throw std::invalid_argument("experts: slice start is not a multiple of down's activation block");
  }
}

void ExpertsOp::forward(const float* x, int64_t T, const int64_t* idx, const float* wts, int64_t k, float* out) {
  const int64_t H = hidden_, I = inter_, E = n_experts_, P = T * k;
  ThreadPool& p = pool();
  // 1. group the (token, slot) pairs by expert, experts ascending, tokens ascending within one
  e_cnt_.assign(size_t(E), 0);
  e_off_.assign(size_t(E) + 1, 0);
  for (int64_t i = 0; i < P; ++i) {
    const int64_t e = idx[i];
    if (e < 0 || e >= E) throw std::out_of_range("expert index " + std::to_string(e) + " outside 0.." + std::to_string(E - 1));
    ++e_cnt_[e];
  }
  for (int64_t e = 0; e < E; ++e) e_off_[e + 1] = e_off_[e] + e_cnt_[e];
  pair_tok_.resize(size_t(P));
  pair_of_.resize(size_t(P));
  {
    std::vector<int64_t>& fill = e_cnt_;  // reuse as a cursor: counts are rebuilt below
    std::vector<int64_t> cur(e_off_.begin(), e_off_.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = idx[t * k + j];
        const int64_t pr = cur[e]++;
        pair_tok_[pr] = int32_t(t);
        pair_of_[t * k + j] = int32_t(pr);
      }
    for (int64_t e = 0; e < E; ++e) fill[e] = e_off_[e + 1] - e_off_[e];
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (e_cnt_[e]) active.push_back(e);

  const WMat& gm = slices_[0].gate.m;
  const WMat& dm = slices_[0].down.m;
  const int64_t per_thread = T == 1 ? 1 : 4;  // row chunks per thread: one contiguous stream when decoding
  const Kernels& kt = kernels();
  const QAct xa = xact_.quantize(x, H, T, H, act_block(gm), is_integer(gm.type));
  g_.resize(size_t(P * I));
  u_.resize(size_t(P * I));
  y_.resize(size_t(P * H));
  if (int(tmp_.size()) < p.threads()) tmp_.resize(size_t(p.threads()));

  // 2. gate/up -> h = silu(g) * u, tasks (slice, expert, row chunk), slices grouped by NUMA node
  struct TaskA {
    int32_t s;
    int64_t e, n0, n1;
  };
  std::vector<TaskA> ta;
  std::vector<int64_t> node_end(size_t(p.nodes()), 0);
  {
    const int64_t want = std::max<int64_t>(1, (per_thread * p.threads() + int64_t(active.size()) - 1) / int64_t(active.size()));
    std::vector<int32_t> order(slices_.size());
    for (size_t s = 0; s < order.size(); ++s) order[s] = int32_t(s);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return slices_[a].node < slices_[b].node; });
    for (int32_t s : order) {
      const int64_t w = slices_[s].hi - slices_[s].lo;
      const int64_t rows = chunk_rows(w, row_align(gm), want);
      for (int64_t e : active)
        for (int64_t n0 = 0; n0 < w; n0 += rows) ta.push_back({s, e, n0, std::min(w, n0 + rows)});
      const int nd = std::min(std::max(slices_[s].node, 0), p.nodes() - 1);
      for (int j = nd; j < p.nodes(); ++j) node_end[j] = int64_t(ta.size());
    }
  }
  p.run(
      int64_t(ta.size()),
      [&](int64_t i, int) {
        const TaskA& t = ta[size_t(i)];
        const ExpertSliceW& s = slices_[size_t(t.s)];
        QAct a = xa;
        a.idx = pair_tok_.data() + e_off_[t.e];
        a.m = int(e_cnt_[t.e]);
        float* g = g_.data() + e_off_[t.e] * I + s.lo;
        float* u = u_.data() + e_off_[t.e] * I + s.lo;
        kt.gemm[int(gm.type)](s.gate.at(t.e), a, t.n0, t.n1, g, I);
        kt.gemm[int(gm.type)](s.up.at(t.e), a, t.n0, t.n1, u, I);
        for (int r = 0; r < a.m; ++r) kt.silu_mul(g + r * I + t.n0, u + r * I + t.n0, g + r * I + t.n0, t.n1 - t.n0);
      },
      node_end.data());

  // 3. down: activations quantized once per (token, expert); tasks (expert, row chunk), the slices'
  //    partial products summed in slice order
  const QAct ha = hact_.quantize(g_.data(), I, P, I, act_block(dm), is_integer(dm.type));
  struct TaskB {
    int64_t e, n0, n1;
  };
  std::vector<TaskB> tb;
  {
    const int64_t want = std::max<int64_t>(1, (per_thread * p.threads() + int64_t(active.size()) - 1) / int64_t(active.size()));
    const int64_t rows = chunk_rows(H, row_align(dm), want);
    for (int64_t e : active)
      for (int64_t n0 = 0; n0 < H; n0 += rows) tb.push_back({e, n0, std::min(H, n0 + rows)});
  }
  p.run(int64_t(tb.size()), [&](int64_t i, int thread) {
    const TaskB& t = tb[size_t(i)];
    const int64_t cnt = e_cnt_[t.e], off = e_off_[t.e], w = t.n1 - t.n0;
    for (size_t si = 0; si < slices_.size(); ++si) {
      const ExpertSliceW& s = slices_[si];
      QAct a = ha;
      a.idx = nullptr;
      a.m = int(cnt);
      if (a.q) {
        a.q += off * I + s.lo;
        a.d += off * (I / a.block) + s.lo / a.block;
        a.s16 += off * (I / 16) + s.lo / 16;
      }
      a.x += off * I + s.lo;
      if (si == 0) {
        kt.gemm[int(dm.type)](s.down.at(t.e), a, t.n0, t.n1, y_.data() + off * H, H);
      } else {
        std::vector<float>& tmp = tmp_[size_t(thread)];
        tmp.resize(size_t(cnt * w));
        // the kernel writes y[r * ldy + n] for n in [n0, n1): point it so that lands in tmp[r * w + n - n0]
        kt.gemm[int(dm.type)](s.down.at(t.e), a, t.n0, t.n1, tmp.data() - t.n0, w);
        for (int64_t r = 0; r < cnt; ++r) {
          float* dst = y_.data() + (off + r) * H + t.n0;
          const float* src = tmp.data() + r * w;
          kt.axpy(1.f, src, dst, w);
        }
      }
    }
  });

  // 4. out[t] = sum_j w[t, j] * y[pair(t, j)], slots in order
  auto combine = [&](int64_t t, int) {
    float* o = out + t * H;
    std::memset(o, 0, size_t(H) * sizeof(float));
    for (int64_t j = 0; j < k; ++j) {
      const float wj = wts[t * k + j];
      const float* src = y_.data() + int64_t(pair_of_[t * k + j]) * H;
      kt.axpy(wj, src, o, H);  // the ISA's kernel: this file is built for baseline x86-64 (SSE2)
    }
  };
  if (T == 1) combine(0, 0);
  else p.run(T, combine);
}

}  // namespace ktpack
