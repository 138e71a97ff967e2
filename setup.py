"""Builds the C++ CPU kernels from csrc/ with torch's cpp_extension + ninja (docs/building.md).

Install torch first (``pip install torch==2.13.0`` for the CPU build), then
``pip install --no-build-isolation -e .``: build isolation would fetch a fresh torch wheel
(a multi-GB CUDA build) into the build environment.

The flags follow the compiler's target (udn_kernels/_build_targets.py): x86-64 builds a portable
``udn_kernels._C`` and an AVX2 ``udn_kernels._C_avx2`` (chosen at import by the CPU), other
targets build ``_C`` without x86 flags. ``UDN_KERNELS_NATIVE=1`` builds one ``-march=native`` module.
"""
import glob
import importlib.util
import json
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))

# Loaded by path: importing the udn_kernels package would import the extension being built.
spec = importlib.util.spec_from_file_location("_build_targets", os.path.join(here, "udn_kernels", "_build_targets.py"))
targets = sys.modules["_build_targets"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(targets)

target = targets.target_of(os.environ.get("CXX", "c++"))
variants = targets.extension_variants(
    target,
    native=os.environ.get("UDN_KERNELS_NATIVE", "0") == "1",
    host_avx2=torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"),
    macos_openmp_prefix=targets.find_macos_openmp() if target.system == "darwin" else None,
)


def extension(variant):
    # The flags are recorded in the binary for `udn info` (a JSON string is a valid C literal).
    record = "-DUDN_BUILD_FLAGS=" + json.dumps(" ".join(variant.compile_args))
    return CppExtension(variant.name, sources, include_dirs=[os.path.join(here, "csrc")],
                        extra_compile_args=variant.compile_args + [record],
                        extra_link_args=variant.link_args)


class BuildEachInItsOwnDir(BuildExtension):
    """Compiles each module in its own temp directory: the modules share the csrc/ sources, and
    one object directory would make each build recompile the other's objects."""

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


setup(
    ext_modules=[extension(v) for v in variants],
    cmdclass={"build_ext": BuildEachInItsOwnDir.with_options(use_ninja=True)},
)
