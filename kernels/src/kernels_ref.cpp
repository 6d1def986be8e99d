// Scalar reference kernels: compiled for baseline x86-64, always available, and the definition
// the SIMD kernels are tested against (besides the numpy reference on dequantized weights).
#include "engine.h"

namespace ktpack {
namespace ref {
namespace {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

int32_t dot_u8s8(const uint8_t* w, const int8_t* x, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += int32_t(w[i]) * x[i];
  return s;
}

int32_t dot_s8s8(const int8_t* w, const int8_t* x, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += int32_t(w[i]) * x[i];
  return s;
}

#include "quantize_scalar.inc"
#include "kernels_generic.inc"

}  // namespace
}  // namespace ref

void fill_kernels_ref(Kernels* k) {
  k->name = "ref";
  ref::fill_generic(k);
}

}  // namespace ktpack
