// Argument checks of the udn_kernels_C ops. The kernels read raw data pointers, so a tensor of the
// wrong shape, dtype, device or layout would be read out of bounds or misread; every op checks its
// tensor arguments up front with these. O(1): sizes, strides, dtype and device, never the data.
// Messages name the op, the argument, the expected and the actual:
//   "gaussian_linear_fwd: weight_sigma: expected shape [64, 32], got [64, 31]".
#pragma once

#include <ATen/ATen.h>

#include <c10/util/StringUtil.h>

#include <initializer_list>
#include <optional>
#include <vector>

namespace udn {

struct ArgChecks {
  const char* op;

  // float32 or float64 (the dtypes the kernels are compiled for).
  void floating(const char* name, const at::Tensor& t) const {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                ": expected dtype float32 or float64, got ", t.scalar_type());
  }

  // float32, float64, or a 16-bit storage dtype (bfloat16, float16) that kernels compute in float.
  void floating_or_half(const char* name, const at::Tensor& t) const {
    const auto d = t.scalar_type();
    TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                ": expected dtype float32, float64, bfloat16 or float16, got ", d);
  }

  // t.dim() is one of `dims`.
  void dim(const char* name, const at::Tensor& t, std::initializer_list<int64_t> dims) const {
    for (int64_t d : dims)
      if (t.dim() == d) return;
    TORCH_CHECK(false, op, ": ", name, ": expected ", c10::Join(" or ", dims), " dims, got shape ", t.sizes());
  }

  // A CPU tensor of `dtype` and `shape`; contiguous unless any_layout (ops that copy it themselves).
  void tensor(const char* name, const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape,
              bool any_layout = false) const {
    TORCH_CHECK(t.defined(), op, ": ", name, ": expected a tensor, got an undefined one");
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, ": expected shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(any_layout || t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor, got strides ",
                t.strides());
  }

  // tensor() when present (None and undefined tensors pass).
  void optional(const char* name, const std::optional<at::Tensor>& t, at::ScalarType dtype, at::IntArrayRef shape,
                bool any_layout = false) const {
    if (t.has_value() && t->defined()) tensor(name, *t, dtype, shape, any_layout);
  }
};

// The depth heads' hidden [L, N, D] (float32/64), weight [C, D] or [L, C, D] and bias None, [C] or
// [L, C], of hidden's dtype. Returns C.
inline int64_t check_heads_params(const ArgChecks& check, const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, bool any_layout) {
  check.dim("hidden", hidden, {3});
  check.floating_or_half("hidden", hidden);
  const auto dtype = hidden.scalar_type();
  const int64_t L = hidden.size(0), N = hidden.size(1), D = hidden.size(2);
  check.tensor("hidden", hidden, dtype, {L, N, D}, any_layout);
  check.dim("weight", weight, {2, 3});
  const int64_t C = weight.size(-2);
  check.tensor("weight", weight, dtype, weight.dim() == 3 ? std::vector<int64_t>{L, C, D} : std::vector<int64_t>{C, D},
               any_layout);
  if (bias.has_value() && bias->defined()) {
    check.dim("bias", *bias, {1, 2});
    check.tensor("bias", *bias, dtype, bias->dim() == 2 ? std::vector<int64_t>{L, C} : std::vector<int64_t>{C},
                 any_layout);
  }
  return C;
}

}  // namespace udn
