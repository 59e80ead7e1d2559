// A BLAS GEMM loaded at run time (dlopen), so the module has no link-time BLAS
// dependency and no libtorch: Python passes the path of a shared library (the
// OpenBLAS of the scipy-openblas32 wheel) and the prefix of its CBLAS symbols.
#pragma once
#include <cstdint>

namespace pyfici {

// True once gemm_load() succeeded in this module.
bool gemm_loaded();

// C[m, n] = A[m, k] * B[n, k]^T, row-major with leading dimensions lda, ldb, ldc.
// Runs on the calling thread's share of the BLAS threads (see BlasThreads).
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc);
void gemm_nt(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
             int64_t ldc);

// Sets the BLAS library's thread count for the lifetime of the object and restores
// the previous one afterwards (the library may be shared with other users in the process).
class BlasThreads {
 public:
  explicit BlasThreads(int n);
  ~BlasThreads();
  BlasThreads(const BlasThreads&) = delete;
  BlasThreads& operator=(const BlasThreads&) = delete;

 private:
  int saved_;
};

}  // namespace pyfici
