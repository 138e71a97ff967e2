// depth_loglik backward epilogue, class-tiled (C > kSmallClasses): turns a logits tile into the
// logits gradient G in place (backward_epilogue), for the gradient pass (tiled_pass,
// heads_fused.cpp) that feeds G to the dH and dW GEMMs.
#include "heads_common.h"

namespace udn_heads {
namespace {

// s <- (base - gs exp(s - lse)) (1 - (s / cap)^2): the categorical logits gradient but its target
// term, base = g eps / C, gs = g (1 + 2 zs lse) (docs/heads.md, "Loss options"; cap = 0: no
// soft-cap, factor 1). Without options (base 0, gs = g) it is exactly -g exp(s - lse).
template <typename T>
void softmax_grad(T* s, T lse, T gs, T base, T cap, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vlse(lse), vgs(gs), vbase(base), one(T(1)), vinv(cap != T(0) ? T(1) / cap : T(0));
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const Vec<T> t = Vec<T>::loadu(s + j), u = t * vinv;
    (at::vec::fnmadd(vgs, (t - vlse).exp(), vbase) * at::vec::fnmadd(u, u, one)).store(s + j);
  }
  const T inv = cap != T(0) ? T(1) / cap : T(0);
  for (; j < n; ++j) s[j] = (base - gs * std::exp(s[j] - lse)) * (T(1) - s[j] * inv * s[j] * inv);
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
// plus the d_bias / noise column sums (when wanted) of the tile's classes.
template <typename T>
void backward_epilogue(const Heads<T>& p, const T* grad, const T* lse, T* s, int64_t r0, int64_t m, int64_t c0,
                       int64_t ct, Gradients<T>& out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = r0 + i;
    T* srow = s + i * ct;
    const T g = grad[r];
    if (p.gaussian) {
      gauss_grad(srow, p.target_val + (r % p.N) * p.C + c0, p.inv_s2.data() + c0, g,
                 out.d_noise ? out.sq_sums.data() + c0 : nullptr, ct);
    } else {
      const int64_t t = p.target_idx[r % p.N];
      if (t == p.ignore_index || g == T(0)) {
        std::fill(srow, srow + ct, T(0));
        continue;
      }
      const bool has_target = t >= c0 && t < c0 + ct;
      const T target_factor = has_target ? p.cap_factor(srow[t - c0]) : T(0);  // before srow is overwritten
      softmax_grad(srow, lse[r], g * p.softmax_scale(lse[r]), g * p.smoothing / static_cast<T>(p.C), p.cap, ct);
      if (has_target) srow[t - c0] += g * (T(1) - p.smoothing) * target_factor;
    }
    if (out.d_bias) add_into(out.d_bias + (p.bias_per_depth ? (r / p.N) * p.C : 0) + c0, srow, ct);
  }
}

#define UDN_HEADS_INSTANTIATE(T)                                                                              \
  template void backward_epilogue<T>(const Heads<T>&, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, \
                                     Gradients<T>&);
UDN_HEADS_INSTANTIATE(float)
UDN_HEADS_INSTANTIATE(double)
#undef UDN_HEADS_INSTANTIATE

}  // namespace udn_heads
