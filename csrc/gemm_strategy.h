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
