// pybind11 glue for ktpack.kernels._native: argument checks and conversions only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "cpu_features.h"
#include "decode.h"
#include "ops.h"
#include "thread_pool.h"

namespace py = pybind11;
using ktpack::Isa;
using ktpack::WType;

namespace {

// In WType order.
const char* const kTypeNames[] = {"ggml_q8_0", "ggml_q4_k", "ggml_q5_k", "ggml_q6_k", "ggml_bf16", "ggml_f32", "amx_int4",
                                  "amx_int8",  "amx_bf16",  "ggml_q4_0", "ggml_q4_1", "ggml_q5_0", "ggml_q5_1",
                                  "lanes_q4_k", "lanes_q6_k", "lanes_q8_0"};
static_assert(sizeof(kTypeNames) / sizeof(kTypeNames[0]) == int(WType::count), "one name per WType");

WType parse_type(const std::string& s) {
  for (int i = 0; i < int(WType::count); ++i)
    if (s == kTypeNames[i]) return WType(i);
  throw py::value_error("unknown weight format '" + s + "'");
}

// A stack of matrices over a Python buffer (kept alive by the owner).
ktpack::WStack make_stack(const py::tuple& t, std::vector<py::object>* keep) {
  if (t.size() != 8) throw py::value_error("weight spec: (format, data, n, k, count, rows, n_block, group)");
  ktpack::WStack s;
  s.m.type = parse_type(t[0].cast<std::string>());
  py::buffer buf = t[1].cast<py::buffer>();
  py::buffer_info info = buf.request();
  if (info.itemsize != 1 || info.ndim != 1 || (info.strides.size() && info.strides[0] != 1))
    throw py::value_error("weight data must be a 1-D contiguous uint8 buffer");
  s.m.data = static_cast<const uint8_t*>(info.ptr);
  s.m.n = t[2].cast<int64_t>();
  s.m.k = t[3].cast<int64_t>();
  s.count = t[4].cast<int64_t>();
  s.m.rows = t[5].cast<int>();
  s.m.n_block = t[6].cast<int>();
  s.m.group = t[7].cast<int>();
  const bool amx = ktpack::is_amx_type(s.m.type);
  if (s.m.n <= 0 || s.m.k <= 0 || s.count <= 0) throw py::value_error("weight shape must be positive");
  if (!amx && (s.m.rows < 1 || s.m.k % ktpack::ggml_block_values(s.m.type)))
    throw py::value_error("ggml row length is not a whole number of blocks");
  if (ktpack::is_lanes_type(s.m.type) && (s.m.n % 16 || s.m.k % ktpack::ggml_block_values(s.m.type)))
    throw py::value_error("ggml_lanes shape is not whole lane blocks (N % 16, K % the block)");
  if (amx) {
    const int kb = s.m.type == WType::amx_bf16 ? 32 : (s.m.type == WType::amx_int8 ? 64 : 128);
    if (s.m.n % 16 || s.m.k % kb || s.m.n_block < 1) throw py::value_error("amx shape is not whole tiles");
    if (s.m.type == WType::amx_int4 && s.m.group != 32 && s.m.group != 64 && s.m.group != 128)
      throw py::value_error("amx_int4 group must be 32, 64 or 128");
  }
  s.stride = ktpack::matrix_bytes(s.m);
  if (info.size != s.stride * s.count)
    throw py::value_error("weight data holds " + std::to_string(info.size) + " bytes, " + std::to_string(s.count) +
                          " matrices of this format need " + std::to_string(s.stride * s.count));
  keep->push_back(buf);
  return s;
}

using F32 = py::array_t<float, py::array::c_style>;

float* f32_ptr(py::array& a, int64_t want, const char* what, bool writable) {
  if (!py::isinstance<F32>(a) || !(a.flags() & py::array::c_style) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::value_error(std::string(what) + " must be a C-contiguous float32 array");
  if (a.size() != want)
    throw py::value_error(std::string(what) + " has " + std::to_string(a.size()) + " values, expected " +
                          std::to_string(want));
  if (writable && !a.writeable()) throw py::value_error(std::string(what) + " is read-only");
  return static_cast<float*>(a.mutable_data());
}

struct PyLinear {
  std::vector<py::object> keep;
  ktpack::WStack w;
  std::unique_ptr<ktpack::LinearOp> op;
  explicit PyLinear(const py::tuple& spec) {
    w = make_stack(spec, &keep);
    op = std::make_unique<ktpack::LinearOp>(w);
  }
  py::array_t<float> row(int64_t n) {  // row n of a ggml_rows_v1 matrix, dequantized natively (tests)
    if (w.count != 1 || n < 0 || n >= w.m.n) throw py::index_error("row outside the matrix");
    py::array_t<float> out(w.m.k);
    if (!ktpack::kernels().dequant_row(w.m, n, out.mutable_data()))
      throw py::value_error("this weight format has no native row dequantizer");
    return out;
  }
  void forward(py::array x, py::array y) {
    const int64_t per = w.count * w.m.k;
    if (x.size() % per) throw py::value_error("input size is not a multiple of count * K");
    const int64_t T = x.size() / per;
    float* xp = f32_ptr(x, T * per, "x", false);
    float* yp = f32_ptr(y, T * w.count * w.m.n, "out", true);
    py::gil_scoped_release nogil;
    op->forward(xp, T, yp);
  }
};

struct PyExperts {
  std::vector<py::object> keep;
  std::unique_ptr<ktpack::ExpertsOp> op;
  int64_t hidden;
  PyExperts(const py::list& slices, int64_t n_experts, int64_t hidden_, int64_t inter) : hidden(hidden_) {
    std::vector<ktpack::ExpertSliceW> s;
    for (const auto& item : slices) {
      py::tuple t = item.cast<py::tuple>();
      if (t.size() != 6) throw py::value_error("slice: (gate, up, down, lo, hi, node)");
      ktpack::ExpertSliceW e;
      e.gate = make_stack(t[0].cast<py::tuple>(), &keep);
      e.up = make_stack(t[1].cast<py::tuple>(), &keep);
      e.down = make_stack(t[2].cast<py::tuple>(), &keep);
      e.lo = t[3].cast<int64_t>();
      e.hi = t[4].cast<int64_t>();
      e.node = t[5].cast<int>();
      s.push_back(e);
    }
    try {
      op = std::make_unique<ktpack::ExpertsOp>(std::move(s), n_experts, hidden, inter);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }
  void forward(py::array x, py::array_t<int64_t, py::array::c_style> idx, py::array w, py::array out) {
    if (x.size() % hidden) throw py::value_error("x size is not a multiple of hidden");
    const int64_t T = x.size() / hidden;
    if (T == 0) return;
    if (idx.size() % T) throw py::value_error("expert indices do not match the token count");
    const int64_t k = idx.size() / T;
    const float* xp = f32_ptr(x, T * hidden, "x", false);
    const float* wp = f32_ptr(w, T * k, "weights", false);
    float* op_ = f32_ptr(out, T * hidden, "out", true);
    const int64_t* ip = idx.data();
    py::gil_scoped_release nogil;
    op->forward(xp, T, ip, wp, k, op_);
  }
};

// The whole decode step (decode.h) over Linear / Experts objects the runtime already built.
struct PyDecode {
  std::vector<py::object> keep;
  std::unique_ptr<ktpack::DecodeStep> op;
  int64_t hidden = 0, vocab = 0, topk = 0;

  const float* farr(const py::object& o, int64_t want, const std::string& what, bool writable = false) {
    if (o.is_none()) return nullptr;
    py::array a = o.cast<py::array>();
    float* p = f32_ptr(a, want, what.c_str(), writable);
    keep.push_back(a);
    return p;
  }
  // a writable C-contiguous array of 16-bit values (float16, or a bf16 cache's bits as int16 / uint16)
  void* half_ptr(py::array a, int64_t want, const char* what) {
    if (!(a.flags() & py::array::c_style) || a.itemsize() != 2)
      throw py::value_error(std::string(what) + " must be a C-contiguous 16-bit (or float32) array");
    if (a.size() != want)
      throw py::value_error(std::string(what) + " has " + std::to_string(a.size()) + " values, expected " +
                            std::to_string(want));
    if (!a.writeable()) throw py::value_error(std::string(what) + " is read-only");
    keep.push_back(a);
    return a.mutable_data();
  }
  ktpack::LinearOp* lin(const py::object& o) {
    if (o.is_none()) return nullptr;
    keep.push_back(o);
    return o.cast<PyLinear&>().op.get();
  }
  ktpack::ExpertsOp* exps(const py::object& o) {
    if (o.is_none()) return nullptr;
    keep.push_back(o);
    return o.cast<PyExperts&>().op.get();
  }

  PyDecode(const py::dict& cfg, const py::list& layers, const py::object& out_norm, const py::object& head,
           const py::object& c_kv, const py::object& k_pe, const py::object& cos, const py::object& sin) {
    ktpack::DecodeConfig c;
    auto gi = [&](const char* k) { return cfg[k].cast<int64_t>(); };
    c.layers = gi("layers"), c.hidden = gi("hidden"), c.heads = gi("heads"), c.q_lora = gi("q_lora");
    c.kv_lora = gi("kv_lora"), c.nope = gi("nope"), c.rope = gi("rope"), c.vdim = gi("vdim"), c.vocab = gi("vocab");
    c.ctx = gi("ctx"), c.n_experts = gi("n_experts"), c.topk = gi("topk"), c.n_group = gi("n_group");
    c.topk_group = gi("topk_group"), c.scoring = int(gi("scoring")), c.method = int(gi("method"));
    c.norm_topk = cfg["norm_topk"].cast<bool>();
    c.eps = cfg["eps"].cast<float>(), c.attn_scale = cfg["attn_scale"].cast<float>();
    c.routed_scale = cfg["routed_scale"].cast<float>();
    hidden = c.hidden, vocab = c.vocab, topk = c.topk;
    std::vector<ktpack::DecodeLayer> ls;
    for (const auto& item : layers) {
      py::dict d = item.cast<py::dict>();
      ktpack::DecodeLayer l;
      l.attn_norm = farr(d["attn_norm"], c.hidden, "attn_norm");
      l.ffn_norm = farr(d["ffn_norm"], c.hidden, "ffn_norm");
      l.q_a_norm = farr(d["q_a_norm"], c.q_lora, "q_a_norm");
      l.kv_a_norm = farr(d["kv_a_norm"], c.kv_lora, "kv_a_norm");
      l.q_a = lin(d["q_a"]), l.q_b = lin(d["q_b"]), l.kv_a = lin(d["kv_a"]);
      l.k_b = lin(d["k_b"]), l.v_b = lin(d["v_b"]), l.o = lin(d["o"]);
      l.mlp = exps(d["mlp"]);
      l.router_w = farr(d["router_w"], c.n_experts * c.hidden, "router weight");
      l.router_b = farr(d["router_b"], c.n_experts, "router bias");
      l.experts = exps(d["experts"]);
      l.shared = exps(d["shared"]);
      ls.push_back(l);
    }
    const float* on = farr(out_norm, c.hidden, "output_norm");
    // the cache: float32 arrays, float16 ones (an f16 cache), or a bf16 cache's bits (cfg "kv_cache": "bf16")
    py::array ca = c_kv.cast<py::array>(), ka = k_pe.cast<py::array>();
    const std::string kvs = cfg.contains("kv_cache") ? cfg["kv_cache"].cast<std::string>() : "f32";
    ktpack::KvType kv;
    if (kvs == "f32")
      kv = ktpack::KvType::f32;
    else if (kvs == "f16")
      kv = ktpack::KvType::f16;
    else if (kvs == "bf16")
      kv = ktpack::KvType::bf16;
    else
      throw py::value_error("kv_cache must be f32, f16 or bf16, got " + kvs);
    if ((kv == ktpack::KvType::f32) != (ca.itemsize() == 4) || ka.itemsize() != ca.itemsize())
      throw py::value_error("the cache arrays' element size does not match kv_cache " + kvs);
    void *ck, *kp;
    if (kv != ktpack::KvType::f32) {
      ck = half_ptr(ca, c.layers * c.ctx * c.kv_lora, "c_kv cache");
      kp = half_ptr(ka, c.layers * c.ctx * c.rope, "k_pe cache");
    } else {
      ck = const_cast<float*>(farr(c_kv, c.layers * c.ctx * c.kv_lora, "c_kv cache", true));
      kp = const_cast<float*>(farr(k_pe, c.layers * c.ctx * c.rope, "k_pe cache", true));
    }
    const float* cs = farr(cos, c.ctx * (c.rope / 2), "rope cos");
    const float* sn = farr(sin, c.ctx * (c.rope / 2), "rope sin");
    try {
      op = std::make_unique<ktpack::DecodeStep>(c, std::move(ls), on, lin(head), ck, kp, kv, cs, sn);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }
  void forward(py::array x, int64_t pos, py::array logits) {
    const float* xp = f32_ptr(x, hidden, "x", false);
    float* lp = f32_ptr(logits, vocab, "logits", true);
    py::gil_scoped_release nogil;
    op->forward(xp, pos, lp);
  }
  bool set_embedding(const py::object& embed) {
    ktpack::LinearOp* e = lin(embed);  // kept alive with the step
    return e && op->set_embedding(e);
  }
  void forward_token(int64_t tok, int64_t pos, py::array logits) {
    float* lp = f32_ptr(logits, vocab, "logits", true);
    py::gil_scoped_release nogil;
    op->forward_token(tok, pos, lp);
  }
  // forward_token, then the index of the largest logit (the first one on ties; NaN counts as largest, as
  // torch.argmax): greedy decoding with no tensor work between steps.
  int64_t greedy_token(int64_t tok, int64_t pos, py::array logits) {
    float* lp = f32_ptr(logits, vocab, "logits", true);
    py::gil_scoped_release nogil;
    op->forward_token(tok, pos, lp);
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i) {
      if (lp[best] != lp[best]) break;  // NaN already chosen
      if (lp[i] > lp[best] || lp[i] != lp[i]) best = i;
    }
    return best;
  }
  py::dict profile(bool reset) {
    int64_t ns[ktpack::DecodeStep::kPhases], steps = 0;
    op->profile(ns, &steps);
    py::dict d;
    d["steps"] = steps;
    for (int p = 0; p < ktpack::DecodeStep::kPhases; ++p) d[ktpack::DecodeStep::phase_name(p)] = ns[p] * 1e-9;
    if (reset) op->reset_profile();
    return d;
  }
  py::tuple route(int64_t layer, py::array f) {
    const float* fp = f32_ptr(f, hidden, "f", false);
    py::array_t<int64_t> idx(topk);
    py::array_t<float> w(topk);
    op->route(layer, fp, idx.mutable_data(), w.mutable_data());
    return py::make_tuple(idx, w);
  }
};

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "ktpack native CPU engine";
  m.def("cpu_features", [] {
    const auto& f = ktpack::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["amx_tile"] = f.amx_tile;
    d["amx_int8"] = f.amx_int8;
    d["amx_bf16"] = f.amx_bf16;
    d["os_avx"] = f.os_avx;
    d["os_avx512"] = f.os_avx512;
    d["os_amx"] = f.os_amx;
    d["amx_permitted"] = f.amx_permitted;
    d["amx_why"] = f.amx_why;
    return d;
  });
  m.def("isa_supported", [](const std::string& name) {
    for (Isa isa : {Isa::ref, Isa::avx2, Isa::avx512, Isa::amx}) {
      if (name == ktpack::isa_name(isa)) {
        std::string why;
        bool ok = ktpack::isa_supported(isa, &why);
        return py::make_tuple(ok, why);
      }
    }
    throw py::value_error("unknown ISA '" + name + "' (ref, avx2, avx512, amx)");
  });
  m.def(
      "select_isa",
      [](const std::string& name) {
        for (Isa isa : {Isa::ref, Isa::avx2, Isa::avx512, Isa::amx}) {
          if (name != ktpack::isa_name(isa)) continue;
          std::string why;
          if (!ktpack::isa_supported(isa, &why)) throw py::value_error("ISA " + name + " cannot run here: " + why);
          ktpack::select_isa(name.c_str());
          return;
        }
        throw py::value_error("unknown ISA '" + name + "'");
      },
      "Use this ISA's kernels from now on (checked against the CPU first).");
  m.def("selected_isa", [] { return std::string(ktpack::kernels().name); });
  m.def(
      "prefill_probs",
      [](py::array q, py::array qr, py::array c, py::array kr, float scale, int64_t heads, int64_t pos0, py::array s) {
        // q [M][D], qr [M][R] f32; c [n][D], kr [n][R] bf16 bits (int16/uint16); s [M][n] f32, written:
        // row m (head m % heads of the token at position pos0 + m / heads) as its causal softmax, the
        // probabilities over cache rows 0..pos0 + m / heads, 0 after them.
        if (q.ndim() != 2 || qr.ndim() != 2 || c.ndim() != 2 || kr.ndim() != 2 || s.ndim() != 2)
          throw py::value_error("prefill_probs: 2-d arrays expected");
        const int64_t M = q.shape(0), D = q.shape(1), R = qr.shape(1), n = c.shape(0);
        if (qr.shape(0) != M || c.shape(1) != D || kr.shape(0) != n || kr.shape(1) != R || s.shape(0) != M ||
            s.shape(1) != n)
          throw py::value_error("prefill_probs: inconsistent shapes");
        if (c.itemsize() != 2 || kr.itemsize() != 2 || !(c.flags() & py::array::c_style) ||
            !(kr.flags() & py::array::c_style))
          throw py::value_error("prefill_probs: the cache rows must be C-contiguous bf16 bits");
        if (heads < 1 || M % heads) throw py::value_error("prefill_probs: the rows are not whole tokens of heads");
        if (pos0 < 0) throw py::value_error("prefill_probs: negative position");
        const float* qp = f32_ptr(q, M * D, "q", false);
        const float* qrp = f32_ptr(qr, M * R, "qr", false);
        float* sp = f32_ptr(s, M * n, "s", true);
        const auto* cp = static_cast<const uint16_t*>(c.data());
        const auto* kp = static_cast<const uint16_t*>(kr.data());
        py::gil_scoped_release nogil;
        ktpack::prefill_probs_bf16(qp, qrp, M, heads, D, R, cp, kp, n, pos0, scale, sp);
      },
      py::arg("q"), py::arg("qr"), py::arg("c"), py::arg("kr"), py::arg("scale"), py::arg("heads"), py::arg("pos0"),
      py::arg("s"));
  m.def(
      "prefill_values",
      [](py::array p, py::array v, py::array out) {
        // p [T][H][n], v [n][H][V], out [T][H][V] f32 (written): out[t][h] = sum_j p[t][h][j] v[j][h].
        if (p.ndim() != 3 || v.ndim() != 3 || out.ndim() != 3)
          throw py::value_error("prefill_values: 3-d arrays expected");
        const int64_t T = p.shape(0), H = p.shape(1), n = p.shape(2), V = v.shape(2);
        if (v.shape(0) != n || v.shape(1) != H || out.shape(0) != T || out.shape(1) != H || out.shape(2) != V)
          throw py::value_error("prefill_values: inconsistent shapes");
        const float* pp = f32_ptr(p, T * H * n, "p", false);
        const float* vp = f32_ptr(v, n * H * V, "v", false);
        float* op = f32_ptr(out, T * H * V, "out", true);
        py::gil_scoped_release nogil;
        ktpack::prefill_values(pp, T, H, n, vp, V, op);
      },
      py::arg("p"), py::arg("v"), py::arg("out"));
  m.def(
      "attention",
      [](const std::string& kv, py::array q, py::array qr, py::array c, py::array kr, float scale, int64_t t0,
         int64_t t1, py::array p) {
        // The decode attention kernels alone (tests): q [H][D], qr [H][R] f32; the cache rows c [n][D],
        // kr [n][R] (f32, or 16-bit values: f16, or bf16 bits); p [H][n] f32 weights. Returns the scores
        // s [H][n] of rows t0..t1-1 (others 0) and the latent sums out [H][D] = sum_{t0<=t<t1} p[h][t] c[t].
        const ktpack::Kernels& k = ktpack::kernels();
        if (q.ndim() != 2 || qr.ndim() != 2 || c.ndim() != 2 || kr.ndim() != 2 || p.ndim() != 2)
          throw py::value_error("attention: 2-d arrays expected");
        const int64_t H = q.shape(0), D = q.shape(1), R = qr.shape(1), n = c.shape(0);
        if (qr.shape(0) != H || c.shape(1) != D || kr.shape(0) != n || kr.shape(1) != R || p.shape(0) != H ||
            p.shape(1) != n || t0 < 0 || t1 > n || t0 > t1)
          throw py::value_error("attention: inconsistent shapes or rows");
        const float* qp = f32_ptr(q, H * D, "q", false);
        const float* qrp = f32_ptr(qr, H * R, "qr", false);
        const float* pp = f32_ptr(p, H * n, "p", false);
        py::array_t<float> s({H, n}), out({H, D});
        std::fill(s.mutable_data(), s.mutable_data() + H * n, 0.f);
        std::fill(out.mutable_data(), out.mutable_data() + H * D, 0.f);
        if (kv == "f32") {
          const float* cp = f32_ptr(c, n * D, "c", false);
          const float* kp = f32_ptr(kr, n * R, "kr", false);
          k.attn_scores(qp, D, qrp, R, H, cp, D, kp, R, t0, t1, scale, s.mutable_data(), n);
          k.attn_values(pp, n, H, cp, D, t0, t1, out.mutable_data());
        } else if (kv == "f16" || kv == "bf16") {
          if (c.itemsize() != 2 || kr.itemsize() != 2 || !(c.flags() & py::array::c_style) ||
              !(kr.flags() & py::array::c_style))
            throw py::value_error("attention: a 16-bit cache takes C-contiguous 16-bit arrays");
          const auto* cp = static_cast<const uint16_t*>(c.data());
          const auto* kp = static_cast<const uint16_t*>(kr.data());
          auto sc = kv == "f16" ? k.attn_scores16 : k.attn_scores_bf16;
          auto va = kv == "f16" ? k.attn_values16 : k.attn_values_bf16;
          sc(qp, D, qrp, R, H, cp, D, kp, R, t0, t1, scale, s.mutable_data(), n);
          va(pp, n, H, cp, D, t0, t1, out.mutable_data());
        } else {
          throw py::value_error("attention: kv must be f32, f16 or bf16");
        }
        return py::make_tuple(s, out);
      },
      py::arg("kv"), py::arg("q"), py::arg("qr"), py::arg("c"), py::arg("kr"), py::arg("scale"), py::arg("t0"),
      py::arg("t1"), py::arg("p"));
  m.def(
      "set_threads", [](int threads, int nodes) { ktpack::set_pool(threads, nodes); }, py::arg("threads") = 0,
      py::arg("nodes") = 1, "Recreate the thread pool (threads <= 0: KTPACK_THREADS or the usable cores).");
  m.def(
      "set_spin_us", [](int us) { ktpack::pool().set_spin_us(us); }, py::arg("us"),
      "How long the pool's idle threads spin before they sleep, in microseconds (KTPACK_SPIN_US at start).");
  m.def("spin_us", [] { return ktpack::pool().spin_us(); });
  m.def("threads", [] { return ktpack::pool().threads(); });
  m.def("machine_nodes", &ktpack::machine_nodes, "NUMA nodes of this machine (1 when unknown).");
  m.def(
      "bind_to_node",
      [](py::buffer b, int node) {
        py::buffer_info info = b.request();
        return ktpack::bind_to_node(info.ptr, size_t(info.size * info.itemsize), node);
      },
      "Prefer NUMA node `node` for a buffer's pages (no-op on one node); returns 0 or errno.");
  m.def(
      "quantize",
      [](py::array x, int block) {
        if (x.ndim() != 2) throw py::value_error("x must be 2-D");
        const int64_t rows = x.shape(0), k = x.shape(1);
        if (block < 16 || block % 16 || k % block) throw py::value_error("block must be a multiple of 16 dividing K");
        const float* xp = f32_ptr(x, rows * k, "x", false);
        py::array_t<int8_t> q({rows, k});
        py::array_t<float> d({rows, k / block});
        py::array_t<int32_t> s({rows, k / 16});
        const auto& kt = ktpack::kernels();
        for (int64_t r = 0; r < rows; ++r)
          kt.quantize(xp + r * k, k, block, q.mutable_data() + r * k, d.mutable_data() + r * (k / block),
                      s.mutable_data() + r * (k / 16));
        return py::make_tuple(q, d, s);
      },
      "Quantize rows of activations as the integer kernels do: (codes, scales, sums of 16).");
  m.def(
      "read_all",
      [](py::buffer b) {
        py::buffer_info info = b.request();
        if (info.itemsize != 1 || info.ndim != 1 || info.size % 64)
          throw py::value_error("read_all takes a 1-D uint8 buffer whose size is a multiple of 64");
        const auto* p = static_cast<const uint8_t*>(info.ptr);
        const int64_t n = info.size;
        py::gil_scoped_release nogil;
        return ktpack::read_all(p, n);
      },
      "Read a buffer once with every pool thread (a read-bandwidth probe); returns a checksum.");
  m.def("act_block", [](const std::string& type, int group) {
    ktpack::WMat w;
    w.type = parse_type(type);
    w.group = group;
    return ktpack::act_block(w);
  });
  py::class_<PyLinear>(m, "Linear")
      .def(py::init<py::tuple>(), py::arg("spec"))
      .def("forward", &PyLinear::forward, py::arg("x"), py::arg("out"))
      .def("row", &PyLinear::row, py::arg("n"), "Row n dequantized natively (ggml_rows_v1 formats).");
  py::class_<PyExperts>(m, "Experts")
      .def(py::init<py::list, int64_t, int64_t, int64_t>(), py::arg("slices"), py::arg("n_experts"),
           py::arg("hidden"), py::arg("inter"))
      .def("forward", &PyExperts::forward, py::arg("x"), py::arg("idx"), py::arg("weights"), py::arg("out"));
  py::class_<PyDecode>(m, "Decode")
      .def(py::init<py::dict, py::list, py::object, py::object, py::object, py::object, py::object, py::object>(),
           py::arg("config"), py::arg("layers"), py::arg("output_norm"), py::arg("head"), py::arg("c_kv"),
           py::arg("k_pe"), py::arg("cos"), py::arg("sin"))
      .def("forward", &PyDecode::forward, py::arg("x"), py::arg("pos"), py::arg("logits"))
      .def("set_embedding", &PyDecode::set_embedding, py::arg("embed"),
           "Use this Linear's rows as the token embedding of forward_token; False where its format cannot.")
      .def("forward_token", &PyDecode::forward_token, py::arg("token"), py::arg("pos"), py::arg("logits"))
      .def("greedy_token", &PyDecode::greedy_token, py::arg("token"), py::arg("pos"), py::arg("logits"),
           "forward_token, then the argmax of the logits (first on ties).")
      .def("route", &PyDecode::route, py::arg("layer"), py::arg("f"))
      .def("profile", &PyDecode::profile, py::arg("reset") = false,
           "Seconds spent per phase since the last reset, and the number of steps.");
}
