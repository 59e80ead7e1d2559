// pyfici._cuda: CUDA kernels. Does not link libtorch: every function takes raw
// device pointers (as integers), sizes, dtype codes and the caller's stream.
#include <cuda_runtime.h>

#include "registry.h"

#ifndef PYFICI_CUDA_ARCHS
#define PYFICI_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfici CUDA kernels";
  m.attr("__archs__") = PYFICI_CUDA_ARCHS;
  m.def("runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
    return n;
  });
  pyfici::export_codes(m);
  pyfici::register_all(m);
}
