// CPUID + XGETBV + the AMX permission request. Compiled without any ISA flags.
#include "cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace ktpack {
namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // <asm/prctl.h>, defined here for older headers
constexpr long kXfeatureXtiledata = 18;

uint64_t xgetbv0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  const bool avx = c & (1u << 28);
  if (osxsave) {
    const uint64_t xcr0 = xgetbv0();
    f.os_avx = avx && (xcr0 & 0x6) == 0x6;                     // SSE + AVX state
    f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;           // opmask, ZMM_Hi256, Hi16_ZMM
    f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);          // XTILECFG + XTILEDATA
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512_vnni = c & (1u << 11);
    f.gfni = c & (1u << 8);
    f.amx_bf16 = d & (1u << 22);
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
  if (!(f.amx_tile && f.amx_int8 && f.amx_bf16)) {
    f.amx_why = "the CPU has no AMX (CPUID 7.0 EDX bits 22/24/25)";
  } else if (!f.os_amx) {
    f.amx_why = "the OS does not enable AMX tile state (XCR0 bits 17-18)";
  } else if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    f.amx_why = "Linux refused the AMX tile-data permission (arch_prctl ARCH_REQ_XCOMP_PERM)";
  } else {
    f.amx_permitted = true;
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::ref: return "ref";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::amx: return "amx";
  }
  return "?";
}

bool isa_supported(Isa isa, std::string* why) {
  const CpuFeatures& f = cpu_features();
  auto no = [&](const char* msg) {
    if (why) *why = msg;
    return false;
  };
  switch (isa) {
    case Isa::ref:
      return true;
    case Isa::avx2:
      if (!(f.avx2 && f.fma && f.f16c)) return no("the CPU lacks AVX2/FMA/F16C");
      if (!f.os_avx) return no("the OS does not enable AVX state (XCR0)");
      return true;
    case Isa::avx512:
      if (!isa_supported(Isa::avx2, why)) return false;
      if (!(f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni && f.avx512_bf16))
        return no("the CPU lacks AVX-512 F/BW/VL/VNNI/BF16");
      if (!f.os_avx512) return no("the OS does not enable AVX-512 state (XCR0)");
      return true;
    case Isa::amx:
      if (!isa_supported(Isa::avx512, why)) return false;
      if (!f.amx_permitted) {
        if (why) *why = f.amx_why;
        return false;
      }
      return true;
  }
  return no("unknown ISA");
}

}  // namespace ktpack
