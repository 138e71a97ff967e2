// The class-tiled gradient pass (tiled_pass) of depth_loglik_bwd (recomputing the logits for the
// forward's logsumexp) and of the fused ops -- depth_loglik_fwd_bwd (upstream gradient known
// before the forward: expected-mode NLL) and depth_loglik_mixture_fwd_bwd (gradient formed from
// the log-likelihoods of a row's depths: mixture NLL) -- which compute the logits once: 3 GEMMs
// instead of the 4 of forward + recomputing backward (fused_impl).
#include "heads_common.h"

namespace udn_heads {
namespace {

using Block = std::pair<int64_t, int64_t>;

constexpr int64_t kPieceRows = 16;  // rows per task of a group's forward epilogue

// Row groups of the pass, each a list of blocks of stacked rows: blocks of kMaxRowTile rows, or
// (mixture: a row's gradient needs every depth's log-likelihood) the L blocks of a sample range.
template <typename T>
std::vector<std::vector<Block>> row_groups(const Heads<T>& p, bool mixture) {
  std::vector<std::vector<Block>> groups;
  if (!mixture) {
    for (const Block& b : p.row_blocks(kMaxRowTile)) groups.push_back({b});
    return groups;
  }
  const int64_t k = std::max<int64_t>(8, kMaxRowTile / p.L);
  for (int64_t n0 = 0; n0 < p.N; n0 += k) {
    groups.emplace_back();
    for (int64_t l = 0; l < p.L; ++l) groups.back().emplace_back(l * p.N + n0, l * p.N + std::min(n0 + k, p.N));
  }
  return groups;
}

// One GEMM operand set of a group: buffer rows [row0, row0 + m) hold the logits of hidden rows H
// against head W; dH / dW are where their gradients go (undefined when not wanted).
struct Operand {
  int64_t row0, m;
  Tensor H, W, dH, dW;
};

}  // namespace

// Row groups in turn. Per group, its whole [rows, C] logits (one buffer, class-tile slabs
// [rows, ct]) are computed by class tiles in parallel; with loglik, pieces of rows then run the
// forward epilogue across the tiles in order (and mixture mode forms the group's gradient); the
// class tiles, in parallel again, turn the logits into G in place and add G^T H into the
// d_weight rows they own (d_bias / noise sums too: their columns are the tile's); finally
// dH = G W is written once per group, as class-tile GEMMs in order, each threaded by ATen.
// No task owns a partial of anything, so the scratch memory (group rows x C logits, a gathered
// copy of the group's hidden rows) is the same at any thread count, and so are the results
// (reduction orders follow the shape only).
template <typename T>
void tiled_pass(const Heads<T>& p, const T* grad, T* loglik, T* aux, Gradients<T>& out, const Mixture<T>* mix) {
  const auto groups = row_groups(p, mix != nullptr);
  std::vector<T> mix_grad(mix ? p.rows : 0);
  if (mix) grad = mix_grad.data();  // each group fills the rows of its samples
  int64_t group_rows = 0;
  for (const auto& blocks : groups) {
    int64_t rows = 0;
    for (const Block& b : blocks) rows += b.second - b.first;
    group_rows = std::max(group_rows, rows);
  }
  const int64_t nctiles = ceil_div(p.C, p.class_tile);
  if (out.d_weight.defined()) out.d_weight.zero_();
  if (out.d_bias) std::fill(out.d_bias, out.d_bias + out.bias_numel, T(0));
  out.sq_sums.assign(out.d_noise ? p.C : 0, T(0));
  // A shared head's mixture group gathers its hidden rows, so each class tile takes one GEMM per
  // product for the whole group; dH goes through dhbuf and is scattered back. 16-bit storage
  // gathers every group too. Upcast: the rows are cast once per group and dH accumulates in T.
  // Native: the rows stay 16-bit, and each class tile rounds its G once into the 16-bit [rows, C]
  // matrix g16 (as eager 16-bit autograd rounds the logits gradient), which feeds the tile's dW
  // product and then one dH = G W GEMM over all classes (not one small GEMM per class tile).
  const bool gathered = (mix && !p.per_depth && p.L > 1) || p.half();
  const auto gemm_opts = p.native16 ? p.hidden2d.options() : p.opts;
  Tensor hbuf = gathered ? at::empty({group_rows, p.D}, gemm_opts) : Tensor();
  Tensor dhbuf = gathered && out.d_hidden2d.defined() ? at::empty({group_rows, p.D}, gemm_opts) : Tensor();
  Tensor g16 = p.native16 ? at::empty({group_rows, p.C}, gemm_opts) : Tensor();
  Tensor buf = at::empty({group_rows * p.C}, p.opts);

  for (const auto& blocks : groups) {
    std::vector<int64_t> row0(blocks.size() + 1, 0);  // block b: buffer rows [row0[b], row0[b + 1])
    for (size_t b = 0; b < blocks.size(); ++b) row0[b + 1] = row0[b] + blocks[b].second - blocks[b].first;
    const int64_t rows = row0.back();
    T* const data = buf.data_ptr<T>();
    auto slab = [&](int64_t ci) {
      const int64_t c0 = ci * p.class_tile;
      return buf.narrow(0, c0 * rows, rows * std::min(p.class_tile, p.C - c0)).view({rows, -1});
    };
    if (gathered)
      for (size_t b = 0; b < blocks.size(); ++b)
        hbuf.narrow(0, row0[b], row0[b + 1] - row0[b]).copy_(p.hidden2d.narrow(0, blocks[b].first, row0[b + 1] - row0[b]));
    // hidden rows [r0, r0 + m) at buffer row i0, and where their dH goes
    auto rows_of = [&](int64_t r0, int64_t i0, int64_t m) {
      return gathered ? hbuf.narrow(0, i0, m) : p.hidden2d.narrow(0, r0, m);
    };
    auto dh_of = [&](int64_t r0, int64_t i0, int64_t m) {
      if (!out.d_hidden2d.defined()) return Tensor();
      return gathered ? dhbuf.narrow(0, i0, m) : out.d_hidden2d.narrow(0, r0, m);
    };
    std::vector<Operand> operands;
    if (!p.per_depth) {
      operands.push_back({0, rows, rows_of(blocks[0].first, 0, rows), p.weight, dh_of(blocks[0].first, 0, rows),
                          out.d_weight});
    } else {
      for (size_t b = 0; b < blocks.size(); ++b) {
        const int64_t r0 = blocks[b].first, m = row0[b + 1] - row0[b];
        operands.push_back({row0[b], m, rows_of(r0, row0[b], m), p.head(r0), dh_of(r0, row0[b], m),
                            out.d_weight.defined() ? out.d_weight.select(0, r0 / p.N) : Tensor()});
      }
    }

    at::parallel_for(0, nctiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ci = t0; ci < t1; ++ci) {
        const int64_t c0 = ci * p.class_tile, ct = std::min(p.class_tile, p.C - c0);
        Tensor S = slab(ci);
        for (const Operand& op : operands) {
          p.gemm(S.narrow(0, op.row0, op.m), op.H, op.W.narrow(0, c0, ct).t());
        }
        for (size_t b = 0; b < blocks.size(); ++b)
          p.add_bias_cap(S.data_ptr<T>() + row0[b] * ct, blocks[b].first, row0[b + 1] - row0[b], c0, ct);
      }
    });

    if (loglik) {
      std::vector<std::pair<size_t, int64_t>> pieces;  // (block, first row in it)
      for (size_t b = 0; b < blocks.size(); ++b)
        for (int64_t i0 = 0; i0 < row0[b + 1] - row0[b]; i0 += kPieceRows) pieces.emplace_back(b, i0);
      at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const auto [b, i0] = pieces[k];
          RowState<T> state(blocks[b].first + i0, std::min(kPieceRows, row0[b + 1] - row0[b] - i0));
          for (int64_t c0 = 0; c0 < p.C; c0 += p.class_tile) {
            const int64_t ct = std::min(p.class_tile, p.C - c0);
            state.tile(p, data + c0 * rows + (row0[b] + i0) * ct, c0, ct);
          }
          state.finish(p, loglik, aux);
        }
      });
      if (mix) mix->grad(p, loglik, blocks[0].first, blocks[0].second, mix_grad.data());
    }

    at::parallel_for(0, nctiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ci = t0; ci < t1; ++ci) {
        const int64_t c0 = ci * p.class_tile, ct = std::min(p.class_tile, p.C - c0);
        Tensor S = slab(ci);
        for (size_t b = 0; b < blocks.size(); ++b)
          backward_epilogue(p, grad, aux, S.data_ptr<T>() + row0[b] * ct, blocks[b].first, row0[b + 1] - row0[b], c0,
                            ct, out);
        if (p.native16) S = g16.narrow(0, 0, rows).narrow(1, c0, ct).copy_(S);
        for (const Operand& op : operands)
          if (op.dW.defined()) p.gemm(op.dW.narrow(0, c0, ct), S.narrow(0, op.row0, op.m).t(), op.H, true);
      }
    });

    if (!out.d_hidden2d.defined()) continue;
    for (const Operand& op : operands) {
      Tensor dH = op.dH;
      if (p.native16) {
        at::mm_out(dH, g16.narrow(0, op.row0, op.m), op.W);
        continue;
      }
      for (int64_t ci = 0; ci < nctiles; ++ci) {
        const int64_t c0 = ci * p.class_tile;
        Tensor G = slab(ci).narrow(0, op.row0, op.m), W_t = op.W.narrow(0, c0, G.size(1));
        p.gemm(dH, G, W_t, ci > 0);
      }
    }
    if (gathered)
      for (size_t b = 0; b < blocks.size(); ++b)
        out.d_hidden2d.narrow(0, blocks[b].first, row0[b + 1] - row0[b])
            .copy_(dhbuf.narrow(0, row0[b], row0[b + 1] - row0[b]));
  }
  if (out.d_noise) finish_noise_grad(p, grad, out.sq_sums.data(), out.d_noise);
}

// Forward with the head gradients (those wanted) in the same pass; only the forward when none is.
template <typename T>
void fused_impl(const Heads<T>& p, const T* grad, T* loglik, T* aux, Gradients<T>& out, const Mixture<T>* mix) {
  if (p.class_major) return small_pass(p, loglik, aux, grad, out.any() ? &out : nullptr, mix);
  if (!out.any()) return forward_impl(p, loglik, aux);
  tiled_pass(p, grad, loglik, aux, out, mix);
}

#define UDN_HEADS_INSTANTIATE(T)                                                                              \
  template void tiled_pass<T>(const Heads<T>&, const T*, T*, T*, Gradients<T>&, const Mixture<T>*);          \
  template void fused_impl<T>(const Heads<T>&, const T*, T*, T*, Gradients<T>&, const Mixture<T>*);
UDN_HEADS_INSTANTIATE(float)
UDN_HEADS_INSTANTIATE(double)
#undef UDN_HEADS_INSTANTIATE

}  // namespace udn_heads
