// Bindings of the CUDA layer-wise optimizer kernels (kernels/cuda/optim.cu).
#include "common.h"
#include "optim.cuh"
#include "registry.h"

namespace pyfici {
PYFICI_REGISTER(m) {
  m.def("optim_chunk_size", &optim_chunk_size, "Elements per chunk of the optim chunk tables.");
  m.def(
      "layerwise_sgd_step",
      [](int64_t n, int64_t nchunks, std::uintptr_t tables, std::uintptr_t lrs, std::uintptr_t hyper, int pdtype,
         std::uintptr_t grad_scale, std::uintptr_t found_inf, std::uintptr_t stream) {
        if (pdtype != kFloat32 && pdtype != kFloat64 && pdtype != kFloat16 && pdtype != kBFloat16)
          throw std::invalid_argument("layerwise_sgd_step: params must be float32, float64, float16 or bfloat16");
        launch_layerwise_sgd_step(n, nchunks, as_ptr<const int64_t>(tables), as_ptr<const double>(lrs),
                                  as_ptr<const double>(hyper), pdtype, as_ptr<const float>(grad_scale),
                                  as_ptr<const float>(found_inf), reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "layerwise_sgd_step launch");
      },
      "CUDA fused SGD step (device tables: meta [5, n], chunk tensor [nchunks], chunk start [nchunks]); "
      "lrs float64 [n], hyper float64 [n, 6].");
  m.def(
      "layerwise_adamw_step",
      [](int64_t n, int64_t nchunks, std::uintptr_t tables, std::uintptr_t lrs, std::uintptr_t steps,
         std::uintptr_t hyper, int pdtype, std::uintptr_t grad_scale, std::uintptr_t found_inf,
         std::uintptr_t stream) {
        if (pdtype != kFloat32 && pdtype != kFloat64 && pdtype != kFloat16 && pdtype != kBFloat16)
          throw std::invalid_argument("layerwise_adamw_step: params must be float32, float64, float16 or bfloat16");
        launch_layerwise_adamw_step(n, nchunks, as_ptr<const int64_t>(tables), as_ptr<const double>(lrs),
                                    as_ptr<float>(steps), as_ptr<const double>(hyper), pdtype,
                                    as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf),
                                    reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "layerwise_adamw_step launch");
      },
      "CUDA fused AdamW step (device tables: meta [7, n], chunk tensor, chunk start); lrs float64 [n], "
      "hyper float64 [n, 6]; advances steps.");
  m.def(
      "weight_variation",
      [](int64_t n, int64_t nchunks, std::uintptr_t tables, int dtype, std::uintptr_t scratch, std::uintptr_t out,
         std::uintptr_t stream) {
        if (dtype != kFloat32 && dtype != kFloat64 && dtype != kFloat16 && dtype != kBFloat16)
          throw std::invalid_argument("weight_variation: tensors must be floating point");
        launch_weight_variation(n, nchunks, as_ptr<const int64_t>(tables), dtype, as_ptr<double>(scratch),
                                as_ptr<double>(out), reinterpret_cast<cudaStream_t>(stream));
        check_cuda(cudaGetLastError(), "weight_variation launch");
      },
      "CUDA per-tensor sum of squared differences (device tables: meta [3, n], chunk tensor, chunk start).");
}
}  // namespace pyfici
