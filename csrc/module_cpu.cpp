// pyfici._C: CPU kernels. Does not link libtorch: every function takes raw
// pointers (as integers), sizes, dtype codes and a thread count.
#include <omp.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfici CPU kernels (C++17, OpenMP)";
  m.attr("__compiler__") = __VERSION__;
#ifdef __AVX512F__
  m.attr("__simd__") = "avx512";
#elif defined(__AVX2__)
  m.attr("__simd__") = "avx2";
#else
  m.attr("__simd__") = "generic";
#endif
  m.def("max_threads", []() { return omp_get_max_threads(); });
  pyfici::export_codes(m);
  pyfici::register_all(m);
}
