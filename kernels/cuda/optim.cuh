#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pyfici {
// Multi-tensor apply over a chunk table. `tables` is ONE device int64 buffer:
//   [R * n]      per-tensor rows (row 0 numel, then pointers; 0 = absent)
//   [nchunks]    tensor index of each chunk (sorted by tensor)
//   [nchunks]    first element of each chunk (multiples of optim_chunk_size())
// SGD rows: numel, param, grad, momentum buffer, mask. AdamW rows: numel, param,
// grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 = no amsgrad), mask. weight_variation
// rows: numel, a, b. Learning rates and the hyper-parameter rows are float64
// (see pyfici/ops/reference.py); float64 params step in float64.
// Everything runs on `stream`; no host synchronisation.
int64_t optim_chunk_size();
void launch_layerwise_sgd_step(int64_t n, int64_t nchunks, const int64_t* tables, const double* lrs,
                               const double* hyper, int pdtype, const float* grad_scale,
                               const float* found_inf, cudaStream_t stream);
void launch_layerwise_adamw_step(int64_t n, int64_t nchunks, const int64_t* tables, const double* lrs,
                                 float* steps, const double* hyper, int pdtype, const float* grad_scale,
                                 const float* found_inf, cudaStream_t stream);
void launch_weight_variation(int64_t n, int64_t nchunks, const int64_t* tables, int dtype,
                             double* scratch, double* out, cudaStream_t stream);
}  // namespace pyfici
