// The run-time BLAS GEMM provider (see gemm.h). gemm_load(path, prefix) opens the
// library with dlopen (RTLD_LOCAL: its symbols do not leak into the process) and
// looks up <prefix>cblas_sgemm, <prefix>cblas_dgemm, <prefix>openblas_set_num_threads,
// <prefix>openblas_get_num_threads and <prefix>openblas_get_config. The library stays
// loaded for the life of the process. gemm_nt_call is the bare GEMM for benchmarks
// and tests (the kNN worker calls gemm_nt from C++ directly).
#include "gemm.h"

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

// CBLAS enum values (cblas.h): CblasRowMajor, CblasNoTrans, CblasTrans
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using blasint = int;  // scipy-openblas32: 32-bit BLAS integers
using SgemmFn = void (*)(int, int, int, blasint, blasint, blasint, float, const float*, blasint, const float*, blasint,
                         float, float*, blasint);
using DgemmFn = void (*)(int, int, int, blasint, blasint, blasint, double, const double*, blasint, const double*,
                         blasint, double, double*, blasint);
using SetThreadsFn = void (*)(int);
using GetThreadsFn = int (*)();
using ConfigFn = const char* (*)();

struct Blas {
  void* handle = nullptr;
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
  SetThreadsFn set_threads = nullptr;
  GetThreadsFn get_threads = nullptr;
  std::string path, config;
};

Blas g_blas;
std::mutex g_mutex;

void* symbol(void* h, const std::string& name, const std::string& path) {
  dlerror();
  void* p = dlsym(h, name.c_str());
  if (!p) throw std::runtime_error("gemm_load: " + path + " has no symbol " + name);
  return p;
}

std::string gemm_load(const std::string& path, const std::string& prefix) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_blas.handle) {
    if (g_blas.path != path)
      throw std::runtime_error("gemm_load: a BLAS is already loaded from " + g_blas.path + " (asked for " + path + ")");
    return g_blas.config;
  }
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = dlerror();
    throw std::runtime_error("gemm_load: cannot open " + path + ": " + (e ? e : "unknown error"));
  }
  Blas b;
  try {
    b.sgemm = reinterpret_cast<SgemmFn>(symbol(h, prefix + "cblas_sgemm", path));
    b.dgemm = reinterpret_cast<DgemmFn>(symbol(h, prefix + "cblas_dgemm", path));
    b.set_threads = reinterpret_cast<SetThreadsFn>(symbol(h, prefix + "openblas_set_num_threads", path));
    b.get_threads = reinterpret_cast<GetThreadsFn>(symbol(h, prefix + "openblas_get_num_threads", path));
    b.config = reinterpret_cast<ConfigFn>(symbol(h, prefix + "openblas_get_config", path))();
  } catch (...) {
    dlclose(h);
    throw;
  }
  b.handle = h;
  b.path = path;
  g_blas = b;
  return g_blas.config;
}

void require_loaded() {
  if (!g_blas.handle) throw std::runtime_error("the BLAS GEMM is not loaded (call gemm_load first)");
}

// The Python bindings' checks: a loaded BLAS, a float dtype, sizes the BLAS's
// 32-bit integers hold.
void check_gemm_args(const char* name, int dtype, int64_t m, int64_t n, int64_t k) {
  require_loaded();
  if (dtype != kFloat32 && dtype != kFloat64)
    throw std::invalid_argument(std::string(name) + ": dtype must be float32 or float64");
  if (m < 0 || n < 0 || k < 0 || std::max({m, n, k}) > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string(name) + ": m, n, k must be in [0, 2^31)");
}

}  // namespace

bool gemm_loaded() { return g_blas.handle != nullptr; }

void gemm_nt(int64_t m, int64_t n, int64_t k, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
             int64_t ldc, float alpha, float beta) {
  g_blas.sgemm(kRowMajor, kNoTrans, kTrans, static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k),
               alpha, A, static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

void gemm_nt(int64_t m, int64_t n, int64_t k, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
             int64_t ldc, double alpha, double beta) {
  g_blas.dgemm(kRowMajor, kNoTrans, kTrans, static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k),
               alpha, A, static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
}

namespace {
// Rows [r0, r1) of C[m, n] = alpha * A @ B^T + beta * C (contiguous; dtype code) on the calling thread's BLAS.
void gemm_nt_rows(int dtype, int64_t r0, int64_t r1, int64_t n, int64_t k, std::uintptr_t A, std::uintptr_t B,
                  std::uintptr_t C, double alpha, double beta) {
  if (r1 <= r0) return;
  if (dtype == kFloat32)
    gemm_nt(r1 - r0, n, k, as_ptr<const float>(A) + r0 * k, k, as_ptr<const float>(B), k, as_ptr<float>(C) + r0 * n,
            n, static_cast<float>(alpha), static_cast<float>(beta));
  else
    gemm_nt(r1 - r0, n, k, as_ptr<const double>(A) + r0 * k, k, as_ptr<const double>(B), k,
            as_ptr<double>(C) + r0 * n, n, alpha, beta);
}
}  // namespace

BlasThreads::BlasThreads(int n) : saved_(g_blas.get_threads()) {
  if (n != saved_) g_blas.set_threads(n);
}

BlasThreads::~BlasThreads() {
  if (g_blas.get_threads() != saved_) g_blas.set_threads(saved_);
}

PYFICI_REGISTER(m) {
  m.def("gemm_load", &gemm_load, py::arg("path"), py::arg("prefix"),
        "Open the BLAS shared library at `path` (dlopen) and look up its CBLAS GEMMs and OpenBLAS "
        "thread-count functions, named with `prefix` (scipy-openblas32: 'scipy_'). Returns the "
        "library's configuration string. Idempotent for the same path.");
  m.def("gemm_loaded", &gemm_loaded, "True once gemm_load succeeded in this module.");
  m.def(
      "gemm_nt",
      [](int dtype, int64_t m, int64_t n, int64_t k, std::uintptr_t A, std::uintptr_t B, std::uintptr_t C,
         int nthreads, double alpha, double beta) {
        check_gemm_args("gemm_nt", dtype, m, n, k);
        py::gil_scoped_release nogil;
        BlasThreads threads(std::max(1, nthreads));
        gemm_nt_rows(dtype, 0, m, n, k, A, B, C, alpha, beta);
      },
      py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("A"), py::arg("B"), py::arg("C"),
      py::arg("nthreads"), py::arg("alpha") = 1.0, py::arg("beta") = 0.0,
      "C[m, n] = alpha * A[m, k] @ B[n, k]^T + beta * C (contiguous row-major; C is not read when "
      "beta == 0) with the loaded BLAS on nthreads threads.");
  // The same product on OpenMP threads, each running a single-threaded BLAS GEMM
  // on its block of rows of C. Code that scans C with OpenMP right after uses
  // this: the BLAS's own thread pool would still be spinning (waiting for work)
  // on the cores the scan needs, and the scan's pool on the cores of the next GEMM.
  m.def(
      "gemm_nt_omp",
      [](int dtype, int64_t m, int64_t n, int64_t k, std::uintptr_t A, std::uintptr_t B, std::uintptr_t C,
         int nthreads, double alpha, double beta) {
        check_gemm_args("gemm_nt_omp", dtype, m, n, k);
        py::gil_scoped_release nogil;
        BlasThreads threads(1);
        const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, (m + 63) / 64)));
#pragma omp parallel num_threads(nt)
        {
          const int t = omp_get_thread_num(), T = omp_get_num_threads();
          gemm_nt_rows(dtype, m * t / T, m * (t + 1) / T, n, k, A, B, C, alpha, beta);
        }
      },
      py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("A"), py::arg("B"), py::arg("C"),
      py::arg("nthreads"), py::arg("alpha") = 1.0, py::arg("beta") = 0.0,
      "gemm_nt on up to nthreads OpenMP threads (blocks of at least 64 rows of C), each calling the "
      "BLAS single-threaded.");
}

}  // namespace pyfici
