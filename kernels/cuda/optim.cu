// Fused layer-wise SGD / AdamW steps with pruning masks and AMP, and weight
// variation: multi-tensor apply. One block per chunk of kChunk elements of one
// tensor; the chunk table (tensor index, start) lives in device memory and is
// indexed by blockIdx.x, so one launch covers any number of tensors. Per-tensor
// lr / hyper-parameters (float64) are read by global tensor number. float64
// params step in float64, the others in float32. A tensor is one flat buffer
// (param, grad, state and mask share strides), so any dense layout works. Each
// thread handles kVec consecutive elements per iteration with vector loads when
// every pointer of the chunk is aligned (scalar otherwise). Frozen tensors (lr == 0 and weight
// decay == 0) and found_inf != 0 return before touching memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "optim.cuh"

namespace pyfici {
namespace {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;
constexpr int kVec = 4;
enum { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename P>
__device__ __forceinline__ P from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

template <typename T>
__device__ __forceinline__ void load_vec(T (&dst)[kVec], const T* src, int64_t i) {
  const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(src + i);
#pragma unroll
  for (int k = 0; k < kVec; ++k) dst[k] = pk.v[k];
}
template <typename T>
__device__ __forceinline__ void store_vec(T* dst, int64_t i, const T (&src)[kVec]) {
  Pack<T> pk;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pk.v[k] = src[k];
  *reinterpret_cast<Pack<T>*>(dst + i) = pk;
}

struct ChunkRef {
  int64_t t, start, len;
};
__device__ __forceinline__ ChunkRef chunk_of(const int64_t* tables, int64_t n, int rows, int64_t nchunks) {
  const int64_t c = blockIdx.x;
  const int64_t t = tables[rows * n + c];
  const int64_t start = tables[rows * n + nchunks + c];
  const int64_t numel = tables[t];
  const int64_t len = numel - start < kChunk ? numel - start : kChunk;
  return ChunkRef{t, start, len};
}

// float64 params step in float64 (state float64), the other dtypes in float32
template <typename P>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};
__device__ __forceinline__ double to_f(double x) { return x; }
template <typename P>
__device__ __forceinline__ P from_c(typename MathOf<P>::type x) { return from_f<P>(x); }
template <>
__device__ __forceinline__ double from_c<double>(double x) { return x; }

// ------------------------------------------------------------------ SGD
struct SgdH {  // one float64 row of the table
  double wd, momentum, dampening, nesterov, init, maximize;
};
template <typename C>
struct SgdC {
  C scale, lr, wd, mom, omd;
  bool has_wd, nest, init;
};

// Branches instead of 0 * x terms: an inf gradient gives what torch gives, not NaN.
template <typename P, typename C>
__device__ __forceinline__ void sgd_elem(P& p, P g, C* buf, uint8_t m, bool has_mask, const SgdC<C>& c) {
  const bool kept = !has_mask || m != 0;
  C gi = kept ? static_cast<C>(to_f(g)) * c.scale : C(0);
  const C pi = static_cast<C>(to_f(p));
  if (c.has_wd) gi = gi + c.wd * pi;
  C d = gi;
  if (buf != nullptr) {
    const C b = c.init ? gi : *buf * c.mom + c.omd * gi;
    *buf = b;
    d = c.nest ? gi + c.mom * b : b;
  }
  const C pn = pi - c.lr * d;
  p = from_c<P>(kept ? pn : C(0));
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
sgd_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, const double* __restrict__ lrs,
           const SgdH* __restrict__ hyper, const float* grad_scale, const float* found_inf) {
  using C = typename MathOf<P>::type;
  const ChunkRef c = chunk_of(tables, n, 5, nchunks);
  const double lr = lrs[c.t];
  const SgdH h = hyper[c.t];
  if (lr == 0.0 && h.wd == 0.0) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const SgdC<C> k{C(h.maximize != 0.0 ? -inv : inv), C(lr), C(h.wd), C(h.momentum), C(1.0 - h.dampening),
                  h.wd != 0.0, h.nesterov != 0.0, h.init != 0.0};
  P* p = reinterpret_cast<P*>(tables[n + c.t]) + c.start;
  const P* g = reinterpret_cast<const P*>(tables[2 * n + c.t]) + c.start;
  C* buf = (h.momentum != 0.0 && tables[3 * n + c.t]) ? reinterpret_cast<C*>(tables[3 * n + c.t]) + c.start : nullptr;
  const uint8_t* mask = tables[4 * n + c.t] ? reinterpret_cast<const uint8_t*>(tables[4 * n + c.t]) + c.start : nullptr;
  const bool has_mask = mask != nullptr;
  const bool vec = aligned(p, sizeof(P) * kVec) && aligned(g, sizeof(P) * kVec) &&
                   (buf == nullptr || aligned(buf, sizeof(C) * kVec)) && (mask == nullptr || aligned(mask, kVec));
  int64_t done = 0;
  if (vec) {
    const int64_t nv = c.len / kVec;
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      const int64_t i = v * kVec;
      P pv[kVec], gv[kVec];
      C bv[kVec] = {C(0), C(0), C(0), C(0)};
      uint8_t mv[kVec] = {1, 1, 1, 1};
      load_vec(pv, p, i);
      load_vec(gv, g, i);
      if (buf) load_vec(bv, buf, i);
      if (has_mask) load_vec(mv, mask, i);
#pragma unroll
      for (int q = 0; q < kVec; ++q) sgd_elem(pv[q], gv[q], buf ? &bv[q] : static_cast<C*>(nullptr), mv[q], has_mask, k);
      store_vec(p, i, pv);
      if (buf) store_vec(buf, i, bv);
    }
    done = nv * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.len; i += kThreads) {
    P pv = p[i];
    C b = buf ? buf[i] : C(0);
    sgd_elem(pv, g[i], buf ? &b : static_cast<C*>(nullptr), has_mask ? mask[i] : uint8_t(1), has_mask, k);
    p[i] = pv;
    if (buf) buf[i] = b;
  }
}

// ------------------------------------------------------------------ AdamW
struct AdamH {  // one float64 row of the table
  double beta1, beta2, eps, wd, amsgrad, maximize;
};
template <typename C>
struct AdamC {
  C scale, decay, w1, w1c, beta2, w2, eps, step_size, bc2_sqrt;
  bool lerp_hi;
};

template <typename C>
__device__ __forceinline__ C max_nan(C a, C b) {
  return (a > b || a != a) ? a : b;
}

template <typename P, typename C>
__device__ __forceinline__ void adam_elem(P& p, P g, C& m, C& v, C* vmax, uint8_t mk, bool has_mask,
                                          const AdamC<C>& c) {
  const bool kept = !has_mask || mk != 0;
  const C gi = kept ? static_cast<C>(to_f(g)) * c.scale : C(0);
  const C pi = static_cast<C>(to_f(p)) * c.decay;
  const C diff = gi - m;
  m = c.lerp_hi ? gi - diff * c.w1c : m + c.w1 * diff;  // torch's lerp
  v = v * c.beta2 + c.w2 * gi * gi;
  C second = v;
  if (vmax != nullptr) {
    second = max_nan(*vmax, v);
    *vmax = second;
  }
  const C pn = pi - c.step_size * (m / (sqrt(second) / c.bc2_sqrt + c.eps));
  p = from_c<P>(kept ? pn : C(0));
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, const double* __restrict__ lrs,
             const float* __restrict__ steps, const AdamH* __restrict__ hyper, const float* grad_scale,
             const float* found_inf) {
  using C = typename MathOf<P>::type;
  const ChunkRef c = chunk_of(tables, n, 7, nchunks);
  const double lr = lrs[c.t];
  const AdamH h = hyper[c.t];
  if (lr == 0.0 && h.wd == 0.0) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const double step = static_cast<double>(steps[c.t]) + 1.0;  // steps are advanced by a later kernel
  const C w1 = C(1.0 - h.beta1);
  const AdamC<C> k{C(h.maximize != 0.0 ? -inv : inv),
                   C(1.0 - lr * h.wd),
                   w1,
                   C(1) - w1,
                   C(h.beta2),
                   C(1.0 - h.beta2),
                   C(h.eps),
                   C(lr / (1.0 - pow(h.beta1, step))),
                   C(sqrt(1.0 - pow(h.beta2, step))),
                   !(fabs(static_cast<double>(w1)) < 0.5)};
  P* p = reinterpret_cast<P*>(tables[n + c.t]) + c.start;
  const P* g = reinterpret_cast<const P*>(tables[2 * n + c.t]) + c.start;
  C* em = reinterpret_cast<C*>(tables[3 * n + c.t]) + c.start;
  C* ev = reinterpret_cast<C*>(tables[4 * n + c.t]) + c.start;
  C* emx = (h.amsgrad != 0.0 && tables[5 * n + c.t]) ? reinterpret_cast<C*>(tables[5 * n + c.t]) + c.start : nullptr;
  const uint8_t* mask = tables[6 * n + c.t] ? reinterpret_cast<const uint8_t*>(tables[6 * n + c.t]) + c.start : nullptr;
  const bool has_mask = mask != nullptr;
  const bool vec = aligned(p, sizeof(P) * kVec) && aligned(g, sizeof(P) * kVec) && aligned(em, sizeof(C) * kVec) &&
                   aligned(ev, sizeof(C) * kVec) && (emx == nullptr || aligned(emx, sizeof(C) * kVec)) &&
                   (mask == nullptr || aligned(mask, kVec));
  int64_t done = 0;
  if (vec) {
    const int64_t nv = c.len / kVec;
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      const int64_t i = v * kVec;
      P pv[kVec], gv[kVec];
      C mv[kVec], vv[kVec], xv[kVec] = {C(0), C(0), C(0), C(0)};
      uint8_t kv[kVec] = {1, 1, 1, 1};
      load_vec(pv, p, i);
      load_vec(gv, g, i);
      load_vec(mv, em, i);
      load_vec(vv, ev, i);
      if (emx) load_vec(xv, emx, i);
      if (has_mask) load_vec(kv, mask, i);
#pragma unroll
      for (int q = 0; q < kVec; ++q)
        adam_elem(pv[q], gv[q], mv[q], vv[q], emx ? &xv[q] : static_cast<C*>(nullptr), kv[q], has_mask, k);
      store_vec(p, i, pv);
      store_vec(em, i, mv);
      store_vec(ev, i, vv);
      if (emx) store_vec(emx, i, xv);
    }
    done = nv * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.len; i += kThreads) {
    P pv = p[i];
    C mm = em[i], vv = ev[i], xx = emx ? emx[i] : C(0);
    adam_elem(pv, g[i], mm, vv, emx ? &xx : static_cast<C*>(nullptr), has_mask ? mask[i] : uint8_t(1), has_mask, k);
    p[i] = pv;
    em[i] = mm;
    ev[i] = vv;
    if (emx) emx[i] = xx;
  }
}

// every tensor that is stepped advances, empty ones included (as in torch)
__global__ void advance_steps_kernel(int64_t n, const double* __restrict__ lrs, float* steps,
                                     const AdamH* __restrict__ hyper, const float* found_inf) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  if (lrs[t] == 0.0 && hyper[t].wd == 0.0) return;
  steps[t] += 1.0f;
}

// ------------------------------------------------------------------ weight variation
template <typename T>
__global__ void __launch_bounds__(kThreads)
sqdiff_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, double* __restrict__ partial) {
  const ChunkRef c = chunk_of(tables, n, 3, nchunks);
  const T* a = reinterpret_cast<const T*>(tables[n + c.t]) + c.start;
  const T* b = reinterpret_cast<const T*>(tables[2 * n + c.t]) + c.start;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < c.len; i += kThreads) {
    const double d = static_cast<double>(to_f(a[i])) - static_cast<double>(to_f(b[i]));
    acc += d * d;
  }
  __shared__ double red[kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}
template <>
__global__ void __launch_bounds__(kThreads)
sqdiff_kernel<double>(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, double* __restrict__ partial) {
  const ChunkRef c = chunk_of(tables, n, 3, nchunks);
  const double* a = reinterpret_cast<const double*>(tables[n + c.t]) + c.start;
  const double* b = reinterpret_cast<const double*>(tables[2 * n + c.t]) + c.start;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < c.len; i += kThreads) {
    const double d = a[i] - b[i];
    acc += d * d;
  }
  __shared__ double red[kThreads];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}

// out[t] = sum of the partials of tensor t's chunks, in chunk order (deterministic)
__global__ void sum_partials_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tidx,
                                    const double* __restrict__ partial, double* __restrict__ out) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  int64_t lo = 0, hi = nchunks;  // first chunk with tidx >= t
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (tidx[mid] < t) lo = mid + 1; else hi = mid;
  }
  double s = 0.0;
  for (int64_t k = lo; k < nchunks && tidx[k] == t; ++k) s += partial[k];
  out[t] = s;
}

}  // namespace

int64_t optim_chunk_size() { return kChunk; }

void launch_layerwise_sgd_step(int64_t n, int64_t nchunks, const int64_t* tables, const double* lrs,
                               const double* hyper, int pdtype, const float* grad_scale,
                               const float* found_inf, cudaStream_t stream) {
  if (nchunks <= 0) return;
  const SgdH* h = reinterpret_cast<const SgdH*>(hyper);
  const dim3 grid(static_cast<unsigned>(nchunks));
  switch (pdtype) {
    case kF32: sgd_kernel<float><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    case kF64: sgd_kernel<double><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    case kF16: sgd_kernel<__half><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    case kBF16: sgd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    default: break;
  }
}

void launch_layerwise_adamw_step(int64_t n, int64_t nchunks, const int64_t* tables, const double* lrs,
                                 float* steps, const double* hyper, int pdtype, const float* grad_scale,
                                 const float* found_inf, cudaStream_t stream) {
  const AdamH* h = reinterpret_cast<const AdamH*>(hyper);
  if (nchunks > 0) {
    const dim3 grid(static_cast<unsigned>(nchunks));
    switch (pdtype) {
      case kF32: adamw_kernel<float><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      case kF64: adamw_kernel<double><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      case kF16: adamw_kernel<__half><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      case kBF16: adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      default: break;
    }
  }
  if (n > 0) {
    const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
    advance_steps_kernel<<<blocks, 256, 0, stream>>>(n, lrs, steps, h, found_inf);
  }
}

void launch_weight_variation(int64_t n, int64_t nchunks, const int64_t* tables, int dtype, double* scratch,
                             double* out, cudaStream_t stream) {
  if (n <= 0) return;
  if (nchunks > 0) {
    const dim3 grid(static_cast<unsigned>(nchunks));
    switch (dtype) {
      case kF32: sqdiff_kernel<float><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, scratch); break;
      case kF64: sqdiff_kernel<double><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, scratch); break;
      case kF16: sqdiff_kernel<__half><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, scratch); break;
      case kBF16: sqdiff_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, scratch); break;
      default: break;
    }
  }
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  sum_partials_kernel<<<blocks, 256, 0, stream>>>(n, nchunks, tables + 3 * n, scratch, out);
}

}  // namespace pyfici
