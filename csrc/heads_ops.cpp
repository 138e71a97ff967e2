// The depth_loglik ops of udn_kernels_C: argument checks (checks.h), output allocation and the
// choice of algorithm -- small_pass for C <= kSmallClasses (heads_small.cpp), else forward_impl
// (heads_forward.cpp), backward_impl (heads_backward.cpp), fused_impl (heads_fused.cpp).
#include <torch/library.h>

#include "checks.h"
#include "gemm_strategy.h"
#include "heads_common.h"

#include <array>
#include <cstdlib>
#include <string>
#include <tuple>

namespace {

using at::Tensor;
using namespace udn_heads;

// The small inputs (bias, noise_std, a Gaussian target) in the compute dtype: the kernels read them
// through T pointers. hidden and weight stay in their storage dtype (cast per tile).
c10::optional<Tensor> to_compute(const c10::optional<Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return t;
  return t->to(dtype);
}

// An op's bias, target and noise_std as the kernels read them (alive as long as the Heads pointing
// into them).
struct ComputeArgs {
  c10::optional<Tensor> bias, noise_std;
  Tensor target;
  ComputeArgs(const Tensor& hidden, const c10::optional<Tensor>& bias_, const Tensor& target_,
              const c10::optional<Tensor>& noise_std_, bool gaussian) {
    const auto dtype = compute_type(hidden);
    bias = to_compute(bias_, dtype), noise_std = to_compute(noise_std_, dtype);
    target = gaussian ? target_.to(dtype) : target_;
  }
};

// loglik [L, N] and aux (categorical logsumexp [L, N], with stats [2, L, N]: then the argmax hits;
// Gaussian empty), in the compute dtype.
std::tuple<Tensor, Tensor> forward_outputs(const Tensor& hidden, bool gaussian, bool stats) {
  const int64_t L = hidden.size(0), N = hidden.size(1);
  const auto options = hidden.options().dtype(compute_type(hidden));
  Tensor aux = gaussian ? at::empty({0}, options) : (stats ? at::empty({2, L, N}, options) : at::empty({L, N}, options));
  return {at::empty({L, N}, options), aux};
}

// The categorical loss options (docs/heads.md, "Loss options"); the op validates them with its
// message, these guard direct kernel calls. softcap 0 means none.
void check_loss_options(const char* op, bool gaussian, double label_smoothing, double lse_square_scale,
                        double softcap) {
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, op,
                    ": label_smoothing: expected a float in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(lse_square_scale >= 0 && std::isfinite(lse_square_scale), op,
                    ": lse_square_scale: expected a finite float >= 0, got ", lse_square_scale);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op,
                    ": softcap: expected 0 (none) or a positive finite float, got ", softcap);
  TORCH_CHECK_VALUE(!gaussian || (label_smoothing == 0 && lse_square_scale == 0 && softcap == 0), op,
                    ": label_smoothing, lse_square_scale, softcap: expected 0 with gaussian=True, got ",
                    label_smoothing, ", ", lse_square_scale, ", ", softcap);
}

template <typename T>
T* aux_ptr(Tensor& aux, bool gaussian) {
  return gaussian ? nullptr : aux.data_ptr<T>();
}

// Gradient outputs, uninitialised (every path writes all the wanted ones). grad_mask says which of
// (d_hidden, d_weight, d_bias, d_noise_std) are wanted: the others come back empty and are never
// computed (their GEMMs never issued); d_bias / d_noise are empty when the input is None.
// 16-bit storage: the kernels accumulate d_weight, d_bias, d_noise (and the small-C path's d_hidden)
// in float, and stored() casts them to the storage dtype; the class-tiled pass writes a 16-bit
// d_hidden itself, group by group from a float buffer.
struct GradTensors {
  Tensor d_hidden, d_weight, d_bias, d_noise;
  bool has_hidden, has_weight, has_bias, has_noise;
  at::ScalarType storage;
  GradTensors(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
              const c10::optional<Tensor>& noise_std, bool gaussian, std::array<bool, 4> grad_mask)
      : has_hidden(grad_mask[0]), has_weight(grad_mask[1]), storage(hidden.scalar_type()) {
    has_bias = grad_mask[2] && bias.has_value() && bias->defined();
    has_noise = grad_mask[3] && gaussian && noise_std.has_value() && noise_std->defined();
    const auto acc = hidden.options().dtype(compute_type(hidden));
    const bool small = weight.size(-2) <= kSmallClasses;
    const auto empty = [&] { return at::empty({0}, hidden.options()); };
    d_hidden = has_hidden ? at::empty(hidden.sizes(), small ? acc : hidden.options()) : empty();
    d_weight = has_weight ? at::empty(weight.sizes(), acc) : empty();
    d_bias = has_bias ? at::empty(bias->sizes(), acc) : empty();
    d_noise = has_noise ? at::empty(noise_std->sizes(), acc) : empty();
  }

  // The gradients in the storage dtype (a no-op for float32 / float64).
  std::tuple<Tensor, Tensor, Tensor, Tensor> stored() const {
    return {d_hidden.to(storage), d_weight.to(storage), d_bias.to(storage), d_noise.to(storage)};
  }

  bool any() const { return has_hidden || has_weight || has_bias || has_noise; }

  void zero() {  // no rows: nothing to write, zero gradients
    for (Tensor* t : {&d_weight, &d_bias, &d_noise}) t->zero_();
  }

  template <typename T>
  Gradients<T> sinks(int64_t rows, int64_t D) {
    return {has_hidden ? d_hidden.view({rows, D}) : Tensor(), has_weight ? d_weight : Tensor(),
            has_bias ? d_bias.data_ptr<T>() : nullptr, has_bias ? d_bias.numel() : 0,
            has_noise ? d_noise.data_ptr<T>() : nullptr, {}};
  }
};

using OptTensor = c10::optional<Tensor>;

// The arguments every depth_loglik op takes: hidden [L, N, D] float32/64; weight [C, D] or
// [L, C, D]; bias None, [C] or [L, C]; target int64 [N] (categorical) or [N, C] (Gaussian);
// noise_std None or [C] (Gaussian only; ignored otherwise). All CPU, contiguous, of hidden's dtype.
udn::ArgChecks check_heads_args(const char* op, const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                                const Tensor& target, const OptTensor& noise_std, bool gaussian) {
  const udn::ArgChecks check{op};
  const int64_t C = udn::check_heads_params(check, hidden, weight, bias, /*any_layout=*/false);
  const auto dtype = hidden.scalar_type();
  const int64_t N = hidden.size(1);
  if (gaussian) {
    check.tensor("target", target, dtype, {N, C});
    check.optional("noise_std", noise_std, dtype, {C});  // storage dtype; cast by the ops
  } else {
    check.tensor("target", target, at::kLong, {N});
  }
  return check;
}

std::tuple<Tensor, Tensor> depth_loglik_fwd(const Tensor& hidden, const Tensor& weight,
                                            const c10::optional<Tensor>& bias, const Tensor& target,
                                            const c10::optional<Tensor>& noise_std, bool gaussian,
                                            int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                            double softcap, bool stats) {
  check_heads_args("depth_loglik_fwd", hidden, weight, bias, target, noise_std, gaussian);
  check_loss_options("depth_loglik_fwd", gaussian, label_smoothing, lse_square_scale, softcap);
  auto [loglik, aux] = forward_outputs(hidden, gaussian, stats);
  const ComputeArgs a(hidden, bias, target, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(compute_type(hidden), "depth_loglik_fwd", [&] {
    Heads<scalar_t> p(hidden, weight, a.bias, a.target, a.noise_std, gaussian, ignore_index);
    p.set_loss_options(label_smoothing, lse_square_scale, softcap, stats && !gaussian);
    if (p.rows == 0) return;
    if (p.class_major)
      small_pass<scalar_t>(p, loglik.data_ptr<scalar_t>(), aux_ptr<scalar_t>(aux, gaussian), nullptr, nullptr);
    else
      forward_impl<scalar_t>(p, loglik.data_ptr<scalar_t>(), aux_ptr<scalar_t>(aux, gaussian));
  });
  return {loglik, aux};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> depth_loglik_bwd(
    const Tensor& grad_loglik, const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
    const Tensor& target, const c10::optional<Tensor>& noise_std, const Tensor& aux, bool gaussian,
    int64_t ignore_index, std::array<bool, 4> grad_mask, double label_smoothing, double lse_square_scale,
    double softcap) {
  const auto check = check_heads_args("depth_loglik_bwd", hidden, weight, bias, target, noise_std, gaussian);
  check_loss_options("depth_loglik_bwd", gaussian, label_smoothing, lse_square_scale, softcap);
  const at::IntArrayRef L_N = hidden.sizes().slice(0, 2);
  check.tensor("grad_loglik", grad_loglik, compute_type(hidden), L_N);
  if (!gaussian) check.tensor("aux", aux, compute_type(hidden), L_N);  // the forward's logsumexp
  GradTensors g(hidden, weight, bias, noise_std, gaussian, grad_mask);
  const ComputeArgs a(hidden, bias, target, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(compute_type(hidden), "depth_loglik_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, a.bias, a.target, a.noise_std, gaussian, ignore_index);
    p.set_loss_options(label_smoothing, lse_square_scale, softcap, false);
    if (p.rows == 0) return g.zero();
    if (!g.any()) return;
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    scalar_t* lse = gaussian ? nullptr : aux.data_ptr<scalar_t>();
    if (p.class_major)
      small_pass<scalar_t>(p, nullptr, lse, grad_loglik.data_ptr<scalar_t>(), &out);
    else
      backward_impl<scalar_t>(p, grad_loglik.data_ptr<scalar_t>(), lse, out);
  });
  return g.stored();
}

// depth_loglik_fwd and depth_loglik_bwd(grad_loglik, ...) in one pass (see fused_impl).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> depth_loglik_fwd_bwd(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& noise_std, const Tensor& grad_loglik, bool gaussian, int64_t ignore_index,
    std::array<bool, 4> grad_mask, double label_smoothing, double lse_square_scale, double softcap, bool stats) {
  const auto check = check_heads_args("depth_loglik_fwd_bwd", hidden, weight, bias, target, noise_std, gaussian);
  check.tensor("grad_loglik", grad_loglik, compute_type(hidden), hidden.sizes().slice(0, 2));
  check_loss_options("depth_loglik_fwd_bwd", gaussian, label_smoothing, lse_square_scale, softcap);
  auto [loglik, aux] = forward_outputs(hidden, gaussian, stats);
  GradTensors g(hidden, weight, bias, noise_std, gaussian, grad_mask);
  const ComputeArgs a(hidden, bias, target, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(compute_type(hidden), "depth_loglik_fwd_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, a.bias, a.target, a.noise_std, gaussian, ignore_index);
    p.set_loss_options(label_smoothing, lse_square_scale, softcap, stats && !gaussian);
    if (p.rows == 0) return g.zero();
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    fused_impl<scalar_t>(p, grad_loglik.data_ptr<scalar_t>(), loglik.data_ptr<scalar_t>(),
                         aux_ptr<scalar_t>(aux, gaussian), out);
  });
  auto [d_hidden, d_weight, d_bias, d_noise] = g.stored();
  return {loglik, aux, d_hidden, d_weight, d_bias, d_noise};
}

// Mixture-mode NLL (see Mixture) and its head gradients in one pass (fused_impl): the logits of
// every depth of a range of samples are kept until their gradient is known: 3 GEMMs.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> depth_loglik_mixture_fwd_bwd(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& noise_std, const Tensor& log_weights, const Tensor& row_scale, bool gaussian,
    int64_t ignore_index, std::array<bool, 4> grad_mask, double label_smoothing, double lse_square_scale,
    double softcap, bool stats) {
  const auto check =
      check_heads_args("depth_loglik_mixture_fwd_bwd", hidden, weight, bias, target, noise_std, gaussian);
  check.tensor("log_weights", log_weights, compute_type(hidden), {hidden.size(0)});
  check.tensor("row_scale", row_scale, compute_type(hidden), {hidden.size(1)});
  check_loss_options("depth_loglik_mixture_fwd_bwd", gaussian, label_smoothing, lse_square_scale, softcap);
  auto [loglik, aux] = forward_outputs(hidden, gaussian, stats);
  GradTensors g(hidden, weight, bias, noise_std, gaussian, grad_mask);
  const ComputeArgs a(hidden, bias, target, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(compute_type(hidden), "depth_loglik_mixture_fwd_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, a.bias, a.target, a.noise_std, gaussian, ignore_index);
    p.set_loss_options(label_smoothing, lse_square_scale, softcap, stats && !gaussian);
    if (p.rows == 0) return g.zero();
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    const Mixture<scalar_t> mix{log_weights.data_ptr<scalar_t>(), row_scale.data_ptr<scalar_t>()};
    scalar_t* ll = loglik.data_ptr<scalar_t>();
    scalar_t* lse = aux_ptr<scalar_t>(aux, gaussian);
    fused_impl<scalar_t>(p, nullptr, ll, lse, out, &mix);
  });
  auto [d_hidden, d_weight, d_bias, d_noise] = g.stored();
  return {loglik, aux, d_hidden, d_weight, d_bias, d_noise};
}

}  // namespace

namespace udn_heads {

HalfGemm half_gemm(at::ScalarType storage) {
  return native_half_gemm(storage) ? HalfGemm::native : HalfGemm::upcast;
}

std::string half_gemm_info() {
  const auto name = [](HalfGemm g) { return g == HalfGemm::native ? "native" : "upcast"; };
  return std::string("bfloat16:") + name(half_gemm(at::kBFloat16)) + ",float16:" + name(half_gemm(at::kHalf));
}

}  // namespace udn_heads

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("depth_loglik_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "bool gaussian, int ignore_index, float label_smoothing=0., float lse_square_scale=0., float softcap=0., "
        "bool stats=False) -> (Tensor, Tensor)");
  m.def("depth_loglik_bwd(Tensor grad_loglik, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? noise_std, Tensor aux, bool gaussian, int ignore_index, bool[4] grad_mask, "
        "float label_smoothing=0., float lse_square_scale=0., float softcap=0.) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("depth_loglik_fwd_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "Tensor grad_loglik, bool gaussian, int ignore_index, bool[4] grad_mask, float label_smoothing=0., "
        "float lse_square_scale=0., float softcap=0., bool stats=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("depth_loglik_mixture_fwd_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "Tensor log_weights, Tensor row_scale, bool gaussian, int ignore_index, bool[4] grad_mask, "
        "float label_smoothing=0., float lse_square_scale=0., float softcap=0., bool stats=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("depth_loglik_fwd", &depth_loglik_fwd);
  m.impl("depth_loglik_bwd", &depth_loglik_bwd);
  m.impl("depth_loglik_fwd_bwd", &depth_loglik_fwd_bwd);
  m.impl("depth_loglik_mixture_fwd_bwd", &depth_loglik_mixture_fwd_bwd);
}
