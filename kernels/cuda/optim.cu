// Fused layer-wise SGD / AdamW steps with pruning masks and AMP, and weight
// variation: multi-tensor apply. One block per chunk of kChunk elements of one
// tensor; the chunk table (tensor index, start) lives in device memory and is
// indexed by blockIdx.x, so one launch covers any number of tensors. Per-tensor
// lr / hyper-parameters are read by global tensor number. Each thread handles
// kVec consecutive elements per iteration with vector loads when every pointer
// of the chunk is aligned (scalar otherwise). Frozen tensors (lr == 0 and weight
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

// ------------------------------------------------------------------ SGD
struct SgdH {
  float wd, momentum, c_buf, c_grad, c_dir_grad, c_dir_buf;
};

template <typename P>
__device__ __forceinline__ void sgd_elem(P& p, P g, float* buf, uint8_t m, bool has_mask, float lr,
                                         float inv, const SgdH& h) {
  float gi = to_f(g) * inv;
  const float mi = has_mask ? static_cast<float>(m != 0) : 1.0f;
  gi *= mi;
  const float pi = to_f(p);
  if (h.wd != 0.0f) gi += h.wd * pi;
  float d = gi;
  if (buf != nullptr) {
    const float b = h.c_buf * *buf + h.c_grad * gi;
    *buf = b;
    d = h.c_dir_grad * gi + h.c_dir_buf * b;
  }
  p = from_f<P>((pi - lr * d) * mi);
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
sgd_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, const float* __restrict__ lrs,
           const SgdH* __restrict__ hyper, const float* grad_scale, const float* found_inf) {
  const ChunkRef c = chunk_of(tables, n, 5, nchunks);
  const float lr = lrs[c.t];
  const SgdH h = hyper[c.t];
  if (lr == 0.0f && h.wd == 0.0f) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  P* p = reinterpret_cast<P*>(tables[n + c.t]) + c.start;
  const P* g = reinterpret_cast<const P*>(tables[2 * n + c.t]) + c.start;
  float* buf = (h.momentum != 0.0f && tables[3 * n + c.t]) ? reinterpret_cast<float*>(tables[3 * n + c.t]) + c.start : nullptr;
  const uint8_t* mask = tables[4 * n + c.t] ? reinterpret_cast<const uint8_t*>(tables[4 * n + c.t]) + c.start : nullptr;
  const bool has_mask = mask != nullptr;
  const bool vec = aligned(p, sizeof(P) * kVec) && aligned(g, sizeof(P) * kVec) &&
                   (buf == nullptr || aligned(buf, 4 * kVec)) && (mask == nullptr || aligned(mask, kVec));
  int64_t done = 0;
  if (vec) {
    const int64_t nv = c.len / kVec;
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      const int64_t i = v * kVec;
      P pv[kVec], gv[kVec];
      float bv[kVec] = {0.f, 0.f, 0.f, 0.f};
      uint8_t mv[kVec] = {1, 1, 1, 1};
      load_vec(pv, p, i);
      load_vec(gv, g, i);
      if (buf) load_vec(bv, buf, i);
      if (has_mask) load_vec(mv, mask, i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sgd_elem(pv[k], gv[k], buf ? &bv[k] : nullptr, mv[k], has_mask, lr, inv, h);
      store_vec(p, i, pv);
      if (buf) store_vec(buf, i, bv);
    }
    done = nv * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.len; i += kThreads) {
    P pv = p[i];
    float b = buf ? buf[i] : 0.0f;
    sgd_elem(pv, g[i], buf ? &b : nullptr, has_mask ? mask[i] : uint8_t(1), has_mask, lr, inv, h);
    p[i] = pv;
    if (buf) buf[i] = b;
  }
}

// ------------------------------------------------------------------ AdamW
struct AdamH {
  float beta1, beta2, eps, wd;
};

template <typename P>
__device__ __forceinline__ void adam_elem(P& p, P g, float& m, float& v, uint8_t mk, bool has_mask,
                                          float inv, const AdamH& h, float decay, float step_size,
                                          float bc2_sqrt) {
  float gi = to_f(g) * inv;
  const float mi = has_mask ? static_cast<float>(mk != 0) : 1.0f;
  gi *= mi;
  float pi = to_f(p) * decay;
  m = m + (1.0f - h.beta1) * (gi - m);
  v = v * h.beta2 + (1.0f - h.beta2) * (gi * gi);
  pi -= step_size * (m / (sqrtf(v) / bc2_sqrt + h.eps));
  p = from_f<P>(pi * mi);
}

template <typename P>
__global__ void __launch_bounds__(kThreads)
adamw_kernel(int64_t n, int64_t nchunks, const int64_t* __restrict__ tables, const float* __restrict__ lrs,
             const float* __restrict__ steps, const AdamH* __restrict__ hyper, const float* grad_scale,
             const float* found_inf) {
  const ChunkRef c = chunk_of(tables, n, 6, nchunks);
  const float lr = lrs[c.t];
  const AdamH h = hyper[c.t];
  if (lr == 0.0f && h.wd == 0.0f) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const double step = static_cast<double>(steps[c.t]) + 1.0;  // steps are advanced by a later kernel
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * h.wd);
  const float step_size = static_cast<float>(static_cast<double>(lr) / (1.0 - pow(static_cast<double>(h.beta1), step)));
  const float bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(static_cast<double>(h.beta2), step)));
  P* p = reinterpret_cast<P*>(tables[n + c.t]) + c.start;
  const P* g = reinterpret_cast<const P*>(tables[2 * n + c.t]) + c.start;
  float* em = reinterpret_cast<float*>(tables[3 * n + c.t]) + c.start;
  float* ev = reinterpret_cast<float*>(tables[4 * n + c.t]) + c.start;
  const uint8_t* mask = tables[5 * n + c.t] ? reinterpret_cast<const uint8_t*>(tables[5 * n + c.t]) + c.start : nullptr;
  const bool has_mask = mask != nullptr;
  const bool vec = aligned(p, sizeof(P) * kVec) && aligned(g, sizeof(P) * kVec) && aligned(em, 4 * kVec) &&
                   aligned(ev, 4 * kVec) && (mask == nullptr || aligned(mask, kVec));
  int64_t done = 0;
  if (vec) {
    const int64_t nv = c.len / kVec;
    for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
      const int64_t i = v * kVec;
      P pv[kVec], gv[kVec];
      float mv[kVec], vv[kVec];
      uint8_t kv[kVec] = {1, 1, 1, 1};
      load_vec(pv, p, i);
      load_vec(gv, g, i);
      load_vec(mv, em, i);
      load_vec(vv, ev, i);
      if (has_mask) load_vec(kv, mask, i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) adam_elem(pv[k], gv[k], mv[k], vv[k], kv[k], has_mask, inv, h, decay, step_size, bc2_sqrt);
      store_vec(p, i, pv);
      store_vec(em, i, mv);
      store_vec(ev, i, vv);
    }
    done = nv * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.len; i += kThreads) {
    P pv = p[i];
    float mm = em[i], vv = ev[i];
    adam_elem(pv, g[i], mm, vv, has_mask ? mask[i] : uint8_t(1), has_mask, inv, h, decay, step_size, bc2_sqrt);
    p[i] = pv;
    em[i] = mm;
    ev[i] = vv;
  }
}

__global__ void advance_steps_kernel(int64_t n, const int64_t* __restrict__ tables, const float* __restrict__ lrs,
                                     float* steps, const AdamH* __restrict__ hyper, const float* found_inf) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  if (tables[t] == 0 || (lrs[t] == 0.0f && hyper[t].wd == 0.0f)) return;
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
__device__ __forceinline__ double to_f(double x) { return x; }

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

void launch_layerwise_sgd_step(int64_t n, int64_t nchunks, const int64_t* tables, const float* lrs,
                               const float* hyper, int pdtype, const float* grad_scale,
                               const float* found_inf, cudaStream_t stream) {
  if (nchunks <= 0) return;
  const SgdH* h = reinterpret_cast<const SgdH*>(hyper);
  const dim3 grid(static_cast<unsigned>(nchunks));
  switch (pdtype) {
    case kF32: sgd_kernel<float><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    case kF16: sgd_kernel<__half><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    case kBF16: sgd_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, h, grad_scale, found_inf); break;
    default: break;
  }
}

void launch_layerwise_adamw_step(int64_t n, int64_t nchunks, const int64_t* tables, const float* lrs,
                                 float* steps, const float* hyper, int pdtype, const float* grad_scale,
                                 const float* found_inf, cudaStream_t stream) {
  const AdamH* h = reinterpret_cast<const AdamH*>(hyper);
  if (nchunks > 0) {
    const dim3 grid(static_cast<unsigned>(nchunks));
    switch (pdtype) {
      case kF32: adamw_kernel<float><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      case kF16: adamw_kernel<__half><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      case kBF16: adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(n, nchunks, tables, lrs, steps, h, grad_scale, found_inf); break;
      default: break;
    }
  }
  if (n > 0) {
    const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
    advance_steps_kernel<<<blocks, 256, 0, stream>>>(n, tables, lrs, steps, h, found_inf);
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
