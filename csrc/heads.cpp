// Fused depth-mixture heads on CPU: per-depth log-likelihoods of every output head and their
// gradients without materialising the [L, N, C] logits (design notes: docs/heads.md).
//
// Work is cut into (row block x class tile) logits tiles computed with at::mm_out into a
// cache-sized per-thread buffer; vectorised epilogues turn a tile into an online logsumexp /
// target-logit pick (forward) or into the logits gradient G (backward), which feeds two more
// GEMMs: dH += G W_tile and dW_tile += G^T H. With a shared head the depths are stacked into the
// row dimension (rows = L*N), so every GEMM is as large as the problem allows.
// depth_loglik_fwd_bwd (upstream gradient known before the forward, e.g. the expected-mode NLL)
// keeps a row block's logits tiles after its forward and turns them into G in place: 3 GEMMs
// instead of the 4 of forward + recomputing backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "heads_epilogue.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using namespace udn_heads;

constexpr int64_t kMaxRowTile = 256;  // rows of a logits tile
constexpr int64_t kClassTile = 512;   // classes of a logits tile (256 x 512 fp32 = 512 KiB, fits L2)
// Up to this many classes the batched class-major path runs (small_forward / small_backward):
// row-major tiles with only C output columns run far below GEMM peak.
constexpr int64_t kSmallClasses = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- vectorised tile epilogues
// sum_j ((y_j - s_j) * inv_j)^2.
template <typename T>
T gauss_sq(const T* s, const T* y, const T* inv, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> r = (Vec<T>::loadu(y + j) - Vec<T>::loadu(s + j)) * Vec<T>::loadu(inv + j);
    acc = at::vec::fmadd(r, r, acc);
  }
  T total = lane_sum(acc);
  for (; j < n; ++j) {
    const T r = (y[j] - s[j]) * inv[j];
    total += r * r;
  }
  return total;
}

// s <- -g * exp(s - lse): the softmax part of the categorical logits gradient.
template <typename T>
void softmax_grad(T* s, T lse, T g, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vlse(lse), vng(-g);
  int64_t j = 0;
  for (; j + W <= n; j += W) (vng * (Vec<T>::loadu(s + j) - vlse).exp()).store(s + j);
  for (; j < n; ++j) s[j] = -g * std::exp(s[j] - lse);
}

// r = y - s; s <- g r inv2; dn += g r^2 (dn may be null): the Gaussian mean and noise gradients.
template <typename T>
void gauss_grad(T* s, const T* y, const T* inv2, T g, T* dn, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vg(g);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> r = Vec<T>::loadu(y + j) - Vec<T>::loadu(s + j);
    const Vec<T> gr = vg * r;
    (gr * Vec<T>::loadu(inv2 + j)).store(s + j);
    if (dn) at::vec::fmadd(gr, r, Vec<T>::loadu(dn + j)).store(dn + j);
  }
  for (; j < n; ++j) {
    const T r = y[j] - s[j];
    s[j] = g * r * inv2[j];
    if (dn) dn[j] += g * r * r;
  }
}

template <typename T>
void add_into(T* acc, const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(acc + j) + Vec<T>::loadu(x + j)).store(acc + j);
  for (; j < n; ++j) acc[j] += x[j];
}

// Row-vectorised helpers for class-major tiles (one class = one contiguous row of the tile).
template <typename T>
void add_scalar(T* x, T v, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec<T>::loadu(x + j) + Vec<T>(v)).store(x + j);
  for (; j < n; ++j) x[j] += v;
}

template <typename T>
void max_into(T* acc, const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) at::vec::maximum(Vec<T>::loadu(acc + j), Vec<T>::loadu(x + j)).store(acc + j);
  for (; j < n; ++j) acc[j] = max_nan(acc[j], x[j]);
}

// acc += exp(x - shift), elementwise.
template <typename T>
void add_exp_into(T* acc, const T* x, const T* shift, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W)
    (Vec<T>::loadu(acc + j) + (Vec<T>::loadu(x + j) - Vec<T>::loadu(shift + j)).exp()).store(acc + j);
  for (; j < n; ++j) acc[j] += std::exp(x[j] - shift[j]);
}

// x <- -g * exp(x - lse), elementwise (g, lse per row).
template <typename T>
void softmax_grad_rows(T* x, const T* lse, const T* g, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W)
    (Vec<T>(0) - Vec<T>::loadu(g + j) * (Vec<T>::loadu(x + j) - Vec<T>::loadu(lse + j)).exp()).store(x + j);
  for (; j < n; ++j) x[j] = -g[j] * std::exp(x[j] - lse[j]);
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

// ---------------------------------------------------------------- problem description
template <typename T>
struct Heads {
  Tensor hidden2d;  // [L*N, D]: depths stacked into rows
  Tensor weight;    // [C, D] or [L, C, D]
  const T* bias = nullptr;
  const int64_t* target_idx = nullptr;  // categorical [N]
  const T* target_val = nullptr;        // gaussian [N, C]
  int64_t L, N, D, C, rows, row_tile, class_tile;
  bool per_depth, bias_per_depth, gaussian, class_major;
  int64_t ignore_index;
  std::vector<T> inv_s, inv_s2;  // gaussian 1/s and 1/s^2
  T gauss_const = 0;             // -sum_c log s_c - C/2 log(2 pi)

  Heads(const Tensor& hidden, const Tensor& weight_, const c10::optional<Tensor>& bias_,
        const Tensor& target, const c10::optional<Tensor>& noise_std, bool gaussian_,
        int64_t ignore_index_)
      : weight(weight_.detach()), gaussian(gaussian_), ignore_index(ignore_index_) {
    TORCH_CHECK(hidden.dim() == 3, "depth_loglik: hidden must be [L, N, D]");
    TORCH_CHECK(weight.dim() == 2 || weight.dim() == 3, "depth_loglik: weight must be [C, D] or [L, C, D]");
    L = hidden.size(0), N = hidden.size(1), D = hidden.size(2);
    rows = L * N;
    per_depth = weight.dim() == 3;
    C = weight.size(-2);
    TORCH_CHECK(weight.size(-1) == D && (!per_depth || weight.size(0) == L), "depth_loglik: weight shape");
    TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "depth_loglik: contiguous inputs expected");
    // detached aliases: the tile GEMMs run on worker threads, where a TLS autograd guard would not
    // reach, and must not be recorded by autograd when the caller's tensors require grad
    hidden2d = hidden.detach().view({rows, D});
    if (bias_.has_value() && bias_->defined()) {
      TORCH_CHECK(bias_->is_contiguous() && bias_->scalar_type() == hidden.scalar_type(), "depth_loglik: bias");
      bias_per_depth = bias_->dim() == 2;
      TORCH_CHECK(bias_->numel() == (bias_per_depth ? L * C : C), "depth_loglik: bias shape");
      bias = bias_->data_ptr<T>();
    } else {
      bias_per_depth = false;
    }
    TORCH_CHECK(target.is_contiguous(), "depth_loglik: contiguous target expected");
    if (gaussian) {
      TORCH_CHECK(target.scalar_type() == hidden.scalar_type() && target.numel() == N * C,
                  "depth_loglik: gaussian target must be [N, C] of the hidden dtype");
      target_val = target.data_ptr<T>();
      inv_s.assign(C, T(1));
      inv_s2.assign(C, T(1));
      double log_s = 0;
      if (noise_std.has_value() && noise_std->defined()) {
        TORCH_CHECK(noise_std->numel() == C && noise_std->is_contiguous(), "depth_loglik: noise_std must be [C]");
        const T* s = noise_std->data_ptr<T>();
        for (int64_t c = 0; c < C; ++c) {
          inv_s[c] = T(1) / s[c];
          inv_s2[c] = inv_s[c] * inv_s[c];
          log_s += std::log(static_cast<double>(s[c]));
        }
      }
      gauss_const = static_cast<T>(-log_s - 0.5 * C * std::log(2.0 * M_PI));
    } else {
      TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == N,
                  "depth_loglik: categorical target must be int64 [N]");
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
    class_tile = std::min<int64_t>(kClassTile, std::max<int64_t>(C, 1));
    row_tile = std::min<int64_t>(kMaxRowTile, std::max<int64_t>(16, ceil_div(ceil_div(rows, 16), 8) * 8));
  }

  // Row blocks [r0, r1) of the stacked rows; a per-depth head keeps each block inside one depth.
  std::vector<std::pair<int64_t, int64_t>> row_blocks() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    const int64_t segment = per_depth ? N : rows;
    for (int64_t s0 = 0; s0 < rows; s0 += segment)
      for (int64_t r = s0; r < s0 + segment; r += row_tile) out.emplace_back(r, std::min(r + row_tile, s0 + segment));
    return out;
  }

  const T* bias_of_row(int64_t r) const {
    if (!bias) return nullptr;
    return bias_per_depth ? bias + (r / N) * C : bias;
  }

  Tensor head(int64_t r0) const { return per_depth ? weight.select(0, r0 / N) : weight; }

  // The prologue of every class-tiled pass: logits tile H[r0:r0+m] W[c0:c0+ct]^T plus bias,
  // computed into `slot` (at least m * ct elements).
  Tensor logits(const Tensor& slot, int64_t r0, int64_t m, int64_t c0, int64_t ct) const {
    Tensor S = slot.narrow(0, 0, m * ct).view({m, ct});
    at::mm_out(S, hidden2d.narrow(0, r0, m), head(r0).narrow(0, c0, ct).t());
    add_bias(S.data_ptr<T>(), r0, m, c0, ct);
    return S;
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

// ---------------------------------------------------------------- small C: batched class-major path
// With C <= kSmallClasses the per-tile GEMMs are tiny (K = C for dH) and per-call overhead rules
// (heads-small, the udn-step heads). So the logits are computed class-major for a whole chunk of
// depths with ONE GEMM -- bmm over depths for per-depth heads, S^T = W H^T over the stacked rows
// for a shared head -- into a buffer of at most kSmallChunkElems; one parallel_for runs the
// row-vectorised epilogue, and the backward writes dH and dW with one GEMM each (dH directly into
// the output, dW without per-thread partials). Chunking depends on the shape only.
constexpr int64_t kSmallChunkElems = 1 << 18;  // 1 MiB of fp32 logits per chunk
constexpr int64_t kSmallRowTask = 256;         // rows per forward epilogue task

// Depths [l0, l0 + g) and rows [n0, n0 + m) of each: full depths, part of one depth (g = 1), or
// (mixture mode) part of every depth (g = L).
struct SmallChunk {
  int64_t l0, g, n0, m;
};

// Chunks of at most kSmallChunkElems logits. all_depths (mixture: a row's gradient needs every
// depth's log-likelihood): each chunk holds all L depths of a row range.
template <typename T>
std::vector<SmallChunk> small_chunks(const Heads<T>& p, bool all_depths) {
  std::vector<SmallChunk> out;
  const int64_t depth_elems = std::max<int64_t>(1, p.C * p.N);
  if (all_depths && p.L * depth_elems > kSmallChunkElems) {
    const int64_t m = std::max<int64_t>(1, kSmallChunkElems / (p.L * std::max<int64_t>(1, p.C)));
    for (int64_t n0 = 0; n0 < p.N; n0 += m) out.push_back({0, p.L, n0, std::min(m, p.N - n0)});
  } else if (depth_elems <= kSmallChunkElems) {
    const int64_t g = kSmallChunkElems / depth_elems;
    for (int64_t l0 = 0; l0 < p.L; l0 += g) out.push_back({l0, std::min(g, p.L - l0), 0, p.N});
  } else {
    const int64_t m = kSmallChunkElems / std::max<int64_t>(1, p.C);
    for (int64_t l = 0; l < p.L; ++l)
      for (int64_t n0 = 0; n0 < p.N; n0 += m) out.push_back({l, 1, n0, std::min(m, p.N - n0)});
  }
  return out;
}

// Class-major logits of a chunk (no bias) in buf. Class row c of depth l0 + lr starts at
// data + lr * ls + c * cs; batched chunks (per-depth heads, or a shared head over row ranges of
// several depths) lay it out [g, C, m], other shared-head chunks [C, g * m] (rows contiguous).
template <typename T>
struct SmallTile {
  Tensor S;
  T* data;
  int64_t ls, cs;
  T* row(int64_t lr, int64_t c) const { return data + lr * ls + c * cs; }
};

template <typename T>
bool small_batched(const Heads<T>& p, const SmallChunk& k) {
  return p.per_depth || (k.g > 1 && k.m < p.N);
}

// [g, m, D] rows of a batched chunk (of hidden2d or its gradient), and its [g, C, D] heads (a shared
// head expanded over depths).
template <typename T>
Tensor small_hidden(const Heads<T>& p, const Tensor& hidden2d, const SmallChunk& k) {
  return hidden2d.view({p.L, p.N, p.D}).narrow(0, k.l0, k.g).narrow(1, k.n0, k.m);
}

template <typename T>
Tensor small_heads(const Heads<T>& p, const SmallChunk& k) {
  return p.per_depth ? p.weight.narrow(0, k.l0, k.g) : p.weight.expand({k.g, p.C, p.D});
}

template <typename T>
SmallTile<T> small_logits(const Heads<T>& p, Tensor& buf, const SmallChunk& k) {
  const int64_t n = k.g * p.C * k.m;
  if (small_batched(p, k)) {
    Tensor S = buf.narrow(0, 0, n).view({k.g, p.C, k.m});
    at::bmm_out(S, small_heads(p, k), small_hidden(p, p.hidden2d, k).transpose(1, 2));
    return {S, S.data_ptr<T>(), p.C * k.m, k.m};
  }
  Tensor S = buf.narrow(0, 0, n).view({p.C, k.g * k.m});
  at::mm_out(S, p.weight, p.hidden2d.narrow(0, k.l0 * p.N + k.n0, k.g * k.m).t());
  return {S, S.data_ptr<T>(), k.m, k.g * k.m};
}

template <typename T>
const T* small_bias(const Heads<T>& p, int64_t l) {
  return p.bias ? p.bias + (p.bias_per_depth ? l * p.C : 0) : nullptr;
}

// acc += ((y - x) * inv)^2, elementwise.
template <typename T>
void add_gauss_sq_into(T* acc, const T* y, const T* x, T inv, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vinv(inv);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> r = (Vec<T>::loadu(y + j) - Vec<T>::loadu(x + j)) * vinv;
    at::vec::fmadd(r, r, Vec<T>::loadu(acc + j)).store(acc + j);
  }
  for (; j < n; ++j) {
    const T r = (y[j] - x[j]) * inv;
    acc[j] += r * r;
  }
}

// r = y - x; x <- g r inv2; returns sum g r^2 (the Gaussian mean and noise gradients of one class row).
template <typename T>
T gauss_grad_rows(T* x, const T* y, const T* g, T inv2, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vinv2(inv2);
  Vec<T> acc(0);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> r = Vec<T>::loadu(y + j) - Vec<T>::loadu(x + j);
    const Vec<T> gr = Vec<T>::loadu(g + j) * r;
    (gr * vinv2).store(x + j);
    acc = at::vec::fmadd(gr, r, acc);
  }
  T total = lane_sum(acc);
  for (; j < n; ++j) {
    const T r = y[j] - x[j], gr = g[j] * r;
    x[j] = gr * inv2;
    total += gr * r;
  }
  return total;
}

// Gaussian targets class-major ([C, N]) so the epilogues vectorise over rows.
template <typename T>
Tensor small_target_t(const Heads<T>& p) {
  return at::from_blob(const_cast<T*>(p.target_val), {p.N, p.C}, p.hidden2d.options()).t().contiguous();
}

// Forward epilogue of a chunk: adds the bias into S (class-major logits, in place) and writes
// loglik / aux (the logsumexp) of its rows. One task per (depth, kSmallRowTask rows), vectorised
// over rows: elementwise max / sum-exp across the C class rows, no online rescaling.
template <typename T>
void small_forward_epilogue(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, const T* y, T* loglik,
                            T* aux) {
  const int64_t per_depth_tasks = ceil_div(k.m, kSmallRowTask);
  at::parallel_for(0, k.g * per_depth_tasks, 1, [&](int64_t t0, int64_t t1) {
    T mx[kSmallRowTask], se[kSmallRowTask];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lr = t / per_depth_tasks, i0 = (t % per_depth_tasks) * kSmallRowTask;
      const int64_t m = std::min(kSmallRowTask, k.m - i0), l = k.l0 + lr, n0 = k.n0 + i0;
      const T* b = small_bias(p, l);
      std::fill(mx, mx + m, -std::numeric_limits<T>::infinity());
      std::fill(se, se + m, T(0));
      for (int64_t c = 0; c < p.C; ++c) {
        T* s = S.row(lr, c) + i0;
        if (b) add_scalar(s, b[c], m);
        if (p.gaussian)
          add_gauss_sq_into(se, y + c * p.N + n0, s, p.inv_s[c], m);
        else
          max_into(mx, s, m);
      }
      T* out = loglik + l * p.N + n0;
      if (p.gaussian) {
        for (int64_t i = 0; i < m; ++i) out[i] = T(-0.5) * se[i] + p.gauss_const;
        continue;
      }
      // all -inf logits give lse = -inf + log(NaN) = NaN, as on the class-tiled path
      for (int64_t c = 0; c < p.C; ++c) add_exp_into(se, S.row(lr, c) + i0, mx, m);
      for (int64_t i = 0; i < m; ++i) {
        const T lse = mx[i] + std::log(se[i]);
        const int64_t target = p.target_idx[n0 + i];
        aux[l * p.N + n0 + i] = lse;
        out[i] = target == p.ignore_index ? T(0) : S.row(lr, target)[i0 + i] - lse;
      }
    }
  });
}

// Backward epilogue of a chunk: G^T overwrites the logits (bias added first unless the forward
// epilogue already did), one (depth, class) row per task; row_sums [g * C, 2] gets each row's sum
// (d_bias) and sum g r^2 (Gaussian d_noise_std), reduced by the caller in a fixed order.
// g: upstream gradient with ignored rows zeroed.
template <typename T>
void small_backward_epilogue(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, const T* y, const T* g,
                             const T* lse, bool add_bias, T* row_sums) {
  at::parallel_for(0, k.g * p.C, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lr = t / p.C, c = t % p.C, l = k.l0 + lr, r0 = l * p.N + k.n0;
      T* s = S.row(lr, c);
      const T* b = small_bias(p, l);
      if (b && add_bias) add_scalar(s, b[c], k.m);
      if (p.gaussian) {
        row_sums[2 * t + 1] = gauss_grad_rows(s, y + c * p.N + k.n0, g + r0, p.inv_s2[c], k.m);
      } else {
        softmax_grad_rows(s, lse + r0, g + r0, k.m);
        const int64_t* target = p.target_idx + k.n0;
        for (int64_t i = 0; i < k.m; ++i)
          if (target[i] == c) s[i] += g[r0 + i];
      }
      row_sums[2 * t] = p.bias ? sum_of(s, k.m) : T(0);
    }
  });
}

// dH = G W written straight into the chunk's rows (each row once), and dW = G^T H: written by the
// first chunk that touches a head (whole depths: every per-depth chunk), accumulated by the later
// row ranges of a split depth / of a shared head. So no gradient output needs a zero fill.
template <typename T>
void small_backward_gemms(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, Tensor& d_hidden2d,
                          Tensor& d_weight) {
  if (small_batched(p, k)) {
    Tensor H = small_hidden(p, p.hidden2d, k), dH = small_hidden(p, d_hidden2d, k);
    at::bmm_out(dH, S.S.transpose(1, 2), small_heads(p, k));
    if (p.per_depth) {
      Tensor dW = d_weight.narrow(0, k.l0, k.g);
      if (k.n0 == 0)
        at::bmm_out(dW, S.S, H);
      else
        dW.baddbmm_(S.S, H);
    } else {  // shared head over all depths of a row range: [g, C, D] products summed over depths
      Tensor parts = at::bmm(S.S, H);
      if (k.n0 == 0)
        at::sum_out(d_weight, parts, 0);
      else
        d_weight.add_(parts.sum(0));
    }
  } else {
    const int64_t r0 = k.l0 * p.N + k.n0, m = k.g * k.m;
    Tensor dH = d_hidden2d.narrow(0, r0, m);
    at::mm_out(dH, S.S.t(), p.weight);
    if (r0 == 0)
      at::mm_out(d_weight, S.S, p.hidden2d.narrow(0, r0, m));
    else
      d_weight.addmm_(S.S, p.hidden2d.narrow(0, r0, m));
  }
}

// ---------------------------------------------------------------- forward
// Forward epilogue of one class tile S ([m, ct], bias included): online logsumexp and target pick
// (categorical) or squared residual sum (Gaussian) into the per-row state.
template <typename T>
void forward_tile(const Heads<T>& p, T* s, int64_t r0, int64_t m, int64_t c0, int64_t ct, T* mx, T* se,
                  T* picked) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = r0 + i;
    T* srow = s + i * ct;
    if (p.gaussian) {
      se[i] += gauss_sq(srow, p.target_val + (r % p.N) * p.C + c0, p.inv_s.data() + c0, ct);
      continue;
    }
    // online logsumexp: rescale the running sum to the new maximum (a NaN maximum sticks).
    // While every logit so far is -inf there is nothing to add (exp(-inf - -inf) is NaN);
    // the picked logit is still taken, so all -inf logits give -inf - -inf = NaN.
    const T new_max = max_nan(mx[i], add_bias_max(srow, static_cast<const T*>(nullptr), ct));
    if (new_max != -std::numeric_limits<T>::infinity()) {
      se[i] = se[i] * std::exp(mx[i] - new_max) + sum_exp(srow, new_max, ct);
      mx[i] = new_max;
    }
    const int64_t t = p.target_idx[r % p.N];
    if (t >= c0 && t < c0 + ct) picked[i] = srow[t - c0];
  }
}

// Forward of one row block into loglik / aux. keep_rows > 0 keeps the logits for a fused backward
// loop: tile c0 is left at offset c0 * keep_rows + keep_row0 * ct of buf, i.e. in the class-tile
// c0 slab [keep_rows, ct] of a group of blocks, at row keep_row0; otherwise every tile reuses the
// start of buf.
// Forward state of rows [r0, r0 + m) across class tiles (forward_tile), then their loglik / aux.
template <typename T>
struct RowState {
  int64_t r0, m;
  std::vector<T> mx, se, picked;
  RowState(int64_t r0_, int64_t m_)
      : r0(r0_), m(m_), mx(m_, -std::numeric_limits<T>::infinity()), se(m_, T(0)), picked(m_, T(0)) {}

  void tile(const Heads<T>& p, T* s, int64_t c0, int64_t ct) {
    forward_tile(p, s, r0, m, c0, ct, mx.data(), se.data(), picked.data());
  }

  void finish(const Heads<T>& p, T* loglik, T* aux) const {
    for (int64_t i = 0; i < m; ++i) {
      const int64_t r = r0 + i;
      if (p.gaussian) {
        loglik[r] = T(-0.5) * se[i] + p.gauss_const;
      } else {
        const T lse = mx[i] + std::log(se[i]);
        aux[r] = lse;
        loglik[r] = p.target_idx[r % p.N] == p.ignore_index ? T(0) : picked[i] - lse;
      }
    }
  }
};

template <typename T>
void forward_block(const Heads<T>& p, Tensor& buf, int64_t keep_rows, int64_t keep_row0, int64_t r0, int64_t m,
                   T* loglik, T* aux) {
  RowState<T> state(r0, m);
  for (int64_t c0 = 0; c0 < p.C; c0 += p.class_tile) {
    const int64_t ct = std::min(p.class_tile, p.C - c0);
    Tensor S = p.logits(buf.narrow(0, keep_rows ? c0 * keep_rows + keep_row0 * ct : 0, m * ct), r0, m, c0, ct);
    state.tile(p, S.data_ptr<T>(), c0, ct);
  }
  state.finish(p, loglik, aux);
}

template <typename T>
void forward_impl(const Heads<T>& p, T* loglik, T* aux) {
  const auto blocks = p.row_blocks();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = at::empty({p.row_tile * p.class_tile}, p.hidden2d.options());
    for (int64_t bi = b0; bi < b1; ++bi)
      forward_block(p, buf, 0, 0, blocks[bi].first, blocks[bi].second - blocks[bi].first, loglik, aux);
  });
}

// loglik [L, N] and aux (categorical logsumexp [L, N], Gaussian empty).
std::tuple<Tensor, Tensor> forward_outputs(const Tensor& hidden, bool gaussian) {
  const int64_t L = hidden.size(0), N = hidden.size(1);
  return {at::empty({L, N}, hidden.options()),
          gaussian ? at::empty({0}, hidden.options()) : at::empty({L, N}, hidden.options())};
}

template <typename T>
T* aux_ptr(Tensor& aux, bool gaussian) {
  return gaussian ? nullptr : aux.data_ptr<T>();
}

// ---------------------------------------------------------------- backward
// Gradient sinks of one task: where its dH rows, dW rows, d_bias and d_noise go.
template <typename T>
struct Sinks {
  Tensor d_hidden2d;  // [L*N, D]
  Tensor d_weight;    // [C, D] or [L, C, D]
  T* d_bias;          // [C] or [L*C] or null
  T* d_noise;         // [C] or null (gaussian partial sum of g r^2)
};

// Backward epilogue of one logits tile s ([m, ct], bias included; overwritten): G = dloglik/dS,
// plus the d_bias / d_noise column sums.
template <typename T>
void backward_epilogue(const Heads<T>& p, const T* grad, const T* lse, T* s, int64_t r0, int64_t m, int64_t c0,
                       int64_t ct, Sinks<T>& out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = r0 + i;
    T* srow = s + i * ct;
    const T g = grad[r];
    if (p.gaussian) {
      gauss_grad(srow, p.target_val + (r % p.N) * p.C + c0, p.inv_s2.data() + c0, g,
                 out.d_noise ? out.d_noise + c0 : nullptr, ct);
    } else {
      const int64_t t = p.target_idx[r % p.N];
      if (t == p.ignore_index || g == T(0)) {
        std::fill(srow, srow + ct, T(0));
        continue;
      }
      softmax_grad(srow, lse[r], g, ct);
      if (t >= c0 && t < c0 + ct) srow[t - c0] += g;
    }
    if (out.d_bias) add_into(out.d_bias + (p.bias_per_depth ? (r / p.N) * p.C : 0) + c0, srow, ct);
  }
}

// Backward of one logits tile S ([m, ct]): the epilogue, then dH += G W_t and dW_t += G^T H.
template <typename T>
void backward_tile(const Heads<T>& p, const T* grad, const T* lse, Tensor& S, int64_t r0, int64_t m, int64_t c0,
                   int64_t ct, Sinks<T>& out) {
  backward_epilogue(p, grad, lse, S.data_ptr<T>(), r0, m, c0, ct, out);
  Tensor W_t = p.head(r0).narrow(0, c0, ct);
  Tensor dH = out.d_hidden2d.narrow(0, r0, m);
  dH.addmm_(S, W_t);
  Tensor dW = (p.per_depth ? out.d_weight.select(0, r0 / p.N) : out.d_weight).narrow(0, c0, ct);
  dW.addmm_(S.t(), p.hidden2d.narrow(0, r0, m));
}

// Backward of one tile that recomputes its logits into buf.
template <typename T>
void backward_recompute(const Heads<T>& p, const T* grad, const T* lse, Tensor& buf, int64_t r0, int64_t m,
                        int64_t c0, int64_t ct, Sinks<T>& out) {
  Tensor S = p.logits(buf, r0, m, c0, ct);
  backward_tile(p, grad, lse, S, r0, m, c0, ct, out);
}

// Sums partial buffers into dst in a fixed order (partials[0] first), in parallel over elements.
template <typename T>
void reduce_into(T* dst, const std::vector<T*>& partials, int64_t n) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t e0, int64_t e1) {
    for (T* part : partials) add_into(dst + e0, part + e0, e1 - e0);
  });
}

// Gradient outputs and their per-task sinks. A task owns either a class range (its dW rows are
// exclusive, dH is shared) or a row range (dH exclusive, dW shared). Task 0 accumulates the
// shared gradient in the output, the others in zeroed partials; bias / noise column sums are
// per task. finish() adds everything up in task order: same thread count -> bit-identical.
template <typename T>
struct Gradients {
  Tensor d_hidden2d, d_weight;  // outputs
  T* d_bias;                    // output or null
  int64_t bias_numel;
  T* d_noise;                   // output or null
  bool by_class = false;
  std::vector<Tensor> shared_parts;
  Tensor small;                 // [tasks, bias_numel (+ C)]

  void plan(bool by_class_, int64_t ntasks) {
    by_class = by_class_;
    d_hidden2d.zero_();  // the class-tiled passes accumulate into dH and dW
    d_weight.zero_();
    Tensor& shared_out = by_class ? d_hidden2d : d_weight;
    shared_parts.assign(ntasks, Tensor());
    shared_parts[0] = shared_out;
    for (int64_t k = 1; k < ntasks; ++k) shared_parts[k] = at::zeros_like(shared_out);
    small = at::zeros({ntasks, bias_numel + (d_noise ? d_weight.size(-2) : 0)}, d_hidden2d.options());
  }

  Sinks<T> sinks(int64_t k) {
    T* small_k = small.select(0, k).data_ptr<T>();
    return {by_class ? shared_parts[k] : d_hidden2d, by_class ? d_weight : shared_parts[k],
            bias_numel ? small_k : nullptr, d_noise ? small_k + bias_numel : nullptr};
  }

  void finish(const Heads<T>& p, const T* grad) {
    std::vector<T*> parts;
    for (size_t k = 1; k < shared_parts.size(); ++k) parts.push_back(shared_parts[k].data_ptr<T>());
    reduce_into(shared_parts[0].data_ptr<T>(), parts, shared_parts[0].numel());
    // bias and noise partials: sum tasks in order (small vectors)
    const int64_t width = small.size(1);
    std::vector<T> totals(width, T(0));
    const T* sp = small.data_ptr<T>();
    for (int64_t k = 0; k < small.size(0); ++k) add_into(totals.data(), sp + k * width, width);
    if (bias_numel) std::copy(totals.begin(), totals.begin() + bias_numel, d_bias);
    if (d_noise) finish_noise_grad(p, grad, totals.data() + bias_numel, d_noise);
  }
};

template <typename T>
void backward_impl(const Heads<T>& p, const T* grad, const T* lse, Gradients<T>& out) {
  const auto blocks = p.row_blocks();
  const int64_t nblocks = blocks.size();
  const int64_t ct_max = p.class_tile;
  const int64_t nctiles = ceil_div(p.C, ct_max);
  const int64_t threads = at::get_num_threads();
  // Split classes among tasks (each owns its dW rows, dH is reduced) when there are enough class
  // tiles and dH is the smaller buffer to replicate; otherwise split rows (dW is reduced).
  const bool by_class = nctiles >= threads && threads > 1 &&
                        (nblocks < threads || out.d_hidden2d.numel() < out.d_weight.numel());
  const int64_t ntasks = std::max<int64_t>(1, std::min(threads, by_class ? nctiles : nblocks));
  out.plan(by_class, ntasks);

  at::parallel_for(0, ntasks, 1, [&](int64_t k0, int64_t k1) {
    Tensor buf = at::empty({p.row_tile * ct_max}, p.hidden2d.options());
    for (int64_t k = k0; k < k1; ++k) {
      Sinks<T> sinks = out.sinks(k);
      if (by_class) {
        for (int64_t ci = k * nctiles / ntasks; ci < (k + 1) * nctiles / ntasks; ++ci) {
          const int64_t c0 = ci * ct_max, ct = std::min(ct_max, p.C - c0);
          for (const auto& blk : blocks)
            backward_recompute(p, grad, lse, buf, blk.first, blk.second - blk.first, c0, ct, sinks);
        }
      } else {
        for (int64_t bi = k * nblocks / ntasks; bi < (k + 1) * nblocks / ntasks; ++bi) {
          for (int64_t c0 = 0; c0 < p.C; c0 += ct_max) {
            backward_recompute(p, grad, lse, buf, blocks[bi].first, blocks[bi].second - blocks[bi].first, c0,
                               std::min(ct_max, p.C - c0), sinks);
          }
        }
      }
    }
  });
  out.finish(p, grad);
}

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

// The small-C path in one pass over the chunks: the logits of a chunk are computed once (one
// GEMM), then the forward epilogue (if loglik: writes loglik and lse) and, if out, the backward
// epilogue on the same buffer (G^T in place; lse read) and the dH / dW GEMMs. Forward: 1 GEMM;
// backward (lse from the forward): 3; fused (grad known up front): 3 instead of 4.
template <typename T>
void small_pass(const Heads<T>& p, T* loglik, T* lse, const T* grad, Gradients<T>* out,
                const Mixture<T>* mix = nullptr) {
  const auto chunks = small_chunks(p, mix != nullptr);
  Tensor buf = at::empty({std::min(kSmallChunkElems, std::max<int64_t>(1, p.L * p.C * p.N))}, p.hidden2d.options());
  const Tensor yt = p.gaussian ? small_target_t(p) : Tensor();
  const T* y = p.gaussian ? yt.data_ptr<T>() : nullptr;
  std::vector<T> g, row_sums, bias_sums, sq_sums;  // row_sums: [g, C, 2] per chunk
  if (out) {
    if (mix)
      g.assign(p.rows, T(0));  // filled chunk by chunk from the log-likelihoods
    else
      g.assign(grad, grad + p.rows);
    if (!p.gaussian && !mix)
      for (int64_t r = 0; r < p.rows; ++r)
        if (p.target_idx[r % p.N] == p.ignore_index) g[r] = T(0);
    bias_sums.assign(out->bias_numel, T(0));
    sq_sums.assign(out->d_noise ? p.C : 0, T(0));
  }
  for (const SmallChunk& k : chunks) {
    const SmallTile<T> S = small_logits(p, buf, k);
    if (loglik) small_forward_epilogue(p, S, k, y, loglik, lse);
    if (!out) continue;
    if (mix) mix->grad(p, loglik, k.n0, k.n0 + k.m, g.data());
    row_sums.resize(k.g * p.C * 2);
    small_backward_epilogue(p, S, k, y, g.data(), lse, loglik == nullptr, row_sums.data());
    for (int64_t t = 0; t < k.g * p.C; ++t) {  // (chunk, depth, class) order: thread-count independent
      const int64_t l = k.l0 + t / p.C, c = t % p.C;
      if (out->d_bias) bias_sums[(p.bias_per_depth ? l * p.C : 0) + c] += row_sums[2 * t];
      if (out->d_noise) sq_sums[c] += row_sums[2 * t + 1];
    }
    small_backward_gemms(p, S, k, out->d_hidden2d, out->d_weight);
  }
  if (!out) return;
  std::copy(bias_sums.begin(), bias_sums.end(), out->d_bias);
  if (out->d_noise) finish_noise_grad(p, g.data(), sq_sums.data(), out->d_noise);
}

// Forward with the gradient of sum(grad * loglik) in the same pass (grad known up front, e.g.
// the expected-mode weights): each task owns groups of row blocks; per group the forward keeps
// the blocks' whole [m, C] logits (one buffer per task, never [L, N, C]) and the backward loop
// turns the stored tiles into G in place, so the logits are computed once: 3 GEMMs in all instead
// of 4. Expected mode: a group is one row block. Mixture mode (mix): a group is the L blocks of a
// sample range (row_tile / L samples of each depth), whose log-likelihoods give the gradient
// (Mixture::grad) between the forward and the backward loops.
// Small-C heads keep a whole chunk of logits (small_pass); problems with fewer groups than
// threads use forward + recompute.
template <typename T>
void fused_impl(const Heads<T>& p, const T* grad, T* loglik, T* aux, Gradients<T>& out,
                const Mixture<T>* mix = nullptr) {
  if (p.class_major) return small_pass(p, loglik, aux, grad, &out, mix);
  std::vector<T> mix_grad(mix ? p.rows : 0);
  if (mix) grad = mix_grad.data();  // each group fills the rows of its samples
  using Block = std::pair<int64_t, int64_t>;
  std::vector<std::vector<Block>> groups;
  if (mix) {
    const int64_t k = std::max<int64_t>(8, p.row_tile / p.L);
    for (int64_t n0 = 0; n0 < p.N; n0 += k) {
      groups.emplace_back();
      for (int64_t l = 0; l < p.L; ++l) groups.back().emplace_back(l * p.N + n0, l * p.N + std::min(n0 + k, p.N));
    }
  } else {
    for (const Block& b : p.row_blocks()) groups.push_back({b});
  }
  const int64_t ngroups = groups.size();
  const int64_t threads = at::get_num_threads();
  if (ngroups < threads) {
    forward_impl(p, loglik, aux);
    if (mix) mix->grad(p, loglik, 0, p.N, mix_grad.data());
    return backward_impl(p, grad, aux, out);
  }
  int64_t group_rows = 0;
  for (const auto& blocks : groups) {
    int64_t rows = 0;
    for (const Block& b : blocks) rows += b.second - b.first;
    group_rows = std::max(group_rows, rows);
  }
  // Mixture groups with a shared head gather their hidden rows (hbuf) so each class tile takes
  // one GEMM per product for the whole group (M or K = group rows, as in expected mode), the
  // blocks' logits stacked in the tile's slab; dH goes through dhbuf and is scattered back.
  const bool gathered = groups[0].size() > 1 && !p.per_depth;
  const int64_t ntasks = threads;
  out.plan(false, ntasks);
  at::parallel_for(0, ntasks, 1, [&](int64_t k0, int64_t k1) {
    Tensor buf = at::empty({group_rows * p.C}, p.hidden2d.options());
    Tensor hbuf = gathered ? at::empty({group_rows, p.D}, p.hidden2d.options()) : Tensor();
    Tensor dhbuf = gathered ? at::empty({group_rows, p.D}, p.hidden2d.options()) : Tensor();
    for (int64_t k = k0; k < k1; ++k) {
      Sinks<T> sinks = out.sinks(k);
      for (int64_t gi = k * ngroups / ntasks; gi < (k + 1) * ngroups / ntasks; ++gi) {
        const auto& blocks = groups[gi];
        // block b's logits: rows [row0[b], row0[b] + m) of each class-tile slab [rows, ct] at c0 * rows
        std::vector<int64_t> row0(blocks.size() + 1, 0);
        for (size_t b = 0; b < blocks.size(); ++b) row0[b + 1] = row0[b] + blocks[b].second - blocks[b].first;
        const int64_t rows = row0.back();
        auto slab = [&](int64_t c0, int64_t ct) { return buf.narrow(0, c0 * rows, rows * ct).view({rows, ct}); };
        if (gathered) {
          std::vector<RowState<T>> states;
          for (size_t b = 0; b < blocks.size(); ++b) {
            states.emplace_back(blocks[b].first, row0[b + 1] - row0[b]);
            hbuf.narrow(0, row0[b], states[b].m).copy_(p.hidden2d.narrow(0, blocks[b].first, states[b].m));
          }
          Tensor H = hbuf.narrow(0, 0, rows);
          for (int64_t c0 = 0; c0 < p.C; c0 += p.class_tile) {
            const int64_t ct = std::min(p.class_tile, p.C - c0);
            Tensor S = slab(c0, ct);
            at::mm_out(S, H, p.weight.narrow(0, c0, ct).t());
            for (size_t b = 0; b < blocks.size(); ++b) {
              T* s = S.data_ptr<T>() + row0[b] * ct;
              p.add_bias(s, states[b].r0, states[b].m, c0, ct);
              states[b].tile(p, s, c0, ct);
            }
          }
          for (const RowState<T>& state : states) state.finish(p, loglik, aux);
        } else {
          for (size_t b = 0; b < blocks.size(); ++b)
            forward_block(p, buf, rows, row0[b], blocks[b].first, row0[b + 1] - row0[b], loglik, aux);
        }
        if (mix) mix->grad(p, loglik, blocks[0].first, blocks[0].second, mix_grad.data());
        for (int64_t c0 = 0; c0 < p.C; c0 += p.class_tile) {
          const int64_t ct = std::min(p.class_tile, p.C - c0);
          Tensor S = slab(c0, ct);
          for (size_t b = 0; b < blocks.size(); ++b) {
            const int64_t r0 = blocks[b].first, m = row0[b + 1] - row0[b];
            Tensor Sb = S.narrow(0, row0[b], m);
            if (gathered)
              backward_epilogue(p, grad, aux, Sb.data_ptr<T>(), r0, m, c0, ct, sinks);
            else
              backward_tile(p, grad, aux, Sb, r0, m, c0, ct, sinks);
          }
          if (!gathered) continue;
          Tensor W_t = p.weight.narrow(0, c0, ct), dH = dhbuf.narrow(0, 0, rows);
          if (c0 == 0)
            at::mm_out(dH, S, W_t);
          else
            dH.addmm_(S, W_t);
          sinks.d_weight.narrow(0, c0, ct).addmm_(S.t(), hbuf.narrow(0, 0, rows));
        }
        if (gathered)
          for (size_t b = 0; b < blocks.size(); ++b)
            sinks.d_hidden2d.narrow(0, blocks[b].first, row0[b + 1] - row0[b])
                .copy_(dhbuf.narrow(0, row0[b], row0[b + 1] - row0[b]));
      }
    }
  });
  out.finish(p, grad);
}

// Gradient outputs, uninitialised: every path writes all of them (the class-tiled ones zero dH / dW
// first, Gradients::plan); d_bias / d_noise are empty when the input is None.
struct GradTensors {
  Tensor d_hidden, d_weight, d_bias, d_noise;
  GradTensors(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
              const c10::optional<Tensor>& noise_std, bool gaussian)
      : d_hidden(at::empty_like(hidden)), d_weight(at::empty_like(weight)) {
    has_bias = bias.has_value() && bias->defined();
    has_noise = gaussian && noise_std.has_value() && noise_std->defined();
    d_bias = has_bias ? at::empty_like(*bias) : at::empty({0}, hidden.options());
    d_noise = has_noise ? at::empty_like(*noise_std) : at::empty({0}, hidden.options());
  }
  bool has_bias, has_noise;

  void zero() {  // no rows: nothing to write, zero gradients
    for (Tensor* t : {&d_weight, &d_bias, &d_noise}) t->zero_();
  }

  template <typename T>
  Gradients<T> sinks(int64_t rows, int64_t D) {
    return {d_hidden.view({rows, D}), d_weight, has_bias ? d_bias.data_ptr<T>() : nullptr,
            has_bias ? d_bias.numel() : 0, has_noise ? d_noise.data_ptr<T>() : nullptr};
  }
};

template <typename T>
void check_grad(const Heads<T>& p, const Tensor& grad, const char* op) {
  TORCH_CHECK(grad.is_contiguous() && grad.numel() == p.rows && grad.scalar_type() == p.hidden2d.scalar_type(),
              op, ": grad_loglik must be a contiguous [L, N] tensor of the hidden dtype, got ", grad.sizes(), " ",
              grad.scalar_type());
}

std::tuple<Tensor, Tensor> depth_loglik_fwd(const Tensor& hidden, const Tensor& weight,
                                            const c10::optional<Tensor>& bias, const Tensor& target,
                                            const c10::optional<Tensor>& noise_std, bool gaussian,
                                            int64_t ignore_index) {
  auto [loglik, aux] = forward_outputs(hidden, gaussian);
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "depth_loglik_fwd", [&] {
    Heads<scalar_t> p(hidden, weight, bias, target, noise_std, gaussian, ignore_index);
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
    int64_t ignore_index) {
  GradTensors g(hidden, weight, bias, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "depth_loglik_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, bias, target, noise_std, gaussian, ignore_index);
    check_grad(p, grad_loglik, "depth_loglik_bwd");
    TORCH_CHECK(gaussian || (aux.numel() == p.rows && aux.is_contiguous()), "depth_loglik_bwd: aux must be [L, N]");
    if (p.rows == 0) return g.zero();
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    scalar_t* lse = gaussian ? nullptr : aux.data_ptr<scalar_t>();
    if (p.class_major)
      small_pass<scalar_t>(p, nullptr, lse, grad_loglik.data_ptr<scalar_t>(), &out);
    else
      backward_impl<scalar_t>(p, grad_loglik.data_ptr<scalar_t>(), lse, out);
  });
  return {g.d_hidden, g.d_weight, g.d_bias, g.d_noise};
}

// depth_loglik_fwd and depth_loglik_bwd(grad_loglik, ...) in one pass (see fused_impl).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> depth_loglik_fwd_bwd(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& noise_std, const Tensor& grad_loglik, bool gaussian, int64_t ignore_index) {
  auto [loglik, aux] = forward_outputs(hidden, gaussian);
  GradTensors g(hidden, weight, bias, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "depth_loglik_fwd_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, bias, target, noise_std, gaussian, ignore_index);
    check_grad(p, grad_loglik, "depth_loglik_fwd_bwd");
    if (p.rows == 0) return g.zero();
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    fused_impl<scalar_t>(p, grad_loglik.data_ptr<scalar_t>(), loglik.data_ptr<scalar_t>(),
                         aux_ptr<scalar_t>(aux, gaussian), out);
  });
  return {loglik, aux, g.d_hidden, g.d_weight, g.d_bias, g.d_noise};
}

// Mixture-mode NLL (see Mixture) and its head gradients in one pass (fused_impl): the logits of
// every depth of a range of samples are kept until their gradient is known: 3 GEMMs.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> depth_loglik_mixture_fwd_bwd(
    const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& noise_std, const Tensor& log_weights, const Tensor& row_scale, bool gaussian,
    int64_t ignore_index) {
  auto [loglik, aux] = forward_outputs(hidden, gaussian);
  GradTensors g(hidden, weight, bias, noise_std, gaussian);
  AT_DISPATCH_FLOATING_TYPES(hidden.scalar_type(), "depth_loglik_mixture_fwd_bwd", [&] {
    Heads<scalar_t> p(hidden, weight, bias, target, noise_std, gaussian, ignore_index);
    TORCH_CHECK(log_weights.is_contiguous() && log_weights.numel() == p.L &&
                    log_weights.scalar_type() == hidden.scalar_type(),
                "depth_loglik_mixture_fwd_bwd: log_weights must be a contiguous [L] tensor of the hidden dtype, got ",
                log_weights.sizes(), " ", log_weights.scalar_type());
    TORCH_CHECK(row_scale.is_contiguous() && row_scale.numel() == p.N && row_scale.scalar_type() == hidden.scalar_type(),
                "depth_loglik_mixture_fwd_bwd: row_scale must be a contiguous [N] tensor of the hidden dtype, got ",
                row_scale.sizes(), " ", row_scale.scalar_type());
    if (p.rows == 0) return g.zero();
    Gradients<scalar_t> out = g.sinks<scalar_t>(p.rows, p.D);
    const Mixture<scalar_t> mix{log_weights.data_ptr<scalar_t>(), row_scale.data_ptr<scalar_t>()};
    scalar_t* ll = loglik.data_ptr<scalar_t>();
    scalar_t* lse = aux_ptr<scalar_t>(aux, gaussian);
    fused_impl<scalar_t>(p, nullptr, ll, lse, out, &mix);
  });
  return {loglik, aux, g.d_hidden, g.d_weight, g.d_bias, g.d_noise};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("depth_loglik_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "bool gaussian, int ignore_index) -> (Tensor, Tensor)");
  m.def("depth_loglik_bwd(Tensor grad_loglik, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? noise_std, Tensor aux, bool gaussian, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("depth_loglik_fwd_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "Tensor grad_loglik, bool gaussian, int ignore_index) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("depth_loglik_mixture_fwd_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? noise_std, "
        "Tensor log_weights, Tensor row_scale, bool gaussian, int ignore_index) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("depth_loglik_fwd", &depth_loglik_fwd);
  m.impl("depth_loglik_bwd", &depth_loglik_bwd);
  m.impl("depth_loglik_fwd_bwd", &depth_loglik_fwd_bwd);
  m.impl("depth_loglik_mixture_fwd_bwd", &depth_loglik_mixture_fwd_bwd);
}
