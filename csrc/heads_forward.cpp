// depth_loglik forward, class-tiled (C > kSmallClasses; smaller heads take heads_small.cpp): per
// row block, logits tiles H W_tile^T + bias fold into an online logsumexp and target pick
// (categorical) or a squared residual sum (Gaussian) per row, then loglik / aux. Also the per-tile
// step (forward_tile) that the gradient pass (heads_fused.cpp) reuses.
#include "heads_common.h"

namespace udn_heads {
namespace {

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

}  // namespace

// Forward epilogue of one class tile S ([m, ct], bias included): online logsumexp and target pick
// (categorical) or squared residual sum (Gaussian) into the per-row state.
template <typename T>
void forward_tile(const Heads<T>& p, T* s, int64_t r0, int64_t m, int64_t c0, int64_t ct, T* mx, T* se,
                  T* picked, T* tsum, int64_t* arg) {
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
    const T tile_max = add_bias_max(srow, static_cast<const T*>(nullptr), ct);
    // first argmax: a later tile takes over only with a strictly larger maximum (a NaN maximum
    // finds no index: no hit)
    if (p.stats && (arg[i] < 0 || tile_max > mx[i])) arg[i] = c0 + (std::find(srow, srow + ct, tile_max) - srow);
    if (p.smoothing != T(0)) tsum[i] += sum_of(srow, ct);
    const T new_max = max_nan(mx[i], tile_max);
    if (new_max != -std::numeric_limits<T>::infinity()) {
      se[i] = se[i] * std::exp(mx[i] - new_max) + sum_exp(srow, new_max, ct);
      mx[i] = new_max;
    }
    const int64_t t = p.target_idx[r % p.N];
    if (t >= c0 && t < c0 + ct) picked[i] = srow[t - c0];
  }
}

template <typename T>
void forward_impl(const Heads<T>& p, T* loglik, T* aux) {
  const auto blocks = p.row_blocks(p.row_tile);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    Tensor buf = at::empty({p.row_tile * p.class_tile}, p.opts);
    for (int64_t bi = b0; bi < b1; ++bi) {
      RowState<T> state(blocks[bi].first, blocks[bi].second - blocks[bi].first);
      for (int64_t c0 = 0; c0 < p.C; c0 += p.class_tile) {
        const int64_t ct = std::min(p.class_tile, p.C - c0);
        state.tile(p, p.logits(buf, state.r0, state.m, c0, ct).template data_ptr<T>(), c0, ct);
      }
      state.finish(p, loglik, aux);
    }
  });
}

#define UDN_HEADS_INSTANTIATE(T)                                                                           \
  template void forward_tile<T>(const Heads<T>&, T*, int64_t, int64_t, int64_t, int64_t, T*, T*, T*, T*, int64_t*); \
  template void forward_impl<T>(const Heads<T>&, T*, T*);
UDN_HEADS_INSTANTIATE(float)
UDN_HEADS_INSTANTIATE(double)
#undef UDN_HEADS_INSTANTIATE

}  // namespace udn_heads
