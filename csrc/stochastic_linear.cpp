// CPU kernels of gaussian_linear and bernoulli_linear (docs/internals.md signatures, noise layout of
// docs/rng.md). The random weights are never materialised whole: a block of output rows of the
// sampled weight is generated into a cache-sized tile (Philox fills of philox.h), multiplied with
// at::mm, and thrown away; backward regenerates the same tiles from (seed, offset).
//
// x arrives as [Sx, B, K] (Sx = 1: shared by the S draws), outputs are [S, B, N].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

#include "philox.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Weight tile: 512 KiB of float32 (128 rows at K = 1024). Smaller tiles starve the backward
// GEMMs (d_x = ge_blk W_tile has the tile's row count as inner dimension): 64-row tiles cost
// ~25% more GEMM time than the 3 whole-matrix GEMMs, 128-row tiles none.
constexpr int64_t kTileElements = 1 << 17;
constexpr int64_t kNoiseChunk = 2048;  // noise generated per L1-resident chunk of a tile
constexpr int64_t kFillGrain = 1 << 14;

// Kernels run below autograd, but OpenMP workers do not inherit the dispatch-key TLS: without
// this, at::mm_out on a worker would see inputs that require grad and refuse the out= variant.
using WorkerGuard = at::AutoDispatchBelowADInplaceOrView;

// One kind of per-element noise of the stream (docs/rng.md).
struct Noise {
  enum Kind { kNormal, kSign, kKeep } kind;
  uint64_t seed;
  float p = 0.0f;
  double scale = 1.0;  // kept value of kKeep: 1 / (1 - p)

  void fill(float* out, int64_t n, int64_t offset, float keep_scale) const {
    switch (kind) {
      case kNormal: udn::philox::fill_normal(out, n, seed, offset); break;
      case kSign: udn::philox::fill_sign(out, n, seed, offset); break;
      case kKeep: udn::philox::fill_keep_mask(out, n, p, keep_scale, seed, offset); break;
    }
  }

  // Noise in the compute dtype; double goes through a float scratch buffer and applies the keep
  // scale in double, so float64 masks are exactly 0 or 1 / (1 - p).
  template <typename T>
  void fill_as(T* out, int64_t n, int64_t offset, std::vector<float>& scratch) const {
    if constexpr (std::is_same_v<T, float>) {
      fill(out, n, offset, static_cast<float>(scale));
    } else {
      scratch.resize(n);
      fill(scratch.data(), n, offset, 1.0f);
      const T factor = kind == kKeep ? static_cast<T>(scale) : T(1);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(scratch[i]) * factor;
    }
  }
};

// Stream elements offset .. offset + numel as a tensor of `options` (input/output-sized noise).
Tensor noise_tensor(const Noise& noise, at::IntArrayRef shape, int64_t offset, const at::TensorOptions& options) {
  Tensor out = at::empty(shape, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "noise_tensor", [&] {
    scalar_t* data = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kFillGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch;
      noise.fill_as(data + begin, end - begin, offset + begin, scratch);
    });
  });
  return out;
}

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

// softplus(r) = max(r, 0) + log1p(t) and softplus'(r) = sigmoid(r), from t = exp(-|r|) (F.softplus
// without its threshold: beyond 20 the two agree to rounding). float: ATen's exp_u20 (~20 ulp;
// 0 below ln(FLT_MIN)) and log1p(t) = t P(t) on [0, 1], P a degree-8 Chebyshev fit (2.3e-7
// relative error, no log, no division); double: ATen's exp and log1p.
template <typename T>
C10_ALWAYS_INLINE Vec<T> exp_neg_abs(Vec<T> r) {
  const Vec<T> neg_abs = at::vec::minimum(r, Vec<T>(0) - r);
  if constexpr (std::is_same_v<T, float>) return neg_abs.exp_u20(); else return neg_abs.exp();
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> softplus_from(Vec<T> r, Vec<T> t) {
  if constexpr (std::is_same_v<T, float>) {
    constexpr float kLog1pOverT[] = {0.9999999404f, -0.4999925494f, 0.3331601024f, -0.2482564896f,
                                     0.1905595511f, -0.1358394176f, 0.0775403827f, -0.0292102676f,
                                     0.0051860036f};
    Vec<T> p(kLog1pOverT[8]);
    for (int64_t i = 7; i >= 0; --i) p = at::vec::fmadd(p, t, Vec<T>(kLog1pOverT[i]));
    return at::vec::fmadd(t, p, at::vec::maximum(r, Vec<T>(0)));
  } else {
    return at::vec::maximum(r, Vec<T>(0)) + t.log1p();
  }
}

template <typename T>
C10_ALWAYS_INLINE Vec<T> sigmoid_from(Vec<T> r, Vec<T> t) {
  return Vec<T>::blendv(t, Vec<T>(1), r >= Vec<T>(0)) / (Vec<T>(1) + t);
}

// The weight draws W_s = a + sigma(b) * r_s, r_s(n, k) = noise at s*N*K + n*K + k (a optional);
// sigma(b) = b, or softplus(b) with softplus_b (b then holds rho, and d_b is d rho).
struct NoisyWeight {
  const Tensor* a;  // [N, K] or nullptr
  Tensor b;         // [N, K]
  Noise noise;
  int64_t S;
  bool softplus_b = false;
};

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
// DESIGN shapes); the caller's arena keeps freed blocks for the next call.
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

const Tensor* ptr_or_null(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// ---------------------------------------------------------------- gaussian_linear

// Per-draw bias [S, N]: bias_mu + bias_sigma * eps_s (eps at S*N*K + s*N + n); undefined if no bias.
Tensor sampled_bias(const Tensor* bias_mu, const Tensor* bias_sigma, uint64_t seed, int64_t S, int64_t N,
                    int64_t K, const at::TensorOptions& opt) {
  if (!bias_mu && !bias_sigma) return Tensor();
  Tensor bias = bias_mu ? bias_mu->expand({S, N}) : at::zeros({S, N}, opt);
  if (bias_sigma) bias = bias + *bias_sigma * noise_tensor({Noise::kNormal, seed}, {S, N}, S * N * K, opt);
  return bias.contiguous();
}

struct Flipout {
  int64_t in_offset, out_offset;  // stream offsets of sign_in (0,0,0) and sign_out (0,0,0)
};

Flipout flipout_offsets(int64_t S, int64_t B, int64_t N, int64_t K) {
  const int64_t in_offset = S * N * K + S * N;
  return {in_offset, in_offset + S * B * K};
}

// The mean part x mu^T of local and flipout: [Sx, B, N].
Tensor mean_product(const Tensor& x, const Tensor& mu) { return at::matmul(x, mu.t()); }

// Sum over draws of a per-draw [S, B, M] tensor when x is shared by them (Sx = 1 < S).
Tensor sum_draws_if_shared(const Tensor& t, int64_t Sx) { return Sx == 1 && t.size(0) > 1 ? t.sum(0, true) : t; }

// Contiguous [Sx, B, M] viewed as the matrix [Sx*B, M] (explicit sizes: -1 is ambiguous when M is 0).
Tensor rows_of(const Tensor& t) { return t.view({t.size(0) * t.size(1), t.size(2)}); }

// Gradients of the mean part x mu^T (local, flipout): d_x [Sx, B, K] += g mu and d_mu = g^T x,
// with g summed over the draws first when x is shared (one GEMM each instead of one per draw).
void add_mean_part_grads(const Tensor& g, const Tensor& x, const Tensor& mu, Tensor& d_x, Tensor& d_mu) {
  const Tensor g_mean = rows_of(sum_draws_if_shared(g, x.size(0)));
  rows_of(d_x).addmm_(g_mean, mu);
  d_mu = at::mm(g_mean.t(), rows_of(x));
}

// With sigma_softplus the sigma arguments hold rho and the standard deviations are softplus(rho):
// the weight-noise tiles compute it in their noise pass; the [N] bias and local's variance operand
// (a weight-sized GEMM input either way) take ATen's softplus, and their gradients its sigmoid.
Tensor std_from(const Tensor& sigma, bool sigma_softplus) { return sigma_softplus ? at::softplus(sigma) : sigma; }

// d sigma -> d rho in place when the sigma argument held rho.
void chain_softplus(Tensor& d_sigma, const Tensor& rho, bool sigma_softplus) {
  if (sigma_softplus) d_sigma.mul_(at::sigmoid(rho));
}

// The Gaussian weight draws of sample / flipout (flipout passes mu = nullptr: its mean part is
// separate). With sigma_softplus one draw computes softplus in its noise pass; several take
// softplus(rho) once up front (transient, freed on return) instead of once per draw, and their
// backward chains d sigma afterwards.
NoisyWeight gaussian_draws(const Tensor* mu, const Tensor& weight_sigma, uint64_t seed, int64_t S,
                           bool sigma_softplus) {
  const bool in_noise_pass = sigma_softplus && S == 1;
  return {mu, in_noise_pass ? weight_sigma : std_from(weight_sigma, sigma_softplus), {Noise::kNormal, seed}, S,
          in_noise_pass};
}

// (out [S, B, N], std): std is local's output standard deviation [Sx, B, N], which backward takes
// instead of recomputing the variance GEMM (empty for sample / flipout).
std::tuple<Tensor, Tensor> gaussian_linear_fwd(const Tensor& x, const OptTensor& weight_mu_opt,
                                               const Tensor& weight_sigma, const OptTensor& bias_mu_opt,
                                               const OptTensor& bias_sigma_opt, int64_t seed_in,
                                               c10::string_view estimator, int64_t S, bool x_sampled,
                                               bool sigma_softplus) {
  const Tensor* mu = ptr_or_null(weight_mu_opt);
  const Tensor* bias_mu = ptr_or_null(bias_mu_opt);
  const Tensor* bias_rho = ptr_or_null(bias_sigma_opt);  // the bias sigma argument (rho with sigma_softplus)
  const Tensor bias_std = bias_rho ? std_from(*bias_rho, sigma_softplus) : Tensor();
  const Tensor* bias_sigma = bias_rho ? &bias_std : nullptr;
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t B = x.size(1), K = x.size(2), N = weight_sigma.size(0);
  const auto opt = x.options();
  Tensor out = at::empty({S, B, N}, opt);
  if (estimator == "local") {
    // var [Sx, B, N] (+ bias_sigma^2), made the std in place: the forward's one output-sized aux.
    Tensor sd = at::matmul(x * x, std_from(weight_sigma, sigma_softplus).square().t()).contiguous();
    if (bias_sigma) sd.add_(bias_sigma->square());
    sd.sqrt_();
    Tensor mean = mu ? mean_product(x, *mu) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_linear_fwd_local", [&] {
      const scalar_t* sdp = sd.data_ptr<scalar_t>();
      const scalar_t* m = mu ? mean.data_ptr<scalar_t>() : nullptr;
      const scalar_t* bm = bias_mu ? bias_mu->data_ptr<scalar_t>() : nullptr;
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t Sx = x.size(0);
      at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t xrow = Sx == 1 ? row % B : row;
          scalar_t* orow = o + row * N;
          Noise{Noise::kNormal, seed}.fill_as(orow, N, row * N, scratch);  // eps (s, b, :)
          at::vec::map2<scalar_t>([](Vec<scalar_t> e, Vec<scalar_t> c) { return e * c; }, orow, orow,
                                  sdp + xrow * N, N);
          if (m) at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> c) { return a + c; }, orow, orow, m + xrow * N, N);
          if (bm) at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> c) { return a + c; }, orow, orow, bm, N);
        }
      });
    });
    return {out, sd};
  }
  const Tensor bias = sampled_bias(bias_mu, bias_sigma, seed, S, N, K, opt);
  const bool flipout = estimator == "flipout";
  TORCH_CHECK(flipout || estimator == "sample", "gaussian_linear_fwd: unknown estimator ", estimator);
  const Flipout fo = flipout_offsets(S, B, N, K);
  Tensor xe = x;
  if (flipout) {
    // out starts as the mean part; x * sign_in feeds the noisy part.
    if (mu) out.copy_(mean_product(x, *mu).expand({S, B, N})); else out.zero_();
    xe = noise_tensor({Noise::kSign, seed}, {S, B, K}, fo.in_offset, opt).mul_(x);
  }
  const NoisyWeight nw = gaussian_draws(flipout ? nullptr : mu, weight_sigma, seed, S, sigma_softplus);
  const Noise flip{Noise::kSign, seed};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_linear_fwd", [&] {
    noisy_weight_forward<scalar_t>(xe, nw, out, bias, flipout ? &flip : nullptr, fo.out_offset);
  });
  return {out, x.new_empty({0})};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gaussian_linear_bwd(
    const Tensor& grad_out, const Tensor& x, const OptTensor& weight_mu_opt, const Tensor& weight_sigma,
    const OptTensor& bias_mu_opt, const OptTensor& bias_sigma_opt, const Tensor& std_in, int64_t seed_in,
    c10::string_view estimator, int64_t S, bool x_sampled, bool sigma_softplus) {
  const Tensor* mu = ptr_or_null(weight_mu_opt);
  const Tensor* bias_mu = ptr_or_null(bias_mu_opt);
  const Tensor* bias_rho = ptr_or_null(bias_sigma_opt);  // the bias sigma argument (rho with sigma_softplus)
  const Tensor bias_std = bias_rho ? std_from(*bias_rho, sigma_softplus) : Tensor();
  const Tensor* bias_sigma = bias_rho ? &bias_std : nullptr;
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t Sx = x.size(0), B = x.size(1), K = x.size(2), N = weight_sigma.size(0);
  const auto opt = x.options();
  const Tensor g = grad_out.contiguous();
  Tensor d_x, d_mu = mu ? Tensor() : x.new_empty({0}), d_sigma;
  Tensor d_bias_mu = bias_mu ? g.sum({0, 1}) : x.new_empty({0});
  Tensor d_bias_sigma = x.new_empty({0});
  if (estimator == "local") {
    TORCH_CHECK(std_in.sizes() == at::IntArrayRef({Sx, B, N}), "gaussian_linear_bwd: std: expected the "
                "forward's local std of shape [", Sx, ", ", B, ", ", N, "], got ", std_in.sizes());
    const Tensor sd = std_in.contiguous();
    // 2 dL/dvar per draw = g * eps / std (0 where std == 0): the 2 cancels the 2 of d(x^2) and d(sigma^2).
    Tensor d_var = at::empty({S, B, N}, opt);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_linear_bwd_local", [&] {
      const scalar_t* sdp = sd.data_ptr<scalar_t>();
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* dv = d_var.data_ptr<scalar_t>();
      at::parallel_for(0, S * B, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch;
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* srow = sdp + (Sx == 1 ? row % B : row) * N;
          scalar_t* drow = dv + row * N;
          Noise{Noise::kNormal, seed}.fill_as(drow, N, row * N, scratch);
          using V = Vec<scalar_t>;
          const scalar_t* grow = gp + row * N;
          int64_t n = 0;
          for (; n + V::size() <= N; n += V::size()) {
            const V std_n = V::loadu(srow + n);
            const V value = V::loadu(grow + n) * V::loadu(drow + n) / std_n;
            V::blendv(V(0), value, std_n > V(0)).store(drow + n);
          }
          for (; n < N; ++n) drow[n] = srow[n] > 0 ? grow[n] * drow[n] / srow[n] : scalar_t(0);
        }
      });
    });
    const Tensor d_var_x = sum_draws_if_shared(d_var, Sx);  // [Sx, B, N]
    const Tensor sigma = std_from(weight_sigma, sigma_softplus);
    d_x = at::matmul(d_var_x, sigma.square()).mul_(x);
    d_sigma = at::mm(rows_of(d_var_x).t(), rows_of(x * x)).mul_(sigma);
    chain_softplus(d_sigma, weight_sigma, sigma_softplus);
    if (bias_sigma) {
      d_bias_sigma = d_var.sum({0, 1}).mul_(*bias_sigma);
      chain_softplus(d_bias_sigma, *bias_rho, sigma_softplus);
    }
    if (mu) add_mean_part_grads(g, x, *mu, d_x, d_mu);
    return {d_x, d_mu, d_sigma, d_bias_mu, d_bias_sigma};
  }
  const bool flipout = estimator == "flipout";
  TORCH_CHECK(flipout || estimator == "sample", "gaussian_linear_bwd: unknown estimator ", estimator);
  if (bias_sigma) {
    const Tensor beps = noise_tensor({Noise::kNormal, seed}, {S, N}, S * N * K, opt);
    d_bias_sigma = (g.sum(1) * beps).sum(0);
    chain_softplus(d_bias_sigma, *bias_rho, sigma_softplus);
  }
  const NoisyWeight nw = gaussian_draws(flipout ? nullptr : mu, weight_sigma, seed, S, sigma_softplus);
  const bool chain_after = sigma_softplus && !nw.softplus_b;
  Tensor d_xe, d_a;
  if (!flipout) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_linear_bwd", [&] {
      noisy_weight_backward<scalar_t>(x, g, nw, mu != nullptr, d_xe, d_a, d_sigma);
    });
    if (mu) d_mu = d_a;
    chain_softplus(d_sigma, weight_sigma, chain_after);
    return {d_xe, d_mu, d_sigma, d_bias_mu, d_bias_sigma};
  }
  const Flipout fo = flipout_offsets(S, B, N, K);
  const Tensor sign_in = noise_tensor({Noise::kSign, seed}, {S, B, K}, fo.in_offset, opt);
  const Tensor xe = x.expand({S, B, K}) * sign_in;
  const Tensor ge = noise_tensor({Noise::kSign, seed}, {S, B, N}, fo.out_offset, opt).mul_(g);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gaussian_linear_bwd_flipout", [&] {
    noisy_weight_backward<scalar_t>(xe, ge, nw, false, d_xe, d_a, d_sigma);
  });
  d_x = sum_draws_if_shared(d_xe.mul_(sign_in), Sx);
  if (mu) add_mean_part_grads(g, x, *mu, d_x, d_mu);
  chain_softplus(d_sigma, weight_sigma, chain_after);
  return {d_x, d_mu, d_sigma, d_bias_mu, d_bias_sigma};
}

// ---------------------------------------------------------------- bernoulli_linear

Noise bernoulli_noise(c10::string_view mask, double p, uint64_t seed) {
  if (mask == "symmetric") return {Noise::kSign, seed};
  TORCH_CHECK(mask == "input" || mask == "weight", "bernoulli_linear: unknown mask ", mask);
  return {Noise::kKeep, seed, static_cast<float>(p), 1.0 / (1.0 - p)};
}

// The masked input stack [S*B, K] (row r = s*B + b, mask offset r*K; x shared when x.size(0) == 1),
// with `scale_by_mask` [S*B, K] multiplied by the same mask in place when given. Rows are done in
// parallel; each chunk's mask lives in a small cache-resident buffer.
Tensor masked_input(const Tensor& x, const Noise& noise, int64_t S, Tensor* scale_by_mask) {
  const int64_t B = x.size(1), K = x.size(2), R = S * B;
  const bool shared = x.size(0) == 1;
  Tensor xm = at::empty({R, K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_input", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* out = xm.data_ptr<scalar_t>();
    scalar_t* sp = scale_by_mask ? scale_by_mask->data_ptr<scalar_t>() : nullptr;
    const int64_t rows_per_chunk = std::max<int64_t>(1, kFillGrain / std::max<int64_t>(K, 1));
    at::parallel_for(0, R, rows_per_chunk, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> keep(K);
      std::vector<float> scratch;
      for (int64_t r = begin; r < end; ++r) {
        noise.fill_as(keep.data(), K, r * K, scratch);
        const scalar_t* xr = xp + (shared ? r % B : r) * K;
        at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> m) { return a * m; }, out + r * K, xr,
                                keep.data(), K);
        if (sp) {
          at::vec::map2<scalar_t>([](Vec<scalar_t> a, Vec<scalar_t> m) { return a * m; }, sp + r * K, sp + r * K,
                                  keep.data(), K);
        }
      }
    });
  });
  return xm;
}

Tensor bernoulli_linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias_opt, double p,
                            int64_t seed_in, c10::string_view mask, int64_t S, bool x_sampled) {
  const Tensor* bias = ptr_or_null(bias_opt);
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t B = x.size(1), K = x.size(2), N = weight.size(0);
  const Noise noise = bernoulli_noise(mask, p, seed);
  Tensor out = at::empty({S, B, N}, x.options());
  if (mask == "input") {
    // One fused pass builds the masked input stack (input-sized, freed after forward), then a
    // single GEMM: one large at::addmm runs at full BLAS efficiency on all threads, unlike per-tile
    // GEMMs that each re-read the whole weight.
    const Tensor xm = masked_input(x, noise, S, nullptr);
    Tensor out2 = out.view({S * B, N});
    if (bias) at::addmm_out(out2, *bias, xm, weight.t());
    else at::mm_out(out2, xm, weight.t());
    return out;
  }
  const NoisyWeight nw{nullptr, weight, noise, S};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bernoulli_linear_fwd", [&] {
    noisy_weight_forward<scalar_t>(x, nw, out, bias ? bias->view({1, N}) : Tensor(), nullptr, 0);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> bernoulli_linear_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& weight,
                                                        const OptTensor& bias_opt, double p, int64_t seed_in,
                                                        c10::string_view mask, int64_t S, bool x_sampled) {
  const Tensor* bias = ptr_or_null(bias_opt);
  const uint64_t seed = static_cast<uint64_t>(seed_in);
  const int64_t Sx = x.size(0), B = x.size(1), K = x.size(2), N = weight.size(0);
  const Noise noise = bernoulli_noise(mask, p, seed);
  const Tensor g = grad_out.contiguous();
  const Tensor d_bias = bias ? g.sum({0, 1}) : x.new_empty({0});
  if (mask == "input") {
    // d_x = (g W) * keep, d_W = g^T X_masked: two large GEMMs around one fused pass that
    // regenerates the mask, rebuilds X_masked and scales g W in place.
    const Tensor g2 = g.view({S * B, N});
    Tensor dx = at::mm(g2, weight);
    const Tensor xm = masked_input(x, noise, S, &dx);
    Tensor d_weight = at::mm(g2.t(), xm);
    return {sum_draws_if_shared(dx.view({S, B, K}), Sx), d_weight, d_bias};
  }
  const NoisyWeight nw{nullptr, weight, noise, S};
  Tensor d_x, d_a, d_weight;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bernoulli_linear_bwd", [&] {
    noisy_weight_backward<scalar_t>(x, g, nw, false, d_x, d_a, d_weight);
  });
  return {d_x, d_weight, d_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("gaussian_linear_fwd(Tensor x, Tensor? weight_mu, Tensor weight_sigma, Tensor? bias_mu, "
        "Tensor? bias_sigma, int seed, str estimator, int samples, bool x_sampled, bool sigma_softplus=False) "
        "-> (Tensor, Tensor)");
  m.def("gaussian_linear_bwd(Tensor grad_out, Tensor x, Tensor? weight_mu, Tensor weight_sigma, "
        "Tensor? bias_mu, Tensor? bias_sigma, Tensor std, int seed, str estimator, int samples, bool x_sampled, "
        "bool sigma_softplus=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("bernoulli_linear_fwd(Tensor x, Tensor weight, Tensor? bias, float p, int seed, str mask, "
        "int samples, bool x_sampled) -> Tensor");
  m.def("bernoulli_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, float p, int seed, "
        "str mask, int samples, bool x_sampled) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CPU, m) {
  m.impl("gaussian_linear_fwd", &gaussian_linear_fwd);
  m.impl("gaussian_linear_bwd", &gaussian_linear_bwd);
  m.impl("bernoulli_linear_fwd", &bernoulli_linear_fwd);
  m.impl("bernoulli_linear_bwd", &bernoulli_linear_bwd);
}
