// Vectorised row epilogues shared by the depth-head kernels (heads_*.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace udn_heads {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// The dtype the kernels compute in: float for 16-bit storage (bfloat16 / float16), else the input's.
inline at::ScalarType compute_type(const at::Tensor& hidden) {
  const auto t = hidden.scalar_type();
  return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t;
}

// max(a, b) that returns NaN if either is NaN (std::max(a, NaN) is a: it would drop a NaN logit).
template <typename T>
inline T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Sum of the lanes of v, lane 0 first (a fixed order: results do not depend on the caller).
template <typename T>
T lane_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T total = 0;
  for (int64_t k = 0; k < Vec<T>::size(); ++k) total += lanes[k];
  return total;
}

// s += b (b may be null); returns max(s), NaN if any s is NaN.
template <typename T>
T add_bias_max(T* s, const T* b, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> vmax(-std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec<T> v = Vec<T>::loadu(s + j);
    if (b) {
      v = v + Vec<T>::loadu(b + j);
      v.store(s + j);
    }
    vmax = at::vec::maximum(vmax, v);
  }
  T lanes[W];
  vmax.store(lanes);
  T m = lanes[0];
  for (int64_t k = 1; k < W; ++k) m = max_nan(m, lanes[k]);
  for (; j < n; ++j) {
    if (b) s[j] += b[j];
    m = max_nan(m, s[j]);
  }
  return m;
}

template <typename T>
T sum_of(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = acc + Vec<T>::loadu(x + j);
  T total = lane_sum(acc);
  for (; j < n; ++j) total += x[j];
  return total;
}

// s <- cap tanh(s / cap): Gemma-2 logit soft-capping.
template <typename T>
void soft_cap(T* s, T cap, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vcap(cap), vinv(T(1) / cap);
  int64_t j = 0;
  for (; j + W <= n; j += W) (vcap * (Vec<T>::loadu(s + j) * vinv).tanh()).store(s + j);
  for (; j < n; ++j) s[j] = cap * std::tanh(s[j] / cap);
}

// sum_j exp(s_j - shift).
template <typename T>
T sum_exp(const T* s, T shift, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vshift(shift);
  Vec<T> acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) acc = acc + (Vec<T>::loadu(s + j) - vshift).exp();
  T total = lane_sum(acc);
  for (; j < n; ++j) total += std::exp(s[j] - shift);
  return total;
}

}  // namespace udn_heads
