#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pyfici {
// Largest k the CUDA selection kernel handles (k <= 1024).
constexpr int64_t kKnnMaxK = 1024;

// Merge a [rows, cols] score tile (row stride ld) into the running top-k state
// ([rows, k] values best first, int64 global indices). score(j) = S[j] * a[j] + b[j]
// (a, b may be null). Column j has global index col_offset + j; self_offset >= 0
// excludes global index self_offset + row. dtype: 0 float32, 1 float64.
// Launches on `stream`; no synchronisation.
void launch_knn_select_tile(const void* S, int dtype, int64_t rows, int64_t cols, int64_t ld,
                            int64_t col_offset, const void* a, const void* b, int64_t k, void* vals,
                            int64_t* idx, int64_t self_offset, cudaStream_t stream);

// out[q] = sum_t w[q,t] * u(Y[idx[q,t] - lo]) over idx in [lo, hi) (u = y/||y|| if
// normalize_rows), then / ||.|| (spherical) or / sum_t w[q,t] when finalize.
void launch_knn_average_rows(const void* Y, int dtype, int64_t D, const int64_t* idx, const void* w,
                             int64_t Q, int64_t k, int64_t lo, int64_t hi, bool normalize_rows,
                             bool spherical, bool finalize, void* out, cudaStream_t stream);
}  // namespace pyfici
