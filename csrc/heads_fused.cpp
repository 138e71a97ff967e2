// depth_loglik forward and backward in one pass when the upstream gradient is known before the
// forward (depth_loglik_fwd_bwd: expected-mode NLL) or follows from the log-likelihoods of a row's
// depths (depth_loglik_mixture_fwd_bwd: mixture NLL): a row block's logits tiles are kept after
// its forward and turned into G in place, 3 GEMMs instead of the 4 of forward + recomputing
// backward (fused_impl).
#include "heads_common.h"

namespace udn_heads {

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
                const Mixture<T>* mix) {
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

template void fused_impl<float>(const Heads<float>&, const float*, float*, float*, Gradients<float>&,
                                const Mixture<float>*);
template void fused_impl<double>(const Heads<double>&, const double*, double*, double*, Gradients<double>&,
                                 const Mixture<double>*);

}  // namespace udn_heads
