// The "amx" ISA: AVX-512 VNNI kernels for decode (a few tokens: memory-bound), AMX tiles for prefill.
//
// The amx_int8 / amx_int4 layouts were made for this: a 1 KiB block is exactly an AMX B tile (16 rows
// of K/4 x 64 bytes: 16 outputs x 4 consecutive k), int8 codes q+128 stored as they are, int4 codes
// split into a low-nibble and a high-nibble tile. With 16 tokens' int8 activations as the A tile,
// TDPBSUD (A signed, B unsigned) gives C[token][row] = sum x_q * code exactly; the epilogue removes the
// code offset (128 or 8 times the activation block sum), applies the activation scale per block and
// the weight scale (per row, or per row and group) in f32. Same arithmetic as the VNNI kernels.
//
// Compiled with the AMX flags; selected only where CPUID, XCR0 and arch_prctl allow AMX.
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#include "engine.h"

namespace ktpack {
namespace amx {
namespace {

Kernels g_avx512;  // the AVX-512 table: decode and the formats without tile kernels

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles: 0, 1 = C (16 tokens x 16 int32), 2 = A (16 tokens x 64 int8), 3 = B (16 x 64 bytes)
void configure() {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

inline int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

template <bool INT4>
void amx_tiles_gemm(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int kpb = INT4 ? 128 : 64;  // k per 1 KiB block
  const int64_t kt = w.k / kpb;
  const int64_t n_tiles = w.n / 16;
  const int g = INT4 ? w.group : 64;  // values per activation/weight scale block
  const float* scales = reinterpret_cast<const float*>(w.data + n_tiles * kt * 1024);
  configure();
  // per call scratch: 16 token rows of codes (K bytes each), the unpacked nibble tiles, C, accumulators
  static thread_local int8_t* xbuf = nullptr;
  static thread_local int64_t xcap = 0;
  if (xcap < 16 * w.k) {
    std::free(xbuf);
    xbuf = static_cast<int8_t*>(std::aligned_alloc(64, size_t(16 * w.k)));
    xcap = 16 * w.k;
  }
  static thread_local float* dxo = nullptr;
  static thread_local int64_t dcap = 0;
  alignas(64) uint8_t bt[2][1024];
  alignas(64) int32_t c[2][256];
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int r0 = 0; r0 < a.m; r0 += 16) {
    const int mt = int(imin64(16, a.m - r0));
    int64_t ar[16];
    for (int t = 0; t < 16; ++t) {
      ar[t] = t < mt ? a.row(r0 + t) : -1;
      if (t < mt) std::memcpy(xbuf + t * w.k, a.q + ar[t] * a.k, size_t(w.k));
      else std::memset(xbuf + t * w.k, 0, size_t(w.k));
    }
    // per token and scale block: dx, and the codes' offset times the activation codes' sum (subtracted
    // in int32, exactly: in f32 it would cancel against C and lose bits)
    const int64_t nsb = w.k / g;
    if (dcap < 16 * nsb) {
      std::free(dxo);
      dxo = static_cast<float*>(std::aligned_alloc(64, size_t(((32 * nsb * 4) + 63) / 64 * 64)));
      dcap = 16 * nsb;
    }
    float* dxs = dxo;
    int32_t* offs = reinterpret_cast<int32_t*>(dxo + 16 * nsb);
    for (int t = 0; t < mt; ++t)
      for (int64_t sb = 0; sb < nsb; ++sb) {
        const int32_t* xs = a.s16 + ar[t] * (a.k / 16) + sb * (g / 16);
        int32_t xsum = 0;
        for (int q = 0; q < g / 16; ++q) xsum += xs[q];
        dxs[t * nsb + sb] = a.d[ar[t] * (a.k / g) + sb];
        offs[t * nsb + sb] = (INT4 ? 8 : 128) * xsum;
      }
    for (int64_t nt0 = n0 / 16; nt0 < n1 / 16; nt0 += w.n_block) {
      const int tiles = int(imin64(w.n_block, n_tiles - nt0));
      for (int s = 0; s < tiles; ++s) {
        const int64_t nt = nt0 + s;
        __m512 acc[16];
        for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
        for (int64_t kb = 0; kb < kt; ++kb) {
          const int64_t ti = nt0 * kt + kb * tiles + s;  // block index within the matrix
          const uint8_t* tile = w.data + ti * 1024;
          const int8_t* xa = xbuf + kb * kpb;
          if constexpr (INT4) {
            for (int r = 0; r < 16; ++r) {
              const __m512i v = _mm512_loadu_si512(tile + 64 * r);
              _mm512_store_si512(bt[0] + 64 * r, _mm512_and_si512(v, m4));
              _mm512_store_si512(bt[1] + 64 * r, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4));
            }
            _tile_zero(0);
            _tile_loadd(2, xa, w.k);
            _tile_loadd(3, bt[0], 64);
            _tile_dpbsud(0, 2, 3);
            if (g == 128) {
              _tile_loadd(2, xa + 64, w.k);
              _tile_loadd(3, bt[1], 64);
              _tile_dpbsud(0, 2, 3);
              _tile_stored(0, c[0], 64);
            } else {  // g == 64: the two halves have their own scales
              _tile_zero(1);
              _tile_loadd(2, xa + 64, w.k);
              _tile_loadd(3, bt[1], 64);
              _tile_dpbsud(1, 2, 3);
              _tile_stored(0, c[0], 64);
              _tile_stored(1, c[1], 64);
            }
          } else {
            _tile_zero(0);
            _tile_loadd(2, xa, w.k);
            _tile_loadd(3, tile, 64);
            _tile_dpbsud(0, 2, 3);
            _tile_stored(0, c[0], 64);
          }
          const int ng = INT4 ? 128 / g : 1;
          for (int j = 0; j < ng; ++j) {
            const int64_t sb = (kb * kpb + j * g) / g;  // this scale block
            if constexpr (INT4) {
              // acc += (C - 8 xsum) dx s_w
              const __m512 sw = _mm512_loadu_ps(scales + ti * ng * 16 + j * 16);
              for (int t = 0; t < mt; ++t) {
                const __m512i ci = _mm512_sub_epi32(_mm512_load_si512(c[j] + 16 * t), _mm512_set1_epi32(offs[t * nsb + sb]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci), _mm512_mul_ps(sw, _mm512_set1_ps(dxs[t * nsb + sb])), acc[t]);
              }
            } else {  // the row scale is applied once at the end
              for (int t = 0; t < mt; ++t) {
                const __m512i ci = _mm512_sub_epi32(_mm512_load_si512(c[j] + 16 * t), _mm512_set1_epi32(offs[t * nsb + sb]));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ci), _mm512_set1_ps(dxs[t * nsb + sb]), acc[t]);
              }
            }
          }
        }
        const __m512 srow = INT4 ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(scales + nt * 16);
        for (int t = 0; t < mt; ++t) _mm512_storeu_ps(y + (r0 + t) * ldy + nt * 16, _mm512_mul_ps(acc[t], srow));
      }
    }
  }
  _tile_release();
}

void gemm_int8(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (a.m < 16 || w.n_block > 4) return g_avx512.gemm[int(WType::amx_int8)](w, a, n0, n1, y, ldy);
  amx_tiles_gemm<false>(w, a, n0, n1, y, ldy);
}

void gemm_int4(const WMat& w, const QAct& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (a.m < 16 || w.group < 64 || w.n_block > 4) return g_avx512.gemm[int(WType::amx_int4)](w, a, n0, n1, y, ldy);
  amx_tiles_gemm<true>(w, a, n0, n1, y, ldy);
}

}  // namespace
}  // namespace amx

void fill_kernels_amx(Kernels* k) {
  fill_kernels_avx512(&amx::g_avx512);
  *k = amx::g_avx512;
  k->name = "amx";
  k->gemm[int(WType::amx_int8)] = amx::gemm_int8;
  k->gemm[int(WType::amx_int4)] = amx::gemm_int4;
}

}  // namespace ktpack
