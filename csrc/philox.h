// Philox4x32-10 exactly as Triton's tl.randint4x / tl.rand / tl.randn (docs/rng.md).
//
// Element e of the stream of `seed`: key (seed_lo, seed_hi), counter (e_lo, e_hi, 0, 0), 10 rounds.
// uint32 = word 0; uniform = Triton's uint_to_uniform_float(word 0); sign = +1 if word 0's top bit
// is set else -1. Normals come four per counter: normal e = tl.randn4x(seed, e >> 2)[e & 3], i.e.
// Box-Muller on words (0, 1) for e & 3 in {0, 1} and (2, 3) for {2, 3}, cosine for even e, sine
// for odd e.
//
// Header-only. The scalar functions give one element at any 64-bit offset (use them inside fused
// kernels for ragged tiles); the fill_* functions write n consecutive elements, eight lanes at a
// time with AVX2 + FMA intrinsics when compiled with them (setup.py passes -mavx2 -mfma), and a
// scalar loop otherwise. They are single-threaded: callers parallelise over rows / chunks.
// Words, uniforms, signs and masks are bit-identical on both paths; the vector normals use
// Cephes-style log/sincos polynomials (~1 ulp; normals within 1e-6 of the reference, contract 4e-6).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
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

// One output of Triton's pair_uniform_to_normal on the uniforms of words (a, b): sine or cosine.
inline float words_to_normal(uint32_t a, uint32_t b, bool sine) {
  const float u1 = std::max(kMinUniform, word_to_uniform(a));
  const float theta = kTwoPi * word_to_uniform(b);
  const float radius = std::sqrt(-2.0f * std::log(u1));
  return radius * (sine ? std::sin(theta) : std::cos(theta));
}

inline uint32_t uint32_at(uint64_t seed, int64_t e) {
  return philox4x32(seed, static_cast<uint64_t>(e)).w0;
}
inline float uniform_at(uint64_t seed, int64_t e) {
  return word_to_uniform(uint32_at(seed, e));
}
inline float normal_at(uint64_t seed, int64_t e) {
  const Words w = philox4x32(seed, static_cast<uint64_t>(e) >> 2);
  return (e & 2) ? words_to_normal(w.w2, w.w3, e & 1) : words_to_normal(w.w0, w.w1, e & 1);
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
  (void)vec;  // unused without AVX2
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

// Words 0 .. kWords - 1 for U blocks of 8 consecutive counters e[u]..e[u]+7 (no low-word wrap
// inside a block) into w[k][u]. Several independent blocks interleaved keep the multipliers busy.
//
// The first two rounds are specialised: the counter is (x, h, 0, 0) with only x varying across
// lanes, so round 1 multiplies only x and round 2 multiplies only the new c2 (the other product
// is a scalar), which saves 2 of the 20 vector multiplies.
template <int U, int kWords>
inline void philox8(uint64_t seed, const uint64_t* e, __m256i (*w)[U]) {
  const __m256i mA = _mm256_set1_epi64x(kRoundA), mB = _mm256_set1_epi64x(kRoundB);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  uint32_t k0[kRounds], k1[kRounds];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < kRounds; ++r) {
    k0[r] = k0[r - 1] + kKeyA;
    k1[r] = k1[r - 1] + kKeyB;
  }
  __m256i c0[U], c1[U], c2[U], c3[U];
  for (int u = 0; u < U; ++u) {
    const __m256i x = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e[u]))), lanes);
    const uint32_t s = static_cast<uint32_t>(e[u] >> 32) ^ k0[0];  // round-1 c0, equal in every lane
    const uint64_t ps = static_cast<uint64_t>(kRoundA) * s;        // round-2 product of that c0
    __m256i ha, la, hb, lb;
    mulhilo8(x, mA, ha, la);                                        // round 1
    const __m256i r1c2 = _mm256_xor_si256(ha, _mm256_set1_epi32(static_cast<int32_t>(k1[0])));
    mulhilo8(r1c2, mB, hb, lb);                                     // round 2
    c0[u] = _mm256_xor_si256(hb, _mm256_set1_epi32(static_cast<int32_t>(k0[1])));
    c1[u] = lb;
    c2[u] = _mm256_xor_si256(la, _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(ps >> 32) ^ k1[1])));
    c3[u] = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(ps)));
  }
#pragma GCC unroll 8
  for (int r = 2; r < kRounds; ++r) {
    const __m256i vk0 = _mm256_set1_epi32(static_cast<int32_t>(k0[r]));
    const __m256i vk1 = _mm256_set1_epi32(static_cast<int32_t>(k1[r]));
    for (int u = 0; u < U; ++u) {
      __m256i hb, lb, ha, la;
      mulhilo8(c2[u], mB, hb, lb);
      mulhilo8(c0[u], mA, ha, la);
      c0[u] = _mm256_xor_si256(_mm256_xor_si256(hb, c1[u]), vk0);
      c2[u] = _mm256_xor_si256(_mm256_xor_si256(ha, c3[u]), vk1);
      c1[u] = lb;
      c3[u] = la;
    }
  }
  for (int u = 0; u < U; ++u) {
    const __m256i c[4] = {c0[u], c1[u], c2[u], c3[u]};
    for (int k = 0; k < kWords; ++k) w[k][u] = c[k];
  }
}

inline __m256 words_to_uniform8(__m256i w) {
  const __m256i x = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(kUniformScale));
}

// Cephes logf's polynomial coefficients (Horner order), shared by the 8- and 16-lane logs.
constexpr int kLogPolyTerms = 9;
constexpr float kLogPoly[kLogPolyTerms] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                           -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                           2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

// Cody-Waite split of pi/2 and Cephes sin / cos polynomial coefficients on |y| <= pi/4, shared by
// the 8- and 16-lane sincos (one table: the two widths stay bit-identical).
constexpr float kTwoOverPi = 0.636619772367581343f;
constexpr float kPiOver2Parts[3] = {1.57079637050628662109375f, -4.37113900018624283e-8f, -1.7151245100059144e-15f};
constexpr float kSinPoly[3] = {-1.9515295891e-4f, 8.3321608736e-3f, -1.6666654611e-1f};
constexpr float kCosPoly[3] = {2.443315711809948e-5f, -1.388731625493765e-3f, 4.166664568298827e-2f};

// Natural log for x in [1e-7, 1) (no zero/negative/inf/nan handling needed): Cephes logf,
// x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by its degree-9 polynomial; about 1 ulp.
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(kLogPoly[0]);
  for (int k = 1; k < kLogPolyTerms; ++k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kLogPoly[k]));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// sin(x) and cos(x) for x in [0, 2 pi]: x = q pi/2 + y with |y| <= pi/4 (3-part Cody-Waite with
// FMA), Cephes sin/cos polynomials on y, quadrant picks +-sin y / +-cos y; about 1 ulp.
inline void sincos8(__m256 x, __m256& sin_x, __m256& cos_x) {
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kTwoOverPi)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 y = _mm256_fnmadd_ps(q, _mm256_set1_ps(kPiOver2Parts[0]), x);
  y = _mm256_fnmadd_ps(q, _mm256_set1_ps(kPiOver2Parts[1]), y);
  y = _mm256_fnmadd_ps(q, _mm256_set1_ps(kPiOver2Parts[2]), y);
  const __m256 z = _mm256_mul_ps(y, y);
  __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(kSinPoly[0]), z, _mm256_set1_ps(kSinPoly[1]));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(kSinPoly[2]));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), y, y);
  __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(kCosPoly[0]), z, _mm256_set1_ps(kCosPoly[1]));
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(kCosPoly[2]));
  c = _mm256_fmadd_ps(_mm256_mul_ps(c, z), z, _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, _mm256_set1_ps(1.0f)));
  const __m256i qi = _mm256_cvtps_epi32(q);
  const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(qi, 31));  // top bit set for odd q
  // Quadrant q: sin = (s, c, -s, -c)[q & 3], cos = (c, -s, -c, s)[q & 3].
  const __m256i two = _mm256_set1_epi32(2);
  const __m256 sin_sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(qi, two), 30));
  const __m256 cos_sign = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(qi, _mm256_set1_epi32(1)), two), 30));
  sin_x = _mm256_xor_ps(_mm256_blendv_ps(s, c, odd), sin_sign);
  cos_x = _mm256_xor_ps(_mm256_blendv_ps(c, s, odd), cos_sign);
}

// Box-Muller of one word pair: radius and angle of Triton's pair_uniform_to_normal.
inline void polar8(__m256i a, __m256i b, __m256& radius, __m256& theta) {
  const __m256 u1 = _mm256_max_ps(words_to_uniform8(a), _mm256_set1_ps(kMinUniform));
  theta = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), words_to_uniform8(b));
  radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(u1)));
}

// The 32 normals of 8 consecutive counters from their words: out[4 i + j] = normal j of counter i.
inline void normals8x4(float* out, const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3) {
  auto load = [](const uint32_t* w) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)); };
  __m256 ra, ta, rb, tb, sa, ca, sb, cb;
  polar8(load(w0), load(w1), ra, ta);
  polar8(load(w2), load(w3), rb, tb);
  sincos8(ta, sa, ca);
  sincos8(tb, sb, cb);
  // Normals j = 0..3 of counter i in lane i of n0..n3; transpose 4 x 8 into counter-major order.
  const __m256 n0 = _mm256_mul_ps(ra, ca), n1 = _mm256_mul_ps(ra, sa);
  const __m256 n2 = _mm256_mul_ps(rb, cb), n3 = _mm256_mul_ps(rb, sb);
  const __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(n0, n1));  // pairs (n0 n1) of lanes 0 1 | 4 5
  const __m256d t1 = _mm256_castps_pd(_mm256_unpackhi_ps(n0, n1));  // lanes 2 3 | 6 7
  const __m256d t2 = _mm256_castps_pd(_mm256_unpacklo_ps(n2, n3));
  const __m256d t3 = _mm256_castps_pd(_mm256_unpackhi_ps(n2, n3));
  const __m256 c04 = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));  // counters 0 | 4
  const __m256 c15 = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
  const __m256 c26 = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
  const __m256 c37 = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(c04, c15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(c26, c37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(c04, c15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(c26, c37, 0x31));
}

// ---- AVX-512 Philox (chosen at run time, so one build serves AVX2-only and AVX-512 machines).
// Each 32-bit word lives in the low half of a 64-bit lane: _mm512_mul_epu32 then yields the full
// 64-bit product (high word = one shift, low word = the product itself, its garbage high half
// ignored by the next multiply) and vpternlogd does both xors of a round, so a round costs
// 6 instructions per 8 lanes instead of 18 with 32-bit lanes in AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define UDN_PHILOX_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")
// Words 0 .. kWords - 1 of the counters e + 16 i .. e + 16 i + 15 for i < blocks (no low-word
// wrap inside [e, e + 16 blocks)) into w[k][16 blocks].
template <int kWords>
__attribute__((noinline)) void philox_words512(uint64_t seed, uint64_t e, int64_t blocks, uint32_t* const* w) {
  const __m512i mA = _mm512_set1_epi64(kRoundA), mB = _mm512_set1_epi64(kRoundB);
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  uint32_t k0[kRounds], k1[kRounds];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int r = 1; r < kRounds; ++r) {
    k0[r] = k0[r - 1] + kKeyA;
    k1[r] = k1[r - 1] + kKeyB;
  }
  // Rounds 1-2 as in philox8: the counter is (x, h, 0, 0) with only x varying across lanes.
  const uint32_t s = static_cast<uint32_t>(e >> 32) ^ k0[0];
  const uint64_t ps = static_cast<uint64_t>(kRoundA) * s;
  const __m512i vk1_0 = _mm512_set1_epi64(k1[0]), vk0_1 = _mm512_set1_epi64(k0[1]);
  const __m512i c2_2 = _mm512_set1_epi64(static_cast<uint32_t>(ps >> 32) ^ k1[1]);
  const __m512i c3_2 = _mm512_set1_epi64(static_cast<uint32_t>(ps));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512i c0[2], c1[2], c2[2], c3[2];
    for (int h = 0; h < 2; ++h) {
      const __m512i x = _mm512_add_epi64(_mm512_set1_epi64(static_cast<uint32_t>(e) + 16 * blk + 8 * h), lanes);
      const __m512i pa = _mm512_mul_epu32(x, mA);                                    // round 1
      const __m512i r1c2 = _mm512_xor_si512(_mm512_srli_epi64(pa, 32), vk1_0);
      const __m512i pb = _mm512_mul_epu32(r1c2, mB);                                 // round 2
      c0[h] = _mm512_xor_si512(_mm512_srli_epi64(pb, 32), vk0_1);
      c1[h] = pb;
      c2[h] = _mm512_xor_si512(pa, c2_2);
      c3[h] = c3_2;
    }
#pragma GCC unroll 8
    for (int r = 2; r < kRounds - 1; ++r) {
      const __m512i vk0 = _mm512_set1_epi64(k0[r]), vk1 = _mm512_set1_epi64(k1[r]);
      for (int h = 0; h < 2; ++h) {
        const __m512i pb = _mm512_mul_epu32(c2[h], mB), pa = _mm512_mul_epu32(c0[h], mA);
        c0[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[h], vk0, 0x96);  // a ^ b ^ c
        c2[h] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[h], vk1, 0x96);
        c1[h] = pb;
        c3[h] = pa;
      }
    }
    // Round 10. Word-0 fills (uint32 / uniform / sign) skip the product of c0 that only feeds
    // words 2 and 3; normals use all four.
    const __m512i vk0 = _mm512_set1_epi64(k0[kRounds - 1]), vk1 = _mm512_set1_epi64(k1[kRounds - 1]);
    for (int h = 0; h < 2; ++h) {
      const __m512i pb = _mm512_mul_epu32(c2[h], mB);
      __m512i out[4] = {_mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[h], vk0, 0x96), pb};
      if constexpr (kWords > 2) {
        const __m512i pa = _mm512_mul_epu32(c0[h], mA);
        out[2] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[h], vk1, 0x96);
        out[3] = pa;
      }
      for (int k = 0; k < kWords; ++k) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + 16 * blk + 8 * h), _mm512_cvtepi64_epi32(out[k]));
      }
    }
  }
}

// Box-Muller on 16 lanes: the operations of normals8x4 one for one, with mask registers for its
// compares and blends, so both ISAs give bit-identical normals.
inline __m512 uniform16(__m512i w) {
  const __m512i x = _mm512_xor_si512(w, _mm512_srai_epi32(w, 31));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(x), _mm512_set1_ps(kUniformScale));
}

inline __m512 log16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  __m512 e = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126)));
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)),
                                                       _mm512_set1_epi32(0x3F000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm512_mask_sub_ps(e, small, e, _mm512_set1_ps(1.0f));
  const __m512 f = _mm512_sub_ps(_mm512_mask_add_ps(m, small, m, m), _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(kLogPoly[0]);
  for (int k = 1; k < kLogPolyTerms; ++k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kLogPoly[k]));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, y);
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
}

inline void sincos16(__m512 x, __m512& sin_x, __m512& cos_x) {
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kTwoOverPi)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 y = _mm512_fnmadd_ps(q, _mm512_set1_ps(kPiOver2Parts[0]), x);
  y = _mm512_fnmadd_ps(q, _mm512_set1_ps(kPiOver2Parts[1]), y);
  y = _mm512_fnmadd_ps(q, _mm512_set1_ps(kPiOver2Parts[2]), y);
  const __m512 z = _mm512_mul_ps(y, y);
  __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(kSinPoly[0]), z, _mm512_set1_ps(kSinPoly[1]));
  s = _mm512_fmadd_ps(s, z, _mm512_set1_ps(kSinPoly[2]));
  s = _mm512_fmadd_ps(_mm512_mul_ps(s, z), y, y);
  __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(kCosPoly[0]), z, _mm512_set1_ps(kCosPoly[1]));
  c = _mm512_fmadd_ps(c, z, _mm512_set1_ps(kCosPoly[2]));
  c = _mm512_fmadd_ps(_mm512_mul_ps(c, z), z, _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), z, _mm512_set1_ps(1.0f)));
  const __m512i qi = _mm512_cvtps_epi32(q);
  const __mmask16 odd = _mm512_test_epi32_mask(qi, _mm512_set1_epi32(1));
  const __m512i two = _mm512_set1_epi32(2);
  const __m512i sin_sign = _mm512_slli_epi32(_mm512_and_si512(qi, two), 30);
  const __m512i cos_sign = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(qi, _mm512_set1_epi32(1)), two), 30);
  sin_x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, s, c)), sin_sign));
  cos_x = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mask_blend_ps(odd, c, s)), cos_sign));
}

inline void polar16(__m512i a, __m512i b, __m512& radius, __m512& theta) {
  const __m512 u1 = _mm512_max_ps(uniform16(a), _mm512_set1_ps(kMinUniform));
  theta = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), uniform16(b));
  radius = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(u1)));
}

// normals8x4 on 16 counters: the 64 normals of counters i < 16 in counter-major order.
__attribute__((noinline)) inline void normals16x4(float* out, const uint32_t* w0, const uint32_t* w1,
                                                  const uint32_t* w2, const uint32_t* w3) {
  __m512 ra, ta, rb, tb, sa, ca, sb, cb;
  polar16(_mm512_loadu_si512(w0), _mm512_loadu_si512(w1), ra, ta);
  polar16(_mm512_loadu_si512(w2), _mm512_loadu_si512(w3), rb, tb);
  sincos16(ta, sa, ca);
  sincos16(tb, sb, cb);
  const __m512 n0 = _mm512_mul_ps(ra, ca), n1 = _mm512_mul_ps(ra, sa);
  const __m512 n2 = _mm512_mul_ps(rb, cb), n3 = _mm512_mul_ps(rb, sb);
  // As normals8x4 within each 128-bit lane: v_j holds counter 4 l + j in its 128-bit lane l.
  const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(n0, n1)), t1 = _mm512_castps_pd(_mm512_unpackhi_ps(n0, n1));
  const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(n2, n3)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(n2, n3));
  const __m512 v0 = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)), v1 = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
  const __m512 v2 = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)), v3 = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  // 4 x 4 transpose of 128-bit lanes: output vector l = lane l of v0, v1, v2, v3.
  const __m512 a01 = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(1, 0, 1, 0));  // v0.0 v0.1 v1.0 v1.1
  const __m512 a23 = _mm512_shuffle_f32x4(v2, v3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 b01 = _mm512_shuffle_f32x4(v0, v1, _MM_SHUFFLE(3, 2, 3, 2));  // v0.2 v0.3 v1.2 v1.3
  const __m512 b23 = _mm512_shuffle_f32x4(v2, v3, _MM_SHUFFLE(3, 2, 3, 2));
  _mm512_storeu_ps(out, _mm512_shuffle_f32x4(a01, a23, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(a01, a23, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(out + 32, _mm512_shuffle_f32x4(b01, b23, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_ps(out + 48, _mm512_shuffle_f32x4(b01, b23, _MM_SHUFFLE(3, 1, 3, 1)));
}
#pragma GCC pop_options
#endif

inline bool use_avx512() {
#ifdef UDN_PHILOX_AVX512
  // UDN_KERNELS_NO_AVX512=1 forces the AVX2 words (tests cover both paths on AVX-512 machines).
  static const bool use = __builtin_cpu_supports("avx512f") && !std::getenv("UDN_KERNELS_NO_AVX512");
  return use;
#else
  return false;
#endif
}

// Words 0 .. kWords - 1 of 16 * blocks consecutive counters from e (no low-word wrap inside)
// into w[k][16 blocks].
template <int kWords>
inline void philox_words(uint64_t seed, uint64_t e, int64_t blocks, uint32_t* const* w) {
#ifdef UDN_PHILOX_AVX512
  if (use_avx512()) return philox_words512<kWords>(seed, e, blocks, w);
#endif
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint64_t ee[2] = {e + 16 * blk, e + 16 * blk + 8};
    __m256i v[kWords][2];
    philox8<2, kWords>(seed, ee, v);
    for (int k = 0; k < kWords; ++k) {
      for (int u = 0; u < 2; ++u) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + 16 * blk + 8 * u), v[k][u]);
    }
  }
}

// Runs `emit(out, w0)` over the vector part of a word-0 fill. Two phases per chunk of up to
// kChunk elements: all Philox words first, then all the emits, so the out-of-order core sees
// independent iterations of each.
constexpr int64_t kChunk = 256;
template <typename T, typename Emit, typename Scalar>
inline void fill_words(T* out, int64_t n, uint64_t seed, int64_t offset, Emit emit, Scalar scalar) {
  alignas(64) uint32_t w0[kChunk];
  uint32_t* const w[1] = {w0};
  int64_t i = 0;
  while (i + 16 <= n) {
    const uint64_t e = static_cast<uint64_t>(offset + i);
    // Blocks end before the low counter word would wrap; the block that would straddle it goes scalar.
    const int64_t room = (int64_t{1} << 32) - static_cast<int64_t>(static_cast<uint32_t>(e));
    const int64_t count = std::min({kChunk, (n - i) & ~int64_t{15}, room & ~int64_t{15}});
    if (count == 0) break;
    philox_words<1>(seed, e, count / 16, w);
    for (int64_t j = 0; j < count; j += 8) emit(out + i + j, _mm256_load_si256(reinterpret_cast<const __m256i*>(w0 + j)));
    i += count;
  }
  fill(out + i, n - i, offset + i, [&](T* o, uint64_t e) {
    __m256i v[1][1];
    philox8<1, 1>(seed, &e, v);
    emit(o, v[0][0]);
  }, scalar);
}

// Normals offset .. offset + n - 1: counters offset >> 2 .. (offset + n - 1) >> 2, 16 at a time
// (64 normals). As in fill_words, per chunk of kNormalChunk counters all four Philox words come
// first, then the Box-Muller blocks. A block that sticks out of [offset, offset + n) (ragged head
// or tail) is computed whole into a buffer and its overlap copied; counters within 16 of a low-word
// wrap go through normal_at.
constexpr int64_t kNormalChunk = 64;
inline void fill_normal4(float* out, int64_t n, uint64_t seed, int64_t offset) {
  if (n <= 0) return;
  alignas(64) uint32_t words[4][kNormalChunk];
  uint32_t* const w[4] = {words[0], words[1], words[2], words[3]};
  alignas(64) float block[64];
  const uint64_t begin = static_cast<uint64_t>(offset), end = begin + static_cast<uint64_t>(n);
  uint64_t c = begin >> 2;
  const uint64_t c_end = (end + 3) >> 2;  // end <= 2^63: no overflow
  // Normals [4 c, 4 c + count) clipped to [begin, end) into out.
  auto emit = [&](uint64_t c0, uint64_t count, auto make) {
    const uint64_t lo = std::max(begin, 4 * c0), hi = std::min(end, 4 * c0 + count);
    if (lo == 4 * c0 && hi == 4 * c0 + count) return make(out + (lo - begin));
    make(block);
    std::memcpy(out + (lo - begin), block + (lo - 4 * c0), (hi - lo) * sizeof(float));
  };
  while (c < c_end) {
    const uint64_t room = (uint64_t{1} << 32) - static_cast<uint32_t>(c);
    if (room < 16) {  // the next 16 counters would wrap the low word: one counter at a time
      emit(c, 4, [&](float* o) { for (int j = 0; j < 4; ++j) o[j] = normal_at(seed, static_cast<int64_t>(4 * c + j)); });
      ++c;
      continue;
    }
    const uint64_t count = std::min({static_cast<uint64_t>(kNormalChunk), (c_end - c + 15) & ~uint64_t{15},
                                     room & ~uint64_t{15}});
    philox_words<4>(seed, c, static_cast<int64_t>(count / 16), w);
    for (uint64_t b = 0; b < count; b += 16) {
      emit(c + b, 64, [&](float* o) {
#ifdef UDN_PHILOX_AVX512
        if (use_avx512()) return normals16x4(o, w[0] + b, w[1] + b, w[2] + b, w[3] + b);
#endif
        normals8x4(o, w[0] + b, w[1] + b, w[2] + b, w[3] + b);
        normals8x4(o + 32, w[0] + b + 8, w[1] + b + 8, w[2] + b + 8, w[3] + b + 8);
      });
    }
    c += count;
  }
}
#endif

}  // namespace detail

// Each fill writes out[i] = stream element (offset + i) for i in [0, n); offset + n must not
// exceed 2^63. Counters are 64-bit: the high word is (offset + i) >> 32, nothing wraps.

inline void fill_uint32(uint32_t* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return uint32_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](uint32_t* o, __m256i w0) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), w0);
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

inline void fill_uniform(float* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return uniform_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](float* o, __m256i w0) {
    _mm256_storeu_ps(o, detail::words_to_uniform8(w0));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

inline void fill_normal(float* out, int64_t n, uint64_t seed, int64_t offset) {
#ifdef UDN_PHILOX_AVX2
  detail::fill_normal4(out, n, seed, offset);
#else
  detail::fill(out, n, offset, nullptr, [&](int64_t e) { return normal_at(seed, e); });
#endif
}

inline void fill_sign(float* out, int64_t n, uint64_t seed, int64_t offset) {
  auto scalar = [&](int64_t e) { return sign_at(seed, e); };
#ifdef UDN_PHILOX_AVX2
  detail::fill_words(out, n, seed, offset, [](float* o, __m256i w0) {
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
  detail::fill_words(out, n, seed, offset, [&](float* o, __m256i w0) {
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
  detail::fill_words(out, n, seed, offset, [&](float* o, __m256i w0) {
    const __m256 hit = _mm256_cmp_ps(detail::words_to_uniform8(w0), vp, _CMP_LT_OQ);
    _mm256_storeu_ps(o, _mm256_and_ps(hit, one));
  }, scalar);
#else
  detail::fill(out, n, offset, nullptr, scalar);
#endif
}

}  // namespace philox
}  // namespace udn
