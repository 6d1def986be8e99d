// The "amx" ISA. Decode (few tokens) is memory-bound and runs the AVX-512 VNNI kernels, which read
// the amx layouts directly; this translation unit is compiled with the AMX flags so tile kernels for
// prefill can live here, and it is selected only where CPUID, XCR0 and arch_prctl allow AMX.
#include "engine.h"

namespace ktpack {

void fill_kernels_amx(Kernels* k) {
  fill_kernels_avx512(k);
  k->name = "amx";
}

}  // namespace ktpack
