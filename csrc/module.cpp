// Python module stub for udn_kernels._C / _C_avx2 (one source, built once per variant by setup.py):
// importing it runs the TORCH_LIBRARY registrations of every kernel in csrc/
// (torch.ops.udn_kernels_C.*), and exposes build facts to `udn info`.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "philox.h"

namespace udn_heads {
std::string half_gemm_info();  // heads_ops.cpp
}

#ifndef UDN_BUILD_FLAGS
#define UDN_BUILD_FLAGS "unknown"
#endif

TORCH_LIBRARY(udn_kernels_C, m) {
  m.def("build_info() -> str");
}

// "key=value" lines: the ISA compiled for, the Philox path taken on this CPU, the heads' 16-bit GEMM
// strategy chosen on this CPU (heads_common.h, HalfGemm), the compile flags.
static std::string build_info() {
  std::string isa = "generic";
#if defined(__AVX512F__)
  isa = "avx512";
#elif defined(__AVX2__)
  isa = "avx2";
#endif
  std::string philox = "scalar";
#if defined(UDN_PHILOX_AVX2)
  philox = udn::philox::detail::use_avx512() ? "avx512" : "avx2";
#endif
  return "isa=" + isa + "\nphilox=" + philox + "\nhalf_gemm=" + udn_heads::half_gemm_info() + "\nflags=" + UDN_BUILD_FLAGS;
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("build_info", &build_info);
}

// The init function's name must match the module's file name (_C or _C_avx2).
#define UDN_CONCAT_(a, b) a##b
#define UDN_CONCAT(a, b) UDN_CONCAT_(a, b)
#define UDN_STRINGIFY_(x) #x
#define UDN_STRINGIFY(x) UDN_STRINGIFY_(x)

extern "C" {
PyObject* UDN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, UDN_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
