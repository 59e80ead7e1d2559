// A BLAS GEMM loaded at run time (dlopen), so the module has no link-time BLAS
// dependency and no libtorch: Python passes the path of a shared library (the
// OpenBLAS of the scipy-openblas32 wheel) and the prefix of its CBLAS symbols.
#pragma once
#include <cstdint>

namespace pyfici {

// True once gemm_load() succeeded in this module.
bool gemm_loaded();

// C[m, n] = alpha * A[m, k] * B[n, k]^T + beta * C, row-major with leading dimensions
// lda, ldb, ldc (C is not read when beta == 0). Uses the BLAS's current thread count
// (see BlasThreads). The sizes must fit the BLAS's 32-bit integers.
void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float alpha = 1.0f, float beta = 0.0f);
void gemm_nt(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
             int64_t ldc, double alpha = 1.0, double beta = 0.0);

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
