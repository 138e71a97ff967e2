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
// ~25% more GEMM time than the 3 whole-matrix GEMMs, 128-row tiles none.
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

// One noise chunk of a draw in the backward: the regenerated weight w = a + sigma(b) * r for d_x,
// and d_b = g * r (first draw) or d_b += g * r, times sigma'(b) after the last draw (softplus_b).
template <typename T>
void backward_chunk(T* w, const T* a, const T* b, const T* r, const T* g, T* db, int64_t n, bool first, bool last,
                    bool softplus_b) {
  using V = Vec<T>;
  for (int64_t i = 0; i < n; i += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), n - i);
    const V bv = V::loadu(b + i, m), rv = V::loadu(r + i, m);
    const V t = softplus_b ? exp_neg_abs(bv) : V(0);
    const V prod = (softplus_b ? softplus_from(bv, t) : bv) * rv;
    (a ? prod + V::loadu(a + i, m) : prod).store(w + i, m);
    const V grad = first ? V::loadu(g + i, m) * rv : at::vec::fmadd(V::loadu(g + i, m), rv, V::loadu(db + i, m));
    (softplus_b && last ? grad * sigmoid_from(bv, t) : grad).store(db + i, m);
  }
}

// `count` scratch tensors of `shape` as one [count, shape...] tensor, allocated on the calling thread:
// a buffer a worker allocates itself comes from that worker's glibc arena, which trims it on free,
// so every call page-faulted its tiles and d_x partials in afresh (~1200 faults per backward at the
// benchmark shapes); the caller's arena keeps freed blocks for the next call.
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
// sign(s, b, n) at flip_offset + s*B*N + b*N + n, then the bias.
template <typename T>
void noisy_weight_forward(const Tensor& xe, const NoisyWeight& nw, Tensor& out, const Tensor& bias,
                          const Noise* flip, int64_t flip_offset) {
  const int64_t N = nw.b.size(0), K = nw.b.size(1), Se = xe.size(0), S = nw.S, B = xe.size(1);
  const int64_t nb = tile_rows(N, K), blocks = (N + nb - 1) / nb;
  const T* a = nw.a ? nw.a->data_ptr<T>() : nullptr;
  const T* b = nw.b.data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  const Tensor tiles = scratch_stack(threads, {nb, K}, nw.b.options());
  const Tensor prods = flip ? scratch_stack(threads, {B, nb}, nw.b.options()) : Tensor();
  at::parallel_for(0, S * blocks, 1, [&](int64_t begin, int64_t end) {
    const WorkerGuard guard;
    Tensor tile = tiles[at::get_thread_num()];
    std::vector<float> scratch;
    std::vector<T> r, sign;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / blocks, n0 = (t % blocks) * nb, rows = std::min(nb, N - n0);
      T* w = tile.data_ptr<T>();
      const T* a0 = a ? a + n0 * K : nullptr;
      for_noise_chunks(nw.noise, rows * K, s * N * K + n0 * K, r, scratch, [&](int64_t i, const T* rc, int64_t n) {
        combine(w + i, a0 ? a0 + i : nullptr, b + n0 * K + i, rc, n, nw.softplus_b);
      });
      const Tensor x_s = xe[Se == 1 ? 0 : s], w_t = tile.narrow(0, 0, rows).t();
      const Tensor bias_s = bias.defined() ? bias[bias.size(0) == 1 ? 0 : s].narrow(0, n0, rows) : Tensor();
      if (flip) {
        Tensor p = prods[at::get_thread_num()].narrow(1, 0, rows);
        at::mm_out(p, x_s, w_t);
        add_flipped_block(out.data_ptr<T>() + s * B * N, p, N, n0, rows,
                          bias_s.defined() ? bias_s.data_ptr<T>() : nullptr, *flip, flip_offset + s * B * N, sign,
                          scratch);
      } else {
        Tensor dst = out[s].narrow(1, n0, rows);
        if (bias_s.defined()) at::addmm_out(dst, bias_s, x_s, w_t); else at::mm_out(dst, x_s, w_t);
      }
    }
  });
}

// Gradients of sum_s <ge_s, x_s W_s^T>: d_x [Se, B, K], d_a = sum_s ge_s^T x_s (if want_da),
// d_b = sigma'(b) * sum_s (ge_s^T x_s) * r_s. Each tile's noise r_s is generated once and feeds both the
// d_b epilogue and the regenerated weight tile of d_x. Draw 0 writes d_a / d_b / the thread's
// d_x partial directly (no zero fill, no extra pass); later draws accumulate.
template <typename T>
void noisy_weight_backward(const Tensor& xe, const Tensor& ge, const NoisyWeight& nw, bool want_da,
                           Tensor& d_x, Tensor& d_a, Tensor& d_b) {
  const int64_t N = nw.b.size(0), K = nw.b.size(1), Se = xe.size(0), S = nw.S;
  const int64_t nb = tile_rows(N, K), blocks = (N + nb - 1) / nb;
  const T* a = nw.a ? nw.a->data_ptr<T>() : nullptr;
  const T* b = nw.b.data_ptr<T>();
  d_a = want_da ? at::empty_like(nw.b) : Tensor();
  d_b = at::empty_like(nw.b);
  T* da = want_da ? d_a.data_ptr<T>() : nullptr;
  T* db = d_b.data_ptr<T>();
  // d_x partial sums, one per thread (thread 0's is d_x itself); a thread's first tile of draw se
  // overwrites its slice.
  const int64_t threads = at::get_num_threads();
  d_x = at::empty_like(xe);
  const Tensor other_partials = scratch_stack(threads - 1, xe.sizes(), xe.options());
  const auto partial = [&](int64_t tid) { return tid == 0 ? d_x : other_partials[tid - 1]; };
  const Tensor tiles = scratch_stack(threads, {2, nb, K}, nw.b.options());
  std::vector<std::vector<char>> touched(threads, std::vector<char>(Se, 0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const WorkerGuard guard;
    const int tid = at::get_thread_num();
    Tensor acc = partial(tid);
    Tensor w_tile = tiles[tid][0];
    Tensor g_tile = tiles[tid][1];
    std::vector<float> scratch;
    std::vector<T> r;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * nb, rows = std::min(nb, N - n0), count = rows * K;
      T* w = w_tile.data_ptr<T>();
      const T* a0 = a ? a + n0 * K : nullptr;
      T* da0 = da ? da + n0 * K : nullptr;
      T* db0 = db + n0 * K;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t se = Se == 1 ? 0 : s;
        Tensor ge_blk = ge[s].narrow(1, n0, rows);  // [B, rows], row stride N
        // ge_s^T x_s for these output rows: straight into d_a for draw 0.
        Tensor g_view = da && s == 0 ? d_a.narrow(0, n0, rows) : g_tile.narrow(0, 0, rows);
        at::mm_out(g_view, ge_blk.t(), xe[se]);
        const T* g0 = g_view.data_ptr<T>();
        // One pass per noise chunk: the weight tile for d_x and the d_a / d_b epilogue.
        for_noise_chunks(nw.noise, count, s * N * K + n0 * K, r, scratch, [&](int64_t i, const T* rc, int64_t n) {
          const T* g = g0 + i;
          backward_chunk(w + i, a0 ? a0 + i : nullptr, b + n0 * K + i, rc, g, db0 + i, n, s == 0, s == S - 1,
                         nw.softplus_b);
          if (da0 && s > 0) at::vec::map2<T>([](Vec<T> x, Vec<T> y) { return x + y; }, da0 + i, da0 + i, g, n);
        });
        Tensor acc_s = acc[se];
        if (touched[tid][se]) {
          acc_s.addmm_(ge_blk, w_tile.narrow(0, 0, rows));
        } else {
          at::mm_out(acc_s, ge_blk, w_tile.narrow(0, 0, rows));
          touched[tid][se] = 1;
        }
      }
    }
  });
  // A thread that ran did every draw of its tiles, so the partial of each thread that ran is fully written.
  bool written = touched[0][0];
  for (int64_t tid = 1; tid < threads; ++tid) {
    if (!touched[tid][0]) continue;
    if (written) d_x.add_(partial(tid)); else d_x.copy_(partial(tid));
    written = true;
  }
  if (!written) d_x.zero_();
}

#define UDN_STOCHASTIC_INSTANTIATE(T)                                                                    \
  template void noisy_weight_forward<T>(const Tensor&, const NoisyWeight&, Tensor&, const Tensor&, const Noise*, \
                                        int64_t);                                                           \
  template void noisy_weight_backward<T>(const Tensor&, const Tensor&, const NoisyWeight&, bool, Tensor&, Tensor&, \
                                         Tensor&);
UDN_STOCHASTIC_INSTANTIATE(float)
UDN_STOCHASTIC_INSTANTIATE(double)
#undef UDN_STOCHASTIC_INSTANTIATE

}  // namespace udn_stochastic
