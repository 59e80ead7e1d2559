// ReID ranking statistics without sorting gallery rows.
//
// For each query row of a distance matrix, the true matches are few. The rank
// of a match m (0-based, among the valid gallery items, ties to the lower
// index) is the number of valid items that come before it:
//     rank(m) = #{j < m valid : d_j <= d_m} + #{j > m valid : d_j < d_m}.
// The row is first turned into integer order keys: key(a) < key(b) exactly
// when a < b as numbers (-0 and +0 get one key), a NaN distance of a valid
// item gets the key just above +inf's (it ranks after every number, +inf
// included, NaNs among themselves by index, as numpy's and torch's sorts
// place NaN last) and a junk item gets a key above every threshold, so it
// is never counted. Both predicates become one strict integer compare:
// d_j <= d_m is key_j < key_m + 1. The counting then walks the key row in
// L1-sized chunks and, for each chunk, counts every match's threshold
// (vectorised compares into per-lane counters, up to 8 matches per pass over
// the chunk on AVX-512, 6 on AVX2, 4 otherwise), so the row is read from L1
// once per group of matches instead of from L2 once per match. When a query
// has more than
// kMaxCountMatches matches, a full sort of the valid row is cheaper and is
// used instead.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
constexpr int64_t kChunk = 2048;  // keys per counting chunk (8 / 16 KB: stays in L1)

// Integer order key: float -> int32, double -> int64.
template <typename T>
using key_t = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;

template <typename T>
inline key_t<T> order_key(T x) {
  using K = key_t<T>;
  x = x + T(0);  // -0 -> +0
  K b;
  std::memcpy(&b, &x, sizeof b);
  constexpr K mag = std::numeric_limits<K>::max();
  return b ^ ((b >> (8 * sizeof(K) - 1)) & mag);
}

// Key of junk items: above key(NaN) + 1 = key(+inf) + 2, the largest threshold.
template <typename K>
constexpr K kJunkKey = std::numeric_limits<K>::max();

// #{j < n : k[j] < t}
#if defined(__AVX512F__)
inline int64_t count_lt(const int32_t* __restrict k, int64_t n, int32_t t) {
  // a true compare lane adds one to its accumulator lane (masked add: no
  // mask-to-integer moves in the loop)
  const __m512i tv = _mm512_set1_epi32(t);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    a0 = _mm512_mask_add_epi32(a0, _mm512_cmplt_epi32_mask(_mm512_loadu_si512(k + j), tv), a0, one);
    a1 = _mm512_mask_add_epi32(a1, _mm512_cmplt_epi32_mask(_mm512_loadu_si512(k + j + 16), tv), a1, one);
  }
  for (; j < n; j += 16) {
    const int64_t r = n - j < 16 ? n - j : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << r) - 1u);
    a0 = _mm512_mask_add_epi32(a0, _mm512_mask_cmplt_epi32_mask(m, _mm512_maskz_loadu_epi32(m, k + j), tv), a0, one);
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
}

inline int64_t count_lt(const int64_t* __restrict k, int64_t n, int64_t t) {
  const __m512i tv = _mm512_set1_epi64(t);
  int64_t c0 = 0, c1 = 0;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    c0 += _mm_popcnt_u32(_mm512_cmplt_epi64_mask(_mm512_loadu_si512(k + j), tv));
    c1 += _mm_popcnt_u32(_mm512_cmplt_epi64_mask(_mm512_loadu_si512(k + j + 8), tv));
  }
  for (; j < n; j += 8) {
    const int64_t r = n - j < 8 ? n - j : 8;
    const __mmask8 m = static_cast<__mmask8>((1u << r) - 1u);
    c0 += _mm_popcnt_u32(_mm512_mask_cmplt_epi64_mask(m, _mm512_maskz_loadu_epi64(m, k + j), tv));
  }
  return c0 + c1;
}
#elif defined(__AVX2__)
// a true compare lane is all ones (-1): subtracting it counts it
inline int64_t count_lt(const int32_t* __restrict k, int64_t n, int32_t t) {
  const __m256i tv = _mm256_set1_epi32(t);
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_sub_epi32(a0, _mm256_cmpgt_epi32(tv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j))));
    a1 = _mm256_sub_epi32(a1, _mm256_cmpgt_epi32(tv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j + 8))));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(a0, a1));
  int64_t c = 0;
  for (int l = 0; l < 8; ++l) c += lanes[l];
  for (; j < n; ++j) c += k[j] < t;
  return c;
}

inline int64_t count_lt(const int64_t* __restrict k, int64_t n, int64_t t) {
  const __m256i tv = _mm256_set1_epi64x(t);
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    a0 = _mm256_sub_epi64(a0, _mm256_cmpgt_epi64(tv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j))));
    a1 = _mm256_sub_epi64(a1, _mm256_cmpgt_epi64(tv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + j + 4))));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(a0, a1));
  int64_t c = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; j < n; ++j) c += k[j] < t;
  return c;
}
#else
// portable: the compiler vectorises it for the variant's ISA
template <typename K>
inline int64_t count_lt(const K* __restrict k, int64_t n, K t) {
  int32_t c = 0;
  for (int64_t j = 0; j < n; ++j) c += k[j] < t;
  return c;
}
#endif

// Cache lines to fetch ahead, a few at a time from inside the counting loops
// (see count_ranks_chunk).
struct Prefetch {
  const char* p;
  int64_t left;
  inline void one() {
    if (left > 0) {
      __builtin_prefetch(p, 0, 3);
      p += 64;
      --left;
    }
  }
  inline void rest() {
    while (left > 0) one();
  }
};

// out[i] += #{j < n : k[j] < t[i]} for four thresholds (the generic variant,
// and the double rows' int64 keys); one line of pf every 32 keys.
template <typename K>
inline void count_lt4(const K* __restrict k, int64_t n, const K* t, int64_t* out, Prefetch& pf) {
  for (int i = 0; i < 4; ++i) out[i] += count_lt(k, n, t[i]);
  for (int64_t j = 0; j < n; j += 32) pf.one();
}
#if defined(__AVX512F__)
// out[i] += #{j < n : k[j] < t[i]} for N thresholds in one pass over the keys:
// one load serves N compares, each true lane adding one to its counter lane
// (a masked add); the body covers 32 keys (one line of pf), so that loop
// control is paid once per two vectors.
template <int N>
inline void count_ltN(const int32_t* __restrict k, int64_t n, const int32_t* t, int64_t* out, Prefetch& pf) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i tv[N], acc[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    tv[i] = _mm512_set1_epi32(t[i]);
    acc[i] = _mm512_setzero_si512();
  }
  auto step = [&](__m512i v, __mmask16 m) {
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) acc[i] = _mm512_mask_add_epi32(acc[i], _mm512_mask_cmplt_epi32_mask(m, v, tv[i]), acc[i], one);
  };
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    pf.one();
    step(_mm512_loadu_si512(k + j), 0xffff);
    step(_mm512_loadu_si512(k + j + 16), 0xffff);
  }
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1u);
    step(_mm512_maskz_loadu_epi32(m, k + j), m);
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) out[i] += _mm512_reduce_add_epi32(acc[i]);
}
#elif defined(__AVX2__)
inline int64_t lane_sum(__m256i a) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  int64_t c = 0;
  for (int l = 0; l < 8; ++l) c += lanes[l];
  return c;
}

// out[i] += #{j < n : k[j] < t[i]} for N thresholds in one pass over the keys.
// AVX2 has 16 vector registers: up to six thresholds and six counters stay in
// them beside the key vector, so one load serves six compare-and-subtract
// pairs; the body covers 32 keys (one line of pf) so that the loop control is
// paid once per four vectors. (Four thresholds per pass with a branch per
// vector left a third of the pass's instructions to loop control.)
// A 12-threshold pass (thresholds as the compares' memory operands, and the
// matches inside the chunk in it too) was tried and was no faster: the
// compare and the subtract per 8 keys per match bound the count here.
template <int N>
inline void count_ltN(const int32_t* __restrict k, int64_t n, const int32_t* t, int64_t* out, Prefetch& pf) {
  __m256i tv[N], acc[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    tv[i] = _mm256_set1_epi32(t[i]);
    acc[i] = _mm256_setzero_si256();
  }
  auto step = [&](const int32_t* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) acc[i] = _mm256_sub_epi32(acc[i], _mm256_cmpgt_epi32(tv[i], v));
  };
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    pf.one();
    step(k + j);
    step(k + j + 8);
    step(k + j + 16);
    step(k + j + 24);
  }
  for (; j + 8 <= n; j += 8) step(k + j);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) out[i] += lane_sum(acc[i]);
  for (; j < n; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) out[i] += k[j] < t[i];
}
#endif

// Thresholds counted per pass over a chunk, and the pass for 2 <= g <= group_width
// of them (th has room for group_width; unused slots may be overwritten).
template <typename K>
constexpr int group_width() {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<K, int32_t>) return 8;
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<K, int32_t>) return 6;
#endif
  return 4;
}
template <typename K>
inline void count_group(const K* __restrict k, int64_t n, K* th, int g, int64_t* out, Prefetch& pf) {
  for (int u = g; u < 4; ++u) th[u] = th[0];
  count_lt4(k, n, th, out, pf);
}
#if defined(__AVX2__) || defined(__AVX512F__)
template <int N>
inline void count_upto(const int32_t* __restrict k, int64_t n, const int32_t* th, int g, int64_t* out, Prefetch& pf) {
  if constexpr (N > 2) {
    if (g < N) return count_upto<N - 1>(k, n, th, g, out, pf);
  }
  count_ltN<N>(k, n, th, out, pf);
}
template <>
inline void count_group<int32_t>(const int32_t* __restrict k, int64_t n, int32_t* th, int g, int64_t* out,
                                 Prefetch& pf) {
  count_upto<group_width<int32_t>()>(k, n, th, g, out, pf);
}
#endif

// Adds to ranks[i] the part of rank(idx[i]) that lies in the chunk of keys
// [c0, c1) (kc points at key c0): #{j < idx : key_j <= t} + #{j > idx : key_j < t}
// with t = tkey[i], the key of item idx[i]. Every match reads the chunk from L1.
//
// pf/pf_lines: cache lines of the distances the next chunk's keys are made
// from, prefetched while this chunk is counted (the counting reads only L1;
// without the prefetch the row's reads and the counting take turns instead of
// overlapping). They are issued a few per counting pass, and the lines left
// when the passes end right then.
template <typename K>
inline void count_ranks_chunk(const K* __restrict kc, int64_t c0, int64_t c1, const int64_t* idx,
                              const K* tkey, int64_t M, int64_t* ranks, const char* pf_start, int64_t pf_lines) {
  Prefetch pf{pf_start, pf_lines};
  // matches whose whole chunk is on one side of them share passes, group_width at a time
  constexpr int W = group_width<K>();
  static_assert(W <= 8, "group_width");
  K th[8];
  int64_t who[8];
  int g = 0;
  auto flush = [&]() {
    int64_t cnt[8] = {};
    count_group<K>(kc, c1 - c0, th, g, cnt, pf);
    for (int u = 0; u < g; ++u) ranks[who[u]] += cnt[u];
    g = 0;
  };
  for (int64_t i = 0; i < M; ++i) {
    const int64_t m = idx[i];
    const K t = tkey[i];
    if (c0 <= m && m < c1) {
      ranks[i] += count_lt(kc, m - c0, static_cast<K>(t + 1)) + count_lt(kc + (m - c0) + 1, c1 - m - 1, t);
      continue;
    }
    th[g] = c1 <= m ? static_cast<K>(t + 1) : t;
    who[g] = i;
    if (++g == W) flush();
  }
  if (g == 1)
    ranks[who[0]] += count_lt(kc, c1 - c0, th[0]);
  else if (g > 1)
    flush();
  pf.rest();
}

// Number of valid items whose key equals key_m, less one (m's own; junk keys match no valid key).
template <typename K>
inline int64_t count_equal(const K* __restrict k, int64_t G, K km) {
  int32_t c = 0;
  for (int64_t j = 0; j < G; ++j) c += (k[j] == km);
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
// tile holds ||g||^2 - 2 q.g, or q.g for cosine), bit-identical to
// pyfici.ops.distance.apply_epilogue (whose sqrt is the IEEE one, as here):
// 0 none, 1 sqeuclidean max(x + ||q||^2, 0), 2 euclidean sqrt of that,
// 3 cosine clamp(1 - x, 0, 2).
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

// Order keys of n items of a row into out: NaN distance -> key(+inf) + 1, and each
// item's key raised to at least jbase[j] (the lowest key for a usable item,
// the junk key for an item of the junk pid; the query's own same-camera items
// are set to junk by the caller). Returns the number of non-finite raw values
// (x - x is 0 exactly for finite x, NaN otherwise: the caller's finiteness
// check, fused into this one read of the row).
template <typename T, int Epi>
inline int64_t row_keys(const T* __restrict d, const key_t<T>* __restrict jbase, int64_t n, T qn,
                        key_t<T>* __restrict out) {
  using K = key_t<T>;
  constexpr K mag = std::numeric_limits<K>::max();
  const K inf_key = order_key<T>(std::numeric_limits<T>::infinity());  // its bits
  int32_t bad = 0;
  // integer selects only (no float compare-and-select), so that the loop
  // vectorises without mask registers too (AVX2)
  for (int64_t j = 0; j < n; ++j) {
    const T raw = d[j];
    bad += !(raw - raw == T(0));
    const T x = epilogue<T, Epi>(raw, qn) + T(0);  // -0 -> +0
    K b;
    std::memcpy(&b, &x, sizeof b);
    K k = b ^ ((b >> (8 * sizeof(K) - 1)) & mag);
    k = (b & mag) > inf_key ? static_cast<K>(inf_key + 1) : k;  // NaN -> just above +inf
    out[j] = k > jbase[j] ? k : jbase[j];
  }
  return static_cast<int64_t>(bad);
}

#if defined(__AVX512F__) || defined(__AVX2__)
// float rows written for the ISA: the same keys bit for bit. The compiler
// vectorised the generic loop for AVX-512 but not, for the clamping epilogues
// (cosine, euclidean), for AVX2, where it ran scalar at 2.3x the time of a
// plain row. The clamps are max/min with the constant as the first operand:
// MAXPS(0, x) is "0 > x ? 0 : x" and MINPS(2, x) is "2 < x ? 2 : x", which
// keep a NaN x, as the scalar selects do.
//
// Exact = false is the pass for rows of finite values (the usual case): it
// leaves out the NaN key fix and the count of non-finite values, and only ORs
// the bits of raw - raw (+0 for a finite raw, NaN otherwise) across the range.
// If any bit is set, or the query norm is not finite (a NaN x from a finite
// raw), the range is made again by the exact pass. For finite raw and qn the
// epilogues give no NaN (an overflow to +inf keys as +inf in both), so the
// keys are the exact pass's bit for bit. This halves the instructions per key
// on AVX2 (the compare-and-blend NaN fix and the mask-to-count moves were
// half the loop).
template <int Epi, bool Exact>
inline int64_t row_keys_f32(const float* __restrict d, const int32_t* __restrict jbase, int64_t n, float qn,
                            int32_t* __restrict out) {
  if constexpr (!Exact) {
    if ((Epi == 1 || Epi == 2) && !std::isfinite(qn)) return row_keys_f32<Epi, true>(d, jbase, n, qn, out);
  }
  int64_t j = 0;
  int64_t bad = 0;
#if defined(__AVX512F__)
  using V = __m512;
  using I = __m512i;
  constexpr int W = 16;
  auto load = [](const float* p) { return _mm512_loadu_ps(p); };
  auto add = [](V a, V b) { return _mm512_add_ps(a, b); };
  auto sub = [](V a, V b) { return _mm512_sub_ps(a, b); };
  auto vmax = [](V a, V b) { return _mm512_max_ps(a, b); };
  auto vmin = [](V a, V b) { return _mm512_min_ps(a, b); };
  auto vsqrt = [](V a) { return _mm512_sqrt_ps(a); };
  auto set1 = [](float x) { return _mm512_set1_ps(x); };
  auto nonzero = [](V a) { return static_cast<int64_t>(_mm_popcnt_u32(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ))); };
  auto keys = [](V x, const int32_t* jb, int32_t* o) {
    const I b = _mm512_castps_si512(x);
    const I mag = _mm512_set1_epi32(0x7fffffff);
    I k = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), mag));
    if constexpr (Exact) {
      const I infk = _mm512_set1_epi32(0x7f800000);
      k = _mm512_mask_mov_epi32(k, _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, mag), infk), _mm512_set1_epi32(0x7f800001));
    }
    _mm512_storeu_si512(o, _mm512_max_epi32(k, _mm512_loadu_si512(jb)));
  };
  auto bits_or = [](I acc, V a) { return _mm512_or_si512(acc, _mm512_castps_si512(a)); };
  auto any_bit = [](I acc) { return _mm512_test_epi32_mask(acc, acc) != 0; };
  I nonfin = _mm512_setzero_si512();
#else
  using V = __m256;
  using I = __m256i;
  constexpr int W = 8;
  auto load = [](const float* p) { return _mm256_loadu_ps(p); };
  auto add = [](V a, V b) { return _mm256_add_ps(a, b); };
  auto sub = [](V a, V b) { return _mm256_sub_ps(a, b); };
  auto vmax = [](V a, V b) { return _mm256_max_ps(a, b); };
  auto vmin = [](V a, V b) { return _mm256_min_ps(a, b); };
  auto vsqrt = [](V a) { return _mm256_sqrt_ps(a); };
  auto set1 = [](float x) { return _mm256_set1_ps(x); };
  auto nonzero = [](V a) {
    return static_cast<int64_t>(__builtin_popcount(static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ)))));
  };
  auto keys = [](V x, const int32_t* jb, int32_t* o) {
    const I b = _mm256_castps_si256(x);
    const I mag = _mm256_set1_epi32(0x7fffffff);
    I k = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), mag));
    if constexpr (Exact) {
      const I infk = _mm256_set1_epi32(0x7f800000);
      const I isnan = _mm256_cmpgt_epi32(_mm256_and_si256(b, mag), infk);
      k = _mm256_blendv_epi8(k, _mm256_set1_epi32(0x7f800001), isnan);
    }
    _mm256_storeu_si256(reinterpret_cast<I*>(o),
                        _mm256_max_epi32(k, _mm256_loadu_si256(reinterpret_cast<const I*>(jb))));
  };
  auto bits_or = [](I acc, V a) { return _mm256_or_si256(acc, _mm256_castps_si256(a)); };
  auto any_bit = [](I acc) { return _mm256_testz_si256(acc, acc) == 0; };
  I nonfin = _mm256_setzero_si256();
#endif
  const V zero = set1(0.0f), one = set1(1.0f), two = set1(2.0f), q = set1(qn);
  for (; j + W <= n; j += W) {
    const V raw = load(d + j);
    if constexpr (Exact)
      bad += nonzero(sub(raw, raw));
    else
      nonfin = bits_or(nonfin, sub(raw, raw));
    V x = raw;
    if constexpr (Epi == 1) {
      x = vmax(zero, add(raw, q));
    } else if constexpr (Epi == 2) {
      x = vsqrt(vmax(zero, add(raw, q)));
    } else if constexpr (Epi == 3) {
      x = vmin(two, vmax(zero, sub(one, raw)));  // 1 - raw == -raw + 1 exactly
    }
    keys(add(x, zero), jbase + j, out + j);  // + 0: -0 -> +0
  }
  if constexpr (!Exact) {
    (void)nonzero;
    if (any_bit(nonfin)) return row_keys_f32<Epi, true>(d, jbase, n, qn, out);
  }
  if (j < n) bad += row_keys<float, Epi>(d + j, jbase + j, n - j, qn, out + j);
  return bad;
}
#endif

// the ISA's float loop where there is one
template <typename T, int Epi>
inline int64_t row_keys_isa(const T* __restrict d, const key_t<T>* __restrict jbase, int64_t n, T qn,
                            key_t<T>* __restrict out) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) return row_keys_f32<Epi, false>(d, jbase, n, qn, out);
#endif
  return row_keys<T, Epi>(d, jbase, n, qn, out);
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
    dense_codes(gpid, G, upid, key);
    dense_codes(gcam, G, ucam, cam);
    offsets.assign(upid.size() + 1, 0);
    for (int64_t j = 0; j < G; ++j) ++offsets[key[j] + 1];
    for (size_t u = 0; u < upid.size(); ++u) offsets[u + 1] += offsets[u];
    members.resize(G);
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t j = 0; j < G; ++j) members[fill[key[j]]++] = j;  // index order within a pid
    key_minus1 = code(upid, -1);
  }
  // uniq = the sorted distinct values of v[0, n), code[j] = the position of v[j]
  // in uniq. Labels are usually small integers (pids, camera numbers): when
  // they span less than 4n + 1024 values, a table indexed by value gives the
  // codes in O(n + span); otherwise a sort and a binary search per item (the
  // sort of a Market-size gallery's pids alone was most of the per-call
  // overhead, 1.8 ms, of an 8-query evaluation).
  static void dense_codes(const int64_t* v, int64_t n, std::vector<int64_t>& uniq, std::vector<int32_t>& code) {
    uniq.clear();
    code.resize(static_cast<size_t>(n));
    if (n == 0) return;
    int64_t lo = v[0], hi = v[0];
    for (int64_t j = 1; j < n; ++j) {
      lo = v[j] < lo ? v[j] : lo;
      hi = v[j] > hi ? v[j] : hi;
    }
    const uint64_t span = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);  // no signed overflow
    if (span < static_cast<uint64_t>(4 * n + 1024)) {
      std::vector<int32_t> tab(static_cast<size_t>(span) + 1, -1);
      for (int64_t j = 0; j < n; ++j) tab[static_cast<uint64_t>(v[j]) - static_cast<uint64_t>(lo)] = 0;
      int32_t c = 0;
      for (size_t u = 0; u < tab.size(); ++u)
        if (tab[u] == 0) {
          tab[u] = c++;
          uniq.push_back(static_cast<int64_t>(static_cast<uint64_t>(lo) + u));
        }
      for (int64_t j = 0; j < n; ++j) code[j] = tab[static_cast<uint64_t>(v[j]) - static_cast<uint64_t>(lo)];
      return;
    }
    uniq.assign(v, v + n);
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    for (int64_t j = 0; j < n; ++j)
      code[j] = static_cast<int32_t>(std::lower_bound(uniq.begin(), uniq.end(), v[j]) - uniq.begin());
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
  using K = key_t<T>;
  int64_t nonfinite = 0;
  const K junk_key = kJunkKey<K>;
  const GalleryIndex gi(gpid, gcam, G);
  const int32_t* __restrict gkey = gi.key.data();
  const int32_t* __restrict gc = gi.cam.data();
  // the junk pid's items are junk for every query: their key floor is the junk key
  std::vector<K> jbase(static_cast<size_t>(G), std::numeric_limits<K>::min());
  if (junk_minus1)
    for (int64_t j = 0; j < G; ++j)
      if (gkey[j] == gi.key_minus1) jbase[j] = junk_key;
#pragma omp parallel num_threads(nthreads) reduction(+ : nonfinite)
  {
    std::vector<K> chunk(static_cast<size_t>(kChunk)), row, tkeys;
    std::vector<int64_t> midx, jidx, ranks, order, ties;
    std::vector<std::pair<int64_t, int64_t>> rank_tie;
    midx.reserve(64);
    jidx.reserve(64);
    ranks.reserve(64);
#pragma omp for schedule(dynamic, 8)
    for (int64_t q = 0; q < Q; ++q) {
      const T* __restrict d = dist + q * ld;
      if (q + 1 < Q) {
        // the next query's match distances are read first and scattered over
        // its row: start fetching them now (usually this thread's next row)
        const int32_t nk = GalleryIndex::code(gi.upid, qpid[q + 1]);
        if (nk >= 0)
          for (int64_t t = gi.offsets[nk]; t < gi.offsets[nk + 1]; ++t) __builtin_prefetch(d + ld + gi.members[t], 0, 3);
      }
      const int32_t qk = GalleryIndex::code(gi.upid, qpid[q]);
      const int32_t qc = GalleryIndex::code(gi.ucam, qcam[q]);
      const T qn = (Epi == 1 || Epi == 2) ? qnorm[q] : T(0);  // cosine (3) passes no norms
      midx.clear();
      jidx.clear();
      const bool query_is_junk_id = junk_minus1 && qpid[q] == -1;
      if (!query_is_junk_id && qk >= 0) {
        for (int64_t t = gi.offsets[qk]; t < gi.offsets[qk + 1]; ++t) {
          const int64_t j = gi.members[t];
          (gc[j] != qc ? midx : jidx).push_back(j);  // a match, or junk (same pid and camera)
        }
      }
      const int64_t M = static_cast<int64_t>(midx.size());
      // keys of [j0, j1) with this query's junk items set to the junk key
      auto make_keys = [&](int64_t j0, int64_t j1, K* out) {
        const int64_t bad = row_keys_isa<T, Epi>(d + j0, jbase.data() + j0, j1 - j0, qn, out);
        for (const int64_t j : jidx)
          if (j >= j0 && j < j1) out[j - j0] = junk_key;
        return bad;
      };
      ranks.clear();
      ties.clear();
      if (M <= kMaxCountMatches && out_ties == nullptr) {
        // fused: each L1 chunk of keys is made, then counted by every match,
        // before the next chunk; the thresholds are the matches' own keys
        if (M > 0 || out_nonfinite != nullptr) {
          tkeys.resize(M);
          for (int64_t i = 0; i < M; ++i) make_keys(midx[i], midx[i] + 1, &tkeys[i]);  // same keys as the row's
          ranks.assign(M, 0);
          for (int64_t c0 = 0; c0 < G; c0 += kChunk) {
            const int64_t c1 = std::min(G, c0 + kChunk);
            nonfinite += make_keys(c0, c1, chunk.data());
            // the next chunk, or the start of the next row (usually this
            // thread's next query: rows are handed out in runs)
            const char* pf = reinterpret_cast<const char*>(c1 < G ? d + c1 : d + ld);
            const int64_t pf_lines = static_cast<int64_t>(sizeof(T)) * std::min(kChunk, c1 < G ? G - c1 : G) / 64;
            count_ranks_chunk<K>(chunk.data(), c0, c1, midx.data(), tkeys.data(), M, ranks.data(), pf, pf_lines);
          }
        }
      } else {
        // the whole key row: tie counts, or a full sort for many matches
        row.resize(static_cast<size_t>(G));
        K* __restrict kv = row.data();
        nonfinite += make_keys(0, G, kv);
        if (M <= kMaxCountMatches) {
          tkeys.resize(M);
          for (int64_t i = 0; i < M; ++i) tkeys[i] = kv[midx[i]];
          ranks.assign(M, 0);
          for (int64_t c0 = 0; c0 < G; c0 += kChunk)
            count_ranks_chunk<K>(kv + c0, c0, std::min(G, c0 + kChunk), midx.data(), tkeys.data(), M,
                                 ranks.data(), nullptr, 0);
          for (int64_t i = 0; i < M; ++i) ties.push_back(count_equal<K>(kv, G, tkeys[i]));
        } else {
          // full stable ordering of the valid items
          order.clear();
          for (int64_t j = 0; j < G; ++j)
            if (kv[j] != junk_key) order.push_back(j);
          std::sort(order.begin(), order.end(), [kv](int64_t a, int64_t b) {
            return kv[a] < kv[b] || (kv[a] == kv[b] && a < b);
          });
          const int64_t n = static_cast<int64_t>(order.size());
          for (int64_t r = 0; r < n; ++r) {
            const int64_t j = order[r];
            if (gkey[j] != qk) continue;
            ranks.push_back(r);
            if (out_ties != nullptr) {
              int64_t t = 0;
              for (int64_t a = r - 1; a >= 0 && kv[order[a]] == kv[j]; --a) ++t;
              for (int64_t a = r + 1; a < n && kv[order[a]] == kv[j]; ++a) ++t;
              ties.push_back(t);
            }
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

// out[r] = max_j |x[r, j]| of each row, NaN if the row holds a NaN (an Inf
// row gives Inf): the cosine feature conditioning's row scale and its
// finiteness check in one read of the features. |x| is taken on the bit
// pattern (sign cleared): non-negative floats order as their bits do, and
// every NaN pattern is above +inf's, so an unsigned max reduction (which
// vectorises) gives the float max and propagates NaN.
template <typename T>
void row_abs_max_impl(const T* x, int64_t rows, int64_t cols, int64_t ld, T* out, int nthreads) {
  using U = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr U mag = std::numeric_limits<U>::max() >> 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const U* __restrict v = reinterpret_cast<const U*>(x + r * ld);
    U m = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const U b = v[j] & mag;
      m = b > m ? b : m;
    }
    T f;
    std::memcpy(&f, &m, sizeof f);
    out[r] = f;
  }
}

// out[r] = a 64-bit hash of row r's values: equal rows (by value: -0.0 counts as
// +0.0) hash equally, whatever their position or alignment. pyfici.ops.distance
// uses it to find the repeated feature rows whose distances it ties exactly,
// since a BLAS kernel can round the same dot product differently by where the
// row falls in its register blocks. Four independent multiply-xor lanes keep the
// pass memory-bound; the caller confirms candidate pairs by comparing the rows.
template <typename T>
void row_hash_impl(const T* x, int64_t rows, int64_t cols, int64_t ld, uint64_t* out, int nthreads) {
  using U = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
  constexpr U sign = ~(std::numeric_limits<U>::max() >> 1);
  constexpr uint64_t P = 0x9E3779B97F4A7C15ull;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const U* __restrict v = reinterpret_cast<const U*>(x + r * ld);
    uint64_t h[4] = {1, 2, 3, 4};
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      for (int l = 0; l < 4; ++l) {
        const U b = v[j + l] == sign ? U(0) : v[j + l];  // -0.0 -> +0.0
        h[l] = (h[l] ^ uint64_t(b)) * P;
      }
    }
    for (; j < cols; ++j) {
      const U b = v[j] == sign ? U(0) : v[j];
      h[0] = (h[0] ^ uint64_t(b)) * P;
    }
    uint64_t z = h[0] ^ (h[1] << 1 | h[1] >> 63) ^ (h[2] << 2 | h[2] >> 62) ^ (h[3] << 3 | h[3] >> 61) ^ uint64_t(cols);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64 finaliser
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    out[r] = z ^ (z >> 31);
  }
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "row_abs_max",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ld, std::uintptr_t out, int nthreads) {
        py::gil_scoped_release nogil;
        if (dtype == kFloat32)
          row_abs_max_impl(as_ptr<const float>(x), rows, cols, ld, as_ptr<float>(out), nthreads);
        else if (dtype == kFloat64)
          row_abs_max_impl(as_ptr<const double>(x), rows, cols, ld, as_ptr<double>(out), nthreads);
        else
          throw std::invalid_argument("row_abs_max: x must be float32 or float64");
      },
      "out[r] = max |x[r, :]| of a [rows, cols] matrix with row stride ld (NaN where a row holds a NaN).");
  m.def(
      "row_hash",
      [](std::uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ld, std::uintptr_t out, int nthreads) {
        py::gil_scoped_release nogil;
        if (dtype == kFloat32)
          row_hash_impl(as_ptr<const float>(x), rows, cols, ld, as_ptr<uint64_t>(out), nthreads);
        else if (dtype == kFloat64)
          row_hash_impl(as_ptr<const double>(x), rows, cols, ld, as_ptr<uint64_t>(out), nthreads);
        else
          throw std::invalid_argument("row_hash: x must be float32 or float64");
      },
      "out[r] (int64 bits) = a hash of the values of row r of a [rows, cols] matrix with row stride ld; "
      "rows equal by value hash equally (-0.0 as +0.0).");
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
