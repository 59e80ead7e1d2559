// Exact k-reciprocal re-ranking (Zhong et al., CVPR 2017) with sparse
// neighbour sets: the CPU backend of pyfici.ops.rerank.
//
// The widely used numpy code holds several dense N x N matrices (N = Q + G).
// Here the only dense things are the [Q, G] output and one tile of distances:
//
//  1. rerank_scan: the caller (pyfici/ops/rerank.py) computes distance tiles
//     (torch GEMM of feature panels, or slices of user-given matrices); we turn
//     each element into the reference's "raw" value (squared distance, float32)
//     and keep, per row of the N x N graph, the running top-K list
//     (ties to the lower index: candidates arrive in increasing column order and
//     only a strictly smaller value displaces), the row max (the reference's
//     normalisation) and, for query rows, the raw value of every gallery column
//     (written into the output). With symmetric feature distances a tile
//     X_I X_{>=I}^T also updates the rows of the later blocks (its columns), so
//     the GEMM covers only half of the N x N matrix.
//  2. rerank_finish: normalise the lists, k-reciprocal sets, the 2/3 expansion
//     with half-size sets, Gaussian weights, local query expansion (k2), an
//     inverted index over the gallery rows and the Jaccard + lambda blend,
//     writing the [Q, G] result in place of the raw values.
//
// Float32 arithmetic follows the reference operation by operation wherever it
// decides a result (normalised distances, numpy's pairwise summation of the
// weights, row-by-row mean in the query expansion, Jaccard accumulation in
// increasing column order, the blend). FMA contraction is disabled so that
// a * b + c rounds twice, as numpy does.
#pragma GCC optimize("fp-contract=off")
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

// How a tile element becomes the reference's raw (squared, float32) value.
enum Mode : int {
  kSquare = 0,          // the element is a distance d: raw = float(d * d)
  kEuclidFromDot = 1,   // element = x_r . x_c: raw = float(max(0, (|x_r|^2 + |x_c|^2) - 2 dot))
  kSqEuclidFromDot = 2, // as above, then squared: raw = float(d2 * d2)
  kCosineFromDot = 3,   // element = cosine: d = clamp(1 - cos, 0, 2), raw = float(d * d)
};

template <typename T, int MODE>
inline float raw_value(T v, T nr, T nc) {
  if constexpr (MODE == kSquare) {
    return static_cast<float>(v * v);
  } else if constexpr (MODE == kEuclidFromDot) {
    T d2 = (nr + nc) - T(2) * v;
    return static_cast<float>(d2 > T(0) ? d2 : T(0));
  } else if constexpr (MODE == kSqEuclidFromDot) {
    T d2 = (nr + nc) - T(2) * v;
    d2 = d2 > T(0) ? d2 : T(0);
    return static_cast<float>(d2 * d2);
  } else {
    T d = T(1) - v;
    d = d < T(0) ? T(0) : (d > T(2) ? T(2) : d);
    return static_cast<float>(d * d);
  }
}

// Sorted (value, index) list of capacity K; a new value goes after equal ones.
inline void topk_push(float* tv, int32_t* ti, int32_t& n, int64_t K, float v, int32_t idx) {
  int64_t pos;
  if (n == K) {
    if (!(v < tv[K - 1])) return;
    pos = K - 1;
  } else {
    pos = n++;
  }
  while (pos > 0 && tv[pos - 1] > v) {
    tv[pos] = tv[pos - 1];
    ti[pos] = ti[pos - 1];
    --pos;
  }
  tv[pos] = v;
  ti[pos] = idx;
}

inline float threshold(const float* tv, int32_t n, int64_t K) {
  return n == K ? tv[K - 1] : std::numeric_limits<float>::infinity();
}

// Push the lanes set in k (a block starting at c) in increasing lane order,
// re-reading the threshold after each push.
inline void push_lanes(uint32_t k, const float* __restrict v, int64_t c, int64_t c0, float* tv, int32_t* ti,
                       int32_t& cnt, int64_t K, float& thr) {
  while (k) {
    const int l = __builtin_ctz(k);
    k &= k - 1;
    if (v[c + l] < thr) {
      topk_push(tv, ti, cnt, K, v[c + l], static_cast<int32_t>(c0 + c + l));
      thr = threshold(tv, cnt, K);
    }
  }
}

// Push the entries of v[0:n) that beat the list's threshold, in increasing
// index order (the scalar loop's order, so the lists are the same). Written for
// the ISA: a vector compare against the current threshold finds the few
// candidates of a block (after the first K, almost none), which are then
// pushed one by one with the threshold re-read after each push.
inline void push_candidates(const float* __restrict v, int64_t n, int64_t c0, float* tv, int32_t* ti,
                            int32_t& cnt, int64_t K) {
  float thr = threshold(tv, cnt, K);
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    uint32_t k = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + c), _mm512_set1_ps(thr), _CMP_LT_OQ);
    push_lanes(k, v, c, c0, tv, ti, cnt, K, thr);
  }
#elif defined(__AVX2__)
  for (; c + 8 <= n; c += 8) {
    uint32_t k = static_cast<uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + c), _mm256_set1_ps(thr), _CMP_LT_OQ)));
    push_lanes(k, v, c, c0, tv, ti, cnt, K, thr);
  }
#endif
  for (; c < n; ++c) {
    if (v[c] < thr) {
      topk_push(tv, ti, cnt, K, v[c], static_cast<int32_t>(c0 + c));
      thr = threshold(tv, cnt, K);
    }
  }
}

// Lanes j of a 32-wide strip with v[j] < thr[j] (bit j set).
inline uint32_t strip_hits(const float* v, const float* thr, int64_t w) {
#if defined(__AVX512F__)
  if (w == 32) {
    const uint32_t lo = _mm512_cmp_ps_mask(_mm512_loadu_ps(v), _mm512_loadu_ps(thr), _CMP_LT_OQ);
    const uint32_t hi = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(thr + 16), _CMP_LT_OQ);
    return lo | (hi << 16);
  }
#elif defined(__AVX2__)
  if (w == 32) {
    uint32_t k = 0;
    for (int q = 0; q < 4; ++q)
      k |= static_cast<uint32_t>(_mm256_movemask_ps(
               _mm256_cmp_ps(_mm256_loadu_ps(v + 8 * q), _mm256_loadu_ps(thr + 8 * q), _CMP_LT_OQ)))
           << (8 * q);
    return k;
  }
#endif
  uint32_t k = 0;
  for (int64_t j = 0; j < w; ++j) k |= static_cast<uint32_t>(v[j] < thr[j]) << j;
  return k;
}

struct ScanArgs {
  int64_t ld, r0, nrows, c0, ncols, Q, G, K, ldo;
  float* topv;
  int32_t* topi;
  int32_t* cnt;
  float* rowmax;
  float* out;
  bool do_cols;
  int nthreads;
};

template <typename T, int MODE>
void scan_impl(const T* tile, const T* norms, const ScanArgs& a) {
  const int64_t K = a.K;
  constexpr bool kZeroDiag = MODE != kSquare;
#pragma omp parallel num_threads(a.nthreads)
  {
    std::vector<float> buf(static_cast<size_t>(a.ncols));
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < a.nrows; ++t) {
      const int64_t r = a.r0 + t;
      const T* __restrict row = tile + t * a.ld;
      float* __restrict v = buf.data();
      const T nr = norms ? norms[r] : T(0);
      if (t + 1 < a.nrows)  // the next row's start (the hardware prefetcher takes over from there)
        for (int64_t c = 0; c < std::min<int64_t>(a.ncols, 512); c += 64 / sizeof(T)) __builtin_prefetch(row + a.ld + c);
      // raw values and the running row max in one pass. The values are finite
      // (the inputs are checked): the max is exact in any order, so it may be
      // a vector reduction. The diagonal (a zero) is left out of the loops.
      auto raw_max = [&](int64_t b, int64_t e, float m) {
#pragma omp simd reduction(max : m)
        for (int64_t c = b; c < e; ++c) {
          const float x = raw_value<T, MODE>(row[c], nr, norms ? norms[a.c0 + c] : T(0));
          v[c] = x;
          m = x > m ? x : m;
        }
        return m;
      };
      const int64_t dg = kZeroDiag && r >= a.c0 && r < a.c0 + a.ncols ? r - a.c0 : a.ncols;
      float mx = raw_max(0, dg, a.rowmax[r]);
      if (dg < a.ncols) {
        v[dg] = 0.0f;
        mx = 0.0f > mx ? 0.0f : mx;
        mx = raw_max(dg + 1, a.ncols, mx);
      }
      a.rowmax[r] = mx;
      if (r < a.Q) {
        const int64_t cb = std::max(a.c0, a.Q);
        float* o = a.out + r * a.ldo - a.Q;
        for (int64_t c = cb; c < a.c0 + a.ncols; ++c) o[c] = v[c - a.c0];
      }
      int32_t n = a.cnt[r];
      push_candidates(v, a.ncols, a.c0, a.topv + r * K, a.topi + r * K, n, K);
      a.cnt[r] = n;
    }
    if (a.do_cols) {
      // columns after this row block are rows of later blocks: give them the
      // candidates of this block (in increasing row order, i.e. index order).
      constexpr int64_t S = 32;
      const int64_t cstart = a.r0 + a.nrows - a.c0;
      const int64_t nstrips = cstart < a.ncols ? (a.ncols - cstart + S - 1) / S : 0;
#pragma omp for schedule(dynamic, 2)
      for (int64_t s = 0; s < nstrips; ++s) {
        const int64_t cb = cstart + s * S;
        const int64_t w = std::min<int64_t>(S, a.ncols - cb);
        float thr[S], mx[S], v[S];
        T nc[S];
        for (int64_t j = 0; j < w; ++j) {
          const int64_t g = a.c0 + cb + j;
          thr[j] = threshold(a.topv + g * K, a.cnt[g], K);
          mx[j] = a.rowmax[g];
          nc[j] = norms ? norms[g] : T(0);
        }
        for (int64_t t = 0; t < a.nrows; ++t) {
          const T* __restrict row = tile + t * a.ld + cb;
          const T nr = norms ? norms[a.r0 + t] : T(0);
          for (int64_t j = 0; j < w; ++j) v[j] = raw_value<T, MODE>(row[j], nr, nc[j]);
          for (int64_t j = 0; j < w; ++j) mx[j] = v[j] > mx[j] ? v[j] : mx[j];
          for (uint32_t k = strip_hits(v, thr, w); k; k &= k - 1) {
            const int j = __builtin_ctz(k);  // lanes are independent lists: any order
            const int64_t g = a.c0 + cb + j;
            topk_push(a.topv + g * K, a.topi + g * K, a.cnt[g], K, v[j], static_cast<int32_t>(a.r0 + t));
            thr[j] = threshold(a.topv + g * K, a.cnt[g], K);
          }
        }
        for (int64_t j = 0; j < w; ++j) a.rowmax[a.c0 + cb + j] = mx[j];
      }
    }
  }
}

// numpy's float32 pairwise summation (np.sum of a contiguous float32 array)
float pairwise_sum(const float* a, int64_t n) {
  if (n < 8) {
    float res = 0.0f;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    float r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// Raw value of an arbitrary pair (row r of the graph, column c), as the scan
// would have produced it: features mode recomputes the dot product (in
// double), distmat mode reads the user's matrices (row r of the graph is
// column r of the reference's assembled matrix).
template <typename T, int MODE>
struct PairRaw {
  const T* feats;  // features mode: [N, D]
  const T* norms;
  int64_t D, ldf;
  const T *qq, *qg, *gg;  // distmat mode
  int64_t ldqq, ldqg, ldgg, Q;
  float operator()(int64_t r, int64_t c) const {
    if constexpr (MODE == kSquare) {
      T v;
      if (r < Q)
        v = c < Q ? qq[c * ldqq + r] : qg[r * ldqg + (c - Q)];
      else
        v = c < Q ? qg[c * ldqg + (r - Q)] : gg[(c - Q) * ldgg + (r - Q)];
      return raw_value<T, MODE>(v, T(0), T(0));
    } else {
      if (r == c) return 0.0f;
      const T* x = feats + r * ldf;
      const T* y = feats + c * ldf;
      double dot = 0.0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(x[d]) * static_cast<double>(y[d]);
      const double nr = norms ? static_cast<double>(norms[r]) : 0.0;
      const double nc = norms ? static_cast<double>(norms[c]) : 0.0;
      return raw_value<double, MODE>(dot, nr, nc);
    }
  }
};

// Sparse rows: entries of row i are idx/val[start[i] .. start[i] + len[i]).
struct SparseRows {
  std::vector<int32_t> idx;
  std::vector<float> val;
  std::vector<int64_t> start;
  std::vector<int32_t> len;
};

struct FinishArgs {
  int64_t N, Q, G, K, k1, k2, ldo;
  double lambda_value;
  float* topv;
  int32_t* topi;
  const float* rowmax;
  float* out;
  int nthreads;
};

template <typename T, int MODE>
void finish_impl(const PairRaw<T, MODE>& pair, const FinishArgs& a) {
  const int64_t N = a.N, Q = a.Q, G = a.G, K = a.K;
  const int64_t Kr = std::min<int64_t>(a.k1 + 1, N);
  const int64_t half = static_cast<int64_t>(std::nearbyint(static_cast<double>(a.k1) / 2.0));  // half to even, like np.around
  const int64_t Kh = std::min<int64_t>(half + 1, N);
  const int64_t K2 = std::min<int64_t>(a.k2, N);
  const int nt = a.nthreads;
  float* topv = a.topv;
  int32_t* topi = a.topi;

  // 1. the reference ranks normalised float32 values: re-sort by (value / rowmax, index);
  //    from here on topv holds normalised values
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    float* tv = topv + r * K;
    int32_t* ti = topi + r * K;
    const float m = a.rowmax[r];
    for (int64_t t = 0; t < K; ++t) tv[t] = tv[t] / m;
    for (int64_t t = 1; t < K; ++t) {
      const float v = tv[t];
      const int32_t id = ti[t];
      int64_t p = t;
      while (p > 0 && (tv[p - 1] > v || (tv[p - 1] == v && ti[p - 1] > id))) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
        --p;
      }
      tv[p] = v;
      ti[p] = id;
    }
  }
  auto in_prefix = [&](int64_t row, int64_t len, int32_t x) {
    const int32_t* l = topi + row * K;
    for (int64_t t = 0; t < len; ++t)
      if (l[t] == x) return true;
    return false;
  };

  // 2. half-size reciprocal sets of every row
  std::vector<int32_t> hset(static_cast<size_t>(N * Kh));
  std::vector<int32_t> hlen(static_cast<size_t>(N));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    int32_t n = 0;
    for (int64_t s = 0; s < Kh; ++s) {
      const int32_t c = topi[r * K + s];
      if (in_prefix(c, Kh, static_cast<int32_t>(r))) hset[r * Kh + n++] = c;
    }
    hlen[r] = n;
  }

  // 3. expanded k-reciprocal sets and their Gaussian weights (fixed capacity rows)
  const int64_t cap = std::min<int64_t>(N, Kr + Kr * Kh);
  SparseRows V;
  V.idx.resize(static_cast<size_t>(N * cap));
  V.val.resize(static_cast<size_t>(N * cap));
  V.start.resize(static_cast<size_t>(N));
  V.len.resize(static_cast<size_t>(N));
#pragma omp parallel num_threads(nt)
  {
    std::vector<int32_t> R, E;
    std::vector<float> w;
    R.reserve(Kr);
    E.reserve(Kr + Kr * Kh);
#pragma omp for schedule(dynamic, 16)
    for (int64_t i = 0; i < N; ++i) {
      R.clear();
      for (int64_t t = 0; t < Kr; ++t) {
        const int32_t c = topi[i * K + t];
        if (in_prefix(c, Kr, static_cast<int32_t>(i))) R.push_back(c);
      }
      E.assign(R.begin(), R.end());
      for (const int32_t c : R) {
        const int32_t* h = hset.data() + static_cast<int64_t>(c) * Kh;
        const int32_t hn = hlen[c];
        int64_t common = 0;
        for (int32_t s = 0; s < hn; ++s) common += std::find(R.begin(), R.end(), h[s]) != R.end();
        if (static_cast<double>(common) > 2.0 / 3 * static_cast<double>(hn)) E.insert(E.end(), h, h + hn);
      }
      std::sort(E.begin(), E.end());
      E.erase(std::unique(E.begin(), E.end()), E.end());
      const int64_t m = static_cast<int64_t>(E.size());
      w.resize(static_cast<size_t>(m));
      const float rm = a.rowmax[i];
      const float* tv = topv + i * K;
      const int32_t* ti = topi + i * K;
      for (int64_t t = 0; t < m; ++t) {
        // normalised value: from the row's own list when there (the very value
        // the scan saw), else recomputed
        float o = 0.0f;
        int64_t u = 0;
        while (u < K && ti[u] != E[t]) ++u;
        o = u < K ? tv[u] : pair(i, E[t]) / rm;
        w[t] = std::exp(-o);
      }
      const float s = pairwise_sum(w.data(), m);
      const int64_t st = i * cap;
      for (int64_t t = 0; t < m; ++t) {
        V.idx[st + t] = E[t];
        V.val[st + t] = w[t] / s;
      }
      V.start[i] = st;
      V.len[i] = static_cast<int32_t>(m);
    }
  }

  // 4. local query expansion: mean of the V rows of the first k2 neighbours
  SparseRows W;
  const SparseRows* Vq = &V;
  if (a.k2 != 1) {
    W.start.resize(static_cast<size_t>(N));
    W.len.resize(static_cast<size_t>(N));
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) {
        int64_t tot = 0;
        for (int64_t i = 0; i < N; ++i) {
          W.start[i] = tot;
          tot += W.len[i];
        }
        W.idx.resize(static_cast<size_t>(tot));
        W.val.resize(static_cast<size_t>(tot));
      }
#pragma omp parallel num_threads(nt)
      {
        std::vector<float> acc(static_cast<size_t>(N), 0.0f);
        std::vector<uint8_t> mark(static_cast<size_t>(N), 0);
        std::vector<int32_t> touched;
#pragma omp for schedule(dynamic, 16)
        for (int64_t i = 0; i < N; ++i) {
          touched.clear();
          for (int64_t t = 0; t < K2; ++t) {
            const int32_t n = topi[i * K + t];
            const int64_t st = V.start[n];
            for (int32_t e = 0; e < V.len[n]; ++e) {
              const int32_t c = V.idx[st + e];
              if (!mark[c]) {
                mark[c] = 1;
                touched.push_back(c);
              }
              if (pass == 1) acc[c] += V.val[st + e];
            }
          }
          if (pass == 0) {
            W.len[i] = static_cast<int32_t>(touched.size());
            for (const int32_t c : touched) mark[c] = 0;
            continue;
          }
          std::sort(touched.begin(), touched.end());
          const float div = static_cast<float>(K2);
          const int64_t st = W.start[i];
          for (size_t e = 0; e < touched.size(); ++e) {
            const int32_t c = touched[e];
            W.idx[st + e] = c;
            W.val[st + e] = acc[c] / div;
            acc[c] = 0.0f;
            mark[c] = 0;
          }
        }
      }
    }
    Vq = &W;
  }

  // 5. inverted index over the gallery rows: column c -> (gallery row, value), rows ascending
  std::vector<int64_t> colptr(static_cast<size_t>(N + 1), 0);
  for (int64_t j = Q; j < N; ++j) {
    const int64_t st = Vq->start[j];
    for (int32_t e = 0; e < Vq->len[j]; ++e) ++colptr[Vq->idx[st + e] + 1];
  }
  for (int64_t c = 0; c < N; ++c) colptr[c + 1] += colptr[c];
  std::vector<int32_t> inv_row(static_cast<size_t>(colptr[N]));
  std::vector<float> inv_val(static_cast<size_t>(colptr[N]));
  {
    std::vector<int64_t> fill(colptr.begin(), colptr.end() - 1);
    for (int64_t j = Q; j < N; ++j) {
      const int64_t st = Vq->start[j];
      for (int32_t e = 0; e < Vq->len[j]; ++e) {
        const int64_t p = fill[Vq->idx[st + e]]++;
        inv_row[p] = static_cast<int32_t>(j - Q);
        inv_val[p] = Vq->val[st + e];
      }
    }
  }

  // 6. Jaccard distance against every gallery row and the lambda blend
  const float wj = static_cast<float>(1.0 - a.lambda_value);
  const float wo = static_cast<float>(a.lambda_value);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> tmp(static_cast<size_t>(G));
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < Q; ++i) {
      float* __restrict acc = tmp.data();
      std::fill(acc, acc + G, 0.0f);
      const int64_t st = Vq->start[i];
      for (int32_t e = 0; e < Vq->len[i]; ++e) {
        const int32_t c = Vq->idx[st + e];
        const float vi = Vq->val[st + e];
        for (int64_t p = colptr[c]; p < colptr[c + 1]; ++p) {
          const float vj = inv_val[p];
          acc[inv_row[p]] += vi < vj ? vi : vj;
        }
      }
      float* __restrict o = a.out + i * a.ldo;
      const float m = a.rowmax[i];
      for (int64_t j = 0; j < G; ++j) {
        const float jac = 1.0f - acc[j] / (2.0f - acc[j]);
        const float orig = o[j] / m;
        const float x = jac * wj;
        const float y = orig * wo;
        o[j] = x + y;
      }
    }
  }
}

template <typename T>
void scan_dispatch_mode(int mode, const T* tile, const T* norms, const ScanArgs& a) {
  switch (mode) {
    case kSquare: return scan_impl<T, kSquare>(tile, norms, a);
    case kEuclidFromDot: return scan_impl<T, kEuclidFromDot>(tile, norms, a);
    case kSqEuclidFromDot: return scan_impl<T, kSqEuclidFromDot>(tile, norms, a);
    case kCosineFromDot: return scan_impl<T, kCosineFromDot>(tile, norms, a);
    default: throw std::invalid_argument("rerank_scan: unknown mode");
  }
}

template <typename T>
void finish_dispatch_mode(int mode, std::uintptr_t feats, std::uintptr_t norms, int64_t D, int64_t ldf,
                          std::uintptr_t qq, int64_t ldqq, std::uintptr_t qg, int64_t ldqg, std::uintptr_t gg,
                          int64_t ldgg, const FinishArgs& a) {
  auto run = [&](auto tag) {
    constexpr int M = decltype(tag)::value;
    PairRaw<T, M> p{as_ptr<const T>(feats), as_ptr<const T>(norms), D, ldf, as_ptr<const T>(qq),
                    as_ptr<const T>(qg), as_ptr<const T>(gg), ldqq, ldqg, ldgg, a.Q};
    finish_impl<T, M>(p, a);
  };
  switch (mode) {
    case kSquare: return run(std::integral_constant<int, kSquare>{});
    case kEuclidFromDot: return run(std::integral_constant<int, kEuclidFromDot>{});
    case kSqEuclidFromDot: return run(std::integral_constant<int, kSqEuclidFromDot>{});
    case kCosineFromDot: return run(std::integral_constant<int, kCosineFromDot>{});
    default: throw std::invalid_argument("rerank_finish: unknown mode");
  }
}

// Stacked features and their squared norms in one pass: out rows [0, Q) are
// query's, [Q, Q + G) gallery's, and norms[r] = sum of the squares of row r
// (out = null: the rows are already stacked, norms only).
// (torch.cat followed by (x * x).sum(1) writes a second N x D temporary and
// reads everything twice; at Market-1501 size, 158 MB of fresh pages.) The
// sum has one order on every variant: 16 partial sums over j mod 16 (vector
// lanes where there are some; contraction is off in this file, so no FMA
// either), added pairwise, then the tail in order.
template <bool Copy, typename T>
inline T copy_sqnorm(const T* __restrict src, T* __restrict dst, int64_t D) {
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= D; j += 16) {
    for (int l = 0; l < 16; ++l) {
      const T v = src[j + l];
      if constexpr (Copy) dst[j + l] = v;
      acc[l] += v * v;
    }
  }
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  T sum = acc[0];
  for (; j < D; ++j) {
    const T v = src[j];
    if constexpr (Copy) dst[j] = v;
    sum += v * v;
  }
  return sum;
}

template <typename T>
void stack_sqnorm_impl(const T* q, int64_t Q, int64_t ldq, const T* g, int64_t G, int64_t ldg, int64_t D,
                       T* out, T* norms, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < Q + G; ++r) {
    const T* __restrict src = r < Q ? q + r * ldq : g + (r - Q) * ldg;
    T sum;
    if (out)
      sum = copy_sqnorm<true>(src, out + r * D, D);
    else
      sum = copy_sqnorm<false>(src, static_cast<T*>(nullptr), D);
    if (norms) norms[r] = sum;
  }
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "rerank_stack",
      [](int dtype, std::uintptr_t q, int64_t Q, int64_t ldq, std::uintptr_t g, int64_t G, int64_t ldg, int64_t D,
         std::uintptr_t out, std::uintptr_t norms, int nthreads) {
        py::gil_scoped_release nogil;
        if (dtype == kFloat32)
          stack_sqnorm_impl(as_ptr<const float>(q), Q, ldq, as_ptr<const float>(g), G, ldg, D, as_ptr<float>(out),
                            as_ptr<float>(norms), nthreads);
        else if (dtype == kFloat64)
          stack_sqnorm_impl(as_ptr<const double>(q), Q, ldq, as_ptr<const double>(g), G, ldg, D,
                            as_ptr<double>(out), as_ptr<double>(norms), nthreads);
        else
          throw std::invalid_argument("rerank_stack: features must be float32 or float64");
      },
      "out [Q + G, D] (0: none, norms only) = query rows then gallery rows (row strides ldq / ldg); "
      "norms [Q + G] (optional, 0 = none) = their squared norms, summed in one order on every CPU variant.");
  m.def(
      "rerank_scan",
      [](std::uintptr_t tile, int dtype, int mode, int64_t ld, int64_t r0, int64_t nrows, int64_t c0,
         int64_t ncols, std::uintptr_t norms, int64_t Q, int64_t G, std::uintptr_t topv, std::uintptr_t topi,
         std::uintptr_t cnt, std::uintptr_t rowmax, int64_t K, std::uintptr_t out, int64_t ldo, bool do_cols,
         int nthreads) {
        ScanArgs a{ld, r0, nrows, c0, ncols, Q, G, K, ldo, as_ptr<float>(topv), as_ptr<int32_t>(topi),
                   as_ptr<int32_t>(cnt), as_ptr<float>(rowmax), as_ptr<float>(out), do_cols, nthreads};
        py::gil_scoped_release nogil;
        if (dtype == kFloat32)
          scan_dispatch_mode<float>(mode, as_ptr<const float>(tile), as_ptr<const float>(norms), a);
        else if (dtype == kFloat64)
          scan_dispatch_mode<double>(mode, as_ptr<const double>(tile), as_ptr<const double>(norms), a);
        else
          throw std::invalid_argument("rerank_scan: tile must be float32 or float64");
      },
      "Re-ranking pass 1: fold a [nrows, ncols] tile (rows r0.., columns c0..) into the per-row top-K lists, "
      "row maxima and the query x gallery raw values (see csrc/cpu/rerank.cpp).");
  m.def(
      "rerank_finish",
      [](int dtype, int mode, std::uintptr_t feats, std::uintptr_t norms, int64_t D, int64_t ldf,
         std::uintptr_t qq, int64_t ldqq, std::uintptr_t qg, int64_t ldqg, std::uintptr_t gg, int64_t ldgg,
         int64_t Q, int64_t G, std::uintptr_t topv, std::uintptr_t topi, std::uintptr_t rowmax, int64_t K,
         int64_t k1, int64_t k2, double lambda_value, std::uintptr_t out, int64_t ldo, int nthreads) {
        FinishArgs a{Q + G, Q, G, K, k1, k2, ldo, lambda_value, as_ptr<float>(topv), as_ptr<int32_t>(topi),
                     as_ptr<const float>(rowmax), as_ptr<float>(out), nthreads};
        py::gil_scoped_release nogil;
        if (dtype == kFloat32)
          finish_dispatch_mode<float>(mode, feats, norms, D, ldf, qq, ldqq, qg, ldqg, gg, ldgg, a);
        else if (dtype == kFloat64)
          finish_dispatch_mode<double>(mode, feats, norms, D, ldf, qq, ldqq, qg, ldqg, gg, ldgg, a);
        else
          throw std::invalid_argument("rerank_finish: inputs must be float32 or float64");
      },
      "Re-ranking pass 2: k-reciprocal sets, expansion, weights, query expansion, Jaccard and blend, "
      "written into out [Q, G] in place of the raw values.");
}

}  // namespace pyfici
