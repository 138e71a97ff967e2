// depth_loglik forward, backward and both in one pass for small heads (C <= kSmallClasses): the
// batched class-major path, small_pass. With so few classes the class-tiled GEMMs are tiny (K = C
// for dH) and per-call overhead rules (heads-small, the udn-step heads). So the logits are computed
// class-major for a whole chunk of depths with ONE GEMM -- bmm over depths for per-depth heads,
// S^T = W H^T over the stacked rows for a shared head -- into a buffer of at most kSmallChunkElems;
// one parallel_for runs the row-vectorised epilogue, and the backward writes dH and dW with one
// GEMM each (dH directly into the output, dW without per-thread partials). Chunking depends on the
// shape only.
#include "heads_common.h"

namespace udn_heads {
namespace {

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

// x <- (base - gs exp(x - lse)) (1 - (x / cap)^2), elementwise (gs, base, lse per row): the
// categorical logits gradient but its target term (Heads::softmax_scale; cap = 0: factor 1).
template <typename T>
void softmax_grad_rows(T* x, const T* lse, const T* gs, const T* base, T cap, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const T inv = cap != T(0) ? T(1) / cap : T(0);
  const Vec<T> vinv(inv), one(T(1));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> t = Vec<T>::loadu(x + j), u = t * vinv;
    const Vec<T> e = (t - Vec<T>::loadu(lse + j)).exp();
    (at::vec::fnmadd(Vec<T>::loadu(gs + j), e, Vec<T>::loadu(base + j)) * at::vec::fnmadd(u, u, one)).store(x + j);
  }
  for (; j < n; ++j) x[j] = (base[j] - gs[j] * std::exp(x[j] - lse[j])) * (T(1) - x[j] * inv * x[j] * inv);
}

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
    at::bmm_out(S, small_heads(p, k), p.compute(small_hidden(p, p.hidden2d, k)).transpose(1, 2));
    return {S, S.data_ptr<T>(), p.C * k.m, k.m};
  }
  Tensor S = buf.narrow(0, 0, n).view({p.C, k.g * k.m});
  at::mm_out(S, p.weight, p.compute(p.hidden2d.narrow(0, k.l0 * p.N + k.n0, k.g * k.m)).t());
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
  return at::from_blob(const_cast<T*>(p.target_val), {p.N, p.C}, p.opts).t().contiguous();
}

// Forward epilogue of a chunk: adds the bias into S (class-major logits, in place) and writes
// loglik / aux (the logsumexp) of its rows. One task per (depth, kSmallRowTask rows), vectorised
// over rows: elementwise max / sum-exp across the C class rows, no online rescaling.
template <typename T>
void small_forward_epilogue(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, const T* y, T* loglik,
                            T* aux) {
  const int64_t per_depth_tasks = ceil_div(k.m, kSmallRowTask);
  at::parallel_for(0, k.g * per_depth_tasks, 1, [&](int64_t t0, int64_t t1) {
    T mx[kSmallRowTask], se[kSmallRowTask], tsum[kSmallRowTask];
    int64_t arg[kSmallRowTask];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lr = t / per_depth_tasks, i0 = (t % per_depth_tasks) * kSmallRowTask;
      const int64_t m = std::min(kSmallRowTask, k.m - i0), l = k.l0 + lr, n0 = k.n0 + i0;
      const T* b = small_bias(p, l);
      std::fill(mx, mx + m, -std::numeric_limits<T>::infinity());
      std::fill(se, se + m, T(0));
      std::fill(tsum, tsum + m, T(0));
      for (int64_t c = 0; c < p.C; ++c) {
        T* s = S.row(lr, c) + i0;
        if (b) add_scalar(s, b[c], m);
        if (p.cap != T(0)) soft_cap(s, p.cap, m);
        if (p.smoothing != T(0)) add_into(tsum, s, m);
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
      if (p.stats) {  // first argmax: the first class row reaching the maximum
        std::fill(arg, arg + m, -1);
        for (int64_t c = p.C - 1; c >= 0; --c)
          for (int64_t i = 0; i < m; ++i)
            if (S.row(lr, c)[i0 + i] == mx[i]) arg[i] = c;
      }
      for (int64_t i = 0; i < m; ++i) {
        const T lse = mx[i] + std::log(se[i]);
        const int64_t target = p.target_idx[n0 + i];
        aux[l * p.N + n0 + i] = lse;
        if (p.stats) aux[p.rows + l * p.N + n0 + i] = arg[i] == target ? T(1) : T(0);
        out[i] = target == p.ignore_index ? T(0) : p.loglik_of(S.row(lr, target)[i0 + i], tsum[i], lse);
      }
    }
  });
}

// Backward epilogue of a chunk: G^T overwrites the logits (bias added first unless the forward
// epilogue already did), one (depth, class) row per task; row_sums [g * C, 2] gets each row's sum
// (d_bias, when want_bias) and sum g r^2 (Gaussian d_noise_std), reduced by the caller in a fixed order.
// g: upstream gradient with ignored rows zeroed.
template <typename T>
void small_backward_epilogue(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, const T* y, const T* g,
                             const T* lse, bool add_bias, bool want_bias, T* row_sums) {
  // Per row of the chunk (categorical): the softmax factor gs, the smoothing term base and the
  // target term (1 - eps) g dt/dz at the target logit, read before the logits are overwritten.
  const int64_t* target = p.target_idx ? p.target_idx + k.n0 : nullptr;
  std::vector<T> gs, base, target_term;
  if (!p.gaussian) {
    gs.resize(k.g * k.m), base.resize(k.g * k.m), target_term.resize(k.g * k.m);
    for (int64_t lr = 0; lr < k.g; ++lr) {
      const int64_t l = k.l0 + lr, r0 = l * p.N + k.n0;
      const T* b = small_bias(p, l);
      for (int64_t i = 0; i < k.m; ++i) {
        const T gi = g[r0 + i];
        gs[lr * k.m + i] = gi * p.softmax_scale(lse[r0 + i]);
        base[lr * k.m + i] = gi * p.smoothing / static_cast<T>(p.C);
        T logit = 0;
        if (target[i] != p.ignore_index && p.cap != T(0)) {
          logit = S.row(lr, target[i])[i];
          if (add_bias) logit = p.cap * std::tanh((logit + (b ? b[target[i]] : T(0))) / p.cap);
        }
        target_term[lr * k.m + i] = gi * (T(1) - p.smoothing) * p.cap_factor(logit);
      }
    }
  }
  at::parallel_for(0, k.g * p.C, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lr = t / p.C, c = t % p.C, l = k.l0 + lr, r0 = l * p.N + k.n0;
      T* s = S.row(lr, c);
      const T* b = small_bias(p, l);
      if (b && add_bias) add_scalar(s, b[c], k.m);
      if (add_bias && p.cap != T(0)) soft_cap(s, p.cap, k.m);
      if (p.gaussian) {
        row_sums[2 * t + 1] = gauss_grad_rows(s, y + c * p.N + k.n0, g + r0, p.inv_s2[c], k.m);
      } else {
        softmax_grad_rows(s, lse + r0, gs.data() + lr * k.m, base.data() + lr * k.m, p.cap, k.m);
        for (int64_t i = 0; i < k.m; ++i)
          if (target[i] == c) s[i] += target_term[lr * k.m + i];
      }
      row_sums[2 * t] = want_bias ? sum_of(s, k.m) : T(0);
    }
  });
}

// dH = G W written straight into the chunk's rows (each row once), and dW = G^T H: written by the
// first chunk that touches a head (whole depths: every per-depth chunk), accumulated by the later
// row ranges of a split depth / of a shared head. So no gradient output needs a zero fill. An
// undefined d_hidden2d / d_weight is not wanted: its GEMM is skipped.
template <typename T>
void small_backward_gemms(const Heads<T>& p, const SmallTile<T>& S, const SmallChunk& k, Tensor& d_hidden2d,
                          Tensor& d_weight) {
  if (small_batched(p, k)) {
    Tensor H = p.compute(small_hidden(p, p.hidden2d, k));
    if (d_hidden2d.defined()) {
      Tensor dH = small_hidden(p, d_hidden2d, k);
      at::bmm_out(dH, S.S.transpose(1, 2), small_heads(p, k));
    }
    if (!d_weight.defined()) return;
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
    if (d_hidden2d.defined()) {
      Tensor dH = d_hidden2d.narrow(0, r0, m);
      at::mm_out(dH, S.S.t(), p.weight);
    }
    if (!d_weight.defined()) return;
    const Tensor H = p.compute(p.hidden2d.narrow(0, r0, m));
    if (r0 == 0)
      at::mm_out(d_weight, S.S, H);
    else
      d_weight.addmm_(S.S, H);
  }
}

}  // namespace

// The small-C path in one pass over the chunks: the logits of a chunk are computed once (one
// GEMM), then the forward epilogue (if loglik: writes loglik and lse) and, if out, the backward
// epilogue on the same buffer (G^T in place; lse read) and the dH / dW GEMMs. Forward: 1 GEMM;
// backward (lse from the forward): 3; fused (grad known up front): 3 instead of 4.
template <typename T>
void small_pass(const Heads<T>& p, T* loglik, T* lse, const T* grad, Gradients<T>* out,
                const Mixture<T>* mix) {
  const auto chunks = small_chunks(p, mix != nullptr);
  Tensor buf = at::empty({std::min(kSmallChunkElems, std::max<int64_t>(1, p.L * p.C * p.N))}, p.opts);
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
    small_backward_epilogue(p, S, k, y, g.data(), lse, loglik == nullptr, out->d_bias != nullptr, row_sums.data());
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

template void small_pass<float>(const Heads<float>&, float*, float*, const float*, Gradients<float>*,
                                const Mixture<float>*);
template void small_pass<double>(const Heads<double>&, double*, double*, const double*, Gradients<double>*,
                                 const Mixture<double>*);

}  // namespace udn_heads
