// Shared by the depth_loglik kernels (heads_forward.cpp, heads_backward.cpp, heads_small.cpp,
// heads_fused.cpp; the ops in heads_ops.cpp): the problem description Heads, the per-row forward
// state, the gradient outputs, the mixture-mode upstream gradient, and the entry points of each
// algorithm (design notes: docs/heads.md).
//
// Work is cut into (row block x class tile) logits tiles computed with at::mm_out into a
// cache-sized per-thread buffer; vectorised epilogues turn a tile into an online logsumexp /
// target-logit pick (forward) or into the logits gradient G (backward), which feeds two more
// GEMMs: dH += G W_tile and dW_tile += G^T H. With a shared head the depths are stacked into the
// row dimension (rows = L*N), so every GEMM is as large as the problem allows.
// The entry points are templates instantiated for float and double in their own files; 16-bit
// storage (bfloat16 / float16 hidden and weight) runs the float instantiation (see HalfGemm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "heads_epilogue.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace udn_heads {

using at::Tensor;

constexpr int64_t kMaxRowTile = 256;  // rows of a logits tile
constexpr int64_t kClassTile = 512;   // classes of a logits tile (256 x 512 fp32 = 512 KiB, fits L2)
// Up to this many classes the batched class-major path runs (small_forward / small_backward):
// row-major tiles with only C output columns run far below GEMM peak.
constexpr int64_t kSmallClasses = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-bit storage computes in float: logits, epilogues, log-sum-exps and gradient accumulators are
// float, and the GEMM operands stay 16-bit in memory (no float copy of the weight or hidden). Per
// tile, a GEMM either casts its operands to float and runs a float GEMM (upcast: no fast 16-bit dot
// products) or multiplies in 16-bit and casts the product to float (native: AVX512-BF16 / AMX),
// chosen by native_half_gemm (gemm_strategy.h), as for the stochastic kernels. The small-C path
// always upcasts (its head is tiny).
enum class HalfGemm { native, upcast };
HalfGemm half_gemm(at::ScalarType storage);
std::string half_gemm_info();  // "bfloat16:native,float16:upcast", for `udn info`

template <typename T>
void add_into(T* acc, const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(acc + j) + Vec<T>::loadu(x + j)).store(acc + j);
  for (; j < n; ++j) acc[j] += x[j];
}

// ---------------------------------------------------------------- problem description
template <typename T>
struct Heads {
  static constexpr at::ScalarType kCompute = c10::CppTypeToScalarType<T>::value;
  Tensor hidden2d;  // [L*N, D]: depths stacked into rows (storage dtype: T or 16-bit)
  Tensor weight;    // [C, D] or [L, C, D] (storage dtype)
  at::TensorOptions opts;   // T: buffers and accumulators
  bool native16 = false;    // 16-bit storage multiplied in 16-bit (HalfGemm::native)
  const T* bias = nullptr;
  const int64_t* target_idx = nullptr;  // categorical [N]
  const T* target_val = nullptr;        // gaussian [N, C]
  int64_t L, N, D, C, rows, row_tile, class_tile;
  bool per_depth, bias_per_depth, gaussian, class_major;
  int64_t ignore_index;
  // Categorical loss options (docs/heads.md, "Loss options"), set by set_loss_options: label
  // smoothing eps, z-loss scale zs, soft-cap c (0: none); stats: the forward also writes aux's
  // argmax hits.
  T smoothing = 0, zscale = 0, cap = 0;
  bool stats = false;
  std::vector<T> inv_s, inv_s2;  // gaussian 1/s and 1/s^2
  T gauss_const = 0;             // -sum_c log s_c - C/2 log(2 pi)

  // Arguments checked by the op first (check_heads_args); only the target class range, which reads
  // the data, is checked here.
  Heads(const Tensor& hidden, const Tensor& weight_, const c10::optional<Tensor>& bias_,
        const Tensor& target, const c10::optional<Tensor>& noise_std, bool gaussian_,
        int64_t ignore_index_)
      : weight(weight_.detach()), gaussian(gaussian_), ignore_index(ignore_index_) {
    L = hidden.size(0), N = hidden.size(1), D = hidden.size(2);
    rows = L * N;
    per_depth = weight.dim() == 3;
    C = weight.size(-2);
    // detached aliases: the tile GEMMs run on worker threads, where a TLS autograd guard would not
    // reach, and must not be recorded by autograd when the caller's tensors require grad
    hidden2d = hidden.detach().view({rows, D});
    opts = hidden.options().dtype(kCompute);
    native16 = half() && half_gemm(hidden.scalar_type()) == HalfGemm::native;
    if (bias_.has_value() && bias_->defined()) {
      bias_per_depth = bias_->dim() == 2;
      bias = bias_->data_ptr<T>();
    } else {
      bias_per_depth = false;
    }
    if (gaussian) {
      target_val = target.data_ptr<T>();
      inv_s.assign(C, T(1));
      inv_s2.assign(C, T(1));
      double log_s = 0;
      if (noise_std.has_value() && noise_std->defined()) {
        const T* s = noise_std->data_ptr<T>();
        for (int64_t c = 0; c < C; ++c) {
          inv_s[c] = T(1) / s[c];
          inv_s2[c] = inv_s[c] * inv_s[c];
          log_s += std::log(static_cast<double>(s[c]));
        }
      }
      gauss_const = static_cast<T>(-log_s - 0.5 * C * std::log(2.0 * M_PI));
    } else {
      target_idx = target.data_ptr<int64_t>();
      for (int64_t i = 0; i < N; ++i) {
        const int64_t t = target_idx[i];
        TORCH_CHECK_INDEX(t == ignore_index || (t >= 0 && t < C), "target: expected class indices in [0, ", C,
                          ") or ignore_index=", ignore_index, ", got ", t);
      }
    }
    // Row tile from the shape only (never from the thread count) so results do not depend on it
    // beyond the documented reduction order.
    class_major = C <= kSmallClasses;
    if (class_major) weight = compute(weight);  // at most 32 rows: cast once
    class_tile = std::min<int64_t>(kClassTile, std::max<int64_t>(C, 1));
    row_tile = std::min<int64_t>(kMaxRowTile, std::max<int64_t>(16, ceil_div(ceil_div(rows, 16), 8) * 8));
  }

  // Row blocks [r0, r1) of at most `tile` stacked rows; a per-depth head keeps each block inside one depth.
  std::vector<std::pair<int64_t, int64_t>> row_blocks(int64_t tile) const {
    std::vector<std::pair<int64_t, int64_t>> out;
    const int64_t segment = per_depth ? N : rows;
    for (int64_t s0 = 0; s0 < rows; s0 += segment)
      for (int64_t r = s0; r < s0 + segment; r += tile) out.emplace_back(r, std::min(r + tile, s0 + segment));
    return out;
  }

  void set_loss_options(double label_smoothing, double lse_square_scale, double softcap, bool stats_) {
    smoothing = static_cast<T>(label_smoothing);
    zscale = static_cast<T>(lse_square_scale);
    cap = static_cast<T>(softcap);
    stats = stats_;
  }

  // loglik = -(row loss) = (1 - eps) t_y + eps mean_c t_c - lse - zs lse^2 (each term only when
  // its option is set, so the plain loss stays picked - lse exactly).
  T loglik_of(T picked, T logit_sum, T lse) const {
    T ll = (smoothing != T(0) ? (T(1) - smoothing) * picked + smoothing * logit_sum / static_cast<T>(C) : picked) - lse;
    return zscale != T(0) ? ll - zscale * lse * lse : ll;
  }

  // Factor of the upstream gradient g in the softmax part of the logits gradient,
  // d loglik / dt = (1 - eps) onehot + eps / C - (1 + 2 zs lse) softmax(t).
  T softmax_scale(T lse) const { return zscale != T(0) ? T(1) + 2 * zscale * lse : T(1); }

  // The soft-cap's chain factor d t / d z = 1 - (t / c)^2 from the capped logit t.
  T cap_factor(T t) const { return cap != T(0) ? T(1) - (t / cap) * (t / cap) : T(1); }

  const T* bias_of_row(int64_t r) const {
    if (!bias) return nullptr;
    return bias_per_depth ? bias + (r / N) * C : bias;
  }

  Tensor head(int64_t r0) const { return per_depth ? weight.select(0, r0 / N) : weight; }

  bool half() const { return hidden2d.scalar_type() != kCompute; }
  Tensor compute(const Tensor& t) const { return t.scalar_type() == kCompute ? t : t.to(kCompute); }

  // out = A B, or out += A B (accumulate); out is T, A / B tiles of T or of the 16-bit storage.
  void gemm(Tensor out, const Tensor& A, const Tensor& B, bool accumulate = false) const {
    if (native16) {
      const auto storage = hidden2d.scalar_type();
      const Tensor P = at::mm(A.to(storage), B.to(storage));
      accumulate ? out.add_(P) : out.copy_(P);
    } else if (accumulate) {
      out.addmm_(compute(A), compute(B));
    } else {
      at::mm_out(out, compute(A), compute(B));
    }
  }

  // The prologue of every class-tiled pass: logits tile H[r0:r0+m] W[c0:c0+ct]^T plus bias,
  // computed into `slot` (at least m * ct elements).
  Tensor logits(const Tensor& slot, int64_t r0, int64_t m, int64_t c0, int64_t ct) const {
    Tensor S = slot.narrow(0, 0, m * ct).view({m, ct});
    gemm(S, hidden2d.narrow(0, r0, m), head(r0).narrow(0, c0, ct).t());
    add_bias_cap(S.data_ptr<T>(), r0, m, c0, ct);
    return S;
  }

  // The logits every epilogue sees: s [m, ct] + bias, soft-capped when cap is set.
  void add_bias_cap(T* s, int64_t r0, int64_t m, int64_t c0, int64_t ct) const {
    add_bias(s, r0, m, c0, ct);
    if (cap != T(0)) soft_cap(s, cap, m * ct);
  }

  // s [m, ct] (rows r0.., classes c0..) += bias.
  void add_bias(T* s, int64_t r0, int64_t m, int64_t c0, int64_t ct) const {
    if (!bias) return;
    for (int64_t i = 0; i < m; ++i) add_into(s + i * ct, bias_of_row(r0 + i) + c0, ct);
  }
};

// d/ds_c sum_r g_r [-(y-mu)^2 / (2 s^2) - log s] = (sum_r g_r r^2) / s^3 - (sum_r g_r) / s,
// from the per-class sums A_c = sum_r g_r r^2.
template <typename T>
void finish_noise_grad(const Heads<T>& p, const T* grad, const T* sq_sums, T* d_noise) {
  double gsum = 0;
  for (int64_t r = 0; r < p.rows; ++r) gsum += grad[r];
  for (int64_t c = 0; c < p.C; ++c) {
    const T inv = p.inv_s[c];
    d_noise[c] = sq_sums[c] * inv * inv * inv - static_cast<T>(gsum) * inv;
  }
}

// Forward epilogue of one class tile (heads_forward.cpp).
// With label smoothing it adds each row's logit sum into tsum; with stats it keeps the first argmax in arg.
template <typename T>
void forward_tile(const Heads<T>& p, T* s, int64_t r0, int64_t m, int64_t c0, int64_t ct, T* mx, T* se,
                  T* picked, T* tsum, int64_t* arg);

// Forward state of rows [r0, r0 + m) across class tiles (forward_tile), then their loglik / aux.
template <typename T>
struct RowState {
  int64_t r0, m;
  std::vector<T> mx, se, picked, tsum;
  std::vector<int64_t> arg;
  RowState(int64_t r0_, int64_t m_)
      : r0(r0_), m(m_), mx(m_, -std::numeric_limits<T>::infinity()), se(m_, T(0)), picked(m_, T(0)),
        tsum(m_, T(0)), arg(m_, -1) {}

  void tile(const Heads<T>& p, T* s, int64_t c0, int64_t ct) {
    forward_tile(p, s, r0, m, c0, ct, mx.data(), se.data(), picked.data(), tsum.data(), arg.data());
  }

  void finish(const Heads<T>& p, T* loglik, T* aux) const {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = r0 + i;
      if (p.gaussian) {
        loglik[r] = T(-0.5) * se[i] + p.gauss_const;
      } else {
        const T lse = mx[i] + std::log(se[i]);
        const int64_t t = p.target_idx[r % p.N];
        aux[r] = lse;
        if (p.stats) aux[p.rows + r] = arg[i] == t ? T(1) : T(0);  // aux [2, L, N]: the hits after the lse
        loglik[r] = t == p.ignore_index ? T(0) : p.loglik_of(picked[i], tsum[i], lse);
      }
    }
  }
};

// Gradient outputs; d_hidden2d / d_weight undefined and d_bias / d_noise null where not wanted
// (the ops' grad_mask). No per-thread partials: the class-tiled pass (tiled_pass) gives each
// class tile's d_weight rows, d_bias columns and noise sums to one task and writes each group's
// dH rows once, so its memory does not grow with the thread count.
template <typename T>
struct Gradients {
  Tensor d_hidden2d, d_weight;
  T* d_bias;
  int64_t bias_numel;
  T* d_noise;
  std::vector<T> sq_sums;  // Gaussian d_noise: per-class sum_r g_r r^2 (tiled_pass)

  bool any() const { return d_hidden2d.defined() || d_weight.defined() || d_bias || d_noise; }
};

// Mixture-mode NLL sum_n s_n (-logsumexp_l(lw_l + loglik[l, n])): its upstream gradient
// d/d loglik[l, n] = -s_n r[l, n], r = softmax over depths of lw + loglik, needs every depth's
// log-likelihood of row n, so it is formed after their forward (0 on ignored rows and rows with
// s_n = 0).
template <typename T>
struct Mixture {
  const T* log_weights;  // [L]
  const T* row_scale;    // [N]

  void grad(const Heads<T>& p, const T* loglik, int64_t n0, int64_t n1, T* g) const {
    std::vector<T> v(p.L);
    for (int64_t n = n0; n < n1; ++n) {
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t l = 0; l < p.L; ++l) mx = max_nan(mx, v[l] = log_weights[l] + loglik[l * p.N + n]);
      T sum = 0;
      for (int64_t l = 0; l < p.L; ++l) sum += v[l] = std::exp(v[l] - mx);
      const T s = p.gaussian || p.target_idx[n] != p.ignore_index ? row_scale[n] : T(0);
      for (int64_t l = 0; l < p.L; ++l) g[l * p.N + n] = s == T(0) ? T(0) : -s * v[l] / sum;
    }
  }
};

// ---------------------------------------------------------------- algorithms
// heads_forward.cpp: the class-tiled forward.
template <typename T>
void forward_impl(const Heads<T>& p, T* loglik, T* aux);

// heads_backward.cpp: the backward epilogue of one logits tile (G in place, d_bias and noise sums).
template <typename T>
void backward_epilogue(const Heads<T>& p, const T* grad, const T* lse, T* s, int64_t r0, int64_t m, int64_t c0,
                       int64_t ct, Gradients<T>& out);

// heads_fused.cpp: the class-tiled gradient pass. Row groups in turn; per group the [rows, C]
// logits are computed once, by class tiles in parallel. With loglik it runs the forward
// (loglik, aux = lse) too, else it recomputes the logits for the given lse (aux).
template <typename T>
void tiled_pass(const Heads<T>& p, const T* grad, T* loglik, T* aux, Gradients<T>& out,
                const Mixture<T>* mix = nullptr);

template <typename T>
void backward_impl(const Heads<T>& p, const T* grad, const T* lse, Gradients<T>& out) {
  tiled_pass(p, grad, static_cast<T*>(nullptr), const_cast<T*>(lse), out);
}

// heads_small.cpp: C <= kSmallClasses, forward / backward / both in one pass over class-major chunks.
template <typename T>
void small_pass(const Heads<T>& p, T* loglik, T* lse, const T* grad, Gradients<T>* out,
                const Mixture<T>* mix = nullptr);

// heads_fused.cpp: forward and backward of a known upstream gradient (expected mode) or of the
// mixture NLL (mix) with the logits computed once.
template <typename T>
void fused_impl(const Heads<T>& p, const T* grad, T* loglik, T* aux, Gradients<T>& out,
                const Mixture<T>* mix = nullptr);

}  // namespace udn_heads
