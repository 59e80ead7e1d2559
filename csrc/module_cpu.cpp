// pyfici._C_<isa>: CPU kernels, one module per instruction-set level (CMakeLists.txt
// builds the same sources with -march=x86-64 / x86-64-v3 / x86-64-v4). Does not link
// libtorch: every function takes raw pointers (as integers), sizes, dtype codes and a
// thread count. cpu_features() is safe to call from the generic module on any x86-64
// CPU: pyfici/_native.py uses it to choose the variant to import.
#include <omp.h>

#include <string>

#include "registry.h"

#ifndef PYFICI_CPU_MODULE
#define PYFICI_CPU_MODULE _C_generic
#define PYFICI_CPU_ISA "generic"
#endif

namespace {
pybind11::dict cpu_features() {
  pybind11::dict d;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // libgcc's checks include the OS support (XGETBV) for the AVX / AVX-512 register state
  d["avx2"] = bool(__builtin_cpu_supports("avx2"));
  d["fma"] = bool(__builtin_cpu_supports("fma"));
  d["bmi"] = bool(__builtin_cpu_supports("bmi"));
  d["bmi2"] = bool(__builtin_cpu_supports("bmi2"));
  d["f16c"] = bool(__builtin_cpu_supports("f16c"));
  d["movbe"] = bool(__builtin_cpu_supports("movbe"));
  d["lzcnt"] = bool(__builtin_cpu_supports("abm"));
  d["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
  d["avx512bw"] = bool(__builtin_cpu_supports("avx512bw"));
  d["avx512cd"] = bool(__builtin_cpu_supports("avx512cd"));
  d["avx512dq"] = bool(__builtin_cpu_supports("avx512dq"));
  d["avx512vl"] = bool(__builtin_cpu_supports("avx512vl"));
  // bfloat16 matrix hardware: where torch's bfloat16 GEMM (oneDNN) is several times its float32 one,
  // the kNN selection pass runs in bfloat16 (pyfici/backends/knn.py)
  d["avx512bf16"] = bool(__builtin_cpu_supports("avx512bf16"));
  d["amx_bf16"] = bool(__builtin_cpu_supports("amx-bf16"));
  // the vendor decides which BLAS is fastest (pyfici/_native.py: the GEMM provider)
  d["intel"] = bool(__builtin_cpu_is("intel"));
  d["amd"] = bool(__builtin_cpu_is("amd"));
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(PYFICI_CPU_MODULE, m) {
  m.doc() = "pyfici CPU kernels (C++17, OpenMP), variant " PYFICI_CPU_ISA;
  m.attr("__compiler__") = __VERSION__;
  m.attr("__isa__") = PYFICI_CPU_ISA;
#ifdef __AVX512F__
  m.attr("__simd__") = "avx512";
#elif defined(__AVX2__)
  m.attr("__simd__") = "avx2";
#else
  m.attr("__simd__") = "generic";
#endif
  m.def("max_threads", []() { return omp_get_max_threads(); });
  m.def("cpu_features", &cpu_features, "Instruction-set features of the running CPU (x86-64; empty elsewhere).");
  pyfici::export_codes(m);
  pyfici::register_all(m);
}
