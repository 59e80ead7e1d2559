// Family 2: exact batched kNN, fused k-nearest averaging, and the k-Same loop.
//
// knn_select_tile: the GEMM-side selection. Python computes a score tile
// S = X_tile @ Y_tile^T with torch.mm (BLAS); for every row we keep the k best
// scores seen so far (sorted, best first, ties to the lower gallery index).
// The score of column j is  s_j * a_j + b_j  (a, b optional per-column
// vectors: 1/||y|| for cosine, -||y||^2/2 for squared euclidean), so no
// normalised copy of the gallery is needed. The scan is a branch-light
// "any score in this block of 16 beats the k-th best?" test that the compiler
// vectorises; the rare hits replace the root of a k-entry binary heap whose
// root is the worst kept score (so the test is one comparison against a
// register, and an insertion costs O(log k)). Rows are spread over OpenMP
// threads; the state ([rows, k] values and indices) lives across gallery tiles.
//
// knn_refine: exact values of the selected candidates (double accumulation, a
// fixed order per pair), then a sort by (value, index) that keeps the best k.
// knn_exact_rows: the same direct formula over the whole gallery for a few rows.
// knn_average_rows: the fused k-nearest average: gathers only the k selected
// gallery rows per query (no [Q, k, D] buffer), optional weights, optional
// per-row normalisation of the neighbours (cosine) and of the result (spherical).
// k_same_sweep / k_same_mdav: the greedy k-Same partition over candidate lists.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include <pybind11/stl.h>

#include <string>
#include <type_traits>
#include <utility>

#include "gemm.h"
#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

constexpr int64_t kBlock = 16;
constexpr int64_t kOuter = 64;

// Threads worth starting for `work` element-operations: small calls stay on one
// thread (an OpenMP region on a busy machine costs more than the work).
inline int threads_for(int nthreads, int64_t work, int64_t rows) {
  const int64_t by_work = std::max<int64_t>(1, work / (int64_t(1) << 15));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(nthreads), by_work, rows})));
}

template <typename T>
inline bool better(T va, int64_t ia, T vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Binary heap of the k best (value, index) pairs seen so far; the root is the
// worst kept pair, so a new score is tested against one register value.
template <typename T>
inline bool worse(T va, int64_t ia, T vb, int64_t ib) {
  return va < vb || (va == vb && ia > ib);
}

template <typename T>
inline void heap_sift_down(T* __restrict hv, int64_t* __restrict hi, int64_t k, int64_t p) {
  const T v = hv[p];
  const int64_t i = hi[p];
  for (;;) {
    int64_t c = 2 * p + 1;
    if (c >= k) break;
    if (c + 1 < k && worse(hv[c + 1], hi[c + 1], hv[c], hi[c])) ++c;
    if (!worse(hv[c], hi[c], v, i)) break;
    hv[p] = hv[c];
    hi[p] = hi[c];
    p = c;
  }
  hv[p] = v;
  hi[p] = i;
}

constexpr int64_t kEmpty = std::numeric_limits<int64_t>::max();  // index of an unused heap entry

// Merges the scores of one tile row s[0, cols) into the row's heap (hv, hi: k entries,
// root = worst kept). Column j has global index col_base + j; column self_col (local,
// -1: none) is skipped. Columns must arrive in increasing global index order over the
// calls for one row: an equal score then never displaces a kept (lower) index.
//
// Scores are stored as T, or (S = uint16_t, T = float) as bfloat16: the upper 16 bits of a
// float32, widened exactly by a shift (the bf16 selection pass, pyfici/backends/knn.py).
template <typename T, typename S>
inline T load_score(const S* __restrict s, int64_t j) {
  if constexpr (std::is_same_v<S, uint16_t>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 scores widen to float");
    return __builtin_bit_cast(float, static_cast<uint32_t>(s[j]) << 16);
  } else {
    return s[j];
  }
}

template <typename T, bool HasA, bool HasB, typename S = T>
inline void scan_row(const S* __restrict s, int64_t cols, int64_t col_base, const T* __restrict a,
                     const T* __restrict b, int64_t k, T* __restrict hv, int64_t* __restrict hi, int64_t self_col) {
  T thresh = hv[0];
  auto scalar_range = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T v = load_score<T>(s, j);
      if constexpr (HasA) v *= a[j];
      if constexpr (HasB) v += b[j];
      if (v > thresh && j != self_col) {
        hv[0] = v;
        hi[0] = col_base + j;
        heap_sift_down(hv, hi, k, 0);
        thresh = hv[0];
      }
    }
  };
  int64_t j = 0;
  for (; j + kOuter <= cols; j += kOuter) {
    // one max over 64 scores (vertical vmaxps, a single horizontal step), then
    // 16-lane bitmasks only where the block holds a score above the k-th best
    T m = thresh;
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < kOuter; ++t) {
      T v = load_score<T>(s, j + t);
      if constexpr (HasA) v *= a[j + t];
      if constexpr (HasB) v += b[j + t];
      m = v > m ? v : m;
    }
    if (!(m > thresh)) continue;
    for (int64_t j16 = j; j16 < j + kOuter; j16 += kBlock) {
      uint32_t hit = 0;
#pragma omp simd reduction(| : hit)
      for (int64_t t = 0; t < kBlock; ++t) {
        T v = load_score<T>(s, j16 + t);
        if constexpr (HasA) v *= a[j16 + t];
        if constexpr (HasB) v += b[j16 + t];
        hit |= static_cast<uint32_t>(v > thresh) << t;
      }
      while (hit) {  // only the lanes that beat the k-th best (re-checked: it may have risen)
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        scalar_range(j16 + t, j16 + t + 1);
      }
    }
  }
  scalar_range(j, cols);
}

// A row's state (k entries sorted best first, index -1 = unused) as a heap (worst at the
// root: the reversed sorted list already is one), and back.
template <typename T>
inline void state_to_heap(const T* vals, const int64_t* idx, int64_t k, T* hv, int64_t* hi) {
  for (int64_t t = 0; t < k; ++t) {
    hv[t] = vals[k - 1 - t];
    hi[t] = idx[k - 1 - t] < 0 ? kEmpty : idx[k - 1 - t];
  }
}

template <typename T>
inline void heap_to_state(const T* hv, const int64_t* hi, int64_t k, std::vector<std::pair<T, int64_t>>& sorted,
                          T* vals, int64_t* idx) {
  sorted.resize(static_cast<size_t>(k));
  for (int64_t t = 0; t < k; ++t) sorted[t] = {hv[t], hi[t]};
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& p, const auto& q) { return better(p.first, p.second, q.first, q.second); });
  for (int64_t t = 0; t < k; ++t) {
    vals[t] = sorted[t].first;
    idx[t] = sorted[t].second == kEmpty ? -1 : sorted[t].second;
  }
}

// Heap = false: the state is the sorted list (best first, index -1 = unused), turned into a
// heap and back on every call. Heap = true: the state is kept as the heaps themselves (root =
// worst kept, index kEmpty = unused) across calls, and knn_heap_sort sorts it once at the end.
template <typename T, bool HasA, bool HasB, bool Heap, typename S>
void select_tile_impl(const S* Sc, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, const T* a,
                      const T* b, int64_t k, T* state_vals, int64_t* state_idx, int64_t self_offset,
                      int nthreads) {
  nthreads = threads_for(nthreads, rows * cols, rows);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> hv(Heap ? 0 : static_cast<size_t>(k));
    std::vector<int64_t> hi(Heap ? 0 : static_cast<size_t>(k));
    std::vector<std::pair<T, int64_t>> sorted(Heap ? 0 : static_cast<size_t>(k));
    // dynamic: on a busy machine a descheduled thread does not hold the others up
#pragma omp for schedule(dynamic, 16)
    for (int64_t r = 0; r < rows; ++r) {
      T* vals = state_vals + r * k;
      int64_t* idx = state_idx + r * k;
      const int64_t self_col = self_offset >= 0 ? self_offset + r - col_offset : -1;
      if constexpr (Heap) {
        scan_row<T, HasA, HasB, S>(Sc + r * ld, cols, col_offset, a, b, k, vals, idx, self_col);
      } else {
        state_to_heap(vals, idx, k, hv.data(), hi.data());
        scan_row<T, HasA, HasB, S>(Sc + r * ld, cols, col_offset, a, b, k, hv.data(), hi.data(), self_col);
        heap_to_state(hv.data(), hi.data(), k, sorted, vals, idx);
      }
    }
  }
}

template <typename T, bool Heap = false, typename S = T>
void select_tile(const S* Sc, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, const T* a, const T* b,
                 int64_t k, T* vals, int64_t* idx, int64_t self_offset, int nthreads) {
  if (a && b)
    select_tile_impl<T, true, true, Heap>(Sc, rows, cols, ld, col_offset, a, b, k, vals, idx, self_offset, nthreads);
  else if (a)
    select_tile_impl<T, true, false, Heap>(Sc, rows, cols, ld, col_offset, a, b, k, vals, idx, self_offset, nthreads);
  else if (b)
    select_tile_impl<T, false, true, Heap>(Sc, rows, cols, ld, col_offset, a, b, k, vals, idx, self_offset, nthreads);
  else
    select_tile_impl<T, false, false, Heap>(Sc, rows, cols, ld, col_offset, a, b, k, vals, idx, self_offset,
                                            nthreads);
}

// Heaps kept by select_tile<T, true> -> sorted lists (best first, index -1 = unused), in place.
template <typename T>
void heap_sort_rows(T* vals, int64_t* idx, int64_t rows, int64_t k, int nthreads) {
#pragma omp parallel num_threads(threads_for(nthreads, rows * k * 16, rows))
  {
    std::vector<std::pair<T, int64_t>> sorted(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) heap_to_state(vals + r * k, idx + r * k, k, sorted, vals + r * k, idx + r * k);
  }
}

// The whole selection pass in one call, with the GEMM from the run-time BLAS (gemm.h):
// the gallery is walked in tiles of tg columns for each block of tq queries; each score
// tile S = X'_block @ Y'_tile^T (X' = (X - mu) * c and Y' likewise when mu / c != 1,
// else the inputs themselves) is scanned into the block's heaps right after the GEMM
// wrote it, while it is still in cache, and no tile ever goes back to Python.
//
// Threads: the work items (query block x gallery part) run on OpenMP threads, each
// calling a single-threaded GEMM (the BLAS's own threads are set to 1 for the call, so
// the two pools never oversubscribe the cores; a multi-threaded GEMM per tile with an
// OpenMP scan after it measured 10x slower on a loaded 2-core machine). The gallery is
// split into parts only when there are too few query blocks to keep the threads busy;
// the parts' lists are merged at the end.
// Output: the L best (score, global index) of every query, best first, -1 = unused;
// the same selection as knn_select_tile over the same scores.
template <typename T>
inline void transform_rows(const T* src, int64_t n, int64_t D, const T* mu, T c, T* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict x = src + r * D;
    T* __restrict o = dst + r * D;
    if (mu) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = (x[d] - mu[d]) * c;
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = x[d] * c;
    }
  }
}

template <typename T, bool HasA, bool HasB>
void select_gemm_impl(const T* X, const T* Y, int64_t Q, int64_t G, int64_t D, const T* mu, double c, const T* a,
                      const T* b, int64_t L, T* out_s, int64_t* out_i, int64_t col_offset, int64_t self_offset,
                      int64_t tq, int64_t tg, int nthreads) {
  const bool transformed = mu != nullptr || c != 1.0;
  const T cc = static_cast<T>(c);
  const int64_t nqb = (Q + tq - 1) / tq;
  const int64_t ntiles = (G + tg - 1) / tg;
  nthreads = std::max(1, nthreads);
  // a query block's pass over gallery tiles [t0, t1): heaps of its rows -> sorted lists
  struct Buffers {
    std::vector<T> S, xb, yb, hv;
    std::vector<int64_t> hi;
    std::vector<std::pair<T, int64_t>> sorted;
  };
  auto alloc = [&](Buffers& B) {
    B.S.resize(static_cast<size_t>(tq * tg));
    if (transformed) {
      B.xb.resize(static_cast<size_t>(tq * D));
      B.yb.resize(static_cast<size_t>(tg * D));
    }
    B.hv.resize(static_cast<size_t>(tq * L));
    B.hi.resize(static_cast<size_t>(tq * L));
  };
  auto scan_rows = [&](Buffers& B, int64_t q0, int64_t r0, int64_t r1, int64_t g0, int64_t cols) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t self_col = self_offset >= 0 ? self_offset + q0 + r - col_offset - g0 : -1;
      scan_row<T, HasA, HasB>(B.S.data() + r * cols, cols, col_offset + g0, HasA ? a + g0 : nullptr,
                              HasB ? b + g0 : nullptr, L, B.hv.data() + r * L, B.hi.data() + r * L, self_col);
    }
  };
  auto start_block = [&](Buffers& B, int64_t q0, int64_t rows) -> const T* {
    std::fill(B.hv.begin(), B.hv.begin() + rows * L, -std::numeric_limits<T>::infinity());
    std::fill(B.hi.begin(), B.hi.begin() + rows * L, kEmpty);
    if (!transformed) return X + q0 * D;
    transform_rows(X + q0 * D, rows, D, mu, cc, B.xb.data());
    return B.xb.data();
  };
  auto gallery_tile = [&](Buffers& B, int64_t g0, int64_t cols) -> const T* {
    if (!transformed) return Y + g0 * D;
    transform_rows(Y + g0 * D, cols, D, mu, cc, B.yb.data());
    return B.yb.data();
  };
  auto finish_block = [&](Buffers& B, int64_t rows, T* vals, int64_t* idx) {
    for (int64_t r = 0; r < rows; ++r)
      heap_to_state(B.hv.data() + r * L, B.hi.data() + r * L, L, B.sorted, vals + r * L, idx + r * L);
  };

  // enough work items for every thread (a descheduled thread then holds up little)
  const int64_t want = 4 * static_cast<int64_t>(nthreads);
  const int64_t P = nthreads == 1 || nqb >= want ? 1 : std::min(ntiles, (want + nqb - 1) / nqb);
  std::vector<T> part_s(P > 1 ? static_cast<size_t>(P * Q * L) : 0);
  std::vector<int64_t> part_i(P > 1 ? static_cast<size_t>(P * Q * L) : 0);
  const int64_t items = nqb * P;
  BlasThreads blas(1);
#pragma omp parallel num_threads(static_cast<int>(std::min<int64_t>(nthreads, items)))
  {
    Buffers B;
    alloc(B);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t qb = it / P, p = it % P;
      const int64_t q0 = qb * tq, rows = std::min(tq, Q - q0);
      const T* xq = start_block(B, q0, rows);
      for (int64_t t = p * ntiles / P; t < (p + 1) * ntiles / P; ++t) {
        const int64_t g0 = t * tg, cols = std::min(tg, G - g0);
        gemm_nt(rows, cols, D, xq, D, gallery_tile(B, g0, cols), D, B.S.data(), cols);
        scan_rows(B, q0, 0, rows, g0, cols);
      }
      if (P == 1)
        finish_block(B, rows, out_s + q0 * L, out_i + q0 * L);
      else
        finish_block(B, rows, part_s.data() + (p * Q + q0) * L, part_i.data() + (p * Q + q0) * L);
    }
  }
  if (P == 1) return;
  // merge the parts' lists: the best L of their union by (score desc, index asc)
#pragma omp parallel num_threads(threads_for(nthreads, Q * P * L * 16, Q))
  {
    std::vector<std::pair<T, int64_t>> all(static_cast<size_t>(P * L));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = part_i[(p * Q + q) * L + t];
          all[p * L + t] = {part_s[(p * Q + q) * L + t], i < 0 ? kEmpty : i};
        }
      std::partial_sort(all.begin(), all.begin() + L, all.end(),
                        [](const auto& u, const auto& v) { return better(u.first, u.second, v.first, v.second); });
      for (int64_t t = 0; t < L; ++t) {
        out_s[q * L + t] = all[t].first;
        out_i[q * L + t] = all[t].second == kEmpty ? -1 : all[t].second;
      }
    }
  }
}

// Exact value of one (query, gallery row) pair by the direct formula in double: eight
// partial sums (lane l takes d = l, l + 8, l + 16, ... in increasing order, the D % 8 last
// terms going to lanes 0, 1, ...), combined in one fixed tree. The same arithmetic for every
// pair, so identical gallery rows always get identical values, whatever tile they were in;
// the eight lanes are one vector register (AVX-512) or two (AVX2), without one long
// dependency chain. Cosine takes x.y and y.y in the same pass.
constexpr int64_t kLanes = 8;

inline double tree8(const double* a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

template <typename T, typename F>
inline void sum8(const T* __restrict x, const T* __restrict y, int64_t D, F term, double* __restrict acc) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) term(acc, l, static_cast<double>(x[d + l]), static_cast<double>(y[d + l]));
  }
  for (int64_t l = 0; d + l < D; ++l) term(acc, l, static_cast<double>(x[d + l]), static_cast<double>(y[d + l]));
}

template <typename T>
inline double exact_value(const T* __restrict x, const T* __restrict y, int64_t D, int metric, double xnorm) {
  double a[kLanes] = {};  // the lanes sum8 accumulates into (term adds to acc[l])
  if (metric == kSqEuclidean || metric == kEuclidean) {
    sum8(x, y, D, [](double* acc, int64_t l, double u, double v) { acc[l] += (u - v) * (u - v); }, a);
    const double acc = tree8(a);
    return metric == kEuclidean ? std::sqrt(acc) : acc;
  }
  if (metric == kIP) {
    sum8(x, y, D, [](double* acc, int64_t l, double u, double v) { acc[l] += u * v; }, a);
    return tree8(a);
  }
  double b[kLanes] = {};
  sum8(x, y, D, [&b](double* acc, int64_t l, double u, double v) {
    acc[l] += u * v;
    b[l] += v * v;
  }, a);
  const double xy = tree8(a), yy = tree8(b);
  // scale-invariant: only a zero vector is special (cosine 0 with everything)
  const double den = (xnorm > 0.0 ? xnorm : 1.0) * (yy > 0.0 ? std::sqrt(yy) : 1.0);
  return std::min(2.0, std::max(0.0, 1.0 - xy / den));
}

template <typename T>
inline double query_norm(const T* x, int64_t D, int metric) {
  double xx = 0.0;
  if (metric == kCosine)
    for (int64_t d = 0; d < D; ++d) xx += static_cast<double>(x[d]) * x[d];
  return std::sqrt(xx);
}

// (value, index) order of the metric: distances ascend, "ip" descends; ties to the lower index.
inline bool ranks_before(bool ascending, double va, int64_t ia, double vb, int64_t ib) {
  if (va != vb) return ascending ? va < vb : va > vb;
  return ia < ib;
}

// Exact values of L candidates per query (cand [Q, L], -1 = none), sorted by (value, index);
// the first k go to out_vals / out_idx, and the k-th exact value (double) to kth when given.
template <typename T>
void refine_impl(const T* X, const T* Y, int64_t Q, int64_t D, int64_t L, int metric, const int64_t* cand,
                 int64_t k, T* out_vals, int64_t* out_idx, double* kth, int nthreads) {
  const bool ascending = metric != kIP;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  const double worst = ascending ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
  nthreads = threads_for(nthreads, Q * L * D, Q);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<std::pair<double, int64_t>> row(static_cast<size_t>(L));
#pragma omp for schedule(dynamic, 64)  // a descheduled thread does not hold the others up
    for (int64_t q = 0; q < Q; ++q) {
      const T* __restrict x = X + q * D;
      const double xn = query_norm(x, D, metric);
      const int64_t* __restrict id = cand + q * L;
      for (int64_t t = 0; t < L; ++t) {
        const int64_t j = id[t];
        // the candidates are scattered over the gallery: start loading the next row (its
        // first 2 KB; the hardware prefetcher follows beyond) while this one is summed
        // (measured: refine of 20000 x 42 candidates at D = 512 0.24 -> 0.18 s on 2 cores)
        if (t + 1 < L && id[t + 1] >= 0) {
          const char* nxt = reinterpret_cast<const char*>(Y + id[t + 1] * D);
          const int64_t bytes = std::min<int64_t>(D * static_cast<int64_t>(sizeof(T)), 2048);
          for (int64_t o = 0; o < bytes; o += 64)
            __builtin_prefetch(nxt + o);
        }
        row[t] = j >= 0 ? std::make_pair(exact_value(x, Y + j * D, D, metric, xn), j) : std::make_pair(worst, kNone);
      }
      std::sort(row.begin(), row.end(), [ascending](const auto& p, const auto& r) {
        return ranks_before(ascending, p.first, p.second, r.first, r.second);
      });
      for (int64_t t = 0; t < k; ++t) {
        out_vals[q * k + t] = static_cast<T>(row[t].first);
        out_idx[q * k + t] = row[t].second == kNone ? -1 : row[t].second;
      }
      if (kth) kth[q] = row[k - 1].first;
    }
  }
}

// Exact top-k of the given query rows against the whole gallery by the direct formula
// (the fallback for rows whose candidate list could not be certified). rows[r] is the
// query row; with self_offset >= 0, gallery column rows[r] - self_offset is excluded.
template <typename T>
void exact_rows_impl(const T* X, const T* Y, const int64_t* rows, int64_t R, int64_t G, int64_t D, int metric,
                     int64_t k, int64_t self_offset, T* out_vals, int64_t* out_idx, double* kth, int nthreads) {
  const bool ascending = metric != kIP;
  nthreads = threads_for(nthreads, R * G * D, R);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<std::pair<double, int64_t>> heap;
    heap.reserve(static_cast<size_t>(k));
    // heap root = the worst kept pair
    auto cmp = [ascending](const auto& p, const auto& r) {
      return ranks_before(ascending, p.first, p.second, r.first, r.second);
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < R; ++r) {
      const int64_t q = rows[r];
      const T* __restrict x = X + q * D;
      const double xn = query_norm(x, D, metric);
      const int64_t skip = self_offset >= 0 ? q - self_offset : -1;
      heap.clear();
      for (int64_t j = 0; j < G; ++j) {
        if (j == skip) continue;
        const double v = exact_value(x, Y + j * D, D, metric, xn);
        if (static_cast<int64_t>(heap.size()) < k) {
          heap.emplace_back(v, j);
          std::push_heap(heap.begin(), heap.end(), cmp);
        } else if (ranks_before(ascending, v, j, heap.front().first, heap.front().second)) {
          std::pop_heap(heap.begin(), heap.end(), cmp);
          heap.back() = {v, j};
          std::push_heap(heap.begin(), heap.end(), cmp);
        }
      }
      std::sort(heap.begin(), heap.end(), cmp);
      for (int64_t t = 0; t < k; ++t) {
        const bool have = t < static_cast<int64_t>(heap.size());
        out_vals[r * k + t] = static_cast<T>(have ? heap[t].first : (ascending ? INFINITY : -INFINITY));
        out_idx[r * k + t] = have ? heap[t].second : -1;
      }
      if (kth) kth[r] = static_cast<int64_t>(heap.size()) >= k ? heap[k - 1].first : (ascending ? INFINITY : -INFINITY);
    }
  }
}

// One pass over the rows of X [N, D]: norm2[r] = sum_d ((x_d - mu_d) * c)^2 (double;
// mu optional), colsum[d] += x_d (double, optional), and the largest |x_d| (returned).
template <typename T>
double row_stats_impl(const T* X, int64_t N, int64_t D, const double* mu, double c, double* norm2, double* colsum,
                      int nthreads) {
  double amax = 0.0;
  nthreads = threads_for(nthreads, N * D, N);
#pragma omp parallel num_threads(nthreads) reduction(max : amax)
  {
    std::vector<double> cs(colsum ? static_cast<size_t>(D) : 0, 0.0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N; ++r) {
      const T* __restrict x = X + r * D;
      double acc = 0.0, m = amax;
      // these statistics only scale and bound the approximate pass: a vectorised
      // (reassociated) sum is fine here, unlike in the exact values
      if (mu) {
#pragma omp simd reduction(+ : acc) reduction(max : m)
        for (int64_t d = 0; d < D; ++d) {
          const double v = static_cast<double>(x[d]);
          const double e = (v - mu[d]) * c;
          acc += e * e;
          m = std::max(m, std::abs(v));
        }
      } else {
#pragma omp simd reduction(+ : acc) reduction(max : m)
        for (int64_t d = 0; d < D; ++d) {
          const double v = static_cast<double>(x[d]) * c;
          acc += v * v;
          m = std::max(m, std::abs(static_cast<double>(x[d])));
        }
      }
      if (colsum)
        for (int64_t d = 0; d < D; ++d) cs[d] += static_cast<double>(x[d]);
      amax = m;
      norm2[r] = acc;
    }
    if (colsum) {
#pragma omp critical
      for (int64_t d = 0; d < D; ++d) colsum[d] += cs[d];
    }
  }
  return amax;
}

// float32 rows -> bfloat16 for the bf16 selection pass: x' = (x - mu) * c (mu optional; the
// same float arithmetic as the float32 tiles), rounded to nearest even (NaN stays NaN), with
// the squared norms (double) of the rounding residual x' - bf16(x') (exact in float) and of
// the bf16 row: the terms of the pass's error bound (pyfici/backends/knn.py).
inline uint16_t to_bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(r >> 16);
}

void rows_to_bf16(const float* X, int64_t N, int64_t D, const float* mu, float c, uint16_t* out, double* res_n2,
                  double* out_n2, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads, N * D, N))
  for (int64_t r = 0; r < N; ++r) {
    const float* __restrict x = X + r * D;
    uint16_t* __restrict o = out + r * D;
    double er = 0.0, on = 0.0;
#pragma omp simd reduction(+ : er, on)
    for (int64_t d = 0; d < D; ++d) {
      const float v = mu ? (x[d] - mu[d]) * c : x[d] * c;
      const uint16_t h = to_bf16_bits(v);
      o[d] = h;
      const float back = __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16);
      const double e = static_cast<double>(v - back);
      er += e * e;
      on += static_cast<double>(back) * static_cast<double>(back);
    }
    res_n2[r] = er;
    out_n2[r] = on;
  }
}

// Euclidean norm of a row of n values, accurate at any finite magnitude: the
// sum of squares in double, and only when that sum leaves double's safe range
// (float64 rows beyond about 2**+-480; never for float32 rows) a second pass
// over the row divided by its largest magnitude. In the common case the
// result is the plain sqrt of the plain sum, bit for bit.
template <typename A>
inline double row_norm(const A& at, int64_t n) {
  double ss = 0.0;
  for (int64_t d = 0; d < n; ++d) ss += static_cast<double>(at(d)) * static_cast<double>(at(d));
  constexpr double lo = 0x1p-960, hi = 0x1p960;
  if (ss >= lo && ss <= hi) return std::sqrt(ss);
  // a zero row, squares that underflowed, or a sum that overflowed
  double m = 0.0;
  for (int64_t d = 0; d < n; ++d) m = std::max(m, std::fabs(static_cast<double>(at(d))));
  if (m == 0.0) return 0.0;
  double sr = 0.0;
  for (int64_t d = 0; d < n; ++d) {
    const double v = static_cast<double>(at(d)) / m;
    sr += v * v;
  }
  return m * std::sqrt(sr);
}

// out[q] = sum_t w[q, t] * u(Y[idx[q, t]]),  u = y / ||y|| if normalize_rows else y;
// then out[q] /= ||out[q]|| if spherical else out[q] /= sum_t w[q, t].
// idx may hold indices into a shard: rows with idx < 0 or not in [lo, hi) are skipped
// (partial sums for the distributed path; lo = 0, hi = G otherwise). finalize=false
// leaves the raw weighted sum (the caller all-reduces and normalises).
template <typename T>
void average_impl(const T* Y, int64_t D, const int64_t* idx, const T* w, int64_t Q, int64_t k, int64_t lo,
                  int64_t hi, bool normalize_rows, bool spherical, bool finalize, T* out, int nthreads) {
  nthreads = threads_for(nthreads, Q * k * D, Q);
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<double> acc(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double wsum = 0.0;
      double* __restrict ac = acc.data();
      for (int64_t t = 0; t < k; ++t) {
        const int64_t j = idx[q * k + t];
        const double wt = w ? static_cast<double>(w[q * k + t]) : 1.0;
        wsum += wt;
        if (j < lo || j >= hi) continue;
        const T* __restrict y = Y + (j - lo) * D;
        double scale = wt;
        if (normalize_rows) {
          const double yn = row_norm([y](int64_t d) { return y[d]; }, D);
          if (yn > 0.0) scale /= yn;  // a zero row stays zero
        }
        for (int64_t d = 0; d < D; ++d) ac[d] += scale * static_cast<double>(y[d]);
      }
      double div = 1.0;
      if (finalize) {
        if (spherical) {
          const double nn = row_norm([ac](int64_t d) { return ac[d]; }, D);
          div = nn > 0.0 ? nn : 1.0;
        } else {
          div = wsum != 0.0 ? wsum : 1.0;
        }
      }
      T* __restrict o = out + q * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(ac[d] / div);
    }
  }
}

// Greedy k-Same sweep over candidate lists. cand: [N, W] neighbour lists
// (nearest first, -1 padding; the point itself is skipped). Visits
// visit[pos..M) in order; a visited alive point s with >= k-1 alive candidates
// forms the cluster {s} + its first k-1 alive candidates (exactly its k-1
// nearest alive points, because the list is a prefix of s's sorted neighbour
// list and removals only delete from it). If s's list ran out the sweep stops
// and reports s's position so the caller can refresh lists and call again:
// the result is exactly the plain greedy algorithm. Returns
// {status, pos, next_cluster, n_alive}: status 0 = fewer than 2k alive or the
// visit list is done; 1 = refresh visit[pos].
std::vector<int64_t> k_same_sweep_impl(const int64_t* cand, int64_t W, int64_t k, const int64_t* visit,
                                       int64_t pos, int64_t M, uint8_t* alive, int64_t* assign,
                                       int64_t next_cluster, int64_t n_alive) {
  std::vector<int64_t> members;
  members.reserve(static_cast<size_t>(k));
  for (int64_t m = pos; m < M; ++m) {
    if (n_alive < 2 * k) break;
    const int64_t s = visit[m];
    if (!alive[s]) continue;
    members.clear();
    const int64_t* c = cand + s * W;
    for (int64_t t = 0; t < W && static_cast<int64_t>(members.size()) < k - 1; ++t) {
      const int64_t j = c[t];
      if (j >= 0 && j != s && alive[j]) members.push_back(j);
    }
    if (static_cast<int64_t>(members.size()) < k - 1) return {1, m, next_cluster, n_alive};
    alive[s] = 0;
    assign[s] = next_cluster;
    for (int64_t j : members) {
      alive[j] = 0;
      assign[j] = next_cluster;
    }
    ++next_cluster;
    n_alive -= k;
  }
  return {0, M, next_cluster, n_alive};
}

// MDAV-style k-Same: repeatedly take the alive point farthest from the centroid
// of the alive points (ties to the lower index) and cluster it with its k-1
// nearest alive points. X: [N, D] (already unit rows for cosine). sum: running
// double sum of the alive rows (updated in place). Returns {status, value}:
// status 0 = done (fewer than 2k alive), value = next_cluster;
// status 1 = candidate list of point `value` ran out (caller refreshes it and calls again).
template <typename T>
std::vector<int64_t> k_same_mdav_impl(const T* X, int64_t N, int64_t D, const int64_t* cand, int64_t L, int64_t k,
                                      uint8_t* alive, int64_t* assign, double* sum, int64_t next_cluster,
                                      int64_t n_alive, int64_t* n_alive_out, int nthreads) {
  std::vector<double> c(static_cast<size_t>(D));
  std::vector<int64_t> members;
  while (n_alive >= 2 * k) {
    for (int64_t d = 0; d < D; ++d) c[d] = sum[d] / static_cast<double>(n_alive);
    const double* __restrict cc = c.data();
    double best = -std::numeric_limits<double>::infinity();
    int64_t best_i = -1;
#pragma omp parallel num_threads(threads_for(nthreads, n_alive * D, N))
    {
      double lb = -std::numeric_limits<double>::infinity();
      int64_t li = -1;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        if (!alive[i]) continue;
        const T* __restrict x = X + i * D;
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) {
          const double e = static_cast<double>(x[d]) - cc[d];
          acc += e * e;
        }
        if (acc > lb || (acc == lb && i < li)) {
          lb = acc;
          li = i;
        }
      }
#pragma omp critical
      {
        if (li >= 0 && (lb > best || (lb == best && li < best_i))) {
          best = lb;
          best_i = li;
        }
      }
    }
    const int64_t s = best_i;
    members.clear();
    const int64_t* cs = cand + s * L;
    for (int64_t t = 0; t < L && static_cast<int64_t>(members.size()) < k - 1; ++t) {
      const int64_t j = cs[t];
      if (j >= 0 && j != s && alive[j]) members.push_back(j);
    }
    if (static_cast<int64_t>(members.size()) < k - 1) {
      *n_alive_out = n_alive;
      return {1, s, next_cluster};
    }
    members.push_back(s);
    for (int64_t j : members) {
      alive[j] = 0;
      assign[j] = next_cluster;
      const T* x = X + j * D;
      for (int64_t d = 0; d < D; ++d) sum[d] -= static_cast<double>(x[d]);
    }
    ++next_cluster;
    n_alive -= k;
  }
  *n_alive_out = n_alive;
  return {0, -1, next_cluster};
}

template <typename F>
void dispatch_float(int dtype, const char* what, F&& f) {
  if (dtype == kFloat32)
    f(static_cast<float*>(nullptr));
  else if (dtype == kFloat64)
    f(static_cast<double*>(nullptr));
  else
    throw std::invalid_argument(std::string(what) + ": dtype must be float32 or float64");
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "knn_select_tile",
      [](std::uintptr_t S, int dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, std::uintptr_t a,
         std::uintptr_t b, int64_t k, std::uintptr_t vals, std::uintptr_t idx, int64_t self_offset, int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_select_tile", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          select_tile<T>(as_ptr<const T>(S), rows, cols, ld, col_offset, as_ptr<const T>(a), as_ptr<const T>(b), k,
                         as_ptr<T>(vals), as_ptr<int64_t>(idx), self_offset, nthreads);
        });
      },
      "Merge a [rows, cols] score tile (row stride ld; score = S*a[j] + b[j], a/b optional (0)) into the "
      "running top-k state ([rows, k] values best-first, int64 indices). Column j has global index "
      "col_offset + j; self_offset >= 0 excludes global index self_offset + row.");
  m.def(
      "knn_select_tile_heap",
      [](std::uintptr_t scores, int score_dtype, int dtype, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset,
         std::uintptr_t a, std::uintptr_t b, int64_t k, std::uintptr_t vals, std::uintptr_t idx,
         int64_t self_offset, int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_select_tile_heap", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          auto run = [&](auto* stag) {
            using S = std::remove_pointer_t<decltype(stag)>;
            select_tile<T, true, S>(as_ptr<const S>(scores), rows, cols, ld, col_offset, as_ptr<const T>(a),
                                    as_ptr<const T>(b), k, as_ptr<T>(vals), as_ptr<int64_t>(idx), self_offset,
                                    nthreads);
          };
          if (score_dtype == dtype) {
            run(static_cast<T*>(nullptr));
            return;
          }
          if constexpr (std::is_same_v<T, float>) {
            if (score_dtype == kBFloat16) {
              run(static_cast<uint16_t*>(nullptr));
              return;
            }
          }
          throw std::invalid_argument("knn_select_tile_heap: scores must have the state's dtype, or be bfloat16 "
                                        "with a float32 state");
        });
      },
      "knn_select_tile with the state kept as heaps ([rows, k] values and int64 indices, root = worst kept, "
      "index INT64_MAX = unused; start from (-inf, INT64_MAX)) and sorted once by knn_heap_sort. The scores "
      "have the state's dtype, or are bfloat16 (score_dtype) with a float32 state.");
  m.def(
      "knn_heap_sort",
      [](std::uintptr_t vals, std::uintptr_t idx, int dtype, int64_t rows, int64_t k, int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_heap_sort", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          heap_sort_rows<T>(as_ptr<T>(vals), as_ptr<int64_t>(idx), rows, k, nthreads);
        });
      },
      "The heaps of knn_select_tile_heap -> sorted lists (best first, index -1 = unused), in place.");
  m.def(
      "knn_select_gemm",
      [](std::uintptr_t X, std::uintptr_t Y, int dtype, int64_t Q, int64_t G, int64_t D, std::uintptr_t mu, double c,
         std::uintptr_t a, std::uintptr_t b, int64_t L, std::uintptr_t out_s, std::uintptr_t out_i, int64_t col_offset,
         int64_t self_offset, int64_t tq, int64_t tg, int nthreads) {
        if (!gemm_loaded()) throw std::runtime_error("knn_select_gemm: the BLAS GEMM is not loaded (gemm_load)");
        if (Q < 1 || G < 1 || D < 1 || L < 1 || tq < 1 || tg < 1)
          throw std::invalid_argument("knn_select_gemm: Q, G, D, L, tq and tg must be positive");
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_select_gemm", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          const T* pa = as_ptr<const T>(a);
          const T* pb = as_ptr<const T>(b);
          auto run = [&](auto has_a, auto has_b) {
            select_gemm_impl<T, decltype(has_a)::value, decltype(has_b)::value>(
                as_ptr<const T>(X), as_ptr<const T>(Y), Q, G, D, as_ptr<const T>(mu), c, pa, pb, L, as_ptr<T>(out_s),
                as_ptr<int64_t>(out_i), col_offset, self_offset, tq, tg, nthreads);
          };
          constexpr std::true_type on{};
          constexpr std::false_type off{};
          if (pa && pb) run(on, on);
          else if (pa) run(on, off);
          else if (pb) run(off, on);
          else run(off, off);
        });
      },
      "The whole selection pass with the loaded BLAS: the L best ranking scores (S*a[j] + b[j], a/b optional) "
      "and global indices (col_offset + j) of every query of X [Q, D] over Y [G, D], best first, into "
      "out_s / out_i [Q, L]. mu (optional, [D]) and c: the inputs are transformed to (x - mu) * c per tile. "
      "self_offset >= 0: query q excludes global index self_offset + q. tq x tg: the score tile of each of "
      "the nthreads OpenMP threads (the GEMM inside runs single-threaded).");
  m.def(
      "knn_refine",
      [](std::uintptr_t X, std::uintptr_t Y, int dtype, int64_t Q, int64_t D, int64_t L, int metric,
         std::uintptr_t cand, int64_t k, std::uintptr_t out_vals, std::uintptr_t out_idx, std::uintptr_t kth,
         int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_refine", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          refine_impl<T>(as_ptr<const T>(X), as_ptr<const T>(Y), Q, D, L, metric, as_ptr<const int64_t>(cand), k,
                         as_ptr<T>(out_vals), as_ptr<int64_t>(out_idx), as_ptr<double>(kth), nthreads);
        });
      },
      "Exact values (double accumulation) of L candidates per query, sorted by (value, index); writes the "
      "first k, and the k-th exact value as double to kth when kth != 0.");
  m.def(
      "knn_exact_rows",
      [](std::uintptr_t X, std::uintptr_t Y, int dtype, std::uintptr_t rows, int64_t R, int64_t G, int64_t D,
         int metric, int64_t k, int64_t self_offset, std::uintptr_t out_vals, std::uintptr_t out_idx,
         std::uintptr_t kth, int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_exact_rows", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          exact_rows_impl<T>(as_ptr<const T>(X), as_ptr<const T>(Y), as_ptr<const int64_t>(rows), R, G, D, metric,
                             k, self_offset, as_ptr<T>(out_vals), as_ptr<int64_t>(out_idx), as_ptr<double>(kth),
                             nthreads);
        });
      },
      "Exact top-k of the query rows `rows` against the whole gallery by the direct formula (double).");
  m.def(
      "knn_row_stats",
      [](std::uintptr_t X, int dtype, int64_t N, int64_t D, std::uintptr_t mu, double c, std::uintptr_t norm2,
         std::uintptr_t colsum, int nthreads) {
        py::gil_scoped_release nogil;
        double amax = 0.0;
        dispatch_float(dtype, "knn_row_stats", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          amax = row_stats_impl<T>(as_ptr<const T>(X), N, D, as_ptr<const double>(mu), c, as_ptr<double>(norm2),
                                   as_ptr<double>(colsum), nthreads);
        });
        return amax;
      },
      "One pass over the rows: squared norms of (x - mu) * c (double), column sums (double, optional "
      "colsum != 0, accumulated into it) and the largest |x| (returned).");
  m.def(
      "knn_rows_bf16",
      [](std::uintptr_t X, int dtype, int64_t N, int64_t D, std::uintptr_t mu, double c, std::uintptr_t out,
         std::uintptr_t res_n2, std::uintptr_t out_n2, int nthreads) {
        if (dtype != kFloat32) throw std::invalid_argument("knn_rows_bf16: dtype must be float32");
        py::gil_scoped_release nogil;
        rows_to_bf16(as_ptr<const float>(X), N, D, as_ptr<const float>(mu), static_cast<float>(c),
                     as_ptr<uint16_t>(out), as_ptr<double>(res_n2), as_ptr<double>(out_n2), nthreads);
      },
      "float32 rows [N, D] -> bfloat16 out [N, D] of (x - mu) * c (mu optional), round to nearest even, with "
      "the squared norms (double [N]) of the rounding residual and of the bfloat16 rows.");
  m.def(
      "knn_average_rows",
      [](std::uintptr_t Y, int dtype, int64_t D, std::uintptr_t idx, std::uintptr_t w, int64_t Q, int64_t k,
         int64_t lo, int64_t hi, bool normalize_rows, bool spherical, bool finalize, std::uintptr_t out,
         int nthreads) {
        py::gil_scoped_release nogil;
        dispatch_float(dtype, "knn_average_rows", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          average_impl<T>(as_ptr<const T>(Y), D, as_ptr<const int64_t>(idx), as_ptr<const T>(w), Q, k, lo, hi,
                          normalize_rows, spherical, finalize, as_ptr<T>(out), nthreads);
        });
      },
      "Weighted (spherical) mean of the k selected gallery rows per query, gathered in place.");
  m.def(
      "k_same_sweep",
      [](std::uintptr_t cand, int64_t W, int64_t k, std::uintptr_t visit, int64_t pos, int64_t M,
         std::uintptr_t alive, std::uintptr_t assign, int64_t next_cluster, int64_t n_alive) {
        py::gil_scoped_release nogil;
        return k_same_sweep_impl(as_ptr<const int64_t>(cand), W, k, as_ptr<const int64_t>(visit), pos, M,
                                 as_ptr<uint8_t>(alive), as_ptr<int64_t>(assign), next_cluster, n_alive);
      },
      "Greedy k-Same sweep over candidate lists; returns [status, pos, next_cluster, n_alive].");
  m.def(
      "k_same_mdav",
      [](std::uintptr_t X, int dtype, int64_t N, int64_t D, std::uintptr_t cand, int64_t L, int64_t k,
         std::uintptr_t alive, std::uintptr_t assign, std::uintptr_t sum, int64_t next_cluster, int64_t n_alive,
         int nthreads) {
        py::gil_scoped_release nogil;
        std::vector<int64_t> r;
        int64_t na = n_alive;
        dispatch_float(dtype, "k_same_mdav", [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          r = k_same_mdav_impl<T>(as_ptr<const T>(X), N, D, as_ptr<const int64_t>(cand), L, k,
                                  as_ptr<uint8_t>(alive), as_ptr<int64_t>(assign), as_ptr<double>(sum),
                                  next_cluster, n_alive, &na, nthreads);
        });
        r.push_back(na);
        return r;
      },
      "MDAV-style k-Same loop; returns [status, point, next_cluster, n_alive] (status 1: refresh point).");
}

}  // namespace pyfici
