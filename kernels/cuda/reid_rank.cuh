#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace pyfici {
// dtype: 0 float32, 1 float64. Launches on `stream`; no synchronisation.
void launch_reid_rank_stats(const void* dist, int dtype, int64_t Q, int64_t G, int64_t ld,
                            const int64_t* qpid, const int64_t* gpid, const int64_t* qcam,
                            const int64_t* gcam, bool junk_minus1, bool trapezoid, double* out_ap,
                            int64_t* out_first, double* out_inp, int64_t* out_nmatch,
                            cudaStream_t stream);
}  // namespace pyfici
