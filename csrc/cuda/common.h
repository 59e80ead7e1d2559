#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pyfici {
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("pyfici CUDA error in ") + what + ": " + cudaGetErrorString(e));
}
}  // namespace pyfici
