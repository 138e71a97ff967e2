"""Builds the C++ CPU kernels ``udn_kernels._C`` from csrc/ with torch's cpp_extension + ninja.

Install torch first (``pip install torch==2.13.0`` for the CPU build), then
``pip install --no-build-isolation -e .``: build isolation would fetch a fresh torch wheel
(a multi-GB CUDA build) into the build environment.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

extra_compile_args = ["-O3", "-std=c++17", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
if os.environ.get("UDN_KERNELS_NATIVE", "0") == "1":
    extra_compile_args.append("-march=native")
else:
    extra_compile_args += ["-mavx2", "-mfma", "-mf16c"]
# at::vec::Vectorized picks its SIMD implementation from CPU_CAPABILITY_* macros, not from -m flags.
extra_compile_args += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]

setup(
    ext_modules=[
        CppExtension(
            "udn_kernels._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
