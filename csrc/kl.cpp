// Fused KL terms of the stochastic layers (ops/kl.py; formulas in docs/stochastic_linear.md, "KL"):
// the forward is one pass reading the parameters and returning the sum, the backward one pass
// writing the gradients; no weight-sized intermediate either way, and with sigma_softplus the
// standard deviations softplus(rho) exist only in registers.
//
// Sums are taken per fixed-size chunk (vector lanes, then the lanes in order, in double) and the
// chunk partials added in chunk order, so the value does not depend on the thread count.
//
// 16-bit parameters (bfloat16, float16) are widened one chunk at a time and run through the float32
// kernel (over_float_chunks): the sum is float32 (what the ops return for 16-bit inputs) and the
// gradients are rounded into the parameters' dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"
#include "stochastic_common.h"
#include "vec_softplus.h"

namespace udn_kl {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
template <typename T>
using Vec = at::vec::Vectorized<T>;
using udn_stochastic::check_storage_dtype;
using udn_stochastic::exp_neg_abs;
using udn_stochastic::is_half;
using udn_stochastic::sigmoid_from;
using udn_stochastic::softplus_from;

constexpr int64_t kChunk = 1 << 14;  // elements per partial sum (and per parallel task)

// Molchanov et al. 2017, eq. (14) (the constants of reference/kl.py).
constexpr double K1 = 0.63576, K2 = 1.87320, K3 = 1.48695;

// sum over [0, numel) of term(i, m) (a vector of elements i .. i + m; lanes >= m are dropped here),
// in chunks whose partials are added in chunk order. term may also store per-element outputs.
// Within a chunk the lanes accumulate in T over kBlock elements, then in double.
template <typename T, typename Term>
double chunked_sum(int64_t numel, Term term) {
  constexpr int64_t kBlock = 256;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(numel, (c + 1) * kChunk);
      double sum = 0;
      for (int64_t block = c * kChunk; block < end; block += kBlock) {
        const int64_t block_end = std::min(end, block + kBlock);
        Vec<T> acc(0);
        for (int64_t i = block; i < block_end; i += Vec<T>::size()) {
          const int64_t m = std::min<int64_t>(Vec<T>::size(), block_end - i);
          acc = acc + Vec<T>::set(Vec<T>(0), term(i, m), m);
        }
        T lanes[Vec<T>::size()];
        acc.store(lanes);
        for (T lane : lanes) sum += lane;
      }
      partial[c] = sum;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// The 16-bit path: f(begin, n) runs the float32 kernel on elements begin .. begin + n, widened (one
// kChunk-element chunk per call, so the copies are chunk-sized), and returns the chunk's partial sum;
// the partials are added in chunk order, as chunked_sum does.
template <typename F>
double over_float_chunks(int64_t numel, F f) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // Workers do not inherit the dispatch-key TLS: keep their tensor ops below autograd.
    const at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t c = c0; c < c1; ++c) partial[c] = f(c * kChunk, std::min(kChunk, numel - c * kChunk));
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// Elements begin .. begin + n of t, widened to float32.
Tensor float_chunk(const Tensor& t, int64_t begin, int64_t n) { return t.view(-1).narrow(0, begin, n).to(at::kFloat); }

// Writes a float32 chunk result into elements begin .. of the 16-bit output.
void store_chunk(const Tensor& out, int64_t begin, const Tensor& chunk) {
  out.view(-1).narrow(0, begin, chunk.numel()).copy_(chunk);
}

// The posterior and prior of gaussian_kl at one vector: sigma (softplus of rho with sigma_softplus),
// t = exp(-|rho|) for the softplus derivative, the second moment sigma^2 + mu^2, and the prior std.
template <typename T>
struct GaussianArgs {
  const T* mu;        // nullptr: zero-mean posterior
  const T* sigma;     // sigma, or rho with softplus
  const T* prior;     // per-element prior std, or nullptr for the scalar one
  T prior_scalar;
  bool softplus;

  struct At {
    Vec<T> raw, t, sigma, mu, second_moment, prior;
  };

  C10_ALWAYS_INLINE At at(int64_t i, int64_t m) const {
    At a;
    a.raw = Vec<T>::loadu(sigma + i, m);
    a.t = softplus ? exp_neg_abs(a.raw) : Vec<T>(0);
    a.sigma = softplus ? softplus_from(a.raw, a.t) : a.raw;
    a.mu = mu ? Vec<T>::loadu(mu + i, m) : Vec<T>(0);
    a.second_moment = mu ? at::vec::fmadd(a.mu, a.mu, a.sigma * a.sigma) : a.sigma * a.sigma;
    a.prior = prior ? Vec<T>::loadu(prior + i, m) : Vec<T>(prior_scalar);
    return a;
  }
};

// prior_std: one element (a scalar prior) or sigma's shape. Returns the args of the kernels.
template <typename T>
GaussianArgs<T> gaussian_args(const OptTensor& mu, const Tensor& sigma, const Tensor& prior_std, bool softplus) {
  const bool scalar_prior = prior_std.numel() == 1;
  return {mu.has_value() && mu->defined() ? mu->data_ptr<T>() : nullptr, sigma.data_ptr<T>(),
          scalar_prior ? nullptr : prior_std.data_ptr<T>(),
          scalar_prior ? prior_std.item<T>() : T(0), softplus};
}

void check_gaussian(const udn::ArgChecks& check, const OptTensor& mu, const Tensor& sigma, const Tensor& prior_std) {
  check_storage_dtype(check, "sigma", sigma);
  check.tensor("sigma", sigma, sigma.scalar_type(), sigma.sizes());
  check.optional("mu", mu, sigma.scalar_type(), sigma.sizes());
  check.tensor("prior_std", prior_std, sigma.scalar_type(),
               prior_std.numel() == 1 ? prior_std.sizes() : sigma.sizes());
}

Tensor gaussian_kl_fwd(const OptTensor& mu, const Tensor& sigma, const Tensor& prior_std, bool sigma_softplus) {
  check_gaussian({"gaussian_kl_fwd"}, mu, sigma, prior_std);
  if (is_half(sigma)) {
    const bool scalar_prior = prior_std.numel() == 1, has_mu = mu.has_value() && mu->defined();
    const Tensor prior_wide = scalar_prior ? prior_std.to(at::kFloat) : Tensor();
    const double total = over_float_chunks(sigma.numel(), [&](int64_t i, int64_t n) {
      return gaussian_kl_fwd(has_mu ? OptTensor(float_chunk(*mu, i, n)) : OptTensor(), float_chunk(sigma, i, n),
                             scalar_prior ? prior_wide : float_chunk(prior_std, i, n), sigma_softplus)
          .item<double>();
    });
    return at::scalar_tensor(total, sigma.options().dtype(at::kFloat));
  }
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "gaussian_kl_fwd", [&] {
    using V = Vec<scalar_t>;
    const auto args = gaussian_args<scalar_t>(mu, sigma, prior_std, sigma_softplus);
    const int64_t n = sigma.numel();
    if (args.prior == nullptr) {
      // 0.5 (log p^2 - log s^2 + (s^2 + m^2) / p^2 - 1): the constant part once, one log per element.
      const scalar_t half_inv_var = scalar_t(0.5) / (args.prior_scalar * args.prior_scalar);
      total = chunked_sum<scalar_t>(n, [&](int64_t i, int64_t m) {
        const auto a = args.at(i, m);
        return at::vec::fmsub(a.second_moment, V(half_inv_var), a.sigma.log());
      });
      total += static_cast<double>(n) * (std::log(static_cast<double>(args.prior_scalar)) - 0.5);
    } else {
      total = chunked_sum<scalar_t>(n, [&](int64_t i, int64_t m) {
        const auto a = args.at(i, m);
        const V ratio = a.second_moment / (a.prior * a.prior);
        return at::vec::fmadd(ratio, V(0.5), (a.prior / a.sigma).log()) - V(0.5);
      });
    }
  });
  return at::scalar_tensor(total, sigma.options());
}

// (d_mu, d_sigma, d_prior_std) of grad * gaussian_kl; the ones grad_mask leaves out are empty.
// d_sigma is d_rho with sigma_softplus; a scalar prior gets a summed one-element d_prior_std.
std::tuple<Tensor, Tensor, Tensor> gaussian_kl_bwd(const Tensor& grad, const OptTensor& mu, const Tensor& sigma,
                                                   const Tensor& prior_std, bool sigma_softplus,
                                                   std::array<bool, 3> grad_mask) {
  const udn::ArgChecks check{"gaussian_kl_bwd"};
  check_gaussian(check, mu, sigma, prior_std);
  check.tensor("grad", grad, at::toOpMathType(sigma.scalar_type()), {}, true);
  const bool want_mu = grad_mask[0] && mu.has_value() && mu->defined(), want_sigma = grad_mask[1],
             want_prior = grad_mask[2];
  const bool scalar_prior = prior_std.numel() == 1;
  Tensor d_mu = want_mu ? at::empty_like(sigma) : sigma.new_empty(0);
  Tensor d_sigma = want_sigma ? at::empty_like(sigma) : sigma.new_empty(0);
  Tensor d_prior = want_prior && !scalar_prior ? at::empty_like(sigma) : sigma.new_empty(0);
  if (!want_mu && !want_sigma && !want_prior) return {d_mu, d_sigma, d_prior};
  if (is_half(sigma)) {
    const bool has_mu = mu.has_value() && mu->defined();  // d_prior_std needs mu even when d_mu is not wanted
    const Tensor prior_wide = scalar_prior ? prior_std.to(at::kFloat) : Tensor();
    const double prior_sum = over_float_chunks(sigma.numel(), [&](int64_t i, int64_t n) {
      const auto [dm, ds, dp] = gaussian_kl_bwd(grad, has_mu ? OptTensor(float_chunk(*mu, i, n)) : OptTensor(),
                                                float_chunk(sigma, i, n),
                                                scalar_prior ? prior_wide : float_chunk(prior_std, i, n),
                                                sigma_softplus, {want_mu, want_sigma, want_prior});
      if (want_mu) store_chunk(d_mu, i, dm);
      if (want_sigma) store_chunk(d_sigma, i, ds);
      if (want_prior && !scalar_prior) store_chunk(d_prior, i, dp);
      return want_prior && scalar_prior ? dp.item<double>() : 0.0;
    });
    if (want_prior && scalar_prior) d_prior = at::scalar_tensor(prior_sum, sigma.options()).view(prior_std.sizes());
    return {d_mu, d_sigma, d_prior};
  }
  AT_DISPATCH_FLOATING_TYPES(sigma.scalar_type(), "gaussian_kl_bwd", [&] {
    using V = Vec<scalar_t>;
    const auto args = gaussian_args<scalar_t>(mu, sigma, prior_std, sigma_softplus);
    const scalar_t g = grad.item<scalar_t>();
    scalar_t* dm = want_mu ? d_mu.data_ptr<scalar_t>() : nullptr;
    scalar_t* ds = want_sigma ? d_sigma.data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = d_prior.numel() ? d_prior.data_ptr<scalar_t>() : nullptr;
    // d/d mu = mu / p^2, d/d sigma = sigma / p^2 - 1 / sigma (times sigmoid(rho) for rho),
    // d/d p = 1 / p - (s^2 + m^2) / p^3; a scalar prior sums the last (the returned sum).
    const double prior_sum = chunked_sum<scalar_t>(sigma.numel(), [&](int64_t i, int64_t m) {
      const auto a = args.at(i, m);
      const V g_inv_var = V(g) / (a.prior * a.prior);
      if (dm) (g_inv_var * a.mu).store(dm + i, m);
      if (ds) {
        const V d = at::vec::fmsub(g_inv_var, a.sigma, V(g) / a.sigma);
        (sigma_softplus ? d * sigmoid_from(a.raw, a.t) : d).store(ds + i, m);
      }
      if (!want_prior) return V(0);
      const V d = (V(g) - g_inv_var * a.second_moment) / a.prior;
      if (dp) d.store(dp + i, m);
      return d;
    });
    if (want_prior && scalar_prior) d_prior = at::scalar_tensor(prior_sum, sigma.options()).view(prior_std.sizes());
  });
  return {d_mu, d_sigma, d_prior};
}

// log_alpha clamped to [lo, hi] (the layer's range, infinite for none), and where the clamp passes
// the gradient (torch.clamp's rule: lo <= log_alpha <= hi).
template <typename T>
struct Clamped {
  Vec<T> value, inside;
};

template <typename T>
C10_ALWAYS_INLINE Clamped<T> clamp_at(const T* log_alpha, int64_t i, int64_t m, T lo, T hi) {
  const Vec<T> raw = Vec<T>::loadu(log_alpha + i, m);
  return {at::vec::clamp(raw, Vec<T>(lo), Vec<T>(hi)), (raw >= Vec<T>(lo)) & (raw <= Vec<T>(hi))};
}

void check_log_uniform(const udn::ArgChecks& check, const Tensor& log_alpha, double lo, double hi) {
  check_storage_dtype(check, "log_alpha", log_alpha);
  check.tensor("log_alpha", log_alpha, log_alpha.scalar_type(), log_alpha.sizes());
  TORCH_CHECK(lo <= hi, check.op, ": clamp: expected min <= max, got [", lo, ", ", hi, "]");
}

// KL = K1 - K1 sigmoid(K2 + K3 la) + 0.5 softplus(-la), la = clamp(log_alpha, lo, hi).
Tensor log_uniform_kl_fwd(const Tensor& log_alpha, double lo, double hi) {
  check_log_uniform({"log_uniform_kl_fwd"}, log_alpha, lo, hi);
  if (is_half(log_alpha)) {
    const double total = over_float_chunks(log_alpha.numel(), [&](int64_t i, int64_t n) {
      return log_uniform_kl_fwd(float_chunk(log_alpha, i, n), lo, hi).item<double>();
    });
    return at::scalar_tensor(total, log_alpha.options().dtype(at::kFloat));
  }
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(log_alpha.scalar_type(), "log_uniform_kl_fwd", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* la = log_alpha.data_ptr<scalar_t>();
    total = chunked_sum<scalar_t>(log_alpha.numel(), [&](int64_t i, int64_t m) {
      const V x = clamp_at<scalar_t>(la, i, m, lo, hi).value, z = at::vec::fmadd(V(K3), x, V(K2));
      const V neg_x = V(0) - x;
      return at::vec::fmadd(V(0.5), softplus_from(neg_x, exp_neg_abs(x)),
                            V(-K1) * sigmoid_from(z, exp_neg_abs(z)));
    });
    total += static_cast<double>(log_alpha.numel()) * K1;
  });
  return at::scalar_tensor(total, log_alpha.options());
}

// d KL / d la = -K1 K3 s (1 - s) - 0.5 sigmoid(-la), s = sigmoid(K2 + K3 la); 0 where clamped.
Tensor log_uniform_kl_bwd(const Tensor& grad, const Tensor& log_alpha, double lo, double hi) {
  const udn::ArgChecks check{"log_uniform_kl_bwd"};
  check_log_uniform(check, log_alpha, lo, hi);
  check.tensor("grad", grad, at::toOpMathType(log_alpha.scalar_type()), {}, true);
  Tensor d_log_alpha = at::empty_like(log_alpha);
  if (is_half(log_alpha)) {
    over_float_chunks(log_alpha.numel(), [&](int64_t i, int64_t n) {
      store_chunk(d_log_alpha, i, log_uniform_kl_bwd(grad, float_chunk(log_alpha, i, n), lo, hi));
      return 0.0;
    });
    return d_log_alpha;
  }
  AT_DISPATCH_FLOATING_TYPES(log_alpha.scalar_type(), "log_uniform_kl_bwd", [&] {
    using V = Vec<scalar_t>;
    const scalar_t* la = log_alpha.data_ptr<scalar_t>();
    scalar_t* d = d_log_alpha.data_ptr<scalar_t>();
    const scalar_t g = grad.item<scalar_t>();
    chunked_sum<scalar_t>(log_alpha.numel(), [&](int64_t i, int64_t m) {
      const auto c = clamp_at<scalar_t>(la, i, m, lo, hi);
      const V z = at::vec::fmadd(V(K3), c.value, V(K2));
      const V s = sigmoid_from(z, exp_neg_abs(z)), neg_x = V(0) - c.value;
      const V dkl = at::vec::fmadd(V(-K1 * K3) * s, V(1) - s, V(-0.5) * sigmoid_from(neg_x, exp_neg_abs(neg_x)));
      (V(g) * dkl & c.inside).store(d + i, m);
      return V(0);
    });
  });
  return d_log_alpha;
}

}  // namespace
}  // namespace udn_kl

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("gaussian_kl_fwd(Tensor? mu, Tensor sigma, Tensor prior_std, bool sigma_softplus) -> Tensor");
  m.def("gaussian_kl_bwd(Tensor grad, Tensor? mu, Tensor sigma, Tensor prior_std, bool sigma_softplus, "
        "bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
  m.def("log_uniform_kl_fwd(Tensor log_alpha, float min, float max) -> Tensor");
  m.def("log_uniform_kl_bwd(Tensor grad, Tensor log_alpha, float min, float max) -> Tensor");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("gaussian_kl_fwd", &udn_kl::gaussian_kl_fwd);
  m.impl("gaussian_kl_bwd", &udn_kl::gaussian_kl_bwd);
  m.impl("log_uniform_kl_fwd", &udn_kl::log_uniform_kl_fwd);
  m.impl("log_uniform_kl_bwd", &udn_kl::log_uniform_kl_bwd);
}
