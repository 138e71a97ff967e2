// gaussian_linear on CPU: linear layers with mean-field Gaussian weights W = mu + sigma * eps.
// "sample" and "flipout" run the noisy-weight tile engine (noisy_weight.cpp); flipout adds its mean
// part x mu^T separately and sign-flips the input and output of the noisy part. "local" (local
// reparameterisation) samples the pre-activations: mean x mu^T, std sqrt(x^2 sigma^2^T (+ bias
// sigma^2)), one output-sized noise draw. With sigma_softplus the sigma arguments hold rho.
// 16-bit storage: the tile engine widens the weights per noise chunk and runs float32 GEMMs on x, the
// output and grad_out widened to float32 (input- and output-sized, rounded back at the end); local and
// the mean parts x mu^T run ATen's 16-bit GEMMs (float32 accumulation inside), as F.linear does.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <array>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "stochastic_common.h"

namespace {

using namespace udn_stochastic;

// Stream elements offset .. offset + numel as a tensor of `options` (input/output-sized noise).
Tensor noise_tensor(const Noise& noise, at::IntArrayRef shape, int64_t offset, const at::TensorOptions& options) {
  Tensor out = at::empty(shape, options);
  UDN_DISPATCH_FLOATS(out.scalar_type(), "noise_tensor", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kFillGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      noise.fill_as(data + begin, end - begin, offset + begin, scratch);
    });
  });
  return out;
}

// Per-draw bias [S, N] in opt's dtype: bias_mu + bias_sigma * eps_s (eps at S*N*K + s*N + n); undefined if
// no bias.
Tensor sampled_bias(const Tensor* bias_mu, const Tensor* bias_sigma, uint64_t seed, int64_t S, int64_t N,
                    int64_t K, const at::TensorOptions& opt) {
  if (!bias_mu && !bias_sigma) return Tensor();
  Tensor bias = bias_mu ? bias_mu->to(opt).expand({S, N}) : at::zeros({S, N}, opt);
  if (bias_sigma) bias = bias + bias_sigma->to(opt) * noise_tensor({Noise::kNormal, seed}, {S, N}, S * N * K, opt);
  return bias.contiguous();
}

struct Flipout {
  int64_t in_offset, out_offset;  // stream offsets of sign_in (0,0,0) and sign_out (0,0,0)
};

Flipout flipout_offsets(int64_t S, int64_t B, int64_t N, int64_t K) {
  const int64_t in_offset = S * N * K + S * N;
  return {in_offset, in_offset + S * B * K};
}

// Contiguous [Sx, B, M] viewed as the matrix [Sx*B, M] (explicit sizes: -1 is ambiguous when M is 0).
Tensor rows_of(const Tensor& t) { return t.view({t.size(0) * t.size(1), t.size(2)}); }

// [S, B, K] x times the matrix w [K, N] as [S, B, N]: one GEMM over the stacked rows, in float32
// tiles for 16-bit storage without native 16-bit GEMMs (gemm_strategy.h).
Tensor rows_times(const Tensor& x, const Tensor& w) {
  const Tensor x2 = x.reshape({x.size(0) * x.size(1), x.size(2)});
  return udn_gemm::mm(x2, w).view({x.size(0), x.size(1), w.size(1)});
}

// The mean part x mu^T of local and flipout: [Sx, B, N].
Tensor mean_product(const Tensor& x, const Tensor& mu) { return rows_times(x, mu.t()); }

// Gradients of the mean part x mu^T (local, flipout; sample's d_mu when sigma is frozen): d_x [Sx, B, K]
// += g mu (when d_x is given) and d_mu = g^T x (when d_mu is given), with g summed over the draws first
// when x is shared (one GEMM each instead of one per draw).
void add_mean_part_grads(const Tensor& g, const Tensor& x, const Tensor& mu, Tensor* d_x, Tensor* d_mu) {
  const Tensor g_mean = rows_of(sum_draws_if_shared(g, x.size(0)));
  if (d_x) udn_gemm::matmul_out(rows_of(*d_x), g_mean, mu, Tensor(), /*accumulate=*/true);
  if (d_mu) *d_mu = udn_gemm::mm(g_mean.t(), rows_of(x));
}

// With sigma_softplus the sigma arguments hold rho and the standard deviations are softplus(rho):
// the weight-noise tiles compute it in their noise pass; the [N] bias and local's variance operand
// (a weight-sized GEMM input either way) take ATen's softplus, and their gradients its sigmoid.
Tensor std_from(const Tensor& sigma, bool sigma_softplus) { return sigma_softplus ? at::softplus(sigma) : sigma; }

// d sigma -> d rho in place when the sigma argument held rho.
void chain_softplus(Tensor& d_sigma, const Tensor& rho, bool sigma_softplus) {
  if (sigma_softplus) d_sigma.mul_(at::sigmoid(rho));
}

// The Gaussian weight draws of sample / flipout (flipout passes mu = nullptr: its mean part is
// separate). With sigma_softplus one draw computes softplus in its noise pass; several take
// softplus(rho) once up front (transient, freed on return) instead of once per draw, and their
// backward chains d sigma afterwards.
NoisyWeight gaussian_draws(const Tensor* mu, const Tensor& weight_sigma, uint64_t seed, int64_t S,
                           bool sigma_softplus) {
  const bool in_noise_pass = sigma_softplus && S == 1;
  return {mu, in_noise_pass ? weight_sigma : std_from(weight_sigma, sigma_softplus), {Noise::kNormal, seed}, S,
          in_noise_pass};
}

// x [Sx, B, K] (Sx = S with x_sampled, else 1), weight_sigma [N, K]; weight_mu, bias_mu, bias_sigma
// None or [N, K], [N], [N]. All CPU, contiguous, of x's float dtype. Returns N.
int64_t check_gaussian_args(const udn::ArgChecks& check, const Tensor& x, const OptTensor& weight_mu,
                            const Tensor& weight_sigma, const OptTensor& bias_mu, const OptTensor& bias_sigma,
                            c10::string_view estimator, int64_t S, bool x_sampled) {
  const int64_t N = check_input_and_weight(check, x, S, x_sampled, "weight_sigma", weight_sigma);
  const auto dtype = x.scalar_type();
  check.optional("weight_mu", weight_mu, dtype, {N, x.size(2)});
  check.optional("bias_mu", bias_mu, dtype, {N});
  check.optional("bias_sigma", bias_sigma, dtype, {N});
  TORCH_CHECK(estimator == "sample" || estimator == "local" || estimator == "flipout", check.op,
              ": estimator: expected 'sample', 'local' or 'flipout', got '", estimator, "'");
  return N;
}

// (out [S, B, N], std): std is local's output standard deviation [Sx, B, N], which backward takes
// instead of recomputing the variance GEMM (empty for sample / flipout).
std::tuple<Tensor, Tensor> gaussian_linear_fwd(const Tensor& x, const OptTensor& weight_mu_opt,
                                               const Tensor& weight_sigma, const OptTensor& bias_mu_opt,
                                               const OptTensor& bias_sigma_opt, int64_t seed_in,
                                               c10::string_view estimator, int64_t S, bool x_sampled,
                                               bool sigma_softplus) {
  check_gaussian_args({"gaussian_linear_fwd"}, x, weight_mu_opt, weight_sigma, bias_mu_opt, bias_sigma_opt, estimator,
                      S, x_sampled);
  const Tensor* mu = ptr_or_null(weight_mu_opt);
  const Tensor* bias_mu = ptr_or_null(bias_mu_opt);
  const Tensor* bias_rho = ptr_or_null(bias_sigma_opt);  // the bias sigma argument (rho with sigma_softplus)
  const Tensor bias_std = bias_rho ? std_from(*bias_rho, sigma_softplus) : Tensor();
  const Tensor* bias_sigma = bias_rho ? &bias_std : nullptr;
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t B = x.size(1), K = x.size(2), N = weight_sigma.size(0);
  const auto opt = x.options();
  Tensor out = at::empty({S, B, N}, opt);
  if (estimator == "local") {
    // var [Sx, B, N] (+ bias_sigma^2), made the std in place: the forward's one output-sized aux.
    Tensor sd = rows_times(x * x, std_from(weight_sigma, sigma_softplus).square().t());
    if (bias_sigma) sd.add_(bias_sigma->square());
    sd.sqrt_();
    Tensor mean = mu ? mean_product(x, *mu) : Tensor();
    UDN_DISPATCH_FLOATS(x.scalar_type(), "gaussian_linear_fwd_local", [&] {
      const scalar_t* sdp = sd.data_ptr<scalar_t>();
      const scalar_t* m = mu ? mean.data_ptr<scalar_t>() : nullptr;
      const scalar_t* bm = bias_mu ? bias_mu->data_ptr<scalar_t>() : nullptr;
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t Sx = x.size(0);
      at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t xrow = Sx == 1 ? row % B : row;
          scalar_t* orow = o + row * N;
          Noise{Noise::kNormal, seed}.fill_as(orow, N, row * N, scratch);  // eps (s, b, :)
          at::vec::map2<scalar_t>([](Vec<scalar_t> e, Vec<scalar_t> c) { return e * c; }, orow, orow,
                                  sdp + xrow * N, N);
          if (m) at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> c) { return a + c; }, orow, orow, m + xrow * N, N);
          if (bm) at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> c) { return a + c; }, orow, orow, bm, N);
        }
      });
    });
    return {out, sd};
  }
  // The engine's x, output and bias are in the compute dtype (float32 for 16-bit storage).
  const auto acc = opt.dtype(acc_dtype(x));
  const Tensor bias = sampled_bias(bias_mu, bias_sigma, seed, S, N, K, acc);
  const bool flipout = estimator == "flipout";
  const Flipout fo = flipout_offsets(S, B, N, K);
  Tensor xe = x.to(acc_dtype(x)), out_acc = acc_dtype(x) != x.scalar_type() ? at::empty({S, B, N}, acc) : out;
  if (flipout) {
    // out starts as the mean part; x * sign_in feeds the noisy part.
    if (mu) out_acc.copy_(mean_product(x, *mu).expand({S, B, N})); else out_acc.zero_();
    xe = noise_tensor({Noise::kSign, seed}, {S, B, K}, fo.in_offset, acc).mul_(xe);
  }
  const NoisyWeight nw = gaussian_draws(flipout ? nullptr : mu, weight_sigma, seed, S, sigma_softplus);
  const Noise flip{Noise::kSign, seed};
  UDN_DISPATCH_FLOATS(x.scalar_type(), "gaussian_linear_fwd", [&] {
    noisy_weight_forward<scalar_t>(xe, nw, out_acc, bias, flipout ? &flip : nullptr, fo.out_offset);
  });
  if (acc_dtype(x) != x.scalar_type()) out.copy_(out_acc);
  return {out, x.new_empty({0})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gaussian_linear_bwd(
    const Tensor& grad_out, const Tensor& x, const OptTensor& weight_mu_opt, const Tensor& weight_sigma,
    const OptTensor& bias_mu_opt, const OptTensor& bias_sigma_opt, const Tensor& std_in, int64_t seed_in,
    c10::string_view estimator, int64_t S, bool x_sampled, bool sigma_softplus, std::array<bool, 5> grad_mask) {
  const udn::ArgChecks check{"gaussian_linear_bwd"};
  const int64_t N_out = check_gaussian_args(check, x, weight_mu_opt, weight_sigma, bias_mu_opt, bias_sigma_opt,
                                            estimator, S, x_sampled);
  check.tensor("grad_out", grad_out, x.scalar_type(), {S, x.size(1), N_out}, /*any_layout=*/true);
  if (estimator == "local")  // the forward's output std
    check.tensor("std", std_in, x.scalar_type(), {x.size(0), x.size(1), N_out}, /*any_layout=*/true);
  const Tensor* mu = ptr_or_null(weight_mu_opt);
  const Tensor* bias_mu = ptr_or_null(bias_mu_opt);
  const Tensor* bias_rho = ptr_or_null(bias_sigma_opt);  // the bias sigma argument (rho with sigma_softplus)
  // The gradients asked for (grad_mask: x, weight_mu, weight_sigma, bias_mu, bias_sigma); the others
  // are returned empty and their GEMMs and noise passes never run.
  const bool want_x = grad_mask[0], want_mu = grad_mask[1] && mu, want_sigma = grad_mask[2];
  const bool want_bias_mu = grad_mask[3] && bias_mu, want_bias_sigma = grad_mask[4] && bias_rho;
  const Tensor bias_std = want_bias_sigma ? std_from(*bias_rho, sigma_softplus) : Tensor();
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t Sx = x.size(0), B = x.size(1), K = x.size(2), N = weight_sigma.size(0);
  const auto opt = x.options();
  const Tensor g = grad_out.contiguous();
  Tensor d_x = x.new_empty({0}), d_mu = x.new_empty({0}), d_sigma = x.new_empty({0});
  const Tensor d_bias_mu = want_bias_mu ? g.sum({0, 1}) : x.new_empty({0});
  Tensor d_bias_sigma = x.new_empty({0});
  if (estimator == "local") {
    if (want_x || want_sigma || want_bias_sigma) {
      const Tensor sd = std_in.contiguous();
      // 2 dL/dvar per draw = g * eps / std (0 where std == 0): the 2 cancels the 2 of d(x^2) and d(sigma^2).
      Tensor d_var = at::empty({S, B, N}, opt);
      UDN_DISPATCH_FLOATS(x.scalar_type(), "gaussian_linear_bwd_local", [&] {
        const scalar_t* sdp = sd.data_ptr<scalar_t>();
        const scalar_t* gp = g.data_ptr<scalar_t>();
        scalar_t* dv = d_var.data_ptr<scalar_t>();
        at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch;
          for (int64_t row = begin; row < end; ++row) {
            const scalar_t* srow = sdp + (Sx == 1 ? row % B : row) * N;
            scalar_t* drow = dv + row * N;
            Noise{Noise::kNormal, seed}.fill_as(drow, N, row * N, scratch);
            using V = Vec<scalar_t>;
            const scalar_t* grow = gp + row * N;
            int64_t n = 0;
            for (; n + V::size() <= N; n += V::size()) {
              const V std_n = V::loadu(srow + n);
              const V value = V::loadu(grow + n) * V::loadu(drow + n) / std_n;
              V::blendv(V(0), value, std_n > V(0)).store(drow + n);
            }
            for (; n < N; ++n) drow[n] = srow[n] > 0 ? grow[n] * drow[n] / srow[n] : scalar_t(0);
          }
        });
      });
      const Tensor d_var_x = sum_draws_if_shared(d_var, Sx);  // [Sx, B, N]
      const Tensor sigma = want_x || want_sigma ? std_from(weight_sigma, sigma_softplus) : Tensor();
      if (want_x) d_x = rows_times(d_var_x, sigma.square()).mul_(x);
      if (want_sigma) {
        d_sigma = udn_gemm::mm(rows_of(d_var_x).t(), rows_of(x * x)).mul_(sigma);
        chain_softplus(d_sigma, weight_sigma, sigma_softplus);
      }
      if (want_bias_sigma) {
        d_bias_sigma = d_var.sum({0, 1}).mul_(bias_std);
        chain_softplus(d_bias_sigma, *bias_rho, sigma_softplus);
      }
    }
    if (mu && (want_x || want_mu)) add_mean_part_grads(g, x, *mu, want_x ? &d_x : nullptr, want_mu ? &d_mu : nullptr);
    return {d_x, d_mu, d_sigma, d_bias_mu, d_bias_sigma};
  }
  const bool flipout = estimator == "flipout";
  if (want_bias_sigma) {
    const Tensor beps = noise_tensor({Noise::kNormal, seed}, {S, N}, S * N * K, opt);
    d_bias_sigma = (g.sum(1) * beps).sum(0);
    chain_softplus(d_bias_sigma, *bias_rho, sigma_softplus);
  }
  // sample: d_mu = sum_s G_s comes with d_sigma's G_s = g_s^T x_s from the tile engine; alone (sigma
  // frozen) it is the mean part's one GEMM. flipout's d_mu is always the mean part's.
  const bool mu_in_engine = !flipout && want_mu && want_sigma;
  const NoisyGrads want{want_x, mu_in_engine, want_sigma};
  Tensor d_xe, d_a, d_s;
  if (want.x || want.b) {
    const NoisyWeight nw = gaussian_draws(flipout ? nullptr : mu, weight_sigma, seed, S, sigma_softplus);
    // The engine's x, grad_out and d_x are in the compute dtype (float32 for 16-bit storage).
    const auto acc = opt.dtype(acc_dtype(x));
    const Tensor x_acc = x.to(acc_dtype(x)), g_acc = g.to(acc_dtype(x));
    if (!flipout) {
      UDN_DISPATCH_FLOATS(x.scalar_type(), "gaussian_linear_bwd", [&] {
        noisy_weight_backward<scalar_t>(x_acc, g_acc, nw, want, d_xe, d_a, d_s);
      });
      if (want_x) d_x = d_xe.to(x.scalar_type());
    } else {
      const Flipout fo = flipout_offsets(S, B, N, K);
      const Tensor sign_in = noise_tensor({Noise::kSign, seed}, {S, B, K}, fo.in_offset, acc);
      // x * sign_in feeds only d_sigma's G GEMMs; d_x alone needs just its [S, B, K] shape.
      const Tensor xe = want_sigma ? x_acc.expand({S, B, K}) * sign_in : x_acc.expand({S, B, K});
      const Tensor ge = noise_tensor({Noise::kSign, seed}, {S, B, N}, fo.out_offset, acc).mul_(g_acc);
      UDN_DISPATCH_FLOATS(x.scalar_type(), "gaussian_linear_bwd_flipout", [&] {
        noisy_weight_backward<scalar_t>(xe, ge, nw, want, d_xe, d_a, d_s);
      });
      if (want_x) d_x = sum_draws_if_shared(d_xe.mul_(sign_in), Sx).to(x.scalar_type());
    }
    if (want_sigma) {
      d_sigma = d_s;
      chain_softplus(d_sigma, weight_sigma, sigma_softplus && !nw.softplus_b);
    }
  }
  if (mu_in_engine) d_mu = d_a;
  // The mean part: flipout's d_x term, and d_mu where the engine did not make it.
  Tensor* mean_d_x = flipout && want_x && mu ? &d_x : nullptr;
  Tensor* mean_d_mu = want_mu && !mu_in_engine ? &d_mu : nullptr;
  if (mean_d_x || mean_d_mu) add_mean_part_grads(g, x, *mu, mean_d_x, mean_d_mu);
  return {d_x, d_mu, d_sigma, d_bias_mu, d_bias_sigma};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("gaussian_linear_fwd(Tensor x, Tensor? weight_mu, Tensor weight_sigma, Tensor? bias_mu, "
        "Tensor? bias_sigma, int seed, str estimator, int samples, bool x_sampled, bool sigma_softplus=False) "
        "-> (Tensor, Tensor)");
  m.def("gaussian_linear_bwd(Tensor grad_out, Tensor x, Tensor? weight_mu, Tensor weight_sigma, "
        "Tensor? bias_mu, Tensor? bias_sigma, Tensor std, int seed, str estimator, int samples, bool x_sampled, "
        "bool sigma_softplus, bool[5] grad_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("gaussian_linear_fwd", &gaussian_linear_fwd);
  m.impl("gaussian_linear_bwd", &gaussian_linear_bwd);
}
