// Whether the CPU multiplies 16-bit matrices natively (AVX512-BF16 / AMX-BF16 for bfloat16,
// AVX512-FP16 / AMX-FP16 for float16). Then ATen's 16-bit GEMM (float32 accumulation inside) beats a
// float32 one and the kernels keep their tiles 16-bit; without it ATen emulates the 16-bit GEMM,
// several times slower than float32 (bfloat16 ~42 against ~145 GFLOP/s, float16 ~2), and the kernels
// widen their tiles to float32 instead.
#pragma once

#include <ATen/ATen.h>
#include <cpuinfo.h>

inline bool native_half_gemm(at::ScalarType dtype) {
  static const bool ready = cpuinfo_initialize();
  if (!ready) return false;
  if (dtype == at::kBFloat16) return cpuinfo_has_x86_avx512bf16() || cpuinfo_has_x86_amx_bf16();
  if (dtype == at::kHalf) return cpuinfo_has_x86_avx512fp16() || cpuinfo_has_x86_amx_fp16();
  return false;
}
