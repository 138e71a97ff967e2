// RNG kernels philox_uint32 / philox_uniform / philox_normal / philox_bernoulli (docs/internals.md):
// n consecutive elements of the Philox stream (docs/rng.md) starting at `offset`, filled in
// parallel chunks with the vectorised fills of philox.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "philox.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per task: ~50 us of Philox, well above task overhead
constexpr int64_t kWidenChunk = 2048;

void check_args(const char* op, int64_t n, int64_t seed, int64_t offset) {
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(offset >= 0, op, ": offset must be in [0, 2^63), got ", offset);
  // Elements offset .. offset + n - 1 must all be < 2^63.
  TORCH_CHECK(n == 0 || n - 1 <= std::numeric_limits<int64_t>::max() - offset, op,
              ": offset + n must be <= 2^63, got offset ", offset, " and n ", n);
}

// A fresh 1-D output. Large ones ask for transparent huge pages before first touch: a new 64 MB
// tensor otherwise takes ~16k page faults, which cost more here than generating its contents.
at::Tensor empty_output(int64_t n, at::ScalarType dtype) {
  at::Tensor out = at::empty({n}, dtype);
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + out.nbytes()) & ~(kHugePage - 1);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory: failure is harmless
  }
#endif
  return out;
}

// float32[n] filled by fill(ptr, count, element_offset) over parallel chunks.
template <typename Fill>
at::Tensor parallel_fill(int64_t n, int64_t offset, Fill fill) {
  at::Tensor out = empty_output(n, at::kFloat);
  float* data = out.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    fill(data + begin, end - begin, offset + begin);
  });
  return out;
}

at::Tensor philox_uint32(int64_t n, int64_t seed, int64_t offset) {
  check_args("philox_uint32", n, seed, offset);
  at::Tensor out = empty_output(n, at::kLong);
  int64_t* data = out.data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    uint32_t words[kWidenChunk];
    for (int64_t i = begin; i < end; i += kWidenChunk) {
      const int64_t count = std::min(kWidenChunk, end - i);
      udn::philox::fill_uint32(words, count, key, offset + i);
      for (int64_t j = 0; j < count; ++j) data[i + j] = static_cast<int64_t>(words[j]);
    }
  });
  return out;
}

at::Tensor philox_uniform(int64_t n, int64_t seed, int64_t offset) {
  check_args("philox_uniform", n, seed, offset);
  const uint64_t key = static_cast<uint64_t>(seed);
  return parallel_fill(n, offset, [&](float* out, int64_t count, int64_t e) {
    udn::philox::fill_uniform(out, count, key, e);
  });
}

at::Tensor philox_normal(int64_t n, int64_t seed, int64_t offset) {
  check_args("philox_normal", n, seed, offset);
  const uint64_t key = static_cast<uint64_t>(seed);
  return parallel_fill(n, offset, [&](float* out, int64_t count, int64_t e) {
    udn::philox::fill_normal(out, count, key, e);
  });
}

at::Tensor philox_bernoulli(int64_t n, double p, int64_t seed, int64_t offset) {
  check_args("philox_bernoulli", n, seed, offset);
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "philox_bernoulli: p must be in [0, 1], got ", p);
  const uint64_t key = static_cast<uint64_t>(seed);
  const float pf = static_cast<float>(p);  // compared in float32, as Triton and the reference do
  return parallel_fill(n, offset, [&](float* out, int64_t count, int64_t e) {
    udn::philox::fill_bernoulli(out, count, pf, key, e);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udn_kernels_C, m) {
  m.def("philox_uint32(int n, int seed, int offset) -> Tensor");
  m.def("philox_uniform(int n, int seed, int offset) -> Tensor");
  m.def("philox_normal(int n, int seed, int offset) -> Tensor");
  m.def("philox_bernoulli(int n, float p, int seed, int offset) -> Tensor");
}

// These ops take no tensor, so the dispatcher has no device to key on: register them for every
// backend (CompositeExplicitAutograd); they always produce CPU tensors.
TORCH_LIBRARY_IMPL(udn_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("philox_uint32", &philox_uint32);
  m.impl("philox_uniform", &philox_uniform);
  m.impl("philox_normal", &philox_normal);
  m.impl("philox_bernoulli", &philox_bernoulli);
}
