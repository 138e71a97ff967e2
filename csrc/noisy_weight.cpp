// The noisy-weight tile engine of gaussian_linear (sample, flipout) and bernoulli_linear (weight,
// symmetric masks): the random weights are never materialised whole. A block of output rows of the
// sampled weight is generated into a cache-sized tile (Philox fills of philox.h), multiplied with
// at::mm, and thrown away; backward regenerates the same tiles from (seed, offset).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>

#include "stochastic_common.h"
#include "vec_softplus.h"

namespace udn_stochastic {
namespace {

// Weight tile: 512 KiB of float32 (128 rows at K = 1024). Smaller tiles starve the backward
// GEMMs (d_x = ge_blk W_tile has the tile's row count as inner dimension): 64-row tiles cost
// ~25% more GEMM time than the 3 whole-matrix GEMMs, 128-row tiles none. The backward's blocks
// (backward_blocks) share this budget among the threads.
constexpr int64_t kTileElements = 1 << 17;
constexpr int64_t kNoiseChunk = 2048;  // noise generated per L1-resident chunk of a tile

// Kernels run below autograd, but OpenMP workers do not inherit the dispatch-key TLS: without
// this, at::mm_out on a worker would see inputs that require grad and refuse the out= variant.
using WorkerGuard = at::AutoDispatchBelowADInplaceOrView;

// Rows per weight tile: at most kTileElements, and few enough that every thread gets a tile.
int64_t tile_rows(int64_t N, int64_t K) {
  const int64_t per_thread = (N + at::get_num_threads() - 1) / at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>(per_thread, kTileElements / std::max<int64_t>(K, 1)));
}

// Visits `count` noise elements from stream offset `offset` chunk by chunk: visit(i, r, n) gets
// elements i .. i + n in a small buffer, so the noise is consumed while in L1 and never makes a
// pass over the tile of its own.
template <typename T, typename Visit>
void for_noise_chunks(const Noise& noise, int64_t count, int64_t offset, std::vector<T>& buf,
                      std::vector<float>& scratch, Visit visit) {
  buf.resize(kNoiseChunk);
  for (int64_t i = 0; i < count; i += kNoiseChunk) {
    const int64_t n = std::min(kNoiseChunk, count - i);
    noise.fill_as(buf.data(), n, offset + i, scratch);
    visit(i, buf.data(), n);
  }
}

// dst[0, n) = src in the GEMM dtype A: a vectorised rounding when A is 16-bit (src was computed in
// float32 into a chunk buffer), nothing when src already is dst.
template <typename C, typename A>
void store_as(const C* src, A* dst, int64_t n) {
  if constexpr (!std::is_same_v<C, A>) at::vec::convert(src, dst, n);
}

// Where a chunk of n compute-type elements bound for dst goes: dst itself, or (16-bit GEMM dtype)
// a float32 buffer that store_as rounds into dst.
template <typename C, typename A>
C* compute_chunk(A* dst, int64_t n, std::vector<C>& buf) {
  if constexpr (std::is_same_v<C, A>) {
    return dst;
  } else {
    buf.resize(n);
    return buf.data();
  }
}

// w = a + sigma(b) * r (a may be null) over n elements.
template <typename T>
void combine(T* w, const T* a, const T* b, const T* r, int64_t n, bool softplus_b) {
  using V = Vec<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V bv = V::loadu(b + i, m), sigma = softplus_b ? softplus_from(bv, exp_neg_abs(bv)) : bv;
    const V prod = sigma * V::loadu(r + i, m);
    (a ? prod + V::loadu(a + i, m) : prod).store(w + i, m);
  }
}

// One noise chunk of a draw in the backward: the regenerated weight w = a + sigma(b) * r for d_x (unless w
// is null), and d_b = g * r (first draw) or d_b += g * r, times sigma'(b) after the last draw (softplus_b).
template <typename T>
void backward_chunk(T* w, const T* a, const T* b, const T* r, const T* g, T* db, int64_t n, bool first, bool last,
                    bool softplus_b) {
  using V = Vec<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V bv = V::loadu(b + i, m), rv = V::loadu(r + i, m);
    const V t = softplus_b ? exp_neg_abs(bv) : V(0);
    if (w) {
      const V prod = (softplus_b ? softplus_from(bv, t) : bv) * rv;
      (a ? prod + V::loadu(a + i, m) : prod).store(w + i, m);
    }
    const V grad = first ? V::loadu(g + i, m) * rv : at::vec::fmadd(V::loadu(g + i, m), rv, V::loadu(db + i, m));
    (softplus_b && last ? grad * sigmoid_from(bv, t) : grad).store(db + i, m);
  }
}

// Visits the noise of the [rows, cols] block at (n0, k0) of draw s's [N, K] weight, at most kNoiseChunk
// elements at a time: visit(tile_index, weight_index, r, n) gets n elements, at tile_index of the
// row-major block and weight_index of the weight (one run of rows * K when the block spans whole rows).
template <typename T, typename Visit>
void for_block_noise(const Noise& noise, int64_t s, int64_t N, int64_t K, int64_t n0, int64_t rows, int64_t k0,
                     int64_t cols, std::vector<T>& buf, std::vector<float>& scratch, Visit visit) {
  const bool whole_rows = cols == K;
  const int64_t runs = whole_rows ? 1 : rows, run = whole_rows ? rows * K : cols;
  buf.resize(std::min(kNoiseChunk, run));
  for (int64_t j = 0; j < runs; ++j) {
    for (int64_t c = 0; c < run; c += kNoiseChunk) {
      const int64_t n = std::min(kNoiseChunk, run - c), weight_index = (n0 + j) * K + k0 + c;
      noise.fill_as(buf.data(), n, s * N * K + weight_index, scratch);
      visit(j * run + c, weight_index, buf.data(), n);
    }
  }
}

// The backward's weight blocks: the parallel tasks are column blocks of the weight, each running down
// every row block, so each thread writes its own columns of d_x (no per-thread d_x partials) and its own
// blocks of d_a / d_b. A block has at most max(kMinBlock, kTileElements / threads) elements, so the
// scratch (a weight block and a G block per thread) stays within 2 max(kTileElements, kMinBlock threads)
// elements whatever the thread count, up to 16 threads; blocks keep >= kMinBlockRows rows where N allows,
// the inner dimension of the d_x GEMM.
constexpr int64_t kMinBlock = 1 << 13;
constexpr int64_t kMinBlockRows = 256;

struct Blocks {
  int64_t rows, cols;
};

Blocks backward_blocks(int64_t N, int64_t K) {
  const int64_t threads = at::get_num_threads();
  const int64_t elements = std::max(kMinBlock, kTileElements / threads);
  const int64_t per_thread = (K + threads - 1) / threads;
  int64_t cols = std::min(K, (per_thread + 15) / 16 * 16);  // whole vectors; one column block per thread
  cols = std::max<int64_t>(1, std::min(cols, elements / std::max<int64_t>(1, std::min(N, kMinBlockRows))));
  return {std::max<int64_t>(1, std::min(N, elements / cols)), cols};
}

// `count` scratch tensors of `shape` as one [count, shape...] tensor, allocated on the calling thread:
// a buffer a worker allocates itself comes from that worker's glibc arena, which trims it on free,
// so every call page-faulted its tiles in afresh (~1200 faults per backward at the benchmark shapes);
// the caller's arena keeps freed blocks for the next call.
Tensor scratch_stack(int64_t count, at::IntArrayRef shape, const at::TensorOptions& opt) {
  std::vector<int64_t> sizes{count};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return at::empty(sizes, opt);
}

// out[s][b, n0:n0+rows] += prod[b, :] * sign(s, b, n) + bias_s[n0:] (flipout's output signs).
template <typename T>
void add_flipped_block(T* out_s, const Tensor& prod, int64_t N, int64_t n0, int64_t rows, const T* bias_s,
                       const Noise& flip, int64_t flip_offset, std::vector<T>& sign, std::vector<float>& scratch) {
  const int64_t B = prod.size(0), ld = prod.stride(0);
  const T* p = prod.data_ptr<T>();
  sign.resize(rows);
  for (int64_t bi = 0; bi < B; ++bi) {
    T* o = out_s + bi * N + n0;
    flip.fill_as(sign.data(), rows, flip_offset + bi * N + n0, scratch);
    at::vec::map3<T>([](Vec<T> ov, Vec<T> pv, Vec<T> sv) { return at::vec::fmadd(pv, sv, ov); },
                     o, o, p + bi * ld, sign.data(), rows);
    if (bias_s) at::vec::map2<T>([](Vec<T> ov, Vec<T> bv) { return ov + bv; }, o, o, bias_s, rows);
  }
}

}  // namespace

// out [S, B, N] gets x_s W_s^T for every draw: each block's product goes straight into
// out[s][:, n0:n0+rows] (one GEMM with leading dimension N, plus bias[s] when given: bias is
// [S, N] or [1, N]), or, with `flip` (flipout), is added to out times the output signs
// sign(s, b, n) at flip_offset + s*B*N + b*N + n, then the bias. xe, out and bias are in the GEMM
// dtype A; the noise and the weight formula are computed in C (float32 for 16-bit storage) per
// noise chunk and rounded once into the A tile.
template <typename T, typename A, typename C = at::opmath_type<T>>
void forward_in(const Tensor& xe, const NoisyWeight& nw, Tensor& out, const Tensor& bias, const Noise* flip,
                int64_t flip_offset) {
  const int64_t N = nw.b.size(0), K = nw.b.size(1), Se = xe.size(0), S = nw.S, B = xe.size(1);
  const int64_t nb = tile_rows(N, K), blocks = (N + nb - 1) / nb;
  const T* a = nw.a ? nw.a->data_ptr<T>() : nullptr;
  const T* b = nw.b.data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  const Tensor tiles = scratch_stack(threads, {nb, K}, out.options());
  const Tensor prods = flip ? scratch_stack(threads, {B, nb}, out.options()) : Tensor();
  at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
    const WorkerGuard guard;
    Tensor tile = tiles[at::get_thread_num()];
    std::vector<float> scratch;
    std::vector<C> r, a_wide, b_wide, w_chunk;
    std::vector<A> sign;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / blocks, n0 = (t % blocks) * nb, rows = std::min(nb, N - n0);
      A* w = tile.data_ptr<A>();
      const T* a0 = a ? a + n0 * K : nullptr;
      for_noise_chunks(nw.noise, rows * K, s * N * K + n0 * K, r, scratch, [&](int64_t i, const C* rc, int64_t n) {
        C* wc = compute_chunk(w + i, n, w_chunk);
        combine(wc, a0 ? widen(a0 + i, n, a_wide) : nullptr, widen(b + n0 * K + i, n, b_wide), rc, n, nw.softplus_b);
        store_as(wc, w + i, n);
      });
      const Tensor x_s = xe[Se == 1 ? 0 : s], w_t = tile.narrow(0, 0, rows).t();
      const Tensor bias_s = bias.defined() ? bias[bias.size(0) == 1 ? 0 : s].narrow(0, n0, rows) : Tensor();
      if (flip) {
        Tensor p = prods[at::get_thread_num()].narrow(1, 0, rows);
        at::mm_out(p, x_s, w_t);
        add_flipped_block(out.data_ptr<A>() + s * B * N, p, N, n0, rows,
                          bias_s.defined() ? bias_s.data_ptr<A>() : nullptr, *flip, flip_offset + s * B * N, sign,
                          scratch);
      } else {
        Tensor dst = out[s].narrow(1, n0, rows);
        if (bias_s.defined()) at::addmm_out(dst, bias_s, x_s, w_t); else at::mm_out(dst, x_s, w_t);
      }
    }
  });
}

// Gradients of sum_s <ge_s, x_s W_s^T>, those asked for in `want` (the others stay undefined): d_x [Se, B, K],
// d_b = sigma'(b) * sum_s (ge_s^T x_s) * r_s and d_a = sum_s ge_s^T x_s, the latter only with d_b, whose
// G_s = ge_s^T x_s it reuses. Each block's noise r_s is generated once and feeds both the d_b epilogue and
// the regenerated weight block of d_x; without d_b no G GEMM runs, without d_x no weight block is built and
// no d_x GEMM runs. Draw 0 writes d_a / d_b and the first row block writes d_x's columns directly (no zero
// fill, no extra pass); later ones accumulate. xe, ge and d_x are in the GEMM dtype A; d_a and d_b in
// T: with 16-bit T the epilogues run in float32 (C) and the draws accumulate in float32 blocks of the
// thread's scratch, rounded into d_a / d_b after the last.
template <typename T, typename A, typename C = at::opmath_type<T>>
void backward_in(const Tensor& xe, const Tensor& ge, const NoisyWeight& nw, NoisyGrads want, Tensor& d_x,
                 Tensor& d_a, Tensor& d_b) {
  constexpr bool kWide = !std::is_same_v<T, C>;
  TORCH_INTERNAL_ASSERT((want.x || want.b) && (want.b || !want.a),
                        "noisy_weight_backward: nothing to do, or d_a without d_b");
  const int64_t N = nw.b.size(0), K = nw.b.size(1), Se = xe.size(0), S = nw.S;
  const Blocks blk = backward_blocks(N, K);
  const int64_t col_blocks = (K + blk.cols - 1) / blk.cols;
  const T* a = nw.a ? nw.a->data_ptr<T>() : nullptr;
  const T* b = nw.b.data_ptr<T>();
  d_x = want.x ? at::empty(xe.sizes(), xe.options()) : Tensor();
  d_a = want.a ? at::empty_like(nw.b) : Tensor();
  d_b = want.b ? at::empty_like(nw.b) : Tensor();
  T* da = want.a ? d_a.data_ptr<T>() : nullptr;
  T* db = want.b ? d_b.data_ptr<T>() : nullptr;
  // Per thread: the weight block (for d_x) and the G block (for d_b) in A and, with 16-bit T, the
  // float32 accumulators of d_b and d_a; those needed.
  const int64_t w_index = 0, g_index = want.x ? 1 : 0, db_index = 0, da_index = want.b;
  const int64_t gemm_count = int64_t{want.x} + want.b, acc_count = kWide ? int64_t{want.b} + want.a : 0;
  const int64_t threads = at::get_num_threads();
  const Tensor blocks = scratch_stack(threads, {gemm_count, blk.rows, blk.cols}, xe.options());
  const Tensor accs = acc_count ? scratch_stack(threads, {acc_count, blk.rows, blk.cols},
                                                xe.options().dtype(c10::CppTypeToScalarType<C>::value))
                                : Tensor();
  at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
    const WorkerGuard guard;
    const Tensor mine = blocks[at::get_thread_num()];
    std::vector<float> scratch;
    std::vector<C> r, a_wide, b_wide, g_wide, w_chunk;
    C* db_acc = kWide && want.b ? accs[at::get_thread_num()][db_index].data_ptr<C>() : nullptr;
    C* da_acc = kWide && want.a ? accs[at::get_thread_num()][da_index].data_ptr<C>() : nullptr;
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t k0 = cb * blk.cols, cols = std::min(blk.cols, K - k0);
      for (int64_t n0 = 0; n0 < N; n0 += blk.rows) {
        const int64_t rows = std::min(blk.rows, N - n0);
        const Tensor w_block = want.x ? mine[w_index].view(-1).narrow(0, 0, rows * cols).view({rows, cols}) : Tensor();
        const Tensor g_block = want.b ? mine[g_index].view(-1).narrow(0, 0, rows * cols).view({rows, cols}) : Tensor();
        A* w = want.x ? w_block.data_ptr<A>() : nullptr;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t se = Se == 1 ? 0 : s;
          const Tensor ge_blk = ge[s].narrow(1, n0, rows);  // [B, rows], row stride N
          const A* g = nullptr;
          if (want.b) {
            Tensor g_view = g_block;
            at::mm_out(g_view, ge_blk.t(), xe[se].narrow(1, k0, cols));
            g = g_block.data_ptr<A>();
          }
          // One pass per noise chunk: the weight block for d_x and the d_a / d_b epilogue.
          for_block_noise(nw.noise, s, N, K, n0, rows, k0, cols, r, scratch,
                          [&](int64_t i, int64_t wi, const C* rc, int64_t n) {
            const C* ac = a ? widen(a + wi, n, a_wide) : nullptr;
            const C* bc = widen(b + wi, n, b_wide);
            C* wc = w ? compute_chunk(w + i, n, w_chunk) : nullptr;
            if (!want.b) {
              combine(wc, ac, bc, rc, n, nw.softplus_b);
              return store_as(wc, w + i, n);
            }
            const C* gc = widen(g + i, n, g_wide);
            C* dbc;
            C* dac;
            if constexpr (kWide) {
              dbc = db_acc + i;
              dac = da_acc ? da_acc + i : nullptr;
            } else {
              dbc = db + wi;
              dac = da ? da + wi : nullptr;
            }
            backward_chunk(wc, ac, bc, rc, gc, dbc, n, s == 0, s == S - 1, nw.softplus_b);
            if (wc) store_as(wc, w + i, n);
            if (dac) {
              if (s == 0) std::copy(gc, gc + n, dac);
              else at::vec::map2<C>([](Vec<C> x, Vec<C> y) { return x + y; }, dac, dac, gc, n);
            }
            if constexpr (kWide) {
              if (s == S - 1) {
                at::vec::convert(dbc, db + wi, n);
                if (dac) at::vec::convert(dac, da + wi, n);
              }
            }
          });
          if (want.x) {
            Tensor dst = d_x[se].narrow(1, k0, cols);
            if (n0 == 0 && (Se > 1 || s == 0)) at::mm_out(dst, ge_blk, w_block); else dst.addmm_(ge_blk, w_block);
          }
        }
      }
    }
  });
  if (want.x && N == 0) d_x.zero_();  // no row block: an empty sum
}

// The engine in xe's dtype: the storage's, or float32 for widened 16-bit storage (acc_dtype).
template <typename T>
void noisy_weight_forward(const Tensor& xe, const NoisyWeight& nw, Tensor& out, const Tensor& bias,
                          const Noise* flip, int64_t flip_offset) {
  if (xe.scalar_type() == nw.b.scalar_type()) forward_in<T, T>(xe, nw, out, bias, flip, flip_offset);
  else forward_in<T, at::opmath_type<T>>(xe, nw, out, bias, flip, flip_offset);
}

template <typename T>
void noisy_weight_backward(const Tensor& xe, const Tensor& ge, const NoisyWeight& nw, NoisyGrads want,
                           Tensor& d_x, Tensor& d_a, Tensor& d_b) {
  if (xe.scalar_type() == nw.b.scalar_type()) backward_in<T, T>(xe, ge, nw, want, d_x, d_a, d_b);
  else backward_in<T, at::opmath_type<T>>(xe, ge, nw, want, d_x, d_a, d_b);
}

#define UDN_STOCHASTIC_INSTANTIATE(T)                                                                    \
  template void noisy_weight_forward<T>(const Tensor&, const NoisyWeight&, Tensor&, const Tensor&, const Noise*, \
                                        int64_t);                                                           \
  template void noisy_weight_backward<T>(const Tensor&, const Tensor&, const NoisyWeight&, NoisyGrads, Tensor&, \
                                         Tensor&, Tensor&);
UDN_STOCHASTIC_INSTANTIATE(float)
UDN_STOCHASTIC_INSTANTIATE(double)
UDN_STOCHASTIC_INSTANTIATE(at::BFloat16)
UDN_STOCHASTIC_INSTANTIATE(at::Half)
#undef UDN_STOCHASTIC_INSTANTIATE

}  // namespace udn_stochastic
