// pybind11 glue for ktpack.kernels._native: argument checks and conversions only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_features.h"

namespace py = pybind11;
using ktpack::Isa;

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
}
