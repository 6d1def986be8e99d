// AVX-512 (F, BW, VL, VNNI, BF16) kernels over the packed layouts as stored.
//
// Compiled with exactly these ISA flags (CMakeLists.txt) and used only when CPUID and XCR0 say the
// CPU and OS run them. Integer formats: weight codes x int8 activation codes in integers
// (maddubs/madd for the ggml K-quants, VNNI dpbusd for the amx tile layouts), one f32 FMA per scale
// block. Float formats: F32 weights FMA'd with the f32 activations (exact products); BF16 weights with
// vdpbf16ps against the activations rounded to bf16 (round to nearest even, as llama.cpp's BF16 dot
// and AMX-BF16 do; the products are exact in f32): see bf16_rows_gemm and amx_bf16_gemm.
//
// Each kernel walks one ggml row group (8 rows, blocks interleaved) or one amx N-block (4 tiles of
// 16 rows, K-blocks interleaved) front to back, so a thread streams contiguous memory; up to MT
// tokens share each unpacked weight vector (MT = 1 for decode, 4 for prefill).
#include <immintrin.h>

#include <cstdlib>
#include <type_traits>

#include "cpu_features.h"
#include "engine.h"

namespace ktpack {
namespace avx512 {
namespace {

float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

int32_t dot_u8s8(const uint8_t* w, const int8_t* x, int n) {
  __m512i acc = _mm512_setzero_si512();
  int i = 0;
  for (; i + 64 <= n; i += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(w + i), _mm512_loadu_si512(x + i));
  if (i < n) {
    const __mmask64 m = n - i >= 64 ? ~0ull : ((1ull << (n - i)) - 1);
    acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(m, w + i), _mm512_maskz_loadu_epi8(m, x + i));
  }
  return _mm512_reduce_add_epi32(acc);
}

int32_t dot_s8s8(const int8_t* w, const int8_t* x, int n) {
  __m256i acc = _mm256_setzero_si256();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + i));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i));
    acc = _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
  }
  int32_t s = 0;
  for (; i < n; ++i) s += int32_t(w[i]) * x[i];
  const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  const __m128i h2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
  return s + _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 0xB1)));
}

// Bit-identical to the scalar definition (quantize_scalar.inc): same amax, same 127/amax, the same
// round-half-even of the same product.
void quantize_row(const float* x, int64_t k, int block, int8_t* q, float* d, int32_t* s16) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t b0 = 0; b0 < k; b0 += block) {
    __m512 mx = _mm512_setzero_ps();
    for (int i = 0; i < block; i += 16) mx = _mm512_max_ps(mx, _mm512_andnot_ps(sign, _mm512_loadu_ps(x + b0 + i)));
    const float amax = _mm512_reduce_max_ps(mx);
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 vid = _mm512_set1_ps(id);
    for (int i = 0; i < block; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + b0 + i), vid));
      v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      _mm_storeu_si128((__m128i*)(q + b0 + i), _mm512_cvtepi32_epi8(v));
      s16[(b0 + i) / 16] = _mm512_reduce_add_epi32(v);
    }
    d[b0 / block] = amax / 127.f;
  }
}

#include "kernels_generic.inc"

// exp(x) for x in [-87, 88]: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 Taylor (rel. error
// < 2e-7, under two f32 ulps); silu(g) * u with it.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), 0);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

uint64_t read_zmm(const uint8_t* p, int64_t n) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
  }
  for (; i < n; i += 64) a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
  const __m512i x = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, x);
  return w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ w[5] ^ w[6] ^ w[7];
}

void silu_mul_v(const float* g, const float* u, float* h, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(h + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), _mm512_loadu_ps(u + i)));
  }
  for (; i < n; ++i) h[i] = g[i] / (1.f + __builtin_expf(-g[i])) * u[i];
}

float dot_v(const float* a, const float* b, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

void axpy_v(float a, const float* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// Attention over the latent cache in register blocks: NH heads x NT cache rows of dot products share
// each loaded vector (scores), NH heads x 64 values of the latent sum stay in registers over the rows
// (values), instead of one dot / axpy call per (head, row).
// 16 cache values as f32: an f32 cache as it is, an f16 one widened exactly (F16C)
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// The 16 sums of acc[4][4] (head h, row j -> s[h * lds + t + j], times scale) in one transpose-and-add
// tree (lane i = acc[i / 4][i % 4]): 45 shuffles and adds instead of 16 horizontal reductions of ~9 each.
inline void store_sums_4x4(const __m512 (&acc)[4][4], float scale, float* s, int64_t lds, int64_t t) {
  __m512 u[4];
  for (int h = 0; h < 4; ++h) {
    const __m512 s01 =
        _mm512_add_ps(_mm512_unpacklo_ps(acc[h][0], acc[h][1]), _mm512_unpackhi_ps(acc[h][0], acc[h][1]));
    const __m512 s23 =
        _mm512_add_ps(_mm512_unpacklo_ps(acc[h][2], acc[h][3]), _mm512_unpackhi_ps(acc[h][2], acc[h][3]));
    const __m512d a = _mm512_castps_pd(s01), b = _mm512_castps_pd(s23);
    u[h] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  const __m512 r = _mm512_mul_ps(_mm512_add_ps(_mm512_shuffle_f32x4(v, w, 0x88), _mm512_shuffle_f32x4(v, w, 0xDD)),
                                 _mm512_set1_ps(scale));
  _mm_storeu_ps(s + t, _mm512_extractf32x4_ps(r, 0));
  _mm_storeu_ps(s + lds + t, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(s + 2 * lds + t, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(s + 3 * lds + t, _mm512_extractf32x4_ps(r, 3));
}

template <int NH, int NT>
inline void store_sums(const __m512 (&acc)[NH][NT], float scale, float* s, int64_t lds, int64_t t) {
  if constexpr (NH == 4 && NT == 4) {
    store_sums_4x4(acc, scale, s, lds, t);
  } else {
    for (int h = 0; h < NH; ++h)
      for (int j = 0; j < NT; ++j) s[h * lds + t + j] = _mm512_reduce_add_ps(acc[h][j]) * scale;
  }
}

template <int NH, int NT, typename CT>
void scores_block(const float* q, int64_t ldq, const float* qr, int64_t ldqr, const CT* c, int64_t D,
                  const CT* kr, int64_t R, int64_t t, float scale, float* s, int64_t lds) {
  __m512 acc[NH][NT];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NT; ++j) acc[h][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m512 cv[NT];
    for (int j = 0; j < NT; ++j) cv[j] = ld16(c + (t + j) * D + d);
    for (int h = 0; h < NH; ++h) {
      const __m512 qv = _mm512_loadu_ps(q + h * ldq + d);
      for (int j = 0; j < NT; ++j) acc[h][j] = _mm512_fmadd_ps(qv, cv[j], acc[h][j]);
    }
  }
  for (int64_t d = 0; d < R; d += 16) {
    __m512 cv[NT];
    for (int j = 0; j < NT; ++j) cv[j] = ld16(kr + (t + j) * R + d);
    for (int h = 0; h < NH; ++h) {
      const __m512 qv = _mm512_loadu_ps(qr + h * ldqr + d);
      for (int j = 0; j < NT; ++j) acc[h][j] = _mm512_fmadd_ps(qv, cv[j], acc[h][j]);
    }
  }
  store_sums<NH, NT>(acc, scale, s, lds, t);
}

// Reads `bytes` from p (rounded down to 256) with independent loads, so a block a kernel then walks in a
// few strided streams comes in from DRAM at the streaming rate, with many misses in flight. Decode
// attention (the score blocks read 4 cache rows at a time; a cold 128-row block cost ~1.6x a warm one),
// in-process A/B at 512 positions: 1.003 -> 0.933 ms/token (f32 cache), 0.904 -> 0.829 (f16).
inline void touch(const void* p, int64_t bytes) {
  const char* a = static_cast<const char*>(p);
  const char* e = a + (bytes & ~int64_t(255));
  __m512i o = _mm512_setzero_si512();
  for (; a < e; a += 256)
    o = _mm512_or_si512(o, _mm512_or_si512(_mm512_or_si512(_mm512_loadu_si512(a), _mm512_loadu_si512(a + 64)),
                                           _mm512_or_si512(_mm512_loadu_si512(a + 128), _mm512_loadu_si512(a + 192))));
  volatile int sink = _mm512_reduce_or_epi32(o);  // keeps the loads
  (void)sink;
}

template <typename CT>
void attn_scores_v(const float* q, int64_t ldq, const float* qr, int64_t ldqr, int64_t H, const CT* c, int64_t D,
                   const CT* kr, int64_t R, int64_t t0, int64_t t1, float scale, float* s, int64_t lds) {
  if (D % 16 || R % 16) {  // shapes the register blocks do not take (no DeepSeek one)
    attn_scores_generic(q, ldq, qr, ldqr, H, c, D, kr, R, t0, t1, scale, s, lds);
    return;
  }
  // rows in blocks of 128 (295 KB of an f32 cache, 147 KB of an f16 one): every head group reads a block
  // while it is in L2 (a task's rows at long contexts do not fit: 3000 positions, f32, -6 to -8% per token)
  for (int64_t tb = t0; tb < t1; tb += 128) {
    const int64_t te = imin64(t1, tb + 128);
    touch(c + tb * D, (te - tb) * D * sizeof(CT));
    touch(kr + tb * R, (te - tb) * R * sizeof(CT));
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) {
      const float *qh = q + h * ldq, *qrh = qr + h * ldqr;
      int64_t t = tb;
      for (; t + 4 <= te; t += 4) scores_block<4, 4>(qh, ldq, qrh, ldqr, c, D, kr, R, t, scale, s + h * lds, lds);
      for (; t < te; ++t) scores_block<4, 1>(qh, ldq, qrh, ldqr, c, D, kr, R, t, scale, s + h * lds, lds);
    }
    for (; h < H; ++h)
      for (int64_t t = tb; t < te; ++t)
        scores_block<1, 1>(q + h * ldq, ldq, qr + h * ldqr, ldqr, c, D, kr, R, t, scale, s + h * lds, lds);
  }
}

template <int NH, typename CT>
void values_block(const float* p, int64_t ldp, const CT* c, int64_t D, int64_t d, int64_t t0, int64_t t1,
                  float* out) {
  __m512 acc[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm512_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const CT* ct = c + t * D + d;
    const __m512 c0 = ld16(ct), c1 = ld16(ct + 16), c2 = ld16(ct + 32), c3 = ld16(ct + 48);
    for (int h = 0; h < NH; ++h) {
      const __m512 pv = _mm512_set1_ps(p[h * ldp + t]);
      acc[h][0] = _mm512_fmadd_ps(pv, c0, acc[h][0]);
      acc[h][1] = _mm512_fmadd_ps(pv, c1, acc[h][1]);
      acc[h][2] = _mm512_fmadd_ps(pv, c2, acc[h][2]);
      acc[h][3] = _mm512_fmadd_ps(pv, c3, acc[h][3]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < 4; ++j) {
      float* o = out + h * D + d + 16 * j;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[h][j]));
    }
}

template <typename CT>
void attn_values_v(const float* p, int64_t ldp, int64_t H, const CT* c, int64_t D, int64_t t0, int64_t t1,
                   float* out) {
  if (D % 64) {
    attn_values_generic(p, ldp, H, c, D, t0, t1, out);
    return;
  }
  for (int64_t d = 0; d < D; d += 64) {
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) values_block<4>(p + h * ldp, ldp, c, D, d, t0, t1, out + h * D);
    for (; h < H; ++h) values_block<1>(p + h * ldp, ldp, c, D, d, t0, t1, out + h * D);
  }
}

float exp_sum_v(float* s, int64_t n, float shift) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), sh));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (i < n) {
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + i), sh));
    _mm512_mask_storeu_ps(s + i, m, e);
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(acc);
}

// ------------------------------------------------------------------------------------------------
// ggml K-quants. Activation codes of one 256-block are loaded once per token and reused by the 8
// rows of the group; each row's codes are unpacked once and reused by the MT tokens.

inline __m512i cat256(const int8_t* lo, const int8_t* hi) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)lo)),
                            _mm256_loadu_si256((const __m256i*)hi), 1);
}

inline __m512i idx16(int a, int b) {  // epi16 permutation: lanes 0-15 <- a, 16-31 <- b
  return _mm512_inserti64x4(_mm512_set1_epi16(short(a)), _mm256_set1_epi16(short(b)), 1);
}

inline __m512i idx16x4(int a) {  // lanes 8j..8j+7 <- a + j
  const __m128i v = _mm_setr_epi16(short(a), short(a), short(a), short(a), short(a), short(a), short(a), short(a));
  return _mm512_add_epi16(_mm512_broadcast_i32x4(v),
                          _mm512_setr_epi64(0, 0, 0x0001000100010001ll, 0x0001000100010001ll, 0x0002000200020002ll,
                                            0x0002000200020002ll, 0x0003000300030003ll, 0x0003000300030003ll));
}


// Unpacked weights of one K-quant block: four 64-byte code vectors and their int16 scale vectors,
// plus (Q4_K/Q5_K) the 8 mins as int16 and the two f16 scales.
struct KBlock {
  __m512i w[4], sc[4];
  __m512i off6;  // Q6_K: -32 * scale as int16 lanes 0..15 (zero above): dpwssd with the sums gives the offset
  __m128i mins;
  float d, dmin;
};

// Per token and 256-block: the activation codes in the order the unpacked weights use, the scale,
// and (Q4_K/Q5_K) the 8 sums of 32 codes as int16 / (Q6_K) the 16 sums of 16 codes.
struct XBlock {
  __m512i x[4];
  __m512i s16;
  __m512i s16w;  // Q6_K: the 16 sums as int16 (|sum| <= 16 * 127 fits), upper half zero
  __m128i s32;
  float dx;
};

// 12 packed bytes -> 8 six-bit scales (bytes 0..7) and 8 mins (bytes 8..15) (GGUF's K4 scale format).
inline __m128i k4_unpack_scales(const uint8_t* p) {
  // In registers (a store + vector reload here would stall on store forwarding). Dwords u0, u1, u2 of
  // the 12 bytes; out = [u0 & m1, (u2 & m2) | ((u0 >> 6) & m3) << 4, u1 & m1, ((u2 >> 4) & m2) | ((u1 >> 6) & m3) << 4].
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));  // 16 bytes: still inside the block
  const __m128i a = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
  const __m128i b = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0));
  const __m128i lo = _mm_and_si128(a, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i hi = _mm_and_si128(_mm_slli_epi32(_mm_srli_epi32(b, 6), 4),
                                   _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm_or_si128(lo, hi);
}

// Software prefetch in the decode (one-token) kernels: KTPACK_PREFETCH=BYTES fetches that far ahead of
// the block being unpacked; the default, -1, issues none and leaves the streams to the hardware
// prefetchers. Measured on the 2-core EPYC (Zen 4) test host, from DRAM, one thread, the same matrices
// alternately (2026-12-01): Q6_K lanes 188 MB 26.0-26.9 GB/s without vs 17.2-18.9 with (1-64 KiB ahead),
// Q4_K lanes 68 MB 23.1-25.2 vs 20.2-22.6, Q8_0 lanes 28.4-28.8 vs 24.2-25.4, BF16 rows 24.3-26.6 vs
// 21.1-21.5, ggml rows Q6_K 15.8-17.0 vs 14.2-14.7, amx_int4 level; with 4 KiB pages level too. (An older
// row layout once needed it: 6.7 GB/s without, 22 with.) Every prefetch costs a fill buffer that a
// demand miss or the hardware prefetcher would otherwise use.
int kPrefetch = -1;

// A decode kernel's prefetch of the line kPrefetch bytes after p (none when kPrefetch < 0).
inline void prefetch_ahead(const void* p) {
  if (kPrefetch >= 0) _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
}

// Token rows 0..m-1 in blocks of 4, then the last 1-3 in one block: the GEMM kernels are templates on
// their token count, and a one-token call costs ~2x per token of a 4-token one (an expert's 35 tokens,
// Q4_K lanes 512x2048, one thread: 231 us in 4s and 1s, 213 with a 3-block; 36 tokens: 219).
// call(Tokens<MT>{}, r) runs tokens r..r+MT-1.
template <int N>
struct Tokens {
  static constexpr int n = N;
};
template <class F>
inline void by_token_blocks(int m, F&& call) {
  int r = 0;
  for (; r + 4 <= m; r += 4) call(Tokens<4>{}, r);
  if (m - r == 3)
    call(Tokens<3>{}, r);
  else if (m - r == 2)
    call(Tokens<2>{}, r);
  else if (m - r == 1)
    call(Tokens<1>{}, r);
}

template <int MT, int BB, typename Unpack, typename Xload>
void kquant_group(const WMat& w, const QAct& a, int64_t g0, int rg, int r0, float* y, int64_t ldy, Unpack unpack,
                  Xload xload) {
  const int64_t nb = w.k / 256;
  const uint8_t* base = w.data + g0 * nb * BB;
  __m512 accf[8][MT];
  __m128 off[8][MT];
  for (int i = 0; i < rg; ++i)
    for (int t = 0; t < MT; ++t) accf[i][t] = _mm512_setzero_ps(), off[i][t] = _mm_setzero_ps();
  int64_t ar[MT];
  for (int t = 0; t < MT; ++t) ar[t] = a.row(r0 + t);
  for (int64_t b = 0; b < nb; ++b) {
    if constexpr (MT == 1) {  // decode streams the weights once: fetch ahead of the unpacking (see kPrefetch)
      const char* pf = reinterpret_cast<const char*>(base + b * rg * BB);
      for (int off = 0; kPrefetch >= 0 && off < rg * BB; off += 64) prefetch_ahead(pf + off);
    }
    XBlock xb[MT];
    for (int t = 0; t < MT; ++t) {
      xload(a.q + ar[t] * a.k + 256 * b, xb[t].x);
      xb[t].dx = a.d[ar[t] * (a.k / 256) + b];
      xb[t].s16 = _mm512_loadu_si512(a.s16 + ar[t] * (a.k / 16) + 16 * b);
      if constexpr (BB == 210) xb[t].s16w = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(xb[t].s16));
      if constexpr (BB != 210) {  // pairwise sums -> 8 int16
        const __m512i pair = _mm512_add_epi32(xb[t].s16, _mm512_srli_epi64(xb[t].s16, 32));
        xb[t].s32 = _mm512_cvtepi64_epi16(pair);
      }
    }
    for (int i = 0; i < rg; ++i) {
      const uint8_t* blk = base + (b * rg + i) * BB;
      KBlock kb;
      unpack(blk, &kb);
      for (int t = 0; t < MT; ++t) {
        // maddubs: u8 codes x s8 activations -> s16 pairs; dpwssd: x int16 scales, summed into int32
        __m512i acc = _mm512_madd_epi16(_mm512_maddubs_epi16(kb.w[0], xb[t].x[0]), kb.sc[0]);
        for (int q = 1; q < 4; ++q)
          acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(kb.w[q], xb[t].x[q]), kb.sc[q]);
        if constexpr (BB == 210) {  // codes are offset by 32: add sum(-32 * scale_s * xsum_s)
          acc = _mm512_dpwssd_epi32(acc, kb.off6, xb[t].s16w);
        } else {
          const __m128 mm = _mm_cvtepi32_ps(_mm_madd_epi16(kb.mins, xb[t].s32));
          off[i][t] = _mm_fmadd_ps(mm, _mm_set1_ps(kb.dmin * xb[t].dx), off[i][t]);
        }
        accf[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(kb.d * xb[t].dx), accf[i][t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < rg; ++i) {
      __m128 o = _mm_add_ps(off[i][t], _mm_movehl_ps(off[i][t], off[i][t]));
      o = _mm_add_ss(o, _mm_movehdup_ps(o));
      y[(r0 + t) * ldy + g0 + i] = _mm512_reduce_add_ps(accf[i][t]) - _mm_cvtss_f32(o);
    }
}

// Prefill (MT tokens): one row at a time, its accumulators for MT tokens in registers across all K
// blocks, each block unpacked once and used by the MT tokens (the group kernel above keeps 8 rows x MT
// tokens of accumulators, more than the 32 vector registers hold, so they live on the stack).
// `xo` holds the MT tokens' codes (rows of w.k) already in the order the unpacked weights use, then
// per token and block 32 bytes of activation sums (reorder_codes).
template <int MT, int BB, typename Unpack>
void kquant_rows(const WMat& w, const QAct& a, int64_t g0, int rg, int r0, float* y, int64_t ldy, Unpack unpack,
                 const int8_t* xo) {
  const int64_t nb = w.k / 256;
  const uint8_t* base = w.data + g0 * nb * BB;
  const int8_t* xq[MT];
  const float* xd[MT];
  for (int t = 0; t < MT; ++t) {
    xq[t] = xo + t * w.k;
    xd[t] = a.d + a.row(r0 + t) * (a.k / 256);
  }
  for (int i = 0; i < rg; ++i) {
    __m512 accf[MT];
    __m128 off[MT];
    for (int t = 0; t < MT; ++t) accf[t] = _mm512_setzero_ps(), off[t] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      KBlock kb;
      unpack(base + (b * rg + i) * BB, &kb);
      for (int t = 0; t < MT; ++t) {
        const int8_t* xb = xq[t] + 256 * b;
        __m512i acc = _mm512_madd_epi16(_mm512_maddubs_epi16(kb.w[0], _mm512_loadu_si512(xb)), kb.sc[0]);
        for (int q = 1; q < 4; ++q)
          acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(kb.w[q], _mm512_loadu_si512(xb + 64 * q)), kb.sc[q]);
        const float dx = xd[t][b];
        const int8_t* sums = xo + MT * w.k + (t * nb + b) * 32;  // reorder_codes' per-block sums
        if constexpr (BB == 210) {
          acc = _mm512_dpwssd_epi32(acc, kb.off6, _mm512_zextsi256_si512(_mm256_load_si256((const __m256i*)sums)));
        } else {
          const __m128i s32 = _mm_load_si128((const __m128i*)sums);
          const __m128 mm = _mm_cvtepi32_ps(_mm_madd_epi16(kb.mins, s32));
          off[t] = _mm_fmadd_ps(mm, _mm_set1_ps(kb.dmin * dx), off[t]);
        }
        accf[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(kb.d * dx), accf[t]);
      }
    }
    for (int t = 0; t < MT; ++t) {
      __m128 o = _mm_add_ps(off[t], _mm_movehl_ps(off[t], off[t]));
      o = _mm_add_ss(o, _mm_movehdup_ps(o));
      y[(r0 + t) * ldy + g0 + i] = _mm512_reduce_add_ps(accf[t]) - _mm_cvtss_f32(o);
    }
  }
}

// Q4_K / Q5_K: code vectors hold sub-blocks (0|2), (1|3), (4|6), (5|7) (low/high nibbles of the
// 32-byte qs chunks), so the activations are loaded in that order.
inline void xload_k4(const int8_t* xq, __m512i* xa) {
  xa[0] = cat256(xq, xq + 64);
  xa[1] = cat256(xq + 32, xq + 96);
  xa[2] = cat256(xq + 128, xq + 192);
  xa[3] = cat256(xq + 160, xq + 224);
}

inline void xload_natural(const int8_t* xq, __m512i* xa) {
  for (int j = 0; j < 4; ++j) xa[j] = _mm512_loadu_si512(xq + 64 * j);
}

inline void k4_scales(const uint8_t* blk, KBlock* kb) {
  const __m128i sm = k4_unpack_scales(blk + 4);
  const __m512i v = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
  kb->mins = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
  kb->sc[0] = _mm512_permutexvar_epi16(idx16(0, 2), v);
  kb->sc[1] = _mm512_permutexvar_epi16(idx16(1, 3), v);
  kb->sc[2] = _mm512_permutexvar_epi16(idx16(4, 6), v);
  kb->sc[3] = _mm512_permutexvar_epi16(idx16(5, 7), v);
  kb->d = f16_to_f32(rd16(blk));
  kb->dmin = f16_to_f32(rd16(blk + 2));
}

void unpack_q4k(const uint8_t* blk, KBlock* kb) {
  k4_scales(blk, kb);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i q0 = _mm512_loadu_si512(blk + 16), q1 = _mm512_loadu_si512(blk + 80);
  kb->w[0] = _mm512_and_si512(q0, m4);
  kb->w[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
  kb->w[2] = _mm512_and_si512(q1, m4);
  kb->w[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
}

inline __m512i hbits(__m512i h, int sa, int sb, int mask) {  // per byte: ((h >> s) & mask) << 4
  const __m512i cnt = _mm512_inserti64x4(_mm512_set1_epi16(short(sa)), _mm256_set1_epi16(short(sb)), 1);
  return _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(h, cnt), _mm512_set1_epi8(char(mask))), 4);
}

void unpack_q5k(const uint8_t* blk, KBlock* kb) {
  k4_scales(blk, kb);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 16)));
  const __m512i q0 = _mm512_loadu_si512(blk + 48), q1 = _mm512_loadu_si512(blk + 112);
  kb->w[0] = _mm512_or_si512(_mm512_and_si512(q0, m4), hbits(h, 0, 2, 1));
  kb->w[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(q0, 4), m4), hbits(h, 1, 3, 1));
  kb->w[2] = _mm512_or_si512(_mm512_and_si512(q1, m4), hbits(h, 4, 6, 1));
  kb->w[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(q1, 4), m4), hbits(h, 5, 7, 1));
}

// Q6_K: codes in natural order (64 values per vector), signed scales per 16 values, codes offset by
// 32. The two high bits of a code sit in qh at bit pairs (0,1), (2,3), (4,5), (6,7) for the values l,
// l+32, l+64, l+96 of a 128-half: moved to bits 4-5 with one 16-bit shift per half (bits that cross
// into the neighbouring byte land outside 0x30 and are masked off).
void unpack_q6k(const uint8_t* blk, KBlock* kb) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  for (int h = 0; h < 2; ++h) {
    const __m512i l = _mm512_loadu_si512(blk + 64 * h);
    const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h)));
    kb->w[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_and_si512(_mm512_sllv_epi16(q, shl), m30));
    kb->w[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                       _mm512_and_si512(_mm512_srlv_epi16(q, shr), m30));
  }
  const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));
  const __m512i sc = _mm512_castsi256_si512(sc16);
  for (int j = 0; j < 4; ++j) kb->sc[j] = _mm512_permutexvar_epi16(idx16x4(4 * j), sc);
  kb->off6 = _mm512_zextsi256_si512(_mm256_mullo_epi16(sc16, _mm256_set1_epi16(-32)));
  kb->d = f16_to_f32(rd16(blk + 208));
  kb->dmin = 0.f;
}

// A per-thread buffer for the prefill kernels' reordered activation codes (grown with malloc: a large
// thread_local array in a dlopen'ed module would not fit the static TLS block).
int8_t* x_scratch(int64_t bytes) {
  static thread_local int8_t* buf = nullptr;
  static thread_local int64_t cap = 0;
  if (bytes > cap) {
    std::free(buf);
    cap = (bytes + 4095) / 4096 * 4096;
    buf = static_cast<int8_t*>(std::aligned_alloc(64, size_t(cap)));
  }
  return buf;
}

// Codes of MT tokens, each row of K values, into `out` in the order `xload` gives (one pass per block of
// tokens, shared by every row of the task), followed by 32 bytes per token and 256-block: the 16 sums of
// 16 codes as int16 (Q6_K's offset term) or the 8 sums of 32 as int16 (the K4 mins term).
// K: the weights' row length (a view's activation rows may be longer: a.k is their stride).
template <int MT, bool Q6, typename Xload>
void reorder_codes(const QAct& a, int64_t K, int r0, Xload xload, int8_t* out) {
  const int64_t nb = K / 256;
  for (int t = 0; t < MT; ++t) {
    const int64_t ar = a.row(r0 + t);
    const int8_t* xq = a.q + ar * a.k;
    for (int64_t b = 0; b < nb; ++b) {
      __m512i x[4];
      xload(xq + 256 * b, x);
      for (int q = 0; q < 4; ++q) _mm512_storeu_si512(out + t * K + 256 * b + 64 * q, x[q]);
      const __m512i s16 = _mm512_loadu_si512(a.s16 + ar * (a.k / 16) + 16 * b);
      int8_t* sums = out + MT * K + (t * nb + b) * 32;
      if constexpr (Q6) {
        _mm256_store_si256((__m256i*)sums, _mm512_cvtepi32_epi16(s16));
      } else {
        _mm_store_si128((__m128i*)sums, _mm512_cvtepi64_epi16(_mm512_add_epi32(s16, _mm512_srli_epi64(s16, 32))));
        _mm_store_si128((__m128i*)(sums + 16), _mm_setzero_si128());
      }
    }
  }
}

template <int BB>
void kquant_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  // Lambdas (one type each) rather than function pointers, so the unpackers are inlined.
  const auto u4 = [](const uint8_t* b, KBlock* k) { unpack_q4k(b, k); };
  const auto u5 = [](const uint8_t* b, KBlock* k) { unpack_q5k(b, k); };
  const auto u6 = [](const uint8_t* b, KBlock* k) { unpack_q6k(b, k); };
  const auto xk4 = [](const int8_t* x, __m512i* xa) { xload_k4(x, xa); };
  const auto xnat = [](const int8_t* x, __m512i* xa) { xload_natural(x, xa); };
  if (w.rows > 8) {  // the interleave the kernels are written for is 8 rows
    for (int64_t g0 = n0; g0 < n1; g0 += w.rows)
      for (int r = 0; r < a.m; ++r)
        for (int64_t n = g0; n < imin64(g0 + w.rows, n1); ++n)
          y[r * ldy + n] = BB == 144   ? row_q4_k(w, n, a, a.row(r))
                           : BB == 176 ? row_q5_k(w, n, a, a.row(r))
                                       : row_q6_k(w, n, a, a.row(r));
    return;
  }
  // prefill: blocks of 8 (then 4) tokens. Every block's codes are reordered once per call (task) into
  // the per-thread buffer; then row group by row group (a group's weights stay in L1/L2 while every token
  // block uses them: weights are read from memory once per task, not once per token block).
  const int64_t per_tok = w.k + (w.k / 256) * 32;
  const int m8 = a.m / 8 * 8, m4 = m8 + (a.m - m8) / 4 * 4;
  int8_t* xo = m4 ? x_scratch(m4 * per_tok) : nullptr;
  for (int r = 0; r < m4; r += r < m8 ? 8 : 4) {
    int8_t* seg = xo + r * per_tok;
    if (r < m8) {
      if constexpr (BB == 210) reorder_codes<8, true>(a, w.k, r, xnat, seg);
      else reorder_codes<8, false>(a, w.k, r, xk4, seg);
    } else {
      if constexpr (BB == 210) reorder_codes<4, true>(a, w.k, r, xnat, seg);
      else reorder_codes<4, false>(a, w.k, r, xk4, seg);
    }
  }
  for (int64_t g0 = n0; g0 < n1 && m4; g0 += w.rows) {
    const int rg = int(imin64(w.rows, w.n - g0));
    for (int r = 0; r < m8; r += 8) {
      if constexpr (BB == 144) kquant_rows<8, 144>(w, a, g0, rg, r, y, ldy, u4, xo + r * per_tok);
      else if constexpr (BB == 176) kquant_rows<8, 176>(w, a, g0, rg, r, y, ldy, u5, xo + r * per_tok);
      else kquant_rows<8, 210>(w, a, g0, rg, r, y, ldy, u6, xo + r * per_tok);
    }
    if (m4 > m8) {
      if constexpr (BB == 144) kquant_rows<4, 144>(w, a, g0, rg, m8, y, ldy, u4, xo + m8 * per_tok);
      else if constexpr (BB == 176) kquant_rows<4, 176>(w, a, g0, rg, m8, y, ldy, u5, xo + m8 * per_tok);
      else kquant_rows<4, 210>(w, a, g0, rg, m8, y, ldy, u6, xo + m8 * per_tok);
    }
  }
  const int r = m4;
  // decode and the last tokens: the 8-row group kernel (one token, prefetching)
  for (int64_t g0 = n0; g0 < n1; g0 += w.rows) {
    const int rg = int(imin64(w.rows, w.n - g0));
    for (int rr = r; rr < a.m; ++rr) {
      if constexpr (BB == 144) kquant_group<1, 144>(w, a, g0, rg, rr, y, ldy, u4, xk4);
      else if constexpr (BB == 176) kquant_group<1, 176>(w, a, g0, rg, rr, y, ldy, u5, xk4);
      else kquant_group<1, 210>(w, a, g0, rg, rr, y, ldy, u6, xnat);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Q8_0: 32-value blocks, signed weights: dpbusd(|w|, sign(x, w)).

template <int MT>
void q8_0_group(const WMat& w, const QAct& a, int64_t g0, int rg, int r0, float* y, int64_t ldy) {
  const int64_t nb = w.k / 32;
  const uint8_t* base = w.data + g0 * nb * 34;
  __m256 accf[8][MT];
  for (int i = 0; i < rg; ++i)
    for (int t = 0; t < MT; ++t) accf[i][t] = _mm256_setzero_ps();
  int64_t ar[MT];
  for (int t = 0; t < MT; ++t) ar[t] = a.row(r0 + t);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MT];
    float dx[MT];
    for (int t = 0; t < MT; ++t) {
      xv[t] = _mm256_loadu_si256((const __m256i*)(a.q + ar[t] * a.k + 32 * b));
      dx[t] = a.d[ar[t] * (a.k / 32) + b];
    }
    for (int i = 0; i < rg; ++i) {
      const uint8_t* blk = base + (b * rg + i) * 34;
      if constexpr (MT == 1) prefetch_ahead(blk);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(blk + 2));
      const __m256i aw = _mm256_abs_epi8(wv);
      const float dw = f16_to_f32(rd16(blk));
      for (int t = 0; t < MT; ++t) {
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xv[t], wv));
        accf[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * dx[t]), accf[i][t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < rg; ++i) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(accf[i][t]), _mm256_extractf128_ps(accf[i][t], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      y[(r0 + t) * ldy + g0 + i] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
    }
}

void q8_0_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t g0 = n0; g0 < n1; g0 += w.rows) {
    const int rg = int(imin64(w.rows, w.n - g0));
    if (rg > 8) {
      gemm_rows<row_q8_0>(w, a, g0, imin64(g0 + w.rows, n1), y, ldy);
      continue;
    }
    by_token_blocks(a.m, [&](auto mt, int r) { q8_0_group<decltype(mt)::n>(w, a, g0, rg, r, y, ldy); });
  }
}

// ------------------------------------------------------------------------------------------------
// Q4_0 / Q4_1 / Q5_0 / Q5_1: 32-value blocks of unsigned codes (dpbusd directly), an offset (8, 16)
// or a per-block min applied through the activation block sums.

template <WType T>
inline __m256i q32_codes(const uint8_t* blk) {
  constexpr int qs_off = T == WType::ggml_q4_0 ? 2 : T == WType::ggml_q4_1 ? 4 : T == WType::ggml_q5_0 ? 6 : 8;
  const __m128i qs = _mm_loadu_si128((const __m128i*)(blk + qs_off));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(qs, m4)),
                                      _mm_and_si128(_mm_srli_epi16(qs, 4), m4), 1);
  if constexpr (T == WType::ggml_q5_0 || T == WType::ggml_q5_1) {
    uint32_t qh;
    __builtin_memcpy(&qh, blk + qs_off - 4, 4);
    c = _mm256_or_si256(c, _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10)));
  }
  return c;
}

template <WType T, int BB, int MT>
void q32_group(const WMat& w, const QAct& a, int64_t g0, int rg, int r0, float* y, int64_t ldy) {
  const int64_t nb = w.k / 32;
  const uint8_t* base = w.data + g0 * nb * BB;
  __m256 accf[8][MT];
  float off[8][MT];
  for (int i = 0; i < rg; ++i)
    for (int t = 0; t < MT; ++t) accf[i][t] = _mm256_setzero_ps(), off[i][t] = 0.f;
  int64_t ar[MT];
  for (int t = 0; t < MT; ++t) ar[t] = a.row(r0 + t);
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[MT];
    float dx[MT], xsum[MT];
    for (int t = 0; t < MT; ++t) {
      xv[t] = _mm256_loadu_si256((const __m256i*)(a.q + ar[t] * a.k + 32 * b));
      dx[t] = a.d[ar[t] * (a.k / 32) + b];
      const int32_t* xs = a.s16 + ar[t] * (a.k / 16) + 2 * b;
      xsum[t] = float(xs[0] + xs[1]);
    }
    for (int i = 0; i < rg; ++i) {
      const uint8_t* blk = base + (b * rg + i) * BB;
      if constexpr (MT == 1) prefetch_ahead(blk);
      const __m256i c = q32_codes<T>(blk);
      const float d = f16_to_f32(rd16(blk));
      float mo;  // per unit of dx * xsum
      if constexpr (T == WType::ggml_q4_0) mo = -8.f * d;
      else if constexpr (T == WType::ggml_q5_0) mo = -16.f * d;
      else mo = f16_to_f32(rd16(blk + 2));
      for (int t = 0; t < MT; ++t) {
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, xv[t]);
        accf[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * dx[t]), accf[i][t]);
        off[i][t] += mo * dx[t] * xsum[t];
      }
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int i = 0; i < rg; ++i) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(accf[i][t]), _mm256_extractf128_ps(accf[i][t], 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      y[(r0 + t) * ldy + g0 + i] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2))) + off[i][t];
    }
}

template <WType T, int BB>
void q32_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t g0 = n0; g0 < n1; g0 += w.rows) {
    const int rg = int(imin64(w.rows, w.n - g0));
    if (rg > 8) {
      gemm_rows<row_q32<T, BB>>(w, a, g0, imin64(g0 + w.rows, n1), y, ldy);
      continue;
    }
    by_token_blocks(a.m, [&](auto mt, int r) { q32_group<T, BB, decltype(mt)::n>(w, a, g0, rg, r, y, ldy); });
  }
}

// ------------------------------------------------------------------------------------------------
// ggml F32 rows (blocks of one value: 8 rows' values of column b are adjacent). A vector of 16 weights
// is columns (b, b+1) x rows 0..7; the activation vector is [x_b x8, x_b+1 x8].

void f32_rows_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const __m512i i01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i i23 = _mm512_add_epi32(i01, _mm512_set1_epi32(2));
  const int64_t k4 = w.k / 4 * 4;
  for (int64_t g0 = n0; g0 < n1; g0 += w.rows) {
    const int rg = int(imin64(w.rows, w.n - g0));
    if (rg != 8) {
      gemm_rows<row_f32>(w, a, g0, imin64(g0 + w.rows, n1), y, ldy);
      continue;
    }
    const uint8_t* base = w.data + g0 * w.k * 4;
    for (int r = 0; r < a.m; ++r) {
      const float* x = a.x + a.row(r) * a.ldx;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t b = 0; b < k4; b += 4) {
        const __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + b));
        const uint8_t* p = base + b * 32;
        prefetch_ahead(p);
        prefetch_ahead(p + 64);
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(p)), _mm512_permutexvar_ps(i01, xb), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(reinterpret_cast<const float*>(p + 64)), _mm512_permutexvar_ps(i23, xb),
                               acc1);
      }
      const __m512 s = _mm512_add_ps(acc0, acc1);
      __m256 v = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
      alignas(32) float out[8];
      _mm256_store_ps(out, v);
      for (int64_t b = k4; b < w.k; ++b)
        for (int i = 0; i < 8; ++i) out[i] += rdf32(base + (b * 8 + i) * 4) * x[b];
      for (int i = 0; i < 8; ++i) y[r * ldy + g0 + i] = out[i];
    }
  }
}

// ggml BF16 rows with vdpbf16ps. Two row groups side by side (rows g0..g0+15) fill the 16 lanes; a lane
// holds its row's weights of columns (b, b+1) as one bf16 pair (one vpermt2w of the two groups' loads,
// shared by the tokens of a block), and the activation pair is one broadcast dword. Activations are
// rounded to bf16 first (RNE: |x - bf16(x)| <= 2^-8 |x|); the products w * bf16(x) are exact in f32, so
// the result is the f32 dot product of W with bf16(x) up to f32 summation rounding.
// Tokens go in blocks of kBf16Tokens (their bf16 rows, 2K bytes per token, stay in L2 while every row
// pair of the task uses them); within a block, 4 tokens share each permuted weight vector.
constexpr int kBf16Tokens = 64;

// One row of K floats as bf16 (round to nearest even).
void to_bf16(const float* x, int64_t K, uint16_t* out) {
  int64_t i = 0;
  for (; i + 32 <= K; i += 32)
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
  for (; i < K; ++i) out[i] = f32_to_bf16_rne(x[i]);
}

// Token rows r0..r0+mt-1 of `a` as bf16 rows of K words, into this thread's scratch.
const uint16_t* bf16_rows(const QAct& a, int r0, int mt, int64_t K) {
  uint16_t* xs = reinterpret_cast<uint16_t*>(x_scratch(int64_t(mt) * 2 * K));
  for (int t = 0; t < mt; ++t) to_bf16(a.x + a.row(r0 + t) * a.ldx, K, xs + t * K);
  return xs;
}

inline __m512 dp_bf16(__m512 acc, __m512i w, __m512i x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }

inline __m512i bcast_pair(const uint16_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// ---- decode attention over a bf16 cache, with vdpbf16ps ----
// Scores: the queries [H][D + R] rounded to bf16 once per call; then, as scores_block, NH heads x NT rows
// share each loaded vector, 32 products per instruction instead of 16.
template <int NH, int NT>
void scores_block_bf16(const uint16_t* q, int64_t ldq, const uint16_t* c, int64_t D, const uint16_t* kr, int64_t R,
                       int64_t t, float scale, float* s, int64_t lds) {
  __m512 acc[NH][NT];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < NT; ++j) acc[h][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512i cv[NT];
    for (int j = 0; j < NT; ++j) cv[j] = _mm512_loadu_si512(c + (t + j) * D + d);
    for (int h = 0; h < NH; ++h) {
      const __m512i qv = _mm512_loadu_si512(q + h * ldq + d);
      for (int j = 0; j < NT; ++j) acc[h][j] = dp_bf16(acc[h][j], cv[j], qv);
    }
  }
  for (int64_t d = 0; d < R; d += 32) {
    __m512i cv[NT];
    for (int j = 0; j < NT; ++j) cv[j] = _mm512_loadu_si512(kr + (t + j) * R + d);
    for (int h = 0; h < NH; ++h) {
      const __m512i qv = _mm512_loadu_si512(q + h * ldq + D + d);
      for (int j = 0; j < NT; ++j) acc[h][j] = dp_bf16(acc[h][j], cv[j], qv);
    }
  }
  store_sums<NH, NT>(acc, scale, s, lds, t);
}

void attn_scores_bf16_v(const float* q, int64_t ldq, const float* qr, int64_t ldqr, int64_t H, const uint16_t* c,
                        int64_t D, const uint16_t* kr, int64_t R, int64_t t0, int64_t t1, float scale, float* s,
                        int64_t lds) {
  if (D % 32 || R % 32) {
    attn_scores_bf16_generic(q, ldq, qr, ldqr, H, c, D, kr, R, t0, t1, scale, s, lds);
    return;
  }
  const int64_t ld = D + R;
  uint16_t* qs = reinterpret_cast<uint16_t*>(x_scratch(H * ld * 2));
  for (int64_t h = 0; h < H; ++h) {
    to_bf16(q + h * ldq, D, qs + h * ld);
    to_bf16(qr + h * ldqr, R, qs + h * ld + D);
  }
  for (int64_t tb = t0; tb < t1; tb += 128) {  // blocks of rows read while in L2, as attn_scores_v
    const int64_t te = imin64(t1, tb + 128);
    touch(c + tb * D, (te - tb) * D * 2);
    touch(kr + tb * R, (te - tb) * R * 2);
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) {
      int64_t t = tb;
      for (; t + 4 <= te; t += 4) scores_block_bf16<4, 4>(qs + h * ld, ld, c, D, kr, R, t, scale, s + h * lds, lds);
      for (; t < te; ++t) scores_block_bf16<4, 1>(qs + h * ld, ld, c, D, kr, R, t, scale, s + h * lds, lds);
    }
    for (; h < H; ++h)
      for (int64_t t = tb; t < te; ++t)
        scores_block_bf16<1, 1>(qs + h * ld, ld, c, D, kr, R, t, scale, s + h * lds, lds);
  }
}

// Values: vdpbf16ps sums over pairs of rows, so the rows' pairs are interleaved first, once per call, into
// z[k][i] = (c[t0 + 2k][i], c[t0 + 2k + 1][i]) (an odd last row pairs with zeros), with the probabilities
// as bf16 pairs pb[h][k] = (p[h][t0 + 2k], p[h][t0 + 2k + 1]); then NH heads x 64 values of the sum stay in
// registers over the pairs, 32 products per instruction.
template <int NH>
void values_block_bf16(const uint32_t* pb, int64_t np, const uint16_t* z, int64_t D, int64_t d, float* out) {
  __m512 acc[NH][4];
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < np; ++k) {
    const uint16_t* zk = z + (k * D + d) * 2;
    const __m512i z0 = _mm512_loadu_si512(zk), z1 = _mm512_loadu_si512(zk + 32), z2 = _mm512_loadu_si512(zk + 64),
                  z3 = _mm512_loadu_si512(zk + 96);
    for (int h = 0; h < NH; ++h) {
      const __m512i pv = _mm512_set1_epi32(int32_t(pb[h * np + k]));
      acc[h][0] = dp_bf16(acc[h][0], z0, pv);
      acc[h][1] = dp_bf16(acc[h][1], z1, pv);
      acc[h][2] = dp_bf16(acc[h][2], z2, pv);
      acc[h][3] = dp_bf16(acc[h][3], z3, pv);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int j = 0; j < 4; ++j) {
      float* o = out + h * D + d + 16 * j;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[h][j]));
    }
}

void attn_values_bf16_v(const float* p, int64_t ldp, int64_t H, const uint16_t* c, int64_t D, int64_t t0, int64_t t1,
                        float* out) {
  if (D % 64) {
    attn_values_bf16_generic(p, ldp, H, c, D, t0, t1, out);
    return;
  }
  const int64_t n = t1 - t0, np = (n + 1) / 2;
  uint16_t* z = reinterpret_cast<uint16_t*>(x_scratch((np * D * 2 + H * np * 2) * 2));
  uint32_t* pb = reinterpret_cast<uint32_t*>(z + np * D * 2);
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5,
                                      36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < np; ++k) {
    const uint16_t* a = c + (t0 + 2 * k) * D;
    const bool pair = t0 + 2 * k + 1 < t1;
    for (int64_t i = 0; i < D; i += 32) {
      const __m512i va = _mm512_loadu_si512(a + i);
      const __m512i vb = pair ? _mm512_loadu_si512(a + D + i) : _mm512_setzero_si512();
      _mm512_storeu_si512(z + (k * D + i) * 2, _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_storeu_si512(z + (k * D + i) * 2 + 32, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t k = 0; k < np; ++k) {
      const float* ph = p + h * ldp + t0 + 2 * k;
      const uint32_t b = t0 + 2 * k + 1 < t1 ? f32_to_bf16_rne(ph[1]) : 0u;
      pb[h * np + k] = uint32_t(f32_to_bf16_rne(ph[0])) | (b << 16);
    }
  for (int64_t d = 0; d < D; d += 64) {
    int64_t h = 0;
    for (; h + 4 <= H; h += 4) values_block_bf16<4>(pb + h * np, np, z, D, d, out + h * D);
    for (; h < H; ++h) values_block_bf16<1>(pb + h * np, np, z, D, d, out + h * D);
  }
}

// Prefill values for one head: 2 queries x 128 values in 16 accumulators, each value row loaded once for
// both; f32 FMAs (the row's 8 loads and 2 broadcasts against 16 FMAs: FMA-bound).
template <int NT>
void head_values_block(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, float* out, int64_t ldo) {
  __m512 acc[NT][8];
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < 8; ++i) acc[t][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * ldv;
    __m512 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_ps(vj + 16 * i);
    for (int t = 0; t < NT; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t * ldp + j]);
      for (int i = 0; i < 8; ++i) acc[t][i] = _mm512_fmadd_ps(pt, r[i], acc[t][i]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(out + t * ldo + 16 * i, acc[t][i]);
}

void head_values_v(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, int64_t T, int64_t V,
                   float* out, int64_t ldo) {
  if (V % 128) {
    head_values_generic(p, ldp, v, ldv, n, T, V, out, ldo);
    return;
  }
  for (int64_t i = 0; i < V; i += 128) {
    int64_t t = 0;
    for (; t + 2 <= T; t += 2) head_values_block<2>(p + t * ldp, ldp, v + i, ldv, n, out + t * ldo + i, ldo);
    if (t < T) head_values_block<1>(p + t * ldp, ldp, v + i, ldv, n, out + t * ldo + i, ldo);
  }
}

// Rows g0..g0+15 (group B = g0 + 8; `lone`: only group A, its lanes 8-15 unused) x tokens r0..r0+MT-1;
// the bf16 row of token t at xs + (t - r0) * K.
template <int MT>
void bf16_pair(const WMat& w, const uint16_t* xs, int64_t g0, bool lone, int r0, float* y, int64_t ldy) {
  const int64_t K = w.k, k4 = K / 4 * 4;
  const uint8_t* pa = w.data + g0 * K * 2;
  const uint8_t* pb = lone ? pa : pa + 8 * K * 2;
  const __m512i i01 = _mm512_set_epi16(47, 39, 46, 38, 45, 37, 44, 36, 43, 35, 42, 34, 41, 33, 40, 32, 15, 7, 14, 6,
                                       13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i i23 = _mm512_add_epi16(i01, _mm512_set1_epi16(16));
  __m512 acc[MT][2];  // two independent chains per token
  for (int t = 0; t < MT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k4; b += 4) {
    const __m512i wa = _mm512_loadu_si512(pa + b * 16), wb = _mm512_loadu_si512(pb + b * 16);
    if (MT == 1) {
      prefetch_ahead(pa + b * 16);
      prefetch_ahead(pb + b * 16);
    }
    const __m512i w01 = _mm512_permutex2var_epi16(wa, i01, wb), w23 = _mm512_permutex2var_epi16(wa, i23, wb);
    for (int t = 0; t < MT; ++t) {
      const uint16_t* x = xs + t * K;
      acc[t][0] = dp_bf16(acc[t][0], w01, bcast_pair(x + b));
      acc[t][1] = dp_bf16(acc[t][1], w23, bcast_pair(x + b + 2));
    }
  }
  for (int t = 0; t < MT; ++t) {
    alignas(64) float out[16];
    _mm512_store_ps(out, _mm512_add_ps(acc[t][0], acc[t][1]));
    const uint16_t* x = xs + t * K;
    for (int64_t b = k4; b < K; ++b)  // the last K % 4 columns, the same products
      for (int i = 0; i < 16; ++i)
        out[i] += bf16_to_f32(rd16((i < 8 ? pa : pb) + (b * 8 + (i & 7)) * 2)) * bf16_to_f32(x[b]);
    float* yr = y + (r0 + t) * ldy + g0;
    for (int i = 0; i < (lone ? 8 : 16); ++i) yr[i] = out[i];
  }
}

void bf16_rows_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t K = w.k;
  const int64_t full = imin64(n1, w.n / 8 * 8);  // rows of full 8-row groups; a partial group: row_bf16
  if (full > n0) {
    for (int r0 = 0; r0 < a.m; r0 += kBf16Tokens) {
      const int mt = int(imin64(kBf16Tokens, a.m - r0));
      const uint16_t* xs = bf16_rows(a, r0, mt, K);
      for (int64_t g0 = n0; g0 < full; g0 += 16) {
        const bool lone = g0 + 16 > full;
        by_token_blocks(mt, [&](auto n, int t) { bf16_pair<decltype(n)::n>(w, xs + t * K, g0, lone, r0 + t, y, ldy); });
      }
    }
  }
  if (n1 > full && n1 > n0) gemm_rows<row_bf16>(w, a, n0 > full ? n0 : full, n1, y, ldy);
}

// ------------------------------------------------------------------------------------------------
// amx tile layouts read with VNNI: a tile row (64 bytes) is 16 output rows x 4 consecutive k, so
// dpbusd against the broadcast activation dword accumulates 16 outputs at once.

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One N-block (nt tiles starting at tile nt0), tokens r0..r0+MT-1.
template <int MT>
void amx_int8_nblock(const WMat& w, const QAct& a, int64_t nt0, int tiles, int r0, float* y, int64_t ldy) {
  const int64_t kt = w.k / 64;
  const uint8_t* base = w.data + nt0 * kt * 1024;
  const float* scales = reinterpret_cast<const float*>(w.data + (w.n / 16) * kt * 1024);
  __m512 accf[4][MT];
  for (int s = 0; s < tiles; ++s)
    for (int t = 0; t < MT; ++t) accf[s][t] = _mm512_setzero_ps();
  int64_t ar[MT];
  for (int t = 0; t < MT; ++t) ar[t] = a.row(r0 + t);
  for (int64_t kb = 0; kb < kt; ++kb) {
    for (int s = 0; s < tiles; ++s) {
      const uint8_t* tile = base + (kb * tiles + s) * 1024;
      __m512i acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_si512();
      for (int r = 0; r < 16; ++r) {
        if constexpr (MT == 1) prefetch_ahead(tile + 64 * r);
        const __m512i wv = _mm512_loadu_si512(tile + 64 * r);
        for (int t = 0; t < MT; ++t)
          acc[t] = _mm512_dpbusd_epi32(acc[t], wv, bcast4(a.q + ar[t] * a.k + 64 * kb + 4 * r));
      }
      for (int t = 0; t < MT; ++t) {  // codes are q + 128: subtract 128 * sum(x codes)
        const int32_t* xs = a.s16 + ar[t] * (a.k / 16) + 4 * kb;
        const float dx = a.d[ar[t] * (a.k / 64) + kb];
        const int32_t xsum = xs[0] + xs[1] + xs[2] + xs[3];
        accf[s][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t]), _mm512_set1_ps(dx),
                                     _mm512_sub_ps(accf[s][t], _mm512_set1_ps(128.f * dx * float(xsum))));
      }
    }
  }
  for (int s = 0; s < tiles; ++s) {
    const __m512 sc = _mm512_loadu_ps(scales + (nt0 + s) * 16);
    for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + (nt0 + s) * 16, _mm512_mul_ps(accf[s][t], sc));
  }
}

// int4: 16 tile rows give k = 4r..4r+3 (low nibbles) and 64 + 4r.. (high nibbles) of the 128-block.
// G = values per scale group; group j of the block covers tile rows [j*G/4 % 16 ...] of one nibble.
template <int MT, int G>
void amx_int4_nblock(const WMat& w, const QAct& a, int64_t nt0, int tiles, int r0, float* y, int64_t ldy) {
  constexpr int NG = 128 / G;
  const int64_t kt = w.k / 128;
  const uint8_t* base = w.data + nt0 * kt * 1024;
  const float* scales = reinterpret_cast<const float*>(w.data + (w.n / 16) * kt * 1024);
  const int64_t tile0 = nt0 * kt;  // tile index of the N-block's first tile
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 accf[4][MT];
  for (int s = 0; s < tiles; ++s)
    for (int t = 0; t < MT; ++t) accf[s][t] = _mm512_setzero_ps();
  int64_t ar[MT];
  for (int t = 0; t < MT; ++t) ar[t] = a.row(r0 + t);
  for (int64_t kb = 0; kb < kt; ++kb) {
    for (int s = 0; s < tiles; ++s) {
      const uint8_t* tile = base + (kb * tiles + s) * 1024;
      __m512i acc[MT][NG];
      for (int t = 0; t < MT; ++t)
        for (int j = 0; j < NG; ++j) acc[t][j] = _mm512_setzero_si512();
      for (int r = 0; r < 16; ++r) {
        if constexpr (MT == 1) prefetch_ahead(tile + 64 * r);
        const __m512i v = _mm512_loadu_si512(tile + 64 * r);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        // group of low nibble row r and of high nibble row r
        const int jl = NG == 4 ? r / 8 : 0;
        const int jh = NG == 1 ? 0 : (NG == 2 ? 1 : 2 + r / 8);
        for (int t = 0; t < MT; ++t) {
          const int8_t* xq = a.q + ar[t] * a.k + 128 * kb;
          acc[t][jl] = _mm512_dpbusd_epi32(acc[t][jl], lo, bcast4(xq + 4 * r));
          acc[t][jh] = _mm512_dpbusd_epi32(acc[t][jh], hi, bcast4(xq + 64 + 4 * r));
        }
      }
      const float* sc = scales + (tile0 + kb * tiles + s) * NG * 16;
      for (int t = 0; t < MT; ++t) {
        const int32_t* xs = a.s16 + ar[t] * (a.k / 16) + 8 * kb;
        const float* xd = a.d + ar[t] * (a.k / G) + kb * NG;
        for (int j = 0; j < NG; ++j) {
          int32_t xsum = 0;
          for (int q = 0; q < G / 16; ++q) xsum += xs[j * (G / 16) + q];
          const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[t][j], _mm512_set1_epi32(8 * xsum)));
          accf[s][t] = _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_loadu_ps(sc + 16 * j), _mm512_set1_ps(xd[j])), accf[s][t]);
        }
      }
    }
  }
  for (int s = 0; s < tiles; ++s)
    for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + (nt0 + s) * 16, accf[s][t]);
}

// Prefill: while a kernel call works on row group g (amx_bf16: N-block g) from cache, it fetches a share of
// group g+1 (the next weights, cold in DRAM the first time) a few lines per super-block (K-block); the
// calls of one group's token blocks share the group between them. kNextGroup = 0 (KTPACK_NEXT_GROUP=0)
// turns it off.
int kNextGroup = 1;
struct NextLines {
  const char* p = nullptr;  // first line of this call's share (nullptr: none)
  int64_t lines = 0;        // lines in the share
  // Call j of `calls` on one group: lines [j L / calls, (j + 1) L / calls) of the L lines at `next`.
  static NextLines share(const void* next, int64_t L, int64_t j, int64_t calls) {
    const int64_t l0 = j * L / calls, l1 = (j + 1) * L / calls;
    return {static_cast<const char*>(next) + 64 * l0, l1 - l0};
  }
  inline void at(int64_t b, int64_t nb) const {
    if (!p) return;
    for (int64_t i = b * lines / nb, i1 = (b + 1) * lines / nb; i < i1; ++i) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
  }
};

// amx_bf16 with vdpbf16ps: a tile row is 16 output rows x one (k, k+1) bf16 pair, the pair the
// instruction multiplies, so one broadcast activation pair (bf16, rounded as in bf16_rows_gemm) gives
// 16 outputs x 2 exact products. One token (decode) reads the tiles one after another, front to back;
// MT tokens read row r of all the block's tiles before row r + 1 (tiles x MT independent chains, ~7%
// faster in a prefill; from DRAM that order halved the one-token rate: 21 -> 11 GB/s). One thread, 64
// tokens, 512 x 2048: 47 -> 115 GMAC/s against the f32 FMAs on widened weights it replaced.
// (noinline: inlined into amx_bf16_gemm's token-block lambda, GCC 12 made it 105 -> 45 GMAC/s.)
template <int MT>
__attribute__((noinline)) void amx_bf16_nblock(const WMat& w, const uint16_t* xs, int64_t nt0, int tiles, int r0,
                                               float* y, int64_t ldy, const NextLines& nx = {}) {
  const int64_t kt = w.k / 32, K = w.k;
  const uint8_t* base = w.data + nt0 * kt * 1024;
  __m512 acc[4][MT];
  for (int s = 0; s < 4; ++s)
    for (int t = 0; t < MT; ++t) acc[s][t] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kt; ++kb) {
    const uint8_t* blk = base + kb * tiles * 1024;
    if constexpr (MT == 1) {
      for (int s = 0; s < tiles; ++s) {
        const uint8_t* tile = blk + s * 1024;
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) {
          prefetch_ahead(tile + 64 * r);
          acc[s][0] = dp_bf16(acc[s][0], _mm512_loadu_si512(tile + 64 * r), bcast_pair(xs + 32 * kb + 2 * r));
        }
      }
    } else {
      nx.at(kb, kt);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        for (int s = 0; s < 4; ++s) {
          if (s >= tiles) break;
          const __m512i v = _mm512_loadu_si512(blk + s * 1024 + 64 * r);
          for (int t = 0; t < MT; ++t) acc[s][t] = dp_bf16(acc[s][t], v, bcast_pair(xs + t * K + 32 * kb + 2 * r));
        }
    }
  }
  for (int s = 0; s < tiles; ++s)
    for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + (nt0 + s) * 16, acc[s][t]);
}

void amx_bf16_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (w.n_block > 4) {  // the kernel keeps at most 4 tiles of accumulators
    gemm_rows<row_amx_bf16>(w, a, n0, n1, y, ldy);
    return;
  }
  const int64_t n_tiles = w.n / 16, kt = w.k / 32;
  for (int r0 = 0; r0 < a.m; r0 += kBf16Tokens) {
    const int mt = int(imin64(kBf16Tokens, a.m - r0));
    const uint16_t* xs = bf16_rows(a, r0, mt, w.k);
    const int calls = (mt + 3) / 4;  // by_token_blocks' calls per N-block
    for (int64_t nt0 = n0 / 16; nt0 < n1 / 16; nt0 += w.n_block) {
      const int tiles = int(imin64(w.n_block, n_tiles - nt0));
      // the N-block (tiles x K bf16: 256 KiB at K = 2048) in at the streaming rate before its token
      // blocks reuse it from L2: bench-BF16 512-token prefill 1.17-1.20 -> 1.08-1.12 s (3 alternations);
      // once the previous block's calls have prefetched it (below), this only walks L2
      if (mt >= 8) touch(w.data + nt0 * kt * 1024, tiles * kt * 1024);
      // while they work on it, the calls fetch the next N-block of the range (lines split between them)
      const int64_t nx0 = nt0 + w.n_block;
      const bool next = kNextGroup && mt >= 8 && nx0 < n1 / 16;
      const int64_t next_lines = next ? imin64(w.n_block, n_tiles - nx0) * kt * 16 : 0;
      by_token_blocks(mt, [&](auto n, int t) {
        const NextLines nx = next ? NextLines::share(w.data + nx0 * kt * 1024, next_lines, t / 4, calls) : NextLines{};
        amx_bf16_nblock<decltype(n)::n>(w, xs + t * w.k, nt0, tiles, r0 + t, y, ldy, nx);
      });
    }
  }
}

template <template <int> class NB>
void amx_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t n_tiles = w.n / 16;
  for (int64_t nt0 = n0 / 16; nt0 < n1 / 16; nt0 += w.n_block) {
    if (w.n_block > 4) {  // the kernels keep at most 4 tiles of accumulators
      const int64_t hi = imin64(n1, (nt0 + w.n_block) * 16);
      if (w.type == WType::amx_int8) gemm_rows<row_amx_int8>(w, a, nt0 * 16, hi, y, ldy);
      else
        gemm_rows<row_amx_int4>(w, a, nt0 * 16, hi, y, ldy);
      continue;
    }
    const int tiles = int(imin64(w.n_block, n_tiles - nt0));
    by_token_blocks(a.m, [&](auto mt, int r) { NB<decltype(mt)::n>::run(w, a, nt0, tiles, r, y, ldy); });
  }
}

// ------------------------------------------------------------------------------------------------
// ggml_lanes_v1 (layouts/ggml_lanes.py): a lane block is 16 rows x one 256-value super-block, one row
// per 32-bit lane, so the amx-style dpbusd against the broadcast activation dword needs no shuffles
// and no horizontal sums. A sub-block's int32 dots are multiplied by its integer scale (vpmulld) and
// summed exactly; the f16 super-block scales are applied in f32 once per 256 values (as ggml does).
// One kernel call: row group g (16 rows), tokens r0..r0+MT-1, all of K.

// With KTPACK_PREFETCH set, decode prefetches the block kPrefetch bytes ahead a few lines per tile row,
// spread over the block (all of a block's lines at once measured 35% slower from DRAM).
inline void prefetch_lines(const uint8_t* p, int lines) {
  if (kPrefetch < 0) return;  // KTPACK_PREFETCH=-1: none (the hardware prefetchers alone)
  for (int i = 0; i < lines; ++i) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch + 64 * i, _MM_HINT_T0);
}

// The activation rows of MT tokens as a lane kernel reads them: codes, one scale per `block` values, the
// sums of every 16 codes.
template <int MT>
struct TokenRows {
  const int8_t* q[MT];
  const float* d[MT];
  const int32_t* s16[MT];
  TokenRows(const QAct& a, int r0, int block) {
    for (int t = 0; t < MT; ++t) {
      const int64_t ar = a.row(r0 + t);
      q[t] = a.q + ar * a.k, d[t] = a.d + ar * (a.k / block), s16[t] = a.s16 + ar * (a.k / 16);
    }
  }
};

inline __m512i load_u8x16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }

template <int MT>
void lanes_q4k(const WMat& w, const QAct& a, int64_t g, int r0, float* y, int64_t ldy, const NextLines& nx = {}) {
  constexpr int BB = 2368;
  const int64_t nb = w.k / 256;
  const uint8_t* base = w.data + g * nb * BB;
  const __m512i m4 = _mm512_set1_epi8(0x0F), mf0 = _mm512_set1_epi8(char(0xF0));
  const TokenRows<MT> x(a, r0, 256);
  __m512 f[MT];
  for (int t = 0; t < MT; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = base + b * BB;
    if constexpr (MT == 1) prefetch_lines(blk + 2048, 5);  // scales; the code rows prefetch their own lines
    nx.at(b, nb);
    __m512i isum[MT];
    for (int t = 0; t < MT; ++t) isum[t] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < 2; ++s) {  // tile rows 8s..8s+7: sub-blocks 4h+s (low nibbles), 4h+2+s (high)
        __m512i lo_acc[MT], hi_acc[MT];
        for (int t = 0; t < MT; ++t) lo_acc[t] = hi_acc[t] = _mm512_setzero_si512();
        // a constant trip count: GCC then unrolls and keeps the accumulators in registers (with the bounds
        // 8s..8s+7 it kept a loop with a spill and register copies per step: 137 -> 173 GMAC/s, 1 thread)
#pragma GCC unroll 8
        for (int rr = 0; rr < 8; ++rr) {
          const int r = 8 * s + rr;
          if constexpr (MT == 1) prefetch_lines(blk + 1024 * h + 64 * r, 1);
          const __m512i v = _mm512_loadu_si512(blk + 1024 * h + 64 * r);
          // high nibbles in place (16 x the code: no shift here; the sums are divided by 16, exactly, below)
          const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(v, mf0);
          for (int t = 0; t < MT; ++t) {
            const int8_t* xt = x.q[t] + 256 * b + 128 * h + 4 * r;
            lo_acc[t] = _mm512_dpbusd_epi32(lo_acc[t], lo, bcast4(xt));
            hi_acc[t] = _mm512_dpbusd_epi32(hi_acc[t], hi, bcast4(xt + 64));
          }
        }
        const __m512i sl = load_u8x16(blk + 2048 + 16 * (4 * h + s));
        const __m512i sh = load_u8x16(blk + 2048 + 16 * (4 * h + 2 + s));
        for (int t = 0; t < MT; ++t)
          isum[t] = _mm512_add_epi32(
              isum[t], _mm512_add_epi32(_mm512_mullo_epi32(lo_acc[t], sl),
                                        _mm512_mullo_epi32(_mm512_srai_epi32(hi_acc[t], 4), sh)));
      }
    // mins: int16 pairs (m_2p, m_2p+1) per row against the pair of 32-value activation sums
    __m512i mn[4];
    for (int p = 0; p < 4; ++p) mn[p] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(blk + 2176 + 32 * p)));
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 2304)));
    const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 2336)));
    for (int t = 0; t < MT; ++t) {
      const int32_t* s16 = x.s16[t] + 16 * b;
      __m512i im = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) {
        const uint32_t lo = uint16_t(s16[4 * p] + s16[4 * p + 1]), hi = uint16_t(s16[4 * p + 2] + s16[4 * p + 3]);
        im = _mm512_dpwssd_epi32(im, mn[p], _mm512_set1_epi32(int(lo | hi << 16)));
      }
      const __m512 dx = _mm512_set1_ps(x.d[t][b]);
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(d, dx),
                             _mm512_fnmadd_ps(_mm512_cvtepi32_ps(im), _mm512_mul_ps(dm, dx), f[t]));
    }
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + 16 * g, f[t]);
}

// Q6_K lanes: tile rows 4s..4s+3's four sub-block dots (acc[t][i]: sub-block 4i+s) into the block's sum.
// Codes are offset by 32: subtract 32 x the sub-block's activation sum, then times its int8 scale.
template <int MT>
inline void q6k_add_subblocks(const __m512i (&acc)[MT][4], const uint8_t* blk, int s, const TokenRows<MT>& x, int64_t b,
                              __m512i* isum) {
  for (int i = 0; i < 4; ++i) {
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 3072 + 16 * (4 * i + s))));
    for (int t = 0; t < MT; ++t) {
      const __m512i dot = _mm512_sub_epi32(acc[t][i], _mm512_set1_epi32(32 * x.s16[t][16 * b + 4 * i + s]));
      isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot, sc));
    }
  }
}

template <int MT>
void lanes_q6k(const WMat& w, const QAct& a, int64_t g, int r0, float* y, int64_t ldy, const NextLines& nx = {}) {
  constexpr int BB = 3360;
  const int64_t nb = w.k / 256;
  const uint8_t* base = w.data + g * nb * BB;
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const TokenRows<MT> x(a, r0, 256);
  __m512 f[MT];
  for (int t = 0; t < MT; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = base + b * BB;
    if constexpr (MT == 1) prefetch_lines(blk + 3072, 5);  // scales; the code rows prefetch their own lines
    nx.at(b, nb);
    __m512i isum[MT];
    for (int t = 0; t < MT; ++t) isum[t] = _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s) {  // tile rows 4s..4s+3: quarter i's values 64i+16s.., sub-block 4i+s
      __m512i acc[MT][4];
      for (int t = 0; t < MT; ++t)
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr) {  // constant trip count, as in lanes_q4k
        const int r = 4 * s + rr;
        if constexpr (MT == 1) prefetch_lines(blk + 192 * r, 3);
        const __m512i v0 = _mm512_loadu_si512(blk + 192 * r), v1 = _mm512_loadu_si512(blk + 192 * r + 64);
        const __m512i hv = _mm512_loadu_si512(blk + 192 * r + 128);
        // high bit pair i moves to bits 4-5 (16-bit shifts: bits crossing into the next byte are masked off)
        __m512i c[4];
        c[0] = _mm512_or_si512(_mm512_and_si512(v0, m4), _mm512_and_si512(_mm512_slli_epi16(hv, 4), m30));
        c[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v0, 4), m4),
                               _mm512_and_si512(_mm512_slli_epi16(hv, 2), m30));
        c[2] = _mm512_or_si512(_mm512_and_si512(v1, m4), _mm512_and_si512(hv, m30));
        c[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v1, 4), m4),
                               _mm512_and_si512(_mm512_srli_epi16(hv, 2), m30));
        for (int t = 0; t < MT; ++t)
          for (int i = 0; i < 4; ++i)
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], c[i], bcast4(x.q[t] + 256 * b + 64 * i + 4 * r));
      }
      q6k_add_subblocks<MT>(acc, blk, s, x, b, isum);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 3328)));
    for (int t = 0; t < MT; ++t)
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(d, _mm512_set1_ps(x.d[t][b])), f[t]);
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + 16 * g, f[t]);
}

// Q6_K with GFNI (Zen 4, Ice Lake and later; not Cooper Lake): a code's two high bits go from their pair
// of the high-bit byte to bits 4-5 with one GF2P8AFFINEQB (an 8x8 bit matrix per byte: the other bits
// zero), and one VPTERNLOGD merges them with the low nibble: 10 vector ops per tile row instead of 17.
// Byte i of the matrix qword gives output bit 7 - i.
constexpr uint64_t gf_pair_to_45(int pair) {  // input bits 2p, 2p+1 -> output bits 4, 5
  return (uint64_t(1) << (2 * pair)) << 24 | (uint64_t(2) << (2 * pair)) << 16;
}

template <int MT>
__attribute__((target("gfni"))) void lanes_q6k_gfni(const WMat& w, const QAct& a, int64_t g, int r0, float* y,
                                                    int64_t ldy, const NextLines& nx) {
  constexpr int BB = 3360;
  const int64_t nb = w.k / 256;
  const uint8_t* base = w.data + g * nb * BB;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i A0 = _mm512_set1_epi64(int64_t(gf_pair_to_45(0))), A1 = _mm512_set1_epi64(int64_t(gf_pair_to_45(1)));
  const __m512i A2 = _mm512_set1_epi64(int64_t(gf_pair_to_45(2))), A3 = _mm512_set1_epi64(int64_t(gf_pair_to_45(3)));
  const TokenRows<MT> x(a, r0, 256);
  __m512 f[MT];
  for (int t = 0; t < MT; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = base + b * BB;
    if constexpr (MT == 1) prefetch_lines(blk + 3072, 5);
    nx.at(b, nb);
    __m512i isum[MT];
    for (int t = 0; t < MT; ++t) isum[t] = _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s) {
      __m512i acc[MT][4];
      for (int t = 0; t < MT; ++t)
        for (int i = 0; i < 4; ++i) acc[t][i] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int rr = 0; rr < 4; ++rr) {
        const int r = 4 * s + rr;
        if constexpr (MT == 1) prefetch_lines(blk + 192 * r, 3);
        const __m512i v0 = _mm512_loadu_si512(blk + 192 * r), v1 = _mm512_loadu_si512(blk + 192 * r + 64);
        const __m512i hv = _mm512_loadu_si512(blk + 192 * r + 128);
        __m512i c[4];  // (nibble & 0x0F) | high pair at bits 4-5: ternlog 0xEA = (A & B) | C
        c[0] = _mm512_ternarylogic_epi32(v0, m4, _mm512_gf2p8affine_epi64_epi8(hv, A0, 0), 0xEA);
        c[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 4), m4, _mm512_gf2p8affine_epi64_epi8(hv, A1, 0), 0xEA);
        c[2] = _mm512_ternarylogic_epi32(v1, m4, _mm512_gf2p8affine_epi64_epi8(hv, A2, 0), 0xEA);
        c[3] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v1, 4), m4, _mm512_gf2p8affine_epi64_epi8(hv, A3, 0), 0xEA);
        for (int t = 0; t < MT; ++t)
          for (int i = 0; i < 4; ++i)
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], c[i], bcast4(x.q[t] + 256 * b + 64 * i + 4 * r));
      }
      q6k_add_subblocks<MT>(acc, blk, s, x, b, isum);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 3328)));
    for (int t = 0; t < MT; ++t)
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(d, _mm512_set1_ps(x.d[t][b])), f[t]);
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + 16 * g, f[t]);
}

// Q8_0: a lane block is 16 rows x one 32-value block, codes stored as q + 128 (unsigned): dpbusd, then
// subtract 128 x the block's activation sum; f16 row scales times the block's activation scale.
template <int MT>
void lanes_q80(const WMat& w, const QAct& a, int64_t g, int r0, float* y, int64_t ldy, const NextLines& nx = {}) {
  constexpr int BB = 544;
  const int64_t nb = w.k / 32;
  const uint8_t* base = w.data + g * nb * BB;
  const TokenRows<MT> x(a, r0, 32);
  __m512 f[MT];
  for (int t = 0; t < MT; ++t) f[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = base + b * BB;
    if constexpr (MT == 1) prefetch_lines(blk, 9);  // 8.5 lines a block: a line ahead of every line read
    nx.at(b, nb);
    __m512i acc[MT];
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_si512();
    for (int r = 0; r < 8; ++r) {
      const __m512i v = _mm512_loadu_si512(blk + 64 * r);
      for (int t = 0; t < MT; ++t) acc[t] = _mm512_dpbusd_epi32(acc[t], v, bcast4(x.q[t] + 32 * b + 4 * r));
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 512)));
    for (int t = 0; t < MT; ++t) {
      const __m512i dot = _mm512_sub_epi32(acc[t], _mm512_set1_epi32(128 * (x.s16[t][2 * b] + x.s16[t][2 * b + 1])));
      f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(x.d[t][b])), f[t]);
    }
  }
  for (int t = 0; t < MT; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + 16 * g, f[t]);
}

// Prefill: a row group's weights (16 rows x K: 40-320 KiB for DeepSeek's K) stay in L2 while every
// token block uses them; decode runs the one-token kernel, which prefetches.
template <WType T, int MT, bool GF>
void lanes_call(const WMat& w, const QAct& a, int64_t g, int r, float* y, int64_t ldy, const NextLines& nx) {
  if constexpr (T == WType::lanes_q4_k)
    lanes_q4k<MT>(w, a, g, r, y, ldy, nx);
  else if constexpr (T == WType::lanes_q6_k && GF)
    lanes_q6k_gfni<MT>(w, a, g, r, y, ldy, nx);
  else if constexpr (T == WType::lanes_q6_k)
    lanes_q6k<MT>(w, a, g, r, y, ldy, nx);
  else
    lanes_q80<MT>(w, a, g, r, y, ldy, nx);
}

template <WType T, bool GF = false>
void lanes_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t group_bytes = w.k / ggml_block_values(T) * lanes_block_bytes(T), group_lines = (group_bytes + 63) / 64;
  const int calls = (a.m + 3) / 4;  // by_token_blocks' calls per group
  for (int64_t g = n0 / 16, g1 = n1 / 16; g < g1; ++g) {
    const bool next = kNextGroup && a.m > 1 && g + 1 < g1;
    by_token_blocks(a.m, [&](auto mt, int r) {
      const NextLines nx =
          next ? NextLines::share(w.data + (g + 1) * group_bytes, group_lines, r / 4, calls) : NextLines{};
      lanes_call<T, decltype(mt)::n, GF>(w, a, g, r, y, ldy, nx);
    });
  }
}

template <int MT>
struct Int8NB {
  static void run(const WMat& w, const QAct& a, int64_t nt0, int tiles, int r0, float* y, int64_t ldy) {
    amx_int8_nblock<MT>(w, a, nt0, tiles, r0, y, ldy);
  }
};
template <int MT>
struct Int4NB {
  static void run(const WMat& w, const QAct& a, int64_t nt0, int tiles, int r0, float* y, int64_t ldy) {
    if (w.group == 128) amx_int4_nblock<MT, 128>(w, a, nt0, tiles, r0, y, ldy);
    else if (w.group == 64) amx_int4_nblock<MT, 64>(w, a, nt0, tiles, r0, y, ldy);
    else amx_int4_nblock<MT, 32>(w, a, nt0, tiles, r0, y, ldy);
  }
};

}  // namespace
}  // namespace avx512

void fill_kernels_avx512(Kernels* k) {
  using namespace avx512;
  if (const char* e = std::getenv("KTPACK_PREFETCH")) kPrefetch = std::atoi(e);
  if (const char* e = std::getenv("KTPACK_NEXT_GROUP")) kNextGroup = std::atoi(e);
  k->name = "avx512";
  fill_generic(k);
  k->silu_mul = silu_mul_v;
  k->exp_sum = exp_sum_v;
  k->dot = dot_v;
  k->axpy = axpy_v;
  k->attn_scores = attn_scores_v<float>;
  k->attn_values = attn_values_v<float>;
  k->attn_scores16 = attn_scores_v<uint16_t>;
  k->attn_values16 = attn_values_v<uint16_t>;
  k->attn_scores_bf16 = attn_scores_bf16_v;
  k->attn_values_bf16 = attn_values_bf16_v;
  k->head_values = head_values_v;
  k->read = read_zmm;
  k->gemm[int(WType::ggml_q8_0)] = q8_0_gemm;
  k->gemm[int(WType::ggml_q4_k)] = kquant_gemm<144>;
  k->gemm[int(WType::ggml_q5_k)] = kquant_gemm<176>;
  k->gemm[int(WType::ggml_q6_k)] = kquant_gemm<210>;
  k->gemm[int(WType::ggml_bf16)] = bf16_rows_gemm;
  k->gemm[int(WType::ggml_f32)] = f32_rows_gemm;
  k->gemm[int(WType::amx_int8)] = amx_gemm<Int8NB>;
  k->gemm[int(WType::amx_int4)] = amx_gemm<Int4NB>;
  k->gemm[int(WType::amx_bf16)] = amx_bf16_gemm;
  k->gemm[int(WType::ggml_q4_0)] = q32_gemm<WType::ggml_q4_0, 18>;
  k->gemm[int(WType::ggml_q4_1)] = q32_gemm<WType::ggml_q4_1, 20>;
  k->gemm[int(WType::ggml_q5_0)] = q32_gemm<WType::ggml_q5_0, 22>;
  k->gemm[int(WType::ggml_q5_1)] = q32_gemm<WType::ggml_q5_1, 24>;
  k->gemm[int(WType::lanes_q4_k)] = lanes_gemm<WType::lanes_q4_k>;
  // KTPACK_GFNI=0: the Q6_K unpack without GFNI (as on a CPU that lacks it)
  const char* gf = std::getenv("KTPACK_GFNI");
  const bool gfni = cpu_features().gfni && !(gf && gf[0] == '0');
  k->gemm[int(WType::lanes_q6_k)] = gfni ? lanes_gemm<WType::lanes_q6_k, true> : lanes_gemm<WType::lanes_q6_k>;
  k->gemm[int(WType::lanes_q8_0)] = lanes_gemm<WType::lanes_q8_0>;
}

}  // namespace ktpack
