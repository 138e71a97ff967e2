// Philox4x32-10 exactly as Triton's tl.randint4x / tl.rand / tl.randn (docs/rng.md).
//
// Element e of the stream of `seed`: key (seed_lo, seed_hi), counter (e_lo, e_hi, 0, 0), 10 rounds.
// uint32 = word 0; uniform = Triton's uint_to_uniform_float(word 0); normal = cosine branch of
// Box-Muller on the uniforms of words 0 and 1; sign = +1 if word 0's top bit is set else -1.
//
// Header-only. The scalar functions give one element at any 64-bit offset (use them inside fused
// kernels for ragged tiles); the fill_* functions write n consecutive elements, eight lanes at a
// time with AVX2 when the translation unit is built with CPU_CAPABILITY_AVX2 (setup.py does), and
// a scalar loop otherwise. They are single-threaded: callers parallelise over rows / chunks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(CPU_CAPABILITY_AVX2)
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#define UDN_PHILOX_AVX2 1
#endif

namespace udn {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton: largest s with INT32_MAX * s < 1
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;              // Box-Muller clamp of u1, as Triton

struct Words {
  uint32_t w0, w1, w2, w3;
};

// ---------------------------------------------------------------- scalar

inline Words philox4x32(uint64_t seed, uint64_t e) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(e), c1 = static_cast<uint32_t>(e >> 32), c2 = 0, c3 = 0;
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

inline float word_to_uniform(uint32_t w) {
  int32_t x;
  std::memcpy(&x, &w, sizeof x);
  x ^= x >> 31;  // x < 0 -> ~x (arithmetic shift)
  return static_cast<float>(x) * kUniformScale;
}

inline float words_to_normal(uint32_t w0, uint32_t w1) {
  const float u1 = std::max(kMinUniform, word_to_uniform(w0));
  const float theta = kTwoPi * word_to_uniform(w1);
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * std::cos(theta);
}

inline uint32_t uint32_at(uint64_t seed, int64_t e) {
  return philox4x32(seed, static_cast<uint64_t>(e)).w0;
}
inline float uniform_at(uint64_t seed, int64_t e) {
  return word_to_uniform(uint32_at(seed, e));
}
inline float normal_at(uint64_t seed, int64_t e) {
  const Words w = philox4x32(seed, static_cast<uint64_t>(e));
  return words_to_normal(w.w0, w.w1);
}
inline float sign_at(uint64_t seed, int64_t e) {
  return (uint32_at(seed, e) >> 31) ? 1.0f : -1.0f;
}
inline float keep_at(float p, float scale, uint64_t seed, int64_t e) {
  return uniform_at(seed, e) >= p ? scale : 0.0f;
}

// ---------------------------------------------------------------- vectorised

namespace detail {

// Drives a fill: `vec(out, e)` writes 8 elements whose counters e..e+7 share one high word,
// `scalar(e)` returns one element. Blocks whose low counter words would wrap go scalar.
template <typename T, typename Vec8, typename Scalar>
inline void fill(T* out, int64_t n, int64_t offset, Vec8 vec, Scalar scalar) {
  int64_t i = 0;
#ifdef UDN_PHILOX_AVX2
  for (; i + 8 <= n; i += 8) {
    const uint64_t e = static_cast<uint64_t>(offset + i);
    if (static_cast<uint32_t>(e) > 0xFFFFFFF8u) {
      for (int j = 0; j < 8; ++j) out[i + j] = scalar(static_cast<int64_t>(e) + j);
    } else {
      vec(out + i, e);
    }
  }
#endif
  for (; i < n; ++i) out[i] = scalar(offset + i);
}

#ifdef UDN_PHILOX_AVX2
// (hi, lo) 32-bit halves of a * m for 8 uint32 lanes; m holds the constant in every 64-bit lane.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Words 0 and 1 for U blocks of 8 consecutive counters e[u]..e[u]+7 (no low-word wrap inside a
// block). Several independent blocks interleaved hide the multiply latency of the serial rounds.
template <int U>
inline void philox8(uint64_t seed, const uint64_t* e, __m256i* w0, __m256i* w1) {
  const __m256i mA = _mm256_set1_epi64x(kRoundA), mB = _mm256_set1_epi64x(kRoundB);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0[U], c1[U], c2[U], c3[U];
  for (int u = 0; u < U; ++u) {
    c0[u] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e[u]))), lanes);
    c1[u] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e[u] >> 32)));
    c2[u] = _mm256_setzero_si256();
    c3[u] = _mm256_setzero_si256();
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kRounds; ++r) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int32_t>(k0));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    for (int u = 0; u < U; ++u) {
      __m256i hb, lb, ha, la;
      mulhilo8(c2[u], mB, hb, lb);
      mulhilo8(c0[u], mA, ha, la);
      c0[u] = _mm256_xor_si256(_mm256_xor_si256(hb, c1[u]), vk0);
      c2[u] = _mm256_xor_si256(_mm256_xor_si256(ha, c3[u]), vk1);
      c1[u] = lb;
      c3[u] = la;
    }
    k0 += kKeyA;
    k1 += kKeyB;
  }
  for (int u = 0; u < U; ++u) {
    w0[u] = c0[u];
    w1[u] = c1[u];
  }
}

inline __m256 words_to_uniform8(__m256i w) {
  const __m256i x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

inline __m256 words_to_normal8(__m256i w0, __m256i w1) {
  using V = at::vec::Vectorized<float>;
  const V u1 = at::vec::maximum(V(kMinUniform), V(words_to_uniform8(w0)));
  const V theta = V(kTwoPi) * V(words_to_uniform8(w1));
  const V radius = (V(-2.0f) * u1.log()).sqrt();
  return radius * theta.cos();
}

// Runs `emit(out, w0, w1)` over the AVX2 part of a fill, two blocks (16 elements) at a time.
template <typename T, typename Emit, typename Scalar>
inline void fill_words(T* out, int64_t n, uint64_t seed, int64_t offset, Emit emit, Scalar scalar) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const uint64_t e[2] = {static_cast<uint64_t>(offset + i), static_cast<uint64_t>(offset + i + 8)};
    if (static_cast<uint32_t>(e[0]) > 0xFFFFFFF8u || static_cast<uint32_t>(e[1]) > 0xFFFFFFF8u) break;
    __m256i w0[2], w1[2];
    philox8<2>(seed, e, w0, w1);
    emit(out + i, w0[0], w1[0]);
    emit(out + i + 8, w0[1], w1[1]);
  }
  fill(out + i, n - i, offset + i, [&](T* o, uint64_t e) {
    __m256i w0, w1;
    philox8<1>(seed, &e, &w0, &w1);
    emit(o, w0, w1);
  }, scalar);
}
#endif

}  // namespace detail

// Each fill writes out[i] = stream element (offset + i) for i in [0, n); offset + n must not
// exceed 2^63. Counters are 64-bit: the high word is (offset + i) >> 32, nothing wraps.

inline void fill_uint32(uint32_t* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return uint32_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](uint32_t* o, __m256i w0, __m256i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), w0);
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

inline void fill_uniform(float* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return uniform_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](float* o, __m256i w0, __m256i) {
    _mm256_storeu_ps(o, detail::words_to_uniform8(w0));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

inline void fill_normal(float* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return normal_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](float* o, __m256i w0, __m256i w1) {
    _mm256_storeu_ps(o, detail::words_to_normal8(w0, w1));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

inline void fill_sign(float* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return sign_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](float* o, __m256i w0, __m256i) {
    // blendv selects by each lane's top bit, which is exactly the sign rule.
    _mm256_storeu_ps(o, _mm256_blendv_ps(_mm256_set1_ps(-1.0f), _mm256_set1_ps(1.0f),
                                         _mm256_castsi256_ps(w0)));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

// out[i] = scale where uniform(offset + i) >= p, else 0 (dropout keep mask, scale = 1/(1-p)).
inline void fill_keep_mask(float* out, int64_t n, float p, float scale, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return keep_at(p, scale, seed, e); };
#ifdef UDN_PHILOX_AVX2
  const __m256 vp = _mm256_set1_ps(p), vscale = _mm256_set1_ps(scale);
  detail::fill_words(out, n, seed, offset, [&](float* o, __m256i w0, __m256i) {
    const __m256 keep = _mm256_cmp_ps(detail::words_to_uniform8(w0), vp, _CMP_GE_OQ);
    _mm256_storeu_ps(o, _mm256_and_ps(keep, vscale));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

// out[i] = 1 where uniform(offset + i) < p, else 0 (docs/rng.md bernoulli).
inline void fill_bernoulli(float* out, int64_t n, float p, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return uniform_at(seed, e) < p ? 1.0f : 0.0f; };
#ifdef UDN_PHILOX_AVX2
  const __m256 vp = _mm256_set1_ps(p), one = _mm256_set1_ps(1.0f);
  detail::fill_words(out, n, seed, offset, [&](float* o, __m256i w0, __m256i) {
    const __m256 hit = _mm256_cmp_ps(detail::words_to_uniform8(w0), vp, _CMP_LT_OQ);
    _mm256_storeu_ps(o, _mm256_and_ps(hit, one));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

}  // namespace philox
}  // namespace udn
