// Fused layer-wise optimizer steps (SGD, AdamW) with pruning masks, AMP unscale
// and per-tensor learning rates, plus the per-tensor weight variation.
//
// One pass over memory: every element of every (active) tensor is read and
// written once. Work is split into chunks of kChunk elements across ALL tensors
// (a chunk never spans two tensors), and OpenMP threads take chunks
// dynamically, so a list with one huge tensor and many small ones is balanced
// by chunk, not by tensor. A tensor is one flat buffer: param, grad, state and
// mask share their strides (the Python layer guarantees it), so any dense
// layout (contiguous, channels_last, ...) is element k of every buffer.
//
// The float32 loops are written with AVX-512, AVX2+FMA or (baseline x86-64)
// SSE2 intrinsics when the translation unit is compiled for that ISA (the build
// compiles this file once per ISA and picks the variant at run time), so the
// uint8 mask becomes a lane mask / and-not instead of a byte -> float
// conversion the vectoriser may or may not find. Other dtypes (float64,
// float16, bfloat16), the tails and non-x86 targets use the scalar loops below
// (vectorised by the compiler where it can). Every loop is
// templated on the few flags that change memory traffic (mask, momentum kind,
// weight decay, amsgrad), so there are no per-element branches.
//
// Semantics (torch.optim.SGD / AdamW, foreach=False, plus Apex ASP masks): the
// gradient is zeroed where the mask is 0 (a select, so an inf/NaN gradient of a
// pruned weight never reaches it) and so is the param after the step. float64
// params use float64 math and state, the other dtypes float32. Per-tensor
// metadata arrives as an int64 table (numel and raw pointers), per-tensor
// hyper-parameters as float64 rows (see pyfici/ops/reference.py), learning
// rates as float64. A tensor whose lr is 0 and whose weight decay is 0 is
// skipped without touching its memory. found_inf != 0 skips the whole step;
// grad_scale unscales in registers (grads are never written).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)) || defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports the _mm512_undefined_* inside its own AVX-512 intrinsics as maybe-uninitialized
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "registry.h"

namespace py = pybind11;

namespace pyfici {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per work item

struct BF16 {
  uint16_t v;
};

// IEEE binary16 storage type: _Float16 on x86-64 (gcc >= 12, clang), __fp16 on
// Arm, where older compilers have no _Float16 in C++; both convert to and
// from float with round to nearest even.
#if defined(__aarch64__) || defined(__arm__)
using Half = __fp16;
#else
using Half = _Float16;
#endif

// math type: float64 for float64 params, float32 for the rest
template <typename P>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};
template <typename P>
using math_t = typename MathOf<P>::type;

inline float to_c(float x) { return x; }
inline double to_c(double x) { return x; }
inline float to_c(Half x) { return static_cast<float>(x); }
inline float to_c(BF16 x) {
  uint32_t u = static_cast<uint32_t>(x.v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename P>
inline P from_c(math_t<P> x);
template <>
inline float from_c<float>(float x) { return x; }
template <>
inline double from_c<double>(double x) { return x; }
template <>
inline Half from_c<Half>(float x) { return static_cast<Half>(x); }
template <>
inline BF16 from_c<BF16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  // round to nearest even; NaN stays a (quiet) NaN
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : r)};
}

// NaN-propagating maximum (torch.maximum)
template <typename C>
inline C max_nan(C a, C b) {
  return (a > b || a != a) ? a : b;
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

// ------------------------------------------------------------------ float32 vector ISA
// One struct per ISA with the handful of operations the loops need; the loops
// below are written once against it.
#if defined(__AVX512F__)
#define PYFICI_OPTIM_VEC 1
struct Isa {
  static constexpr int W = 16;
  using F = __m512;
  using M = __mmask16;
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  // lanes whose mask byte is non-zero
  static M mask(const uint8_t* m) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm_test_epi8_mask(b, b);
#else
    const __m512i w = _mm512_cvtepu8_epi32(b);
    return _mm512_test_epi32_mask(w, w);
#endif
  }
  static F keep(M k, F x) { return _mm512_maskz_mov_ps(k, x); }  // x where kept, +0 elsewhere
  static F max_nan(F a, F b) {
    const F r = _mm512_max_ps(a, b);  // b when either is NaN
    return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
#define PYFICI_OPTIM_VEC 1
struct Isa {
  static constexpr int W = 8;
  using F = __m256;
  using M = __m256;  // all-ones lanes where the mask byte is ZERO
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static M mask(const uint8_t* m) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(w, _mm256_setzero_si256()));
  }
  static F keep(M zero, F x) { return _mm256_andnot_ps(zero, x); }
  static F max_nan(F a, F b) {
    const F r = _mm256_max_ps(a, b);
    return _mm256_blendv_ps(r, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
};
#elif defined(__SSE2__)
// baseline x86-64 (no FMA: a * b + c is two roundings, as the scalar tail compiles too)
#define PYFICI_OPTIM_VEC 1
struct Isa {
  static constexpr int W = 4;
  using F = __m128;
  using M = __m128;  // all-ones lanes where the mask byte is ZERO
  static F load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, F x) { _mm_storeu_ps(p, x); }
  static F set1(float x) { return _mm_set1_ps(x); }
  static F add(F a, F b) { return _mm_add_ps(a, b); }
  static F sub(F a, F b) { return _mm_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm_mul_ps(a, b); }
  static F div(F a, F b) { return _mm_div_ps(a, b); }
  static F sqrt(F a) { return _mm_sqrt_ps(a); }
  static F fmadd(F a, F b, F c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static F fnmadd(F a, F b, F c) { return _mm_sub_ps(c, _mm_mul_ps(a, b)); }
  static M mask(const uint8_t* m) {
    int32_t four;
    std::memcpy(&four, m, 4);
    const __m128i z = _mm_setzero_si128();
    const __m128i w = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(four), z), z);
    return _mm_castsi128_ps(_mm_cmpeq_epi32(w, z));
  }
  static F keep(M zero, F x) { return _mm_andnot_ps(zero, x); }
  static F max_nan(F a, F b) {
    const F r = _mm_max_ps(a, b);
    const F nan = _mm_cmpunord_ps(a, a);
    return _mm_or_ps(_mm_and_ps(nan, a), _mm_andnot_ps(nan, r));
  }
};
#else
#define PYFICI_OPTIM_VEC 0
#endif

// ------------------------------------------------------------------ SGD

struct SgdHyper {  // one float64 row of the table
  double wd, momentum, dampening, nesterov, init, maximize;
};
template <typename C>
struct SgdCoef {
  C scale;  // 1 / grad_scale, negated for maximize
  C lr, wd, mom, omd;  // omd = 1 - dampening
};
// momentum kinds: none, buf = mom * buf + omd * g, the first step (buf = g); Nesterov or not
enum SgdKind : int { kNoMom = 0, kMom = 1, kMomNest = 2, kInit = 3, kInitNest = 4 };

template <typename P, bool MASK, bool WD, int KIND>
void sgd_scalar(P* __restrict p, const P* __restrict g, math_t<P>* __restrict buf, const uint8_t* __restrict mask,
                int64_t begin, int64_t end, const SgdCoef<math_t<P>> c) {
  using C = math_t<P>;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    C gi = to_c(g[i]) * c.scale;
    bool kept = true;
    if constexpr (MASK) {
      kept = mask[i] != 0;
      gi = kept ? gi : C(0);
    }
    const C pi = to_c(p[i]);
    if constexpr (WD) gi = gi + c.wd * pi;
    C d = gi;
    if constexpr (KIND != kNoMom) {
      const C b = (KIND == kInit || KIND == kInitNest) ? gi : buf[i] * c.mom + c.omd * gi;
      buf[i] = b;
      d = (KIND == kMomNest || KIND == kInitNest) ? gi + c.mom * b : b;
    }
    C pn = pi - c.lr * d;
    if constexpr (MASK) pn = kept ? pn : C(0);
    p[i] = from_c<P>(pn);
  }
}

#if PYFICI_OPTIM_VEC
template <bool MASK, bool WD, int KIND>
void sgd_vec(float* __restrict p, const float* __restrict g, float* __restrict buf, const uint8_t* __restrict mask,
             int64_t n, const SgdCoef<float> c) {
  using F = Isa::F;
  constexpr int W = Isa::W;
  const F scale = Isa::set1(c.scale), lr = Isa::set1(c.lr), wd = Isa::set1(c.wd), mom = Isa::set1(c.mom),
          omd = Isa::set1(c.omd);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    F gi = Isa::mul(Isa::load(g + i), scale);
    Isa::M k{};
    if constexpr (MASK) {
      k = Isa::mask(mask + i);
      gi = Isa::keep(k, gi);
    }
    const F pi = Isa::load(p + i);
    if constexpr (WD) gi = Isa::fmadd(wd, pi, gi);
    F d = gi;
    if constexpr (KIND != kNoMom) {
      F b;
      if constexpr (KIND == kInit || KIND == kInitNest)
        b = gi;
      else
        b = Isa::fmadd(Isa::load(buf + i), mom, Isa::mul(omd, gi));
      Isa::store(buf + i, b);
      if constexpr (KIND == kMomNest || KIND == kInitNest)
        d = Isa::fmadd(mom, b, gi);
      else
        d = b;
    }
    F pn = Isa::fnmadd(lr, d, pi);
    if constexpr (MASK) pn = Isa::keep(k, pn);
    Isa::store(p + i, pn);
  }
  sgd_scalar<float, MASK, WD, KIND>(p, g, buf, mask, i, n, c);
}
#endif

template <typename P, bool MASK, bool WD, int KIND>
void sgd_range(P* p, const P* g, math_t<P>* buf, const uint8_t* mask, int64_t n, const SgdCoef<math_t<P>>& c) {
#if PYFICI_OPTIM_VEC
  if constexpr (std::is_same_v<P, float>) return sgd_vec<MASK, WD, KIND>(p, g, buf, mask, n, c);
#endif
  sgd_scalar<P, MASK, WD, KIND>(p, g, buf, mask, 0, n, c);
}

template <typename P, bool MASK, bool WD>
void sgd_kind(int kind, P* p, const P* g, math_t<P>* buf, const uint8_t* mask, int64_t n,
              const SgdCoef<math_t<P>>& c) {
  switch (kind) {
    case kNoMom: return sgd_range<P, MASK, WD, kNoMom>(p, g, buf, mask, n, c);
    case kMom: return sgd_range<P, MASK, WD, kMom>(p, g, buf, mask, n, c);
    case kMomNest: return sgd_range<P, MASK, WD, kMomNest>(p, g, buf, mask, n, c);
    case kInit: return sgd_range<P, MASK, WD, kInit>(p, g, buf, mask, n, c);
    default: return sgd_range<P, MASK, WD, kInitNest>(p, g, buf, mask, n, c);
  }
}

// meta: int64 [5, n] rows numel, param, grad, momentum buffer (0 = none), mask (0 = none)
template <typename P>
void sgd_step_t(int64_t n, const int64_t* meta, const double* lrs, const SgdHyper* hyper, float inv_scale,
                int nthreads) {
  using C = math_t<P>;
  std::vector<char> active(n);
  std::vector<SgdCoef<C>> coef(n);
  std::vector<int> kind(n);
  for (int64_t t = 0; t < n; ++t) {
    const SgdHyper& h = hyper[t];
    active[t] = (lrs[t] != 0.0 || h.wd != 0.0) && meta[t] > 0;
    const float s = h.maximize != 0.0 ? -inv_scale : inv_scale;
    coef[t] = SgdCoef<C>{C(s), C(lrs[t]), C(h.wd), C(h.momentum), C(1.0 - h.dampening)};
    const bool mom = h.momentum != 0.0 && meta[3 * n + t] != 0, nest = h.nesterov != 0.0, init = h.init != 0.0;
    kind[t] = !mom ? kNoMom : init ? (nest ? kInitNest : kInit) : (nest ? kMomNest : kMom);
  }
  const std::vector<Chunk> chunks = make_chunks(n, meta, active);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  const int nt = threads_for(total_of(chunks), nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nc; ++k) {
    const Chunk& ch = chunks[k];
    const int64_t t = ch.tensor, off = ch.begin, len = ch.end - ch.begin;
    P* p = reinterpret_cast<P*>(meta[1 * n + t]) + off;
    const P* g = reinterpret_cast<const P*>(meta[2 * n + t]) + off;
    C* buf = meta[3 * n + t] ? reinterpret_cast<C*>(meta[3 * n + t]) + off : nullptr;
    const uint8_t* mask = meta[4 * n + t] ? reinterpret_cast<const uint8_t*>(meta[4 * n + t]) + off : nullptr;
    const bool wd = hyper[t].wd != 0.0;
    if (mask) {
      if (wd) sgd_kind<P, true, true>(kind[t], p, g, buf, mask, len, coef[t]);
      else sgd_kind<P, true, false>(kind[t], p, g, buf, mask, len, coef[t]);
    } else {
      if (wd) sgd_kind<P, false, true>(kind[t], p, g, buf, mask, len, coef[t]);
      else sgd_kind<P, false, false>(kind[t], p, g, buf, mask, len, coef[t]);
    }
  }
}

void sgd_step(int64_t n, const int64_t* meta, const double* lrs, const double* hyper_raw, int pdtype,
              const float* grad_scale, const float* found_inf, int nthreads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const SgdHyper* hyper = reinterpret_cast<const SgdHyper*>(hyper_raw);
  switch (pdtype) {
    case kFloat32: return sgd_step_t<float>(n, meta, lrs, hyper, inv_scale, nthreads);
    case kFloat64: return sgd_step_t<double>(n, meta, lrs, hyper, inv_scale, nthreads);
    case kFloat16: return sgd_step_t<Half>(n, meta, lrs, hyper, inv_scale, nthreads);
    case kBFloat16: return sgd_step_t<BF16>(n, meta, lrs, hyper, inv_scale, nthreads);
    default: return;
  }
}

// ------------------------------------------------------------------ AdamW

struct AdamHyper {  // one float64 row of the table
  double beta1, beta2, eps, wd, amsgrad, maximize;
};
template <typename C>
struct AdamCoef {
  C scale;           // 1 / grad_scale, negated for maximize
  C decay;           // 1 - lr * wd
  C w1, w1c;         // lerp weight 1 - beta1 and 1 - w1 (torch's lerp takes the second form for w1 >= 0.5)
  C beta2, w2, eps;  // w2 = 1 - beta2
  C step_size;       // lr / (1 - beta1^step)
  C bc2_sqrt;        // sqrt(1 - beta2^step)
};

template <typename P, bool MASK, bool AMS, bool LERP_HI>
void adamw_scalar(P* __restrict p, const P* __restrict g, math_t<P>* __restrict m, math_t<P>* __restrict v,
                  math_t<P>* __restrict vmax, const uint8_t* __restrict mask, int64_t begin, int64_t end,
                  const AdamCoef<math_t<P>> c) {
  using C = math_t<P>;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    C gi = to_c(g[i]) * c.scale;
    bool kept = true;
    if constexpr (MASK) {
      kept = mask[i] != 0;
      gi = kept ? gi : C(0);
    }
    const C pi = to_c(p[i]) * c.decay;
    const C diff = gi - m[i];
    const C mm = LERP_HI ? gi - diff * c.w1c : m[i] + c.w1 * diff;
    const C vv = v[i] * c.beta2 + c.w2 * gi * gi;
    m[i] = mm;
    v[i] = vv;
    C second = vv;
    if constexpr (AMS) {
      second = max_nan(vmax[i], vv);
      vmax[i] = second;
    }
    const C denom = std::sqrt(second) / c.bc2_sqrt + c.eps;
    C pn = pi - c.step_size * (mm / denom);
    if constexpr (MASK) pn = kept ? pn : C(0);
    p[i] = from_c<P>(pn);
  }
}

#if PYFICI_OPTIM_VEC
template <bool MASK, bool AMS, bool LERP_HI>
void adamw_vec(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
               float* __restrict vmax, const uint8_t* __restrict mask, int64_t n, const AdamCoef<float> c) {
  using F = Isa::F;
  constexpr int W = Isa::W;
  const F scale = Isa::set1(c.scale), decay = Isa::set1(c.decay), w1 = Isa::set1(c.w1), w1c = Isa::set1(c.w1c),
          beta2 = Isa::set1(c.beta2), w2 = Isa::set1(c.w2), eps = Isa::set1(c.eps),
          step_size = Isa::set1(c.step_size), bc2 = Isa::set1(c.bc2_sqrt);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    F gi = Isa::mul(Isa::load(g + i), scale);
    Isa::M k{};
    if constexpr (MASK) {
      k = Isa::mask(mask + i);
      gi = Isa::keep(k, gi);
    }
    const F pi = Isa::mul(Isa::load(p + i), decay);
    const F m0 = Isa::load(m + i);
    const F diff = Isa::sub(gi, m0);
    const F mm = LERP_HI ? Isa::fnmadd(diff, w1c, gi) : Isa::fmadd(w1, diff, m0);
    const F vv = Isa::fmadd(Isa::mul(w2, gi), gi, Isa::mul(Isa::load(v + i), beta2));
    Isa::store(m + i, mm);
    Isa::store(v + i, vv);
    F second = vv;
    if constexpr (AMS) {
      second = Isa::max_nan(Isa::load(vmax + i), vv);
      Isa::store(vmax + i, second);
    }
    const F denom = Isa::add(Isa::div(Isa::sqrt(second), bc2), eps);
    F pn = Isa::fnmadd(step_size, Isa::div(mm, denom), pi);
    if constexpr (MASK) pn = Isa::keep(k, pn);
    Isa::store(p + i, pn);
  }
  adamw_scalar<float, MASK, AMS, LERP_HI>(p, g, m, v, vmax, mask, i, n, c);
}
#endif

template <typename P, bool MASK, bool AMS, bool LERP_HI>
void adamw_range(P* p, const P* g, math_t<P>* m, math_t<P>* v, math_t<P>* vmax, const uint8_t* mask, int64_t n,
                 const AdamCoef<math_t<P>>& c) {
#if PYFICI_OPTIM_VEC
  if constexpr (std::is_same_v<P, float>) return adamw_vec<MASK, AMS, LERP_HI>(p, g, m, v, vmax, mask, n, c);
#endif
  adamw_scalar<P, MASK, AMS, LERP_HI>(p, g, m, v, vmax, mask, 0, n, c);
}

// meta: int64 [7, n] rows numel, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 = no amsgrad), mask (0 = none)
// steps: float32 [n], incremented for every stepped tensor
template <typename P>
void adamw_step_t(int64_t n, const int64_t* meta, const double* lrs, float* steps, const AdamHyper* hyper,
                  float inv_scale, int nthreads) {
  using C = math_t<P>;
  std::vector<char> active(n);
  std::vector<AdamCoef<C>> coef(n);
  for (int64_t t = 0; t < n; ++t) {
    const AdamHyper& h = hyper[t];
    const double lr = lrs[t];
    active[t] = lr != 0.0 || h.wd != 0.0;  // an empty tensor's step advances too (as in torch)
    if (!active[t]) continue;
    const double step = static_cast<double>(steps[t]) + 1.0;
    steps[t] = static_cast<float>(step);
    const float s = h.maximize != 0.0 ? -inv_scale : inv_scale;
    const C w1 = C(1.0 - h.beta1);
    coef[t] = AdamCoef<C>{C(s),
                          C(1.0 - lr * h.wd),
                          w1,
                          C(1) - w1,
                          C(h.beta2),
                          C(1.0 - h.beta2),
                          C(h.eps),
                          C(lr / (1.0 - std::pow(h.beta1, step))),
                          C(std::sqrt(1.0 - std::pow(h.beta2, step)))};
  }
  const std::vector<Chunk> chunks = make_chunks(n, meta, active);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  const int nt = threads_for(total_of(chunks), nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < nc; ++k) {
    const Chunk& ch = chunks[k];
    const int64_t t = ch.tensor, off = ch.begin, len = ch.end - ch.begin;
    P* p = reinterpret_cast<P*>(meta[1 * n + t]) + off;
    const P* g = reinterpret_cast<const P*>(meta[2 * n + t]) + off;
    C* m = reinterpret_cast<C*>(meta[3 * n + t]) + off;
    C* v = reinterpret_cast<C*>(meta[4 * n + t]) + off;
    const bool ams = hyper[t].amsgrad != 0.0 && meta[5 * n + t] != 0;
    C* vmax = ams ? reinterpret_cast<C*>(meta[5 * n + t]) + off : nullptr;
    const uint8_t* mask = meta[6 * n + t] ? reinterpret_cast<const uint8_t*>(meta[6 * n + t]) + off : nullptr;
    const AdamCoef<C>& c = coef[t];
    const bool hi = !(std::abs(c.w1) < C(0.5));
#define PYFICI_ADAM_CASE(MK, AM, HI) \
  if ((mask != nullptr) == MK && ams == AM && hi == HI) { adamw_range<P, MK, AM, HI>(p, g, m, v, vmax, mask, len, c); continue; }
    PYFICI_ADAM_CASE(true, false, false)
    PYFICI_ADAM_CASE(false, false, false)
    PYFICI_ADAM_CASE(true, true, false)
    PYFICI_ADAM_CASE(false, true, false)
    PYFICI_ADAM_CASE(true, false, true)
    PYFICI_ADAM_CASE(false, false, true)
    PYFICI_ADAM_CASE(true, true, true)
    PYFICI_ADAM_CASE(false, true, true)
#undef PYFICI_ADAM_CASE
  }
}

void adamw_step(int64_t n, const int64_t* meta, const double* lrs, float* steps, const double* hyper_raw, int pdtype,
                const float* grad_scale, const float* found_inf, int nthreads) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const float inv_scale = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
  const AdamHyper* hyper = reinterpret_cast<const AdamHyper*>(hyper_raw);
  switch (pdtype) {
    case kFloat32: return adamw_step_t<float>(n, meta, lrs, steps, hyper, inv_scale, nthreads);
    case kFloat64: return adamw_step_t<double>(n, meta, lrs, steps, hyper, inv_scale, nthreads);
    case kFloat16: return adamw_step_t<Half>(n, meta, lrs, steps, hyper, inv_scale, nthreads);
    case kBFloat16: return adamw_step_t<BF16>(n, meta, lrs, steps, hyper, inv_scale, nthreads);
    default: return;
  }
}

// ------------------------------------------------------------------ weight variation

template <typename P>
double sqdiff_scalar(const P* __restrict a, const P* __restrict b, int64_t begin, int64_t end) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const double d = static_cast<double>(to_c(a[i])) - static_cast<double>(to_c(b[i]));
    acc += d * d;
  }
  return acc;
}

// float32 inputs, float64 accumulation: each float is widened before the difference
double sqdiff_float(const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t i = 0;
  double acc = 0.0;
#if defined(__AVX512F__)
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (; i + 16 <= n; i += 16) {
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i)));
    const __m512d d1 =
        _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + i + 8)), _mm512_cvtps_pd(_mm256_loadu_ps(b + i + 8)));
    s0 = _mm512_fmadd_pd(d0, d0, s0);
    s1 = _mm512_fmadd_pd(d1, d1, s1);
  }
  acc = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)), _mm256_cvtps_pd(_mm_loadu_ps(b + i)));
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i + 4)), _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4)));
    s0 = _mm256_fmadd_pd(d0, d0, s0);
    s1 = _mm256_fmadd_pd(d1, d1, s1);
  }
  const __m256d s = _mm256_add_pd(s0, s1);
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  acc = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
#endif
  return acc + sqdiff_scalar(a, b, i, n);
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
      case kFloat32: s = sqdiff_float(static_cast<const float*>(a) + c.begin, static_cast<const float*>(b) + c.begin, len); break;
      case kFloat64: s = sqdiff_scalar(static_cast<const double*>(a) + c.begin, static_cast<const double*>(b) + c.begin, 0, len); break;
      case kFloat16: s = sqdiff_scalar(static_cast<const Half*>(a) + c.begin, static_cast<const Half*>(b) + c.begin, 0, len); break;
      case kBFloat16: s = sqdiff_scalar(static_cast<const BF16*>(a) + c.begin, static_cast<const BF16*>(b) + c.begin, 0, len); break;
      default: break;
    }
    part[k] = s;
  }
  for (int64_t t = 0; t < n; ++t) out[t] = 0.0;
  for (int64_t k = 0; k < nc; ++k) out[chunks[k].tensor] += part[k];
}

void check_param_dtype(const char* op, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat64 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(op) + ": params must be float32, float64, float16 or bfloat16");
}

}  // namespace

PYFICI_REGISTER(m) {
  m.def(
      "layerwise_sgd_step",
      [](int64_t n, std::uintptr_t meta, std::uintptr_t lrs, std::uintptr_t hyper, int pdtype,
         std::uintptr_t grad_scale, std::uintptr_t found_inf, int nthreads) {
        check_param_dtype("layerwise_sgd_step", pdtype);
        py::gil_scoped_release release;
        sgd_step(n, as_ptr<const int64_t>(meta), as_ptr<const double>(lrs), as_ptr<const double>(hyper), pdtype,
                 as_ptr<const float>(grad_scale), as_ptr<const float>(found_inf), nthreads);
      },
      "Fused SGD step over n tensors. meta: int64 [5, n] (numel, param, grad, buf|0, mask|0 pointers); "
      "lrs float64 [n]; hyper float64 [n, 6]; grad_scale / found_inf: float32 scalar pointers or 0.");
  m.def(
      "layerwise_adamw_step",
      [](int64_t n, std::uintptr_t meta, std::uintptr_t lrs, std::uintptr_t steps, std::uintptr_t hyper,
         int pdtype, std::uintptr_t grad_scale, std::uintptr_t found_inf, int nthreads) {
        check_param_dtype("layerwise_adamw_step", pdtype);
        py::gil_scoped_release release;
        adamw_step(n, as_ptr<const int64_t>(meta), as_ptr<const double>(lrs), as_ptr<float>(steps),
                   as_ptr<const double>(hyper), pdtype, as_ptr<const float>(grad_scale),
                   as_ptr<const float>(found_inf), nthreads);
      },
      "Fused AdamW step over n tensors. meta: int64 [7, n] (numel, param, grad, exp_avg, exp_avg_sq, "
      "max_exp_avg_sq|0, mask|0); lrs float64 [n]; steps float32 [n] (incremented); hyper float64 [n, 6].");
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
