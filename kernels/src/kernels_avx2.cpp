// AVX2 + FMA + F16C kernels: the portable row kernels with 256-bit integer dot products.
// Compiled with -mavx2 -mfma -mf16c only; used when the CPU has AVX2 but not AVX-512.
#include <immintrin.h>

#include "engine.h"

namespace ktpack {
namespace avx2 {
namespace {

float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// w <= 63 keeps the pairwise sums of maddubs (u8 x s8 -> s16) far from saturation.
int32_t dot_u8s8(const uint8_t* w, const int8_t* x, int n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i*)(w + i)),
                                           _mm256_loadu_si256((const __m256i*)(x + i)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
  }
  if (i < n) {  // 16 left
    const __m128i p = _mm_maddubs_epi16(_mm_loadu_si128((const __m128i*)(w + i)), _mm_loadu_si128((const __m128i*)(x + i)));
    acc = _mm256_add_epi32(acc, _mm256_castsi128_si256(_mm_madd_epi16(p, _mm_set1_epi16(1))));
  }
  return hsum_epi32(acc);
}

// Signed x signed via |w| and sign(x, w): |w| <= 127 keeps maddubs exact.
int32_t dot_s8s8(const int8_t* w, const int8_t* x, int n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + i));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i));
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
  }
  if (i < n) {
    const __m128i wv = _mm_loadu_si128((const __m128i*)(w + i));
    const __m128i xv = _mm_loadu_si128((const __m128i*)(x + i));
    const __m128i p = _mm_maddubs_epi16(_mm_sign_epi8(wv, wv), _mm_sign_epi8(xv, wv));
    acc = _mm256_add_epi32(acc, _mm256_castsi128_si256(_mm_madd_epi16(p, _mm_set1_epi16(1))));
  }
  return hsum_epi32(acc);
}

#include "quantize_scalar.inc"
#include "kernels_generic.inc"

}  // namespace
}  // namespace avx2

void fill_kernels_avx2(Kernels* k) {
  k->name = "avx2";
  avx2::fill_generic(k);
}

}  // namespace ktpack
