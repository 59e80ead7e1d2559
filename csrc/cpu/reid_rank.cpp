// ReID ranking statistics without sorting gallery rows.
//
// For each query row of a distance matrix, the true matches are few. The rank
// of a match m (0-based, among the valid gallery items, ties to the lower
// index) is the number of valid items that come before it:
//     rank(m) = #{j valid : d_j < d_m} + #{j valid, j < m : d_j == d_m}.
// We build a copy of the row where junk items are NaN (every comparison with
// NaN is false, so junk is never counted before anything), then count with two
// branch-free, vectorised passes per match (j < m with <=, j > m with <). A NaN
// distance of a valid item becomes +inf: it ranks after every number, ties by
// index, as numpy's sort places NaN last; it never ranks before a real value.
// When a query has more than kMaxCountMatches matches, a full sort of the
// valid row is cheaper and is used instead.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

constexpr int64_t kMaxCountMatches = 256;

// rank of the item at idx with value m: #{j < idx : v_j <= m} + #{j > idx : v_j < m}.
// Portable version (the compiler vectorises it for the variant's ISA).
template <typename T>
inline int64_t count_before_portable(const T* __restrict v, int64_t G, int64_t idx, T m) {
  int32_t c1 = 0, c2 = 0;
  for (int64_t j = 0; j < idx; ++j) c1 += (v[j] <= m);
  for (int64_t j = idx + 1; j < G; ++j) c2 += (v[j] < m);
  return static_cast<int64_t>(c1) + static_cast<int64_t>(c2);
}

#if defined(__AVX512F__)
// AVX-512: 16 floats / 8 doubles per compare into a mask register, counted by
// masked adds into two independent int32 / int64 vector accumulators; the
// ragged ends use masked loads (no scalar tail). Ordered predicates: junk
// (NaN) is never counted.
template <int Pred>
inline __m512i count_range_f32(const float* v, int64_t a, int64_t b, __m512 mv, __m512i acc) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i acc1 = _mm512_setzero_si512();
  int64_t j = a;
  for (; j + 32 <= b; j += 32) {
    const __mmask16 k0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), mv, Pred);
    const __mmask16 k1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j + 16), mv, Pred);
    acc = _mm512_mask_add_epi32(acc, k0, acc, one);
    acc1 = _mm512_mask_add_epi32(acc1, k1, acc1, one);
  }
  for (; j < b; j += 16) {
    const int64_t n = b - j < 16 ? b - j : 16;
    const __mmask16 t = static_cast<__mmask16>((1u << n) - 1u);
    const __mmask16 k = _mm512_mask_cmp_ps_mask(t, _mm512_maskz_loadu_ps(t, v + j), mv, Pred);
    acc = _mm512_mask_add_epi32(acc, k, acc, one);
  }
  return _mm512_add_epi32(acc, acc1);
}

inline int64_t count_before(const float* __restrict v, int64_t G, int64_t idx, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512i acc = count_range_f32<_CMP_LE_OQ>(v, 0, idx, mv, _mm512_setzero_si512());
  acc = count_range_f32<_CMP_LT_OQ>(v, idx + 1, G, mv, acc);
  return static_cast<int64_t>(_mm512_reduce_add_epi32(acc));
}

template <int Pred>
inline __m512i count_range_f64(const double* v, int64_t a, int64_t b, __m512d mv, __m512i acc) {
  const __m512i one = _mm512_set1_epi64(1);
  __m512i acc1 = _mm512_setzero_si512();
  int64_t j = a;
  for (; j + 16 <= b; j += 16) {
    const __mmask8 k0 = _mm512_cmp_pd_mask(_mm512_loadu_pd(v + j), mv, Pred);
    const __mmask8 k1 = _mm512_cmp_pd_mask(_mm512_loadu_pd(v + j + 8), mv, Pred);
    acc = _mm512_mask_add_epi64(acc, k0, acc, one);
    acc1 = _mm512_mask_add_epi64(acc1, k1, acc1, one);
  }
  for (; j < b; j += 8) {
    const int64_t n = b - j < 8 ? b - j : 8;
    const __mmask8 t = static_cast<__mmask8>((1u << n) - 1u);
    const __mmask8 k = _mm512_mask_cmp_pd_mask(t, _mm512_maskz_loadu_pd(t, v + j), mv, Pred);
    acc = _mm512_mask_add_epi64(acc, k, acc, one);
  }
  return _mm512_add_epi64(acc, acc1);
}

inline int64_t count_before(const double* __restrict v, int64_t G, int64_t idx, double m) {
  const __m512d mv = _mm512_set1_pd(m);
  __m512i acc = count_range_f64<_CMP_LE_OQ>(v, 0, idx, mv, _mm512_setzero_si512());
  acc = count_range_f64<_CMP_LT_OQ>(v, idx + 1, G, mv, acc);
  return static_cast<int64_t>(_mm512_reduce_add_epi64(acc));
}
#elif defined(__AVX2__)
// AVX2: 8 floats / 4 doubles per compare; a true lane is all ones (-1), so
// subtracting the compare result counts it. Scalar tails.
template <int Pred>
inline int64_t count_range_f32(const float* v, int64_t a, int64_t b, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  int64_t j = a;
  for (; j + 16 <= b; j += 16) {
    acc0 = _mm256_sub_epi32(acc0, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(v + j), mv, Pred)));
    acc1 = _mm256_sub_epi32(acc1, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(v + j + 8), mv, Pred)));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(acc0, acc1));
  int64_t c = 0;
  for (int l = 0; l < 8; ++l) c += lanes[l];
  for (; j < b; ++j) c += Pred == _CMP_LE_OQ ? (v[j] <= m) : (v[j] < m);
  return c;
}

inline int64_t count_before(const float* __restrict v, int64_t G, int64_t idx, float m) {
  return count_range_f32<_CMP_LE_OQ>(v, 0, idx, m) + count_range_f32<_CMP_LT_OQ>(v, idx + 1, G, m);
}

template <int Pred>
inline int64_t count_range_f64(const double* v, int64_t a, int64_t b, double m) {
  const __m256d mv = _mm256_set1_pd(m);
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  int64_t j = a;
  for (; j + 8 <= b; j += 8) {
    acc0 = _mm256_sub_epi64(acc0, _mm256_castpd_si256(_mm256_cmp_pd(_mm256_loadu_pd(v + j), mv, Pred)));
    acc1 = _mm256_sub_epi64(acc1, _mm256_castpd_si256(_mm256_cmp_pd(_mm256_loadu_pd(v + j + 4), mv, Pred)));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(acc0, acc1));
  int64_t c = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; j < b; ++j) c += Pred == _CMP_LE_OQ ? (v[j] <= m) : (v[j] < m);
  return c;
}

inline int64_t count_before(const double* __restrict v, int64_t G, int64_t idx, double m) {
  return count_range_f64<_CMP_LE_OQ>(v, 0, idx, m) + count_range_f64<_CMP_LT_OQ>(v, idx + 1, G, m);
}
#else
template <typename T>
inline int64_t count_before(const T* __restrict v, int64_t G, int64_t idx, T m) {
  return count_before_portable(v, G, idx, m);
}
#endif

// Number of valid items whose value equals m, less one (m's own; junk is NaN: never equal).
template <typename T>
inline int64_t count_equal(const T* __restrict v, int64_t G, T m) {
  int32_t c = 0;
  for (int64_t j = 0; j < G; ++j) c += (v[j] == m);
  return static_cast<int64_t>(c) - 1;
}

struct RowResult {
  double ap, inp;
  int64_t first, nmatch;
};

// ranks: 0-based ranks of the matches, any order. Returns stats.
inline RowResult stats_from_ranks(std::vector<int64_t>& ranks, bool trapezoid) {
  RowResult r{std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::quiet_NaN(), -1, 0};
  const int64_t M = static_cast<int64_t>(ranks.size());
  r.nmatch = M;
  if (M == 0) return r;
  std::sort(ranks.begin(), ranks.end());
  double ap = 0.0;
  for (int64_t k = 0; k < M; ++k) {
    const double rk = static_cast<double>(ranks[k]);
    const double prec = static_cast<double>(k + 1) / (rk + 1.0);
    if (trapezoid) {
      const double prev = ranks[k] == 0 ? 1.0 : static_cast<double>(k) / rk;
      ap += 0.5 * (prev + prec);
    } else {
      ap += prec;
    }
  }
  r.ap = ap / static_cast<double>(M);
  r.first = ranks[0];
  r.inp = static_cast<double>(M) / static_cast<double>(ranks[M - 1] + 1);
  return r;
}

// Optional fused distance epilogue applied while the row is read (the GEMM
// tile holds ||g||^2 - 2 q.g, or q.g for cosine), bit-identical to torch's
// elementwise ops: 0 none, 1 sqeuclidean max(x + ||q||^2, 0), 2 euclidean
// sqrt of that, 3 cosine clamp(1 - x, 0, 2).
template <typename T, int Epi>
inline T epilogue(T x, T qn) {
  if constexpr (Epi == 1) {
    x = x + qn;
    return x < T(0) ? T(0) : x;
  } else if constexpr (Epi == 2) {
    x = x + qn;
    return std::sqrt(x < T(0) ? T(0) : x);
  } else if constexpr (Epi == 3) {
    x = -x + T(1);
    x = x < T(0) ? T(0) : x;
    return x > T(2) ? T(2) : x;
  } else {
    (void)qn;
    return x;
  }
}

// Gallery ids compressed once per call: dense int32 pid / camera codes (so
// the per-row junk test is a 16-lane int32 compare) and the gallery items of
// each pid in index order (so a query's matches are found without a scan).
struct GalleryIndex {
  std::vector<int64_t> upid, ucam;   // sorted unique pids / cameras
  std::vector<int32_t> key, cam;     // dense codes per gallery item
  std::vector<int64_t> offsets, members;
  int32_t key_minus1 = -2;

  GalleryIndex(const int64_t* gpid, const int64_t* gcam, int64_t G) {
    upid.assign(gpid, gpid + G);
    std::sort(upid.begin(), upid.end());
    upid.erase(std::unique(upid.begin(), upid.end()), upid.end());
    ucam.assign(gcam, gcam + G);
    std::sort(ucam.begin(), ucam.end());
    ucam.erase(std::unique(ucam.begin(), ucam.end()), ucam.end());
    key.resize(G);
    cam.resize(G);
    offsets.assign(upid.size() + 1, 0);
    for (int64_t j = 0; j < G; ++j) {
      key[j] = static_cast<int32_t>(std::lower_bound(upid.begin(), upid.end(), gpid[j]) - upid.begin());
      cam[j] = static_cast<int32_t>(std::lower_bound(ucam.begin(), ucam.end(), gcam[j]) - ucam.begin());
      ++offsets[key[j] + 1];
    }
    for (size_t u = 0; u < upid.size(); ++u) offsets[u + 1] += offsets[u];
    members.resize(G);
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t j = 0; j < G; ++j) members[fill[key[j]]++] = j;  // index order within a pid
    key_minus1 = code(upid, -1);
  }
  // dense code of v, or -3 if absent (matches no gallery code)
  static int32_t code(const std::vector<int64_t>& u, int64_t v) {
    auto it = std::lower_bound(u.begin(), u.end(), v);
    return (it != u.end() && *it == v) ? static_cast<int32_t>(it - u.begin()) : -3;
  }
};

template <typename T, int Epi>
void rank_stats_impl(const T* dist, const T* qnorm, int64_t Q, int64_t G, int64_t ld, const int64_t* qpid,
                     const int64_t* gpid, const int64_t* qcam, const int64_t* gcam,
                     bool junk_minus1, bool trapezoid, double* out_ap, int64_t* out_first,
                     double* out_inp, int64_t* out_nmatch, int nthreads, int64_t* out_ranks,
                     const int64_t* rank_offsets, int64_t* out_ties, int64_t* out_nonfinite) {
  int64_t nonfinite = 0;
  const T inf = std::numeric_limits<T>::infinity();
  const T junk_value = std::numeric_limits<T>::quiet_NaN();
  const GalleryIndex gi(gpid, gcam, G);
  const int32_t* __restrict gkey = gi.key.data();
  const int32_t* __restrict gc = gi.cam.data();
  const int32_t km1 = junk_minus1 ? gi.key_minus1 : -2;
#pragma omp parallel num_threads(nthreads) reduction(+ : nonfinite)
  {
    std::vector<T> v(static_cast<size_t>(G));
    std::vector<int64_t> midx, ranks, order, ties;
    std::vector<std::pair<int64_t, int64_t>> rank_tie;
    midx.reserve(64);
    ranks.reserve(64);
#pragma omp for schedule(dynamic, 8)
    for (int64_t q = 0; q < Q; ++q) {
      const T* __restrict d = dist + q * ld;
      const int32_t qk = GalleryIndex::code(gi.upid, qpid[q]);
      const int32_t qc = GalleryIndex::code(gi.ucam, qcam[q]);
      const T qn = Epi == 0 ? T(0) : qnorm[q];
      T* __restrict vv = v.data();
      // junk -> NaN, NaN distance -> +inf (vectorised selects on int32 codes)
      for (int64_t j = 0; j < G; ++j) {
        const bool junk = ((gkey[j] == qk) & (gc[j] == qc)) | (gkey[j] == km1);
        const T x = epilogue<T, Epi>(d[j], qn);
        vv[j] = junk ? junk_value : (x == x ? x : inf);
      }
      if (out_nonfinite != nullptr) {
        // the caller's finiteness check, fused: x - x is 0 exactly for finite x, NaN otherwise
        int32_t bad = 0;
        for (int64_t j = 0; j < G; ++j) bad += !(d[j] - d[j] == T(0));
        nonfinite += bad;
      }
      midx.clear();
      const bool query_is_junk_id = junk_minus1 && qpid[q] == -1;
      if (!query_is_junk_id && qk >= 0) {
        for (int64_t t = gi.offsets[qk]; t < gi.offsets[qk + 1]; ++t) {
          const int64_t j = gi.members[t];
          if (gc[j] != qc) midx.push_back(j);
        }
      }
      ranks.clear();
      ties.clear();
      const int64_t M = static_cast<int64_t>(midx.size());
      if (M > 0 && M <= kMaxCountMatches) {
        for (int64_t k = 0; k < M; ++k) {
          ranks.push_back(count_before(vv, G, midx[k], vv[midx[k]]));
          if (out_ties != nullptr) ties.push_back(count_equal(vv, G, vv[midx[k]]));
        }
      } else if (M > kMaxCountMatches) {
        // full stable ordering of the valid items
        order.clear();
        for (int64_t j = 0; j < G; ++j)
          if (vv[j] == vv[j]) order.push_back(j);  // not junk
        std::sort(order.begin(), order.end(), [vv](int64_t a, int64_t b) {
          return vv[a] < vv[b] || (vv[a] == vv[b] && a < b);
        });
        const int64_t n = static_cast<int64_t>(order.size());
        for (int64_t r = 0; r < n; ++r) {
          const int64_t j = order[r];
          if (gkey[j] != qk) continue;
          ranks.push_back(r);
          if (out_ties != nullptr) {
            int64_t t = 0;
            for (int64_t a = r - 1; a >= 0 && vv[order[a]] == vv[j]; --a) ++t;
            for (int64_t a = r + 1; a < n && vv[order[a]] == vv[j]; ++a) ++t;
            ties.push_back(t);
          }
        }
      }
      if (out_ranks != nullptr) {
        // sorted ranks (and the tie count of each) at this query's offset
        rank_tie.clear();
        for (size_t k = 0; k < ranks.size(); ++k)
          rank_tie.emplace_back(ranks[k], out_ties != nullptr ? ties[k] : 0);
        std::sort(rank_tie.begin(), rank_tie.end());
        const int64_t o = rank_offsets[q];
        const int64_t cap = rank_offsets[q + 1] - o;
        for (int64_t k = 0; k < static_cast<int64_t>(rank_tie.size()) && k < cap; ++k) {
          out_ranks[o + k] = rank_tie[k].first;
          if (out_ties != nullptr) out_ties[o + k] = rank_tie[k].second;
        }
      }
      RowResult res = stats_from_ranks(ranks, trapezoid);
      out_ap[q] = res.ap;
      out_first[q] = res.first;
      out_inp[q] = res.inp;
      out_nmatch[q] = res.nmatch;
    }
  }
  if (out_nonfinite != nullptr) *out_nonfinite = nonfinite;
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "reid_rank_stats",
      [](std::uintptr_t dist, int dtype, int64_t Q, int64_t G, int64_t ld, std::uintptr_t qpid,
         std::uintptr_t gpid, std::uintptr_t qcam, std::uintptr_t gcam, bool junk_minus1,
         bool trapezoid, std::uintptr_t out_ap, std::uintptr_t out_first, std::uintptr_t out_inp,
         std::uintptr_t out_nmatch, int nthreads, int epi, std::uintptr_t qnorm, std::uintptr_t out_ranks,
         std::uintptr_t rank_offsets, std::uintptr_t out_ties, std::uintptr_t out_nonfinite) {
        if (epi < 0 || epi > 3) throw std::invalid_argument("reid_rank_stats: epi must be 0..3");
        py::gil_scoped_release nogil;
        auto run = [&](auto* p) {
          using T = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
          const T* qn = as_ptr<const T>(qnorm);
          auto impl = epi == 0   ? &rank_stats_impl<T, 0>
                      : epi == 1 ? &rank_stats_impl<T, 1>
                      : epi == 2 ? &rank_stats_impl<T, 2>
                                 : &rank_stats_impl<T, 3>;
          impl(p, qn, Q, G, ld, as_ptr<const int64_t>(qpid), as_ptr<const int64_t>(gpid),
                          as_ptr<const int64_t>(qcam), as_ptr<const int64_t>(gcam), junk_minus1,
                          trapezoid, as_ptr<double>(out_ap), as_ptr<int64_t>(out_first),
                          as_ptr<double>(out_inp), as_ptr<int64_t>(out_nmatch), nthreads,
                          as_ptr<int64_t>(out_ranks), as_ptr<const int64_t>(rank_offsets),
                          as_ptr<int64_t>(out_ties), as_ptr<int64_t>(out_nonfinite));
        };
        if (dtype == kFloat32)
          run(as_ptr<const float>(dist));
        else if (dtype == kFloat64)
          run(as_ptr<const double>(dist));
        else
          throw std::invalid_argument("reid_rank_stats: dist must be float32 or float64");
      },
      "Per-query AP, first-hit rank, INP and match count from a [Q, G] distance tile "
      "(row stride ld). pids/cams int64. Junk: same pid and camera (and pid -1 if junk_minus1). "
      "epi/qnorm: optional fused distance epilogue (0 none, 1 sqeuclidean, 2 euclidean, 3 cosine). "
      "out_ranks/rank_offsets (optional, 0 = none): the sorted 0-based ranks of each query's matches "
      "at ranks[offsets[q]:offsets[q+1]]; out_ties (optional): for each, the number of other valid "
      "items with exactly the same distance. out_nonfinite (optional): receives the number of "
      "NaN / Inf values of the [Q, G] matrix read (the caller's finiteness check, fused).");
}

}  // namespace pyfici
