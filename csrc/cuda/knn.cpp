#include <stdexcept>
#include <string>

#include "common.h"
#include "knn.cuh"
#include "registry.h"

namespace pyfici {
PYFICI_REGISTER(m) {
  m.def(
      "knn_select_tile",
      [](std::uintptr_t S, int dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, std::uintptr_t a,
         std::uintptr_t b, int64_t k, std::uintptr_t vals, std::uintptr_t idx, int64_t self_offset,
         std::uintptr_t stream) {
        if (dtype != kFloat32 && dtype != kFloat64)
          throw std::invalid_argument("knn_select_tile: dtype must be float32 or float64");
        if (k < 1 || k > kKnnMaxK)
          throw std::invalid_argument("knn_select_tile: k must be in [1, " + std::to_string(kKnnMaxK) + "]");
        launch_knn_select_tile(reinterpret_cast<const void*>(S), dtype, rows, cols, ld, col_offset,
                               reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), k,
                               reinterpret_cast<void*>(vals), as_ptr<int64_t>(idx), self_offset,
                               reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "knn_select_tile launch");
      },
      "CUDA version of _C.knn_select_tile (k <= 1024); runs on the given stream.");
  m.def(
      "knn_average_rows",
      [](std::uintptr_t Y, int dtype, int64_t D, std::uintptr_t idx, std::uintptr_t w, int64_t Q, int64_t k,
         int64_t lo, int64_t hi, bool normalize_rows, bool spherical, bool finalize, std::uintptr_t out,
         std::uintptr_t stream) {
        if (dtype != kFloat32 && dtype != kFloat64)
          throw std::invalid_argument("knn_average_rows: dtype must be float32 or float64");
        launch_knn_average_rows(reinterpret_cast<const void*>(Y), dtype, D, as_ptr<const int64_t>(idx),
                                reinterpret_cast<const void*>(w), Q, k, lo, hi, normalize_rows, spherical, finalize,
                                reinterpret_cast<void*>(out), reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "knn_average_rows launch");
      },
      "CUDA version of _C.knn_average_rows; runs on the given stream.");
}
}  // namespace pyfici
