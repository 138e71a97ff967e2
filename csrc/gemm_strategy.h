// Whether 16-bit matrices are multiplied natively (AVX512-BF16 / AMX-BF16 for bfloat16,
// AVX512-FP16 / AMX-FP16 for float16). Then ATen's 16-bit GEMM (float32 accumulation inside) beats a
// float32 one and the kernels keep their tiles 16-bit; without it ATen emulates the 16-bit GEMM,
// several times slower than float32 (bfloat16 ~42 against ~145 GFLOP/s, float16 ~2), and the kernels
// widen their tiles to float32 instead.
// ATen's 16-bit GEMMs run in oneDNN, which uses no instruction set above ONEDNN_MAX_CPU_ISA (or its
// older name DNNL_MAX_CPU_ISA): a cap below the 16-bit ISA makes the GEMM emulated even on a CPU that
// has the instructions, so the choice follows the cap too. UDN_KERNELS_HALF_GEMM=native|upcast
// (read on each call) forces the choice, for tests and benchmarks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuinfo.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <string>

namespace udn_gemm_detail {

// oneDNN's x86 ISA names, lowest first; ranks compare caps. Unknown names (and "ALL") cap nothing.
constexpr std::array<const char*, 14> kIsaOrder = {
    "SSE41",           "AVX",           "AVX2",             "AVX2_VNNI",           "AVX2_VNNI_2",
    "AVX512_CORE",     "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512",
    "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16"};

inline int isa_rank(std::string name) {
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::toupper(c); });
  for (size_t i = 0; i < kIsaOrder.size(); ++i)
    if (name == kIsaOrder[i]) return static_cast<int>(i);
  return static_cast<int>(kIsaOrder.size());
}

// Whether the oneDNN cap (if any) allows the ISA named `needed`.
inline bool isa_allowed(const char* needed) {
  const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (!cap || !*cap) cap = std::getenv("DNNL_MAX_CPU_ISA");
  return !cap || !*cap || isa_rank(cap) >= isa_rank(needed);
}

}  // namespace udn_gemm_detail

inline bool native_half_gemm(at::ScalarType dtype) {
  if (const char* env = std::getenv("UDN_KERNELS_HALF_GEMM")) {
    const std::string v(env);
    if (v == "native") return true;
    if (v == "upcast") return false;
    TORCH_CHECK(v.empty() || v == "auto", "UDN_KERNELS_HALF_GEMM: expected native, upcast or auto, got ", v);
  }
  static const bool ready = cpuinfo_initialize();
  if (!ready) return false;
  using udn_gemm_detail::isa_allowed;
  if (dtype == at::kBFloat16)
    return (cpuinfo_has_x86_avx512bf16() || cpuinfo_has_x86_amx_bf16()) && isa_allowed("AVX512_CORE_BF16");
  if (dtype == at::kHalf)
    return (cpuinfo_has_x86_avx512fp16() || cpuinfo_has_x86_amx_fp16()) && isa_allowed("AVX512_CORE_FP16");
  return false;
}

// out = A B (+ out when accumulate, + bias broadcast over rows when defined) for 2-D A [M, K] and
// B [K, N] of out's dtype: at::mm unless the dtype is 16-bit without native 16-bit GEMMs, where
// ATen's 16-bit GEMM is emulated (float16 ~2 GFLOP/s). Then the product runs in float32 tiles:
// A widened once (pass the weight-sized operand as B), B one column tile of at most
// kUpcastTileElements at a time per thread, each float32 tile product rounded once into out. No
// B-sized float32 copy; scratch per thread: a B tile and an [M, tile] product.
namespace udn_gemm {

constexpr int64_t kUpcastTileElements = 1 << 17;

inline void matmul_out(const at::Tensor& out, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& bias = at::Tensor(), bool accumulate = false) {
  const auto dtype = out.scalar_type();
  const bool upcast = (dtype == at::kBFloat16 || dtype == at::kHalf) && !native_half_gemm(dtype);
  if (!upcast) {
    at::Tensor o = out;
    if (accumulate) o.addmm_(A, B);
    else if (bias.defined()) at::addmm_out(o, bias, A, B);
    else at::mm_out(o, A, B);
    if (accumulate && bias.defined()) o.add_(bias);
    return;
  }
  const int64_t K = A.size(1), N = B.size(1);
  const at::Tensor A32 = A.to(at::kFloat);
  const int64_t cols = std::max<int64_t>(16, kUpcastTileElements / std::max<int64_t>(K, 1));
  at::parallel_for(0, (N + cols - 1) / cols, 1, [&](int64_t t0, int64_t t1) {
    // OpenMP workers do not inherit the dispatch-key TLS: keep autograd out of the tile products.
    const at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * cols, n = std::min(cols, N - n0);
      at::Tensor dst = out.narrow(1, n0, n);
      at::Tensor P = at::mm(A32, B.narrow(1, n0, n).to(at::kFloat));
      if (accumulate) P.add_(dst);
      if (bias.defined()) P.add_(bias.narrow(0, n0, n));
      dst.copy_(P);
    }
  });
}

// A B as a new [M, N] tensor in A's dtype (matmul_out).
inline at::Tensor mm(const at::Tensor& A, const at::Tensor& B) {
  at::Tensor out = at::empty({A.size(0), B.size(1)}, A.options());
  udn_gemm::matmul_out(out, A, B);  // qualified: argument-dependent lookup would find at::matmul_out
  return out;
}

}  // namespace udn_gemm
