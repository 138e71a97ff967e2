// bernoulli_linear on CPU: MC dropout ("input": one fused pass builds the masked input stack, then
// one large GEMM), DropConnect ("weight") and symmetric Bernoulli weights ("symmetric"), both on the
// noisy-weight tile engine (noisy_weight.cpp). 16-bit storage: "input" masks in the storage dtype and
// runs ATen's 16-bit GEMM (float32 accumulation inside, as F.linear); the tile engine widens the weight per
// noise chunk and runs float32 GEMMs on x, the output and grad_out widened to float32.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string_view>
#include <tuple>

#include "checks.h"
#include "stochastic_common.h"

namespace {

using namespace udn_stochastic;

Noise bernoulli_noise(c10::string_view mask, double p, uint64_t seed) {
  if (mask == "symmetric") return {Noise::kSign, seed};
  TORCH_CHECK(mask == "input" || mask == "weight", "bernoulli_linear: unknown mask ", mask);
  return {Noise::kKeep, seed, static_cast<float>(p), 1.0 / (1.0 - p)};
}

// The masked input stack [S*B, K] (row r = s*B + b, mask offset r*K; x shared when x.size(0) == 1;
// undefined without `build`), with `scale_by_mask` [S*B, K] multiplied by the same mask in place when
// given. Rows are done in parallel; each chunk's mask lives in a small cache-resident buffer.
Tensor masked_input(const Tensor& x, const Noise& noise, int64_t S, Tensor* scale_by_mask, bool build = true) {
  const int64_t B = x.size(1), K = x.size(2), R = S * B;
  const bool shared = x.size(0) == 1;
  Tensor xm = build ? at::empty({R, K}, x.options()) : Tensor();
  UDN_DISPATCH_FLOATS(x.scalar_type(), "masked_input", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = build ? xm.data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scale_by_mask ? scale_by_mask->data_ptr<scalar_t>() : nullptr;
    const int64_t rows_per_chunk = std::max<int64_t>(1, kFillGrain / std::max<int64_t>(K, 1));
    at::parallel_for(0, R, rows_per_chunk, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> keep(K);
      std::vector<float> scratch;
      for (int64_t r = begin; r < end; ++r) {
        noise.fill_as(keep.data(), K, r * K, scratch);
        if (out) {
          const scalar_t* xr = xp + (shared ? r % B : r) * K;
          at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> m) { return a * m; }, out + r * K, xr,
                                  keep.data(), K);
        }
        if (sp) {
          at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> m) { return a * m; }, sp + r * K, sp + r * K,
                                  keep.data(), K);
        }
      }
    });
  });
  return xm;
}

// x [Sx, B, K] (Sx = S with x_sampled, else 1), weight [N, K], bias None or [N]; all CPU, contiguous, of
// x's float dtype; p in [0, 1). Returns N.
int64_t check_bernoulli_args(const udn::ArgChecks& check, const Tensor& x, const Tensor& weight,
                             const OptTensor& bias, double p, int64_t S, bool x_sampled) {
  const int64_t N = check_input_and_weight(check, x, S, x_sampled, "weight", weight);
  check.optional("bias", bias, x.scalar_type(), {N});
  TORCH_CHECK(p >= 0 && p < 1, check.op, ": p: expected a probability in [0, 1), got ", p);
  return N;
}

Tensor bernoulli_linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias_opt, double p,
                            int64_t seed_in, c10::string_view mask, int64_t S, bool x_sampled) {
  check_bernoulli_args({"bernoulli_linear_fwd"}, x, weight, bias_opt, p, S, x_sampled);
  const Tensor* bias = ptr_or_null(bias_opt);
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t B = x.size(1), K = x.size(2), N = weight.size(0);
  const Noise noise = bernoulli_noise(mask, p, seed);
  Tensor out = at::empty({S, B, N}, x.options());
  if (mask == "input") {
    // One fused pass builds the masked input stack (input-sized, freed after forward), then a
    // single GEMM: one large at::addmm runs at full BLAS efficiency on all threads, unlike per-tile
    // GEMMs that each re-read the whole weight.
    const Tensor xm = masked_input(x, noise, S, nullptr);
    Tensor out2 = out.view({S * B, N});
    udn_gemm::matmul_out(out2, xm, weight.t(), bias ? *bias : Tensor());
    return out;
  }
  const NoisyWeight nw{nullptr, weight, noise, S};
  const auto acc = acc_dtype(x);
  Tensor out_acc = acc != x.scalar_type() ? at::empty({S, B, N}, x.options().dtype(acc)) : out;
  UDN_DISPATCH_FLOATS(x.scalar_type(), "bernoulli_linear_fwd", [&] {
    noisy_weight_forward<scalar_t>(x.to(acc), nw, out_acc, bias ? bias->to(acc).view({1, N}) : Tensor(), nullptr, 0);
  });
  if (acc != x.scalar_type()) out.copy_(out_acc);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> bernoulli_linear_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                        const OptTensor& bias_opt, double p, int64_t seed_in,
                                                        c10::string_view mask, int64_t S, bool x_sampled,
                                                        std::array<bool, 3> grad_mask) {
  const udn::ArgChecks check{"bernoulli_linear_bwd"};
  const int64_t N_out = check_bernoulli_args(check, x, weight, bias_opt, p, S, x_sampled);
  check.tensor("grad_out", grad_out, x.scalar_type(), {S, x.size(1), N_out}, /*any_layout=*/true);
  const Tensor* bias = ptr_or_null(bias_opt);
  // The gradients asked for (grad_mask: x, weight, bias); the others are returned empty and their GEMMs
  // and mask passes never run.
  const bool want_x = grad_mask[0], want_weight = grad_mask[1], want_bias = grad_mask[2] && bias;
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t Sx = x.size(0), B = x.size(1), K = x.size(2), N = weight.size(0);
  const Noise noise = bernoulli_noise(mask, p, seed);
  const Tensor g = grad_out.contiguous();
  const Tensor d_bias = want_bias ? g.sum({0, 1}) : x.new_empty({0});
  Tensor d_x = x.new_empty({0}), d_weight = x.new_empty({0});
  if (!want_x && !want_weight) return {d_x, d_weight, d_bias};
  if (mask == "input") {
    // d_x = (g W) * keep, d_W = g^T X_masked: two large GEMMs around one fused pass that
    // regenerates the mask, rebuilds X_masked (for d_W) and scales g W in place (for d_x).
    const Tensor g2 = g.view({S * B, N});
    Tensor dx = want_x ? udn_gemm::mm(g2, weight) : Tensor();
    const Tensor xm = masked_input(x, noise, S, want_x ? &dx : nullptr, want_weight);
    if (want_x) d_x = sum_draws_if_shared(dx.view({S, B, K}), Sx);
    if (want_weight) d_weight = udn_gemm::mm(g2.t(), xm);
    return {d_x, d_weight, d_bias};
  }
  const NoisyWeight nw{nullptr, weight, noise, S};
  Tensor d_xe, d_a, d_w;
  const auto acc = acc_dtype(x);
  UDN_DISPATCH_FLOATS(x.scalar_type(), "bernoulli_linear_bwd", [&] {
    noisy_weight_backward<scalar_t>(x.to(acc), g.to(acc), nw, {want_x, false, want_weight}, d_xe, d_a, d_w);
  });
  return {want_x ? d_xe.to(x.scalar_type()) : d_x, want_weight ? d_w : d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("bernoulli_linear_fwd(Tensor x, Tensor weight, Tensor? bias, float p, int seed, str mask, "
        "int samples, bool x_sampled) -> Tensor");
  m.def("bernoulli_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, float p, int seed, "
        "str mask, int samples, bool x_sampled, bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("bernoulli_linear_fwd", &bernoulli_linear_fwd);
  m.impl("bernoulli_linear_bwd", &bernoulli_linear_bwd);
}
