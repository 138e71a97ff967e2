// Fused posterior predictive of a depth mixture on CPU (design notes: docs/heads.md):
// categorical P = sum_l w_l softmax(H_l W_l^T + b_l); Gaussian mixture mean sum_l w_l mu_l and
// variance s^2 + sum_l w_l mu_l^2 - mean^2; w = softmax(log_weights). Only the [N, C] outputs are
// written, never the [L, N, C] logits.
//
// Row blocks run in parallel (each owns its output rows: no reduction, so the result does not
// depend on the thread count). Per depth, logits tiles (rows x class tile) come from at::mm_out
// into a per-thread buffer. Categorical with C <= kOneTileClasses: one tile holds every class of
// its rows (rows per block shrink with C so the tile stays <= 2 MiB fp32), so one GEMM and one exp
// per logit (exp(s - max) stored in place, then out += w/sum * e). Larger C: pass 1 folds
// 512-class tiles into an online logsumexp per row, pass 2 recomputes each tile and adds
// w_l exp(s - lse) to the output rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "heads_epilogue.h"

namespace {

using at::Tensor;
using namespace udn_heads;

constexpr int64_t kRowTile = 128;            // max rows of a logits tile
constexpr int64_t kClassTile = 512;          // classes of a two-pass tile (128 x 512 fp32 = 256 KiB)
constexpr int64_t kOneTileElems = 1 << 19;   // one-pass tile budget (2 MiB fp32)
constexpr int64_t kOneTileMinRows = 16;      // fewer rows per GEMM would re-read W too often
constexpr int64_t kOneTileClasses = kOneTileElems / kOneTileMinRows;  // 32768

// s <- exp(s - shift); returns the sum.
template <typename T>
T exp_sum_inplace(T* s, T shift, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vshift(shift);
  Vec<T> acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> e = (Vec<T>::loadu(s + j) - vshift).exp();
    e.store(s + j);
    acc = acc + e;
  }
  T total = lane_sum(acc);
  for (; j < n; ++j) total += (s[j] = std::exp(s[j] - shift));
  return total;
}

// out += a x.
template <typename T>
void axpy(T* out, const T* x, T a, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) at::vec::fmadd(va, Vec<T>::loadu(x + j), Vec<T>::loadu(out + j)).store(out + j);
  for (; j < n; ++j) out[j] += a * x[j];
}

// out += w exp(s - lse).
template <typename T>
void add_weighted_exp(T* out, const T* s, T lse, T w, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vlse(lse), vw(w);
  int64_t j = 0;
  for (; j + W <= n; j += W)
    at::vec::fmadd(vw, (Vec<T>::loadu(s + j) - vlse).exp(), Vec<T>::loadu(out + j)).store(out + j);
  for (; j < n; ++j) out[j] += w * std::exp(s[j] - lse);
}

// m1 += w mu, m2 += w mu^2 with mu = s + b (b may be null).
template <typename T>
void add_weighted_moments(T* m1, T* m2, const T* s, const T* b, T w, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vw(w);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    Vec<T> mu = Vec<T>::loadu(s + j);
    if (b) mu = mu + Vec<T>::loadu(b + j);
    const Vec<T> wmu = vw * mu;
    (Vec<T>::loadu(m1 + j) + wmu).store(m1 + j);
    at::vec::fmadd(wmu, mu, Vec<T>::loadu(m2 + j)).store(m2 + j);
  }
  for (; j < n; ++j) {
    const T mu = s[j] + (b ? b[j] : T(0)), wmu = w * mu;
    m1[j] += wmu;
    m2[j] += wmu * mu;
  }
}

// m2 <- s2 + m2 - m1^2 (the mixture variance, noise included).
template <typename T>
void finish_variance(T* m2, const T* m1, const T* s2, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> mean = Vec<T>::loadu(m1 + j);
    (Vec<T>::loadu(s2 + j) + Vec<T>::loadu(m2 + j) - mean * mean).store(m2 + j);
  }
  for (; j < n; ++j) m2[j] = s2[j] + m2[j] - m1[j] * m1[j];
}

// softmax(log_weights) as torch.softmax computes it (all -inf or a NaN gives NaN weights).
template <typename T>
std::vector<T> mixture_weights(const Tensor& log_weights) {
  const Tensor lw = log_weights.contiguous();
  const T* p = lw.data_ptr<T>();
  const int64_t L = lw.numel();
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t l = 0; l < L; ++l) mx = max_nan(mx, p[l]);
  std::vector<T> w(L);
  T total = 0;
  for (int64_t l = 0; l < L; ++l) total += (w[l] = std::exp(p[l] - mx));
  for (T& x : w) x /= total;
  return w;
}

template <typename T>
void predict_impl(const Tensor& hidden, const Tensor& weight, const T* bias, bool bias_per_depth,
                  const std::vector<T>& w, bool gaussian, const T* s2, T* out1, T* out2) {
  const int64_t L = hidden.size(0), N = hidden.size(1), C = weight.size(-2);
  const bool per_depth = weight.dim() == 3;
  const bool one_tile = C <= kOneTileClasses;
  const int64_t ct_max = one_tile ? std::max<int64_t>(C, 1) : kClassTile;
  const int64_t nct = (C + ct_max - 1) / ct_max;
  const int64_t row_tile = one_tile ? std::clamp<int64_t>(kOneTileElems / ct_max, kOneTileMinRows, kRowTile) : kRowTile;
  const int64_t nblocks = (N + row_tile - 1) / row_tile;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = at::empty({std::min(row_tile, N) * ct_max}, hidden.options().dtype(compute_type(hidden)));
    std::vector<T> mx(row_tile), se(row_tile);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * row_tile, m = std::min(row_tile, N - n0);
      T* o1 = out1 + n0 * C;
      T* o2 = gaussian ? out2 + n0 * C : nullptr;
      std::fill(o1, o1 + m * C, T(0));
      if (o2) std::fill(o2, o2 + m * C, T(0));
      for (int64_t l = 0; l < L; ++l) {
        // 16-bit storage: this block's rows cast once per depth, each weight tile once per GEMM
        const Tensor H = hidden.select(0, l).narrow(0, n0, m).to(compute_type(hidden));
        const Tensor Wl = per_depth ? weight.select(0, l) : weight;
        const T* bl = bias ? bias + (bias_per_depth ? l * C : 0) : nullptr;
        // logits tile of classes [c0, c0 + ct), bias not yet added
        auto tile = [&](int64_t c0, int64_t ct) {
          Tensor S = buf.narrow(0, 0, m * ct).view({m, ct});
          at::mm_out(S, H, Wl.narrow(0, c0, ct).to(H.scalar_type()).t());
          return S.data_ptr<T>();
        };
        if (gaussian) {
          for (int64_t c0 = 0; c0 < C; c0 += ct_max) {
            const int64_t ct = std::min(ct_max, C - c0);
            const T* s = tile(c0, ct);
            for (int64_t i = 0; i < m; ++i)
              add_weighted_moments(o1 + i * C + c0, o2 + i * C + c0, s + i * ct, bl ? bl + c0 : nullptr, w[l], ct);
          }
          continue;
        }
        if (nct == 1) {
          // an all -inf (or NaN) row gives NaN probabilities, as torch.softmax
          T* s = tile(0, C);
          for (int64_t i = 0; i < m; ++i) {
            const T row_max = add_bias_max(s + i * C, bl, C);
            const T total = exp_sum_inplace(s + i * C, row_max, C);
            axpy(o1 + i * C, s + i * C, w[l] / total, C);
          }
          continue;
        }
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
        std::fill(se.begin(), se.end(), T(0));
        for (int64_t c0 = 0; c0 < C; c0 += ct_max) {
          const int64_t ct = std::min(ct_max, C - c0);
          T* s = tile(c0, ct);
          for (int64_t i = 0; i < m; ++i) {
            // online logsumexp (a NaN maximum sticks; nothing to add while every logit is -inf,
            // so an all -inf row gives lse = -inf and NaN probabilities, as torch.softmax)
            const T tile_max = add_bias_max(s + i * ct, bl ? bl + c0 : nullptr, ct);
            const T new_max = max_nan(mx[i], tile_max);
            if (new_max != -std::numeric_limits<T>::infinity()) {
              se[i] = se[i] * std::exp(mx[i] - new_max) + sum_exp(s + i * ct, new_max, ct);
              mx[i] = new_max;
            }
          }
        }
        for (int64_t i = 0; i < m; ++i) se[i] = mx[i] + std::log(se[i]);  // se <- lse
        for (int64_t c0 = 0; c0 < C; c0 += ct_max) {
          const int64_t ct = std::min(ct_max, C - c0);
          T* s = tile(c0, ct);
          for (int64_t i = 0; i < m; ++i) add_bias_max(s + i * ct, bl ? bl + c0 : nullptr, ct);
          for (int64_t i = 0; i < m; ++i) add_weighted_exp(o1 + i * C + c0, s + i * ct, se[i], w[l], ct);
        }
      }
      if (gaussian)
        for (int64_t i = 0; i < m; ++i) finish_variance(o2 + i * C, o1 + i * C, s2, C);
    }
  });
}

std::tuple<Tensor, Tensor> depth_mixture_predict(const Tensor& hidden, const Tensor& weight,
                                                 const c10::optional<Tensor>& bias, const Tensor& log_weights,
                                                 bool gaussian, const c10::optional<Tensor>& noise_std) {
  // Any layout: the op takes contiguous copies of its inputs.
  const udn::ArgChecks check{"depth_mixture_predict"};
  const int64_t C = udn::check_heads_params(check, hidden, weight, bias, /*any_layout=*/true);
  const int64_t L = hidden.size(0), N = hidden.size(1);
  // 16-bit storage: computed in float (log_weights float too), outputs rounded once at the end
  const auto dtype = compute_type(hidden);
  check.tensor("log_weights", log_weights, dtype, {L}, /*any_layout=*/true);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool has_noise = gaussian && noise_std.has_value() && noise_std->defined();
  if (has_noise) check.tensor("noise_std", *noise_std, hidden.scalar_type(), {C}, /*any_layout=*/true);
  // detached contiguous aliases: the tile GEMMs run on worker threads (no autograd there)
  const Tensor h = hidden.detach().contiguous(), wt = weight.detach().contiguous();
  const Tensor b = has_bias ? bias->detach().to(dtype).contiguous() : Tensor();
  const auto options = hidden.options().dtype(dtype);
  Tensor out1 = at::empty({N, C}, options);
  Tensor out2 = gaussian ? at::empty({N, C}, options) : at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "depth_mixture_predict", [&] {
    const auto w = mixture_weights<scalar_t>(log_weights.detach());
    const Tensor s2 = gaussian ? (has_noise ? noise_std->detach().reshape({C}).to(dtype).square().contiguous()
                                            : at::ones({C}, options))
                               : Tensor();
    if (N > 0 && C > 0)
      predict_impl<scalar_t>(h, wt, has_bias ? b.data_ptr<scalar_t>() : nullptr, has_bias && b.dim() == 2, w,
                             gaussian, gaussian ? s2.data_ptr<scalar_t>() : nullptr, out1.data_ptr<scalar_t>(),
                             gaussian ? out2.data_ptr<scalar_t>() : nullptr);
  });
  return {out1.to(hidden.scalar_type()), out2.to(hidden.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("depth_mixture_predict(Tensor hidden, Tensor weight, Tensor? bias, Tensor log_weights, bool gaussian, "
        "Tensor? noise_std) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("depth_mixture_predict", &depth_mixture_predict);
}
