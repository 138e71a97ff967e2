// Shared by the stochastic-linear kernels (gaussian_linear.cpp, bernoulli_linear.cpp,
// noisy_weight.cpp): the noise kinds of the Philox stream, the noisy-weight description and the
// entry points of the tile engine that never materialises a sampled weight (noisy_weight.cpp).
// Noise layout: docs/rng.md; op signatures: docs/internals.md.
//
// x arrives as [Sx, B, K] (Sx = 1: shared by the S draws), outputs are [S, B, N].
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "gemm_strategy.h"
#include "philox.h"

namespace udn_stochastic {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// The storage dtypes of the stochastic kernels: float32, float64, and the 16-bit bfloat16 and
// float16, which are computed in float32 (at::opmath_type): noise, tiles, GEMMs and accumulators.
#define UDN_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline bool is_half(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// The dtype of the tile engine's GEMM operands (x, grad_out, tiles, output) for storage like t's: the
// storage dtype, except 16-bit storage on a CPU without native 16-bit GEMMs (gemm_strategy.h): float32.
inline at::ScalarType acc_dtype(const Tensor& t) {
  return native_half_gemm(t.scalar_type()) ? t.scalar_type() : at::toOpMathType(t.scalar_type());
}

// `t` of one of the storage dtypes above.
inline void check_storage_dtype(const udn::ArgChecks& check, const char* name, const Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, check.op, ": ", name,
              ": expected dtype float32, float64, bfloat16 or float16, got ", d);
}

// p[0, n) in the compute type A: p itself, or widened into buf (16-bit storage, one chunk at a time).
template <typename T, typename A = at::opmath_type<T>>
const A* widen(const T* p, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<T, A>) {
    return p;
  } else {
    buf.resize(n);
    at::vec::convert(p, buf.data(), n);
    return buf.data();
  }
}

constexpr int64_t kFillGrain = 1 << 14;  // noise elements per parallel task

// One kind of per-element noise of the stream (docs/rng.md).
struct Noise {
  enum Kind { kNormal, kSign, kKeep } kind;
  uint64_t seed;
  float p = 0.0f;
  double scale = 1.0;  // kept value of kKeep: 1 / (1 - p)

  void fill(float* out, int64_t n, int64_t offset, float keep_scale) const {
    switch (kind) {
      case kNormal: udn::philox::fill_normal(out, n, seed, offset); break;
      case kSign: udn::philox::fill_sign(out, n, seed, offset); break;
      case kKeep: udn::philox::fill_keep_mask(out, n, p, keep_scale, seed, offset); break;
    }
  }

  // Noise in the compute dtype; double goes through a float scratch buffer and applies the keep
  // scale in double, so float64 masks are exactly 0 or 1 / (1 - p).
  template <typename T>
  void fill_as(T* out, int64_t n, int64_t offset, std::vector<float>& scratch) const {
    if constexpr (std::is_same_v<T, float>) {
      fill(out, n, offset, static_cast<float>(scale));
    } else {
      scratch.resize(n);
      fill(scratch.data(), n, offset, 1.0f);
      const T factor = kind == kKeep ? static_cast<T>(scale) : T(1);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(scratch[i]) * factor;
    }
  }
};


// The weight draws W_s = a + sigma(b) * r_s, r_s(n, k) = noise at s*N*K + n*K + k (a optional);
// sigma(b) = b, or softplus(b) with softplus_b (b then holds rho, and d_b is d rho).
struct NoisyWeight {
  const Tensor* a;  // [N, K] or nullptr
  Tensor b;         // [N, K]
  Noise noise;
  int64_t S;
  bool softplus_b = false;
};

// Which gradients noisy_weight_backward computes (d_a only together with d_b).
struct NoisyGrads {
  bool x, a, b;
};

// The tile engine (noisy_weight.cpp): out [S, B, N] = x_s W_s^T (+ bias), with flipout's output signs
// when flip is given; and the gradients d_x, d_a, d_b of sum_s <ge_s, x_s W_s^T>. T is the storage of
// a, b, d_a and d_b (float, double, BFloat16, Half); xe, ge, out, bias, d_x and the tiles are in
// xe's dtype, acc_dtype(b): T itself, or float32 for 16-bit T without native 16-bit GEMMs (the callers
// widen the input- and output-sized ones), where a 16-bit weight is widened one noise chunk at a time
// and every GEMM and accumulator is float32.
template <typename T>
void noisy_weight_forward(const Tensor& xe, const NoisyWeight& nw, Tensor& out, const Tensor& bias,
                          const Noise* flip, int64_t flip_offset);
template <typename T>
void noisy_weight_backward(const Tensor& xe, const Tensor& ge, const NoisyWeight& nw, NoisyGrads want,
                           Tensor& d_x, Tensor& d_a, Tensor& d_b);

inline const Tensor* ptr_or_null(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// Sum over draws of a per-draw [S, B, M] tensor when x is shared by them (Sx = 1 < S).
inline Tensor sum_draws_if_shared(const Tensor& t, int64_t Sx) {
  return Sx == 1 && t.size(0) > 1 ? t.sum(0, true) : t;
}

// Checks x [Sx, B, K] (a storage dtype above, Sx = S with x_sampled, else 1; S >= 1) and the [N, K] weight
// argument `weight_name` of x's dtype, all CPU and contiguous. Returns N.
inline int64_t check_input_and_weight(const udn::ArgChecks& check, const Tensor& x, int64_t S, bool x_sampled,
                                      const char* weight_name, const Tensor& weight) {
  TORCH_CHECK(S >= 1, check.op, ": samples: expected >= 1, got ", S);
  check.dim("x", x, {3});
  check_storage_dtype(check, "x", x);
  const int64_t K = x.size(2);
  check.tensor("x", x, x.scalar_type(), {x_sampled ? S : 1, x.size(1), K});
  check.dim(weight_name, weight, {2});
  check.tensor(weight_name, weight, x.scalar_type(), {weight.size(0), K});
  return weight.size(0);
}

}  // namespace udn_stochastic
