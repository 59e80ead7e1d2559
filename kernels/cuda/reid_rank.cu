// ReID ranking statistics on the GPU: one block per query. Matches are
// collected in index order (block scan) into shared memory, then each warp
// ranks one match by counting the valid gallery items before it (ties to the
// lower index; a NaN distance after every number). No sort, no host
// synchronisation.
#include <climits>
#include <cub/block/block_scan.cuh>

#include "reid_rank.cuh"

namespace pyfici {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 1024;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    reid_rank_stats_kernel(const T* __restrict__ dist, int64_t G, int64_t ld,
                           const int64_t* __restrict__ qpid, const int64_t* __restrict__ gpid,
                           const int64_t* __restrict__ qcam, const int64_t* __restrict__ gcam,
                           bool junk_m1, bool trapezoid, double* __restrict__ out_ap,
                           int64_t* __restrict__ out_first, double* __restrict__ out_inp,
                           int64_t* __restrict__ out_nmatch) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int64_t s_idx[kChunk];
  __shared__ int s_n;
  __shared__ double s_ap[kWarps];
  __shared__ long long s_first[kWarps], s_last[kWarps];

  const int64_t q = blockIdx.x;
  const T* __restrict__ d = dist + q * ld;
  const int64_t qp = qpid[q], qc = qcam[q];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool qjunk = junk_m1 && qp == -1;

  double ap_acc = 0.0;
  long long first = LLONG_MAX, last = -1;
  long long total = 0;
  if (threadIdx.x == 0) s_n = 0;
  __syncthreads();

  for (int64_t base = 0; base < G; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int flag = (!qjunk && j < G && gpid[j] == qp && gcam[j] != qc) ? 1 : 0;
    int pos = 0, agg = 0;
    Scan(scan_tmp).ExclusiveSum(flag, pos, agg);
    const int n0 = s_n;
    if (flag) s_idx[n0 + pos] = j;
    __syncthreads();
    if (threadIdx.x == 0) s_n = n0 + agg;
    __syncthreads();
    const int n = s_n;
    const bool flush = (n + kThreads > kChunk) || (base + kThreads >= G);
    if (flush && n > 0) {
      for (int k = warp; k < n; k += kWarps) {
        const int64_t jm = s_idx[k];
        const T m = d[jm];
        const bool m_nan = m != m;
        unsigned int c_all = 0, c_match = 0;
        for (int64_t jj = lane; jj < G; jj += 32) {
          const T dj = d[jj];
          const int64_t p = gpid[jj];
          const bool junk = (p == qp && gcam[jj] == qc) || (junk_m1 && p == -1);
          // a NaN distance ranks after every number (+inf included), NaNs among
          // themselves by index, as the CPU kernel and torch's sort place them
          const bool before = m_nan ? (dj == dj || jj < jm) : ((dj < m) || (dj == m && jj < jm));
          if (!junk && before) {
            ++c_all;
            c_match += (p == qp);
          }
        }
        for (int off = 16; off > 0; off >>= 1) {
          c_all += __shfl_down_sync(0xffffffffu, c_all, off);
          c_match += __shfl_down_sync(0xffffffffu, c_match, off);
        }
        if (lane == 0) {
          const double r = static_cast<double>(c_all);
          const double h = static_cast<double>(c_match) + 1.0;
          const double prec = h / (r + 1.0);
          if (trapezoid) {
            const double prev = c_all == 0 ? 1.0 : (h - 1.0) / r;
            ap_acc += 0.5 * (prev + prec);
          } else {
            ap_acc += prec;
          }
          first = min(first, static_cast<long long>(c_all));
          last = max(last, static_cast<long long>(c_all));
        }
      }
      total += n;
      __syncthreads();
      if (threadIdx.x == 0) s_n = 0;
      __syncthreads();
    }
  }
  if (lane == 0) {
    s_ap[warp] = ap_acc;
    s_first[warp] = first;
    s_last[warp] = last;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double ap = 0.0;
    long long f = LLONG_MAX, l = -1;
    for (int w = 0; w < kWarps; ++w) {
      ap += s_ap[w];
      f = min(f, s_first[w]);
      l = max(l, s_last[w]);
    }
    out_nmatch[q] = total;
    if (total == 0) {
      out_ap[q] = __longlong_as_double(0x7ff8000000000000LL);
      out_inp[q] = __longlong_as_double(0x7ff8000000000000LL);
      out_first[q] = -1;
    } else {
      out_ap[q] = ap / static_cast<double>(total);
      out_first[q] = f;
      out_inp[q] = static_cast<double>(total) / static_cast<double>(l + 1);
    }
  }
}

}  // namespace

void launch_reid_rank_stats(const void* dist, int dtype, int64_t Q, int64_t G, int64_t ld,
                            const int64_t* qpid, const int64_t* gpid, const int64_t* qcam,
                            const int64_t* gcam, bool junk_minus1, bool trapezoid, double* out_ap,
                            int64_t* out_first, double* out_inp, int64_t* out_nmatch,
                            cudaStream_t stream) {
  if (Q == 0) return;
  const dim3 grid(static_cast<unsigned int>(Q));
  if (dtype == 0) {
    reid_rank_stats_kernel<float><<<grid, kThreads, 0, stream>>>(
        static_cast<const float*>(dist), G, ld, qpid, gpid, qcam, gcam, junk_minus1, trapezoid,
        out_ap, out_first, out_inp, out_nmatch);
  } else {
    reid_rank_stats_kernel<double><<<grid, kThreads, 0, stream>>>(
        static_cast<const double*>(dist), G, ld, qpid, gpid, qcam, gcam, junk_minus1, trapezoid,
        out_ap, out_first, out_inp, out_nmatch);
  }
}

}  // namespace pyfici
