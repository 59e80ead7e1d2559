// Fused layer-wise optimizer steps (SGD, AdamW) with pruning masks, AMP unscale
// and per-tensor learning rates, plus the per-tensor weight variation.
//
// One pass over memory: every element of every (active) tensor is read and
// written once. Work is split into chunks of kChunk elements across ALL tensors
// (a chunk never spans two tensors), and OpenMP threads take chunks
// dynamically, so a list with one huge tensor and many small ones is balanced
// by chunk, not by tensor. The inner loops are contiguous, branch-free and
// templated on the few flags that change memory traffic (mask, momentum,
// weight decay), so the compiler vectorises them (AVX-512 with -march=native).
//
// Per-tensor metadata arrives as an int64 table (numel and raw pointers), the
// per-tensor hyper-parameters as float32 rows (see pyfici/ops/reference.py),
// the learning rates as a float32 array read once per step. A tensor whose lr
// is 0 and whose weight decay is 0 is skipped without touching its memory.
// found_inf != 0 skips the whole step; grad_scale unscales in registers
// (grads are never written).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per work item

struct BF16 {
  uint16_t v;
};

inline float to_f(float x) { return x; }
inline float to_f(_Float16 x) { return static_cast<float>(x); }
inline float to_f(BF16 x) {
  uint32_t u = static_cast<uint32_t>(x.v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename P>
inline P from_f(float x);
template <>
inline float from_f<float>(float x) { return x; }
template <>
inline _Float16 from_f<_Float16>(float x) { return static_cast<_Float16>(x); }
template <>
inline BF16 from_f<BF16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  // round to nearest even; NaN stays a (quiet) NaN
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : r)};
}

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

// Threads worth waking for `total` elements: small steps run on the calling
// thread (an OpenMP region costs more than it saves there, most of all on a
// loaded machine).
inline int threads_for(int64_t total, int nthreads) {
  const int64_t useful = total / (int64_t(1) << 16);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, useful)));
}
inline int64_t total_of(const std::vector<Chunk>& cs) {
  int64_t s = 0;
  for (const Chunk& c : cs) s += c.end - c.begin;
  return s;
}

// Chunks of the tensors flagged active, in tensor order.
std::vector<Chunk> make_chunks(int64_t n, const int64_t* numel, const std::vector<char>& active) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < n; ++t) {
    if (!active[t]) continue;
    for (int64_t b = 0; b < numel[t]; b += kChunk)
      out.push_back(Chunk{static_cast<int32_t>(t), b, std::min(numel[t], b + kChunk)});
  }
  return out;
}

// Full 512-bit vectors where the CPU has them (-march=native): at one thread per
// core the step is partly instruction-bound, and GCC prefers 256-bit by default.
#pragma GCC push_options
#pragma GCC target("prefer-vector-width=512")

// ------------------------------------------------------------------ SGD

struct SgdHyper {
  float wd, momentum, c_buf, c_grad, c_dir_grad, c_dir_buf;
};

template <typename P, bool MASK, bool MOM, bool WD>
void sgd_range(P* __restrict p, const P* __restrict g, float* __restrict buf,
               const uint8_t* __restrict mask, int64_t n, float lr, float inv_scale,
               const SgdHyper h) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = to_f(g[i]) * inv_scale;
    float mi = 1.0f;
    if constexpr (MASK) {
      mi = static_cast<float>(mask[i] != 0);
      gi *= mi;
    }
    const float pi = to_f(p[i]);
    if constexpr (WD) gi += h.wd * pi;
    float d = gi;
    if constexpr (MOM) {
      const float b = h.c_buf * buf[i] + h.c_grad * gi;
      buf[i] = b;
      d = h.c_dir_grad * gi + h.c_dir_buf * b;
    }
    float pn = pi - lr * d;
    if constexpr (MASK) pn *= mi;
    p[i] = from_f<P>(pn);
  }
}

template <typename P>
void sgd_chunk(const Chunk& c, const int64_t* meta, int64_t n, const float* lrs,
               const SgdHyper* hyper, float inv_scale) {
  const int64_t t = c.tensor;
  const int64_t off = c.begin, len = c.end - c.begin;
  P* p = reinterpret_cast<P*>(meta[1 * n + t]) + off;
  const P* g = reinterpret_cast<const P*>(meta[2 * n + t]) + off;
  float* buf = meta[3 * n + t] ? reinterpret_cast<float*>(meta[3 * n + t]) + off : nullptr;
  const uint8_t* mask = meta[4 * n + t] ? reinterpret_cast<const uint8_t*>(meta[4 * n + t]) + off : nullptr;
  const SgdHyper h = hyper[t];
  const float lr = lrs[t];
  const bool mom = h.momentum != 0.0f, wd = h.wd != 0.0f;
#define PYFICI_SGD_CASE(M, MO, W) \
  if ((mask != nullptr) == M && mom == MO && wd == W) return sgd_range<P, M, MO, W>(p, g, buf, mask, len, lr, inv_scale, h);
  PYFICI_SGD_CASE(true, true, true)
  PYFICI_SGD_CASE(true, true, false)
  PYFICI_SGD_CASE(true, false, true)
  PYFICI_SGD_CASE(true, false, false)
  PYFICI_SGD_CASE(false, true, true)
  PYFICI_SGD_CASE(false, true, false)
  PYFICI_SGD_CASE(false, false, true)
  PYFICI_SGD_CASE(false, false, false)
#undef PYFICI_SGD_CASE
}

// meta: int64 [5, n] rows numel, param, grad, momentum buffer (0 = none), mask (0 = none)
void sgd_step(int64_t n, const int64_t* meta, const float* lrs, const float* hyper_raw, int pdtype,
              const float* grad_scale, const float* found_inf, int nthreads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const SgdHyper* hyper = reinterpret_cast<const SgdHyper*>(hyper_raw);
  std::vector<char> active(n);
  for (int64_t t = 0; t < n; ++t) active[t] = (lrs[t] != 0.0f || hyper[t].wd != 0.0f) && meta[t] > 0;
  const std::vector<Chunk> chunks = make_chunks(n, meta, active);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  const int nt = threads_for(total_of(chunks), nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nc; ++k) {
    switch (pdtype) {
      case kFloat32: sgd_chunk<float>(chunks[k], meta, n, lrs, hyper, inv_scale); break;
      case kFloat16: sgd_chunk<_Float16>(chunks[k], meta, n, lrs, hyper, inv_scale); break;
      case kBFloat16: sgd_chunk<BF16>(chunks[k], meta, n, lrs, hyper, inv_scale); break;
      default: break;
    }
  }
}

// ------------------------------------------------------------------ AdamW

struct AdamHyper {
  float beta1, beta2, eps, wd;
};
struct AdamDerived {
  float decay;      // 1 - lr * wd
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
};

template <typename P, bool MASK>
void adamw_range(P* __restrict p, const P* __restrict g, float* __restrict m, float* __restrict v,
                 const uint8_t* __restrict mask, int64_t n, float inv_scale, const AdamHyper h,
                 const AdamDerived d) {
  const float w1 = 1.0f - h.beta1, w2 = 1.0f - h.beta2;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float gi = to_f(g[i]) * inv_scale;
    float mi = 1.0f;
    if constexpr (MASK) {
      mi = static_cast<float>(mask[i] != 0);
      gi *= mi;
    }
    float pi = to_f(p[i]) * d.decay;
    const float mm = m[i] + w1 * (gi - m[i]);
    const float vv = v[i] * h.beta2 + w2 * (gi * gi);
    m[i] = mm;
    v[i] = vv;
    const float denom = std::sqrt(vv) / d.bc2_sqrt + h.eps;
    pi -= d.step_size * (mm / denom);
    if constexpr (MASK) pi *= mi;
    p[i] = from_f<P>(pi);
  }
}

template <typename P>
void adamw_chunk(const Chunk& c, const int64_t* meta, int64_t n, const AdamHyper* hyper,
                 const AdamDerived* der, float inv_scale) {
  const int64_t t = c.tensor;
  const int64_t off = c.begin, len = c.end - c.begin;
  P* p = reinterpret_cast<P*>(meta[1 * n + t]) + off;
  const P* g = reinterpret_cast<const P*>(meta[2 * n + t]) + off;
  float* m = reinterpret_cast<float*>(meta[3 * n + t]) + off;
  float* v = reinterpret_cast<float*>(meta[4 * n + t]) + off;
  const uint8_t* mask = meta[5 * n + t] ? reinterpret_cast<const uint8_t*>(meta[5 * n + t]) + off : nullptr;
  if (mask)
    adamw_range<P, true>(p, g, m, v, mask, len, inv_scale, hyper[t], der[t]);
  else
    adamw_range<P, false>(p, g, m, v, mask, len, inv_scale, hyper[t], der[t]);
}

// meta: int64 [6, n] rows numel, param, grad, exp_avg, exp_avg_sq, mask (0 = none)
// steps: float32 [n], incremented for every stepped tensor
void adamw_step(int64_t n, const int64_t* meta, const float* lrs, float* steps, const float* hyper_raw,
                int pdtype, const float* grad_scale, const float* found_inf, int nthreads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const AdamHyper* hyper = reinterpret_cast<const AdamHyper*>(hyper_raw);
  std::vector<char> active(n);
  std::vector<AdamDerived> der(n);
  for (int64_t t = 0; t < n; ++t) {
    const AdamHyper& h = hyper[t];
    const double lr = lrs[t];
    active[t] = (lr != 0.0 || h.wd != 0.0f) && meta[t] > 0;  // empty tensors keep their step
    if (!active[t]) continue;
    const double step = static_cast<double>(steps[t]) + 1.0;
    steps[t] = static_cast<float>(step);
    der[t].decay = static_cast<float>(1.0 - lr * static_cast<double>(h.wd));
    der[t].step_size = static_cast<float>(lr / (1.0 - std::pow(static_cast<double>(h.beta1), step)));
    der[t].bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(h.beta2), step)));
  }
  const std::vector<Chunk> chunks = make_chunks(n, meta, active);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  const int nt = threads_for(total_of(chunks), nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nc; ++k) {
    switch (pdtype) {
      case kFloat32: adamw_chunk<float>(chunks[k], meta, n, hyper, der.data(), inv_scale); break;
      case kFloat16: adamw_chunk<_Float16>(chunks[k], meta, n, hyper, der.data(), inv_scale); break;
      case kBFloat16: adamw_chunk<BF16>(chunks[k], meta, n, hyper, der.data(), inv_scale); break;
      default: break;
    }
  }
}

// ------------------------------------------------------------------ weight variation

template <typename P>
double sqdiff_range(const P* __restrict a, const P* __restrict b, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(to_f(a[i])) - static_cast<double>(to_f(b[i]));
    acc += d * d;
  }
  return acc;
}
template <>
double sqdiff_range<double>(const double* __restrict a, const double* __restrict b, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const double d = a[i] - b[i];
    acc += d * d;
  }
  return acc;
}

// meta: int64 [3, n] rows numel, a, b; out: float64 [n]. Deterministic: per-chunk
// partial sums are added per tensor in chunk order.
void weight_variation(int64_t n, const int64_t* meta, int dtype, double* out, int nthreads) {
  std::vector<char> active(n, 1);
  const std::vector<Chunk> chunks = make_chunks(n, meta, active);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  std::vector<double> part(nc);
  const int nt = threads_for(total_of(chunks), nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nc; ++k) {
    const Chunk& c = chunks[k];
    const int64_t t = c.tensor, len = c.end - c.begin;
    const void* a = reinterpret_cast<const void*>(meta[n + t]);
    const void* b = reinterpret_cast<const void*>(meta[2 * n + t]);
    double s = 0.0;
    switch (dtype) {
      case kFloat32: s = sqdiff_range(static_cast<const float*>(a) + c.begin, static_cast<const float*>(b) + c.begin, len); break;
      case kFloat64: s = sqdiff_range(static_cast<const double*>(a) + c.begin, static_cast<const double*>(b) + c.begin, len); break;
      case kFloat16: s = sqdiff_range(static_cast<const _Float16*>(a) + c.begin, static_cast<const _Float16*>(b) + c.begin, len); break;
      case kBFloat16: s = sqdiff_range(static_cast<const BF16*>(a) + c.begin, static_cast<const BF16*>(b) + c.begin, len); break;
      default: break;
    }
    part[k] = s;
  }
  for (int64_t t = 0; t < n; ++t) out[t] = 0.0;
  for (int64_t k = 0; k < nc; ++k) out[chunks[k].tensor] += part[k];
}

#pragma GCC pop_options

void check_param_dtype(const char* op, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(op) + ": params must be float32, float16 or bfloat16");
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "layerwise_sgd_step",
      [](int64_t n, std::uintptr_t meta, std::uintptr_t lrs, std::uintptr_t hyper, int pdtype,
         std::uintptr_t grad_scale, std::uintptr_t found_inf, int nthreads) {
        check_param_dtype("layerwise_sgd_step", pdtype);
        py::gil_scoped_release release;
        sgd_step(n, as_ptr<const int64_t>(meta), as_ptr<const float>(lrs), as_ptr<const float>(hyper), pdtype,
                 as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf), nthreads);
      },
      "Fused SGD step over n tensors. meta: int64 [5, n] (numel, param, grad, buf|0, mask|0 pointers); "
      "lrs float32 [n]; hyper float32 [n, 6]; grad_scale / found_inf: float32 scalar pointers or 0.");
  m.def(
      "layerwise_adamw_step",
      [](int64_t n, std::uintptr_t meta, std::uintptr_t lrs, std::uintptr_t steps, std::uintptr_t hyper,
         int pdtype, std::uintptr_t grad_scale, std::uintptr_t found_inf, int nthreads) {
        check_param_dtype("layerwise_adamw_step", pdtype);
        py::gil_scoped_release release;
        adamw_step(n, as_ptr<const int64_t>(meta), as_ptr<const float>(lrs), as_ptr<float>(steps),
                   as_ptr<const float>(hyper), pdtype, as_ptr<const float>(grad_scale),
                   as_ptr<const float>(found_inf), nthreads);
      },
      "Fused AdamW step over n tensors. meta: int64 [6, n] (numel, param, grad, exp_avg, exp_avg_sq, "
      "mask|0); lrs float32 [n]; steps float32 [n] (incremented); hyper float32 [n, 4].");
  m.def(
      "weight_variation",
      [](int64_t n, std::uintptr_t meta, int dtype, std::uintptr_t out, int nthreads) {
        if (dtype != kFloat32 && dtype != kFloat64 && dtype != kFloat16 && dtype != kBFloat16)
          throw std::invalid_argument("weight_variation: tensors must be floating point");
        py::gil_scoped_release release;
        weight_variation(n, as_ptr<const int64_t>(meta), dtype, as_ptr<double>(out), nthreads);
      },
      "Per-tensor sum of squared differences. meta: int64 [3, n] (numel, a, b); out float64 [n].");
}

}  // namespace pyfici
