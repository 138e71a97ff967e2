// Python module stub for udn_kernels._C: importing it runs the TORCH_LIBRARY registrations of
// every kernel in csrc/ (torch.ops.udn_kernels_C.*), and exposes build facts to `udn info`.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(udn_kernels_C, m) {
  m.def("build_info() -> str");
}

static std::string build_info() {
  std::string isa = "generic";
#if defined(__AVX512F__)
  isa = "avx512";
#elif defined(__AVX2__)
  isa = "avx2";
#endif
  return isa;
}

TORCH_LIBRARY_IMPL(udn_kernels_C, CompositeExplicitAutograd, m) {
  m.impl("build_info", &build_info);
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
