// What this CPU and OS let ktpack run: CPUID feature bits, XCR0 state enabled by the OS, and the
// Linux permission for AMX tile data. Read once, at import.
#pragma once
#include <string>

namespace ktpack {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vnni = false, avx512_bf16 = false;
  bool gfni = false;  // GF2P8AFFINEQB (byte bit-matrix transforms: the Q6_K unpack)
  bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 says the OS saves that state
  bool amx_permitted = false;                              // arch_prctl(ARCH_REQ_XCOMP_PERM) succeeded
  std::string amx_why;                                     // why AMX is not usable, if it is not
};

// The ISAs ktpack has kernels for, lowest first.
enum class Isa { ref = 0, avx2 = 1, avx512 = 2, amx = 3 };

const CpuFeatures& cpu_features();
bool isa_supported(Isa isa, std::string* why);
const char* isa_name(Isa isa);

}  // namespace ktpack
