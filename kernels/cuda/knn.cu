// k-selection and k-nearest averaging on the GPU. The score tiles come from
// cuBLAS through torch.mm (pyfici/ops/knn.py); this file only selects.
//
// knn_select_tile_kernel: one block per query row (as FAISS's BlockSelect).
// Each thread keeps the best k of its strided share of the columns (and of the
// previous state) in a thread-local sorted list, rejecting most scores with a
// single comparison against its own k-th best. The block then merges the
// thread lists in k rounds of a (value desc, index asc) arg-max reduction
// (warp shuffles + shared memory). Ties go to the lower index everywhere, so
// the result equals a stable sort. Four list sizes are instantiated
// (32, 256, 1024, 2048: faiss's limit) with 128 / 64 / 32 / 32 threads; the
// longer lists live in local memory (a 2048 list is 24-32 KB per thread).
#include <cfloat>
#include <climits>
#include <cmath>

#include "codes.h"
#include "knn.cuh"

namespace pyfici {
namespace {

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return -INFINITY; }
template <>
__device__ __forceinline__ double neg_inf<double>() { return -static_cast<double>(INFINITY); }

template <typename T>
__device__ __forceinline__ bool better(T va, long long ia, T vb, long long ib) {
  return va > vb || (va == vb && ia < ib);
}

template <typename T, int K>
__device__ __forceinline__ void list_insert(T (&lv)[K], long long (&li)[K], int k, T v, long long i) {
  // caller guarantees better(v, i, lv[k-1], li[k-1])
  int p = k - 1;
  while (p > 0 && better(v, i, lv[p - 1], li[p - 1])) {
    lv[p] = lv[p - 1];
    li[p] = li[p - 1];
    --p;
  }
  lv[p] = v;
  li[p] = i;
}

template <typename T, int K, int THREADS>
__global__ void __launch_bounds__(THREADS)
    knn_select_tile_kernel(const T* __restrict__ S, int64_t cols, int64_t ld, int64_t col_offset,
                           const T* __restrict__ a, const T* __restrict__ b, int k, T* __restrict__ vals,
                           int64_t* __restrict__ idx, int64_t self_offset) {
  constexpr int kWarps = THREADS / 32;
  __shared__ T s_v[kWarps];
  __shared__ long long s_i[kWarps];
  __shared__ int s_owner[kWarps];
  __shared__ int s_win;

  const int64_t r = blockIdx.x;
  const T* __restrict__ s = S + r * ld;
  T* __restrict__ sv = vals + r * static_cast<int64_t>(k);
  int64_t* __restrict__ si = idx + r * static_cast<int64_t>(k);
  const long long self_col = self_offset >= 0 ? static_cast<long long>(self_offset + r) : -1LL;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  T lv[K];
  long long li[K];
#pragma unroll
  for (int t = 0; t < K; ++t) {
    lv[t] = neg_inf<T>();
    li[t] = LLONG_MAX;
  }
  // previous state (entries with index -1 are empty)
  for (int t = tid; t < k; t += THREADS) {
    const long long i = si[t];
    const T v = sv[t];
    if (i >= 0 && better(v, i, lv[k - 1], li[k - 1])) list_insert<T, K>(lv, li, k, v, i);
  }
  for (int64_t j = tid; j < cols; j += THREADS) {
    T v = s[j];
    if (a) v *= a[j];
    if (b) v += b[j];
    const long long gi = static_cast<long long>(col_offset + j);
    if (gi != self_col && better(v, gi, lv[k - 1], li[k - 1])) list_insert<T, K>(lv, li, k, v, gi);
  }
  // block merge: k rounds of arg-max over the thread-list heads
  int head = 0;
  for (int out = 0; out < k; ++out) {
    T v = head < k ? lv[head] : neg_inf<T>();
    long long i = head < k ? li[head] : LLONG_MAX;
    int owner = tid;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_down_sync(0xffffffffu, v, off);
      const long long oi = __shfl_down_sync(0xffffffffu, i, off);
      const int oo = __shfl_down_sync(0xffffffffu, owner, off);
      if (better(ov, oi, v, i)) {
        v = ov;
        i = oi;
        owner = oo;
      }
    }
    if (lane == 0) {
      s_v[warp] = v;
      s_i[warp] = i;
      s_owner[warp] = owner;
    }
    __syncthreads();
    if (tid == 0) {
      T bv = s_v[0];
      long long bi = s_i[0];
      int bo = s_owner[0];
      for (int w = 1; w < kWarps; ++w) {
        if (better(s_v[w], s_i[w], bv, bi)) {
          bv = s_v[w];
          bi = s_i[w];
          bo = s_owner[w];
        }
      }
      sv[out] = bv;
      si[out] = bi == LLONG_MAX ? -1 : static_cast<int64_t>(bi);
      s_win = bo;
    }
    __syncthreads();
    if (tid == s_win) ++head;
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* s_red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  T tot = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < nw; ++w) tot += s_red[w];
    s_red[0] = tot;
  }
  __syncthreads();
  tot = s_red[0];
  __syncthreads();
  return tot;
}

constexpr int kAvgThreads = 128;

// One block per query; dynamic shared memory holds k doubles (per-neighbour scale).
template <typename T>
__global__ void __launch_bounds__(kAvgThreads)
    knn_average_kernel(const T* __restrict__ Y, int64_t D, const int64_t* __restrict__ idx,
                       const T* __restrict__ w, int64_t k, int64_t lo, int64_t hi, bool normalize_rows,
                       bool spherical, bool finalize, T* __restrict__ out) {
  extern __shared__ double s_scale[];
  __shared__ double s_red[kAvgThreads / 32];
  const int64_t q = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kAvgThreads / 32;
  double wsum = 0.0;
  for (int64_t t = 0; t < k; ++t) wsum += w ? static_cast<double>(w[q * k + t]) : 1.0;
  // per-neighbour scale: weight, / ||y|| if normalize_rows, 0 if not in this shard
  for (int64_t t = warp; t < k; t += kWarps) {
    const int64_t j = idx[q * k + t];
    const bool own = j >= lo && j < hi;
    double nn = 0.0;
    if (own && normalize_rows) {
      const T* y = Y + (j - lo) * D;
      for (int64_t d = lane; d < D; d += 32) nn += static_cast<double>(y[d]) * y[d];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) nn += __shfl_down_sync(0xffffffffu, nn, off);
    }
    if (lane == 0) {
      double sc = own ? (w ? static_cast<double>(w[q * k + t]) : 1.0) : 0.0;
      if (own && normalize_rows && nn > 0.0) sc /= sqrt(nn);
      s_scale[t] = sc;
    }
  }
  __syncthreads();
  double nn_local = 0.0;
  T* __restrict__ o = out + q * D;
  for (int64_t d = threadIdx.x; d < D; d += kAvgThreads) {
    double acc = 0.0;
    for (int64_t t = 0; t < k; ++t) {
      const double sc = s_scale[t];
      if (sc != 0.0) acc += sc * static_cast<double>(Y[(idx[q * k + t] - lo) * D + d]);
    }
    nn_local += acc * acc;
    o[d] = static_cast<T>(acc);
  }
  if (!finalize) return;
  double div;
  if (spherical) {
    const double nn = block_sum(nn_local, s_red);
    div = nn > 0.0 ? sqrt(nn) : 1.0;
  } else {
    div = wsum != 0.0 ? wsum : 1.0;
  }
  for (int64_t d = threadIdx.x; d < D; d += kAvgThreads) o[d] = static_cast<T>(static_cast<double>(o[d]) / div);
}

template <typename T>
void select_launch(const T* S, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, const T* a, const T* b,
                   int64_t k, T* vals, int64_t* idx, int64_t self_offset, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  const int kk = static_cast<int>(k);
  if (k <= 32)
    knn_select_tile_kernel<T, 32, 128><<<grid, 128, 0, stream>>>(S, cols, ld, col_offset, a, b, kk, vals, idx,
                                                                 self_offset);
  else if (k <= 256)
    knn_select_tile_kernel<T, 256, 64><<<grid, 64, 0, stream>>>(S, cols, ld, col_offset, a, b, kk, vals, idx,
                                                                self_offset);
  else if (k <= 1024)
    knn_select_tile_kernel<T, 1024, 32><<<grid, 32, 0, stream>>>(S, cols, ld, col_offset, a, b, kk, vals, idx,
                                                                 self_offset);
  else
    knn_select_tile_kernel<T, 2048, 32><<<grid, 32, 0, stream>>>(S, cols, ld, col_offset, a, b, kk, vals, idx,
                                                                 self_offset);
}

}  // namespace

void launch_knn_select_tile(const void* S, int dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset,
                            const void* a, const void* b, int64_t k, void* vals, int64_t* idx, int64_t self_offset,
                            cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return;
  if (dtype == kFloat32)
    select_launch<float>(static_cast<const float*>(S), rows, cols, ld, col_offset, static_cast<const float*>(a),
                         static_cast<const float*>(b), k, static_cast<float*>(vals), idx, self_offset, stream);
  else
    select_launch<double>(static_cast<const double*>(S), rows, cols, ld, col_offset, static_cast<const double*>(a),
                          static_cast<const double*>(b), k, static_cast<double*>(vals), idx, self_offset, stream);
}

void launch_knn_average_rows(const void* Y, int dtype, int64_t D, const int64_t* idx, const void* w, int64_t Q,
                             int64_t k, int64_t lo, int64_t hi, bool normalize_rows, bool spherical, bool finalize,
                             void* out, cudaStream_t stream) {
  if (Q <= 0) return;
  const size_t shm = static_cast<size_t>(k) * sizeof(double);
  const dim3 grid(static_cast<unsigned>(Q));
  if (dtype == kFloat32)
    knn_average_kernel<float><<<grid, kAvgThreads, shm, stream>>>(
        static_cast<const float*>(Y), D, idx, static_cast<const float*>(w), k, lo, hi, normalize_rows, spherical,
        finalize, static_cast<float*>(out));
  else
    knn_average_kernel<double><<<grid, kAvgThreads, shm, stream>>>(
        static_cast<const double*>(Y), D, idx, static_cast<const double*>(w), k, lo, hi, normalize_rows, spherical,
        finalize, static_cast<double*>(out));
}

}  // namespace pyfici
