// Vectorised softplus and sigmoid of the CPU kernels that take rho (sigma = softplus(rho)):
// noisy_weight.cpp's noise pass and kl.cpp's fused KL terms.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace udn_stochastic {

// softplus(r) = max(r, 0) + log1p(t) and softplus'(r) = sigmoid(r), from t = exp(-|r|) (F.softplus
// without its threshold: beyond 20 the two agree to rounding). float: ATen's exp_u20 (~20 ulp;
// 0 below ln(FLT_MIN)) and log1p(t) = t P(t) on [0, 1], P a degree-8 Chebyshev fit (2.3e-7
// relative error, no log, no division); double: ATen's exp and log1p.
template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> exp_neg_abs(at::vec::Vectorized<T> r) {
  const at::vec::Vectorized<T> neg_abs = at::vec::minimum(r, at::vec::Vectorized<T>(0) - r);
  if constexpr (std::is_same_v<T, float>) return neg_abs.exp_u20(); else return neg_abs.exp();
}

template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> softplus_from(at::vec::Vectorized<T> r, at::vec::Vectorized<T> t) {
  using V = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    constexpr float kLog1pOverT[] = {0.9999999404f, -0.4999925494f, 0.3331601024f, -0.2482564896f,
                                     0.1905595511f, -0.1358394176f, 0.0775403827f, -0.0292102676f,
                                     0.0051860036f};
    V p(kLog1pOverT[8]);
    for (int64_t i = 7; i >= 0; --i) p = at::vec::fmadd(p, t, V(kLog1pOverT[i]));
    return at::vec::fmadd(t, p, at::vec::maximum(r, V(0)));
  } else {
    return at::vec::maximum(r, V(0)) + t.log1p();
  }
}

template <typename T>
C10_ALWAYS_INLINE at::vec::Vectorized<T> sigmoid_from(at::vec::Vectorized<T> r, at::vec::Vectorized<T> t) {
  using V = at::vec::Vectorized<T>;
  return V::blendv(t, V(1), r >= V(0)) / (V(1) + t);
}

}  // namespace udn_stochastic
