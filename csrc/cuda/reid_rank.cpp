#include "common.h"
#include "registry.h"
#include "reid_rank.cuh"

namespace pyfici {
PYFICI_REGISTER(m) {
  m.def(
      "reid_rank_stats",
      [](std::uintptr_t dist, int dtype, int64_t Q, int64_t G, int64_t ld, std::uintptr_t qpid,
         std::uintptr_t gpid, std::uintptr_t qcam, std::uintptr_t gcam, bool junk_minus1,
         bool trapezoid, std::uintptr_t out_ap, std::uintptr_t out_first, std::uintptr_t out_inp,
         std::uintptr_t out_nmatch, std::uintptr_t stream) {
        if (dtype != kFloat32 && dtype != kFloat64)
          throw std::invalid_argument("reid_rank_stats: dist must be float32 or float64");
        launch_reid_rank_stats(reinterpret_cast<const void*>(dist), dtype, Q, G, ld,
                               as_ptr<const int64_t>(qpid), as_ptr<const int64_t>(gpid),
                               as_ptr<const int64_t>(qcam), as_ptr<const int64_t>(gcam),
                               junk_minus1, trapezoid, as_ptr<double>(out_ap),
                               as_ptr<int64_t>(out_first), as_ptr<double>(out_inp),
                               as_ptr<int64_t>(out_nmatch), reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "reid_rank_stats launch");
      },
      "CUDA version of _C.reid_rank_stats; runs on the given stream.");
}
}  // namespace pyfici
