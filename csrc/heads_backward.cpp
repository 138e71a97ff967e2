// depth_loglik backward, class-tiled (C > kSmallClasses): recomputes each logits tile, turns it into
// the logits gradient G in place (backward_epilogue) and accumulates dH += G W_tile and
// dW_tile += G^T H. Tasks split the classes (dH reduced) or the row blocks (dW reduced), see
// backward_impl. The fused pass (heads_fused.cpp) reuses the per-tile steps.
#include "heads_common.h"

namespace udn_heads {
namespace {

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

}  // namespace

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

#define UDN_HEADS_INSTANTIATE(T)                                                                              \
  template void backward_epilogue<T>(const Heads<T>&, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                     Sinks<T>&);                                                                 \
  template void backward_tile<T>(const Heads<T>&, const T*, const T*, Tensor&, int64_t, int64_t, int64_t, int64_t, \
                                 Sinks<T>&);                                                                     \
  template void backward_impl<T>(const Heads<T>&, const T*, const T*, Gradients<T>&);
UDN_HEADS_INSTANTIATE(float)
UDN_HEADS_INSTANTIATE(double)
#undef UDN_HEADS_INSTANTIATE

}  // namespace udn_heads
