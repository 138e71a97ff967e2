"""Compiler flags of the C++ extension for each target (docs/building.md).

Pure Python without torch, so setup.py can load this file by path before the package imports,
and tests can ask what any target (aarch64, macOS, ...) would be built with.

x86-64 builds three modules from the same sources: ``udn_kernels._C`` (portable: runs on any
x86-64 CPU), ``udn_kernels._C_avx2`` (AVX2 + FMA + F16C) and ``udn_kernels._C_avx512`` (AVX-512
F/BW/VL/DQ, 16-wide float vectors in the epilogues); ``udn_kernels._extension`` loads one of them
at import by the CPU. Other targets build ``_C`` only, with no ISA flags: at::vec then
uses its default implementation for the target (NEON on aarch64).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field

BASE_FLAGS = ["-O3", "-std=c++17"]
# at::vec::Vectorized picks its SIMD implementation from CPU_CAPABILITY_* macros, not from -m flags.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
PORTABLE_FLAGS = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
# Where Homebrew (Apple silicon, then Intel) and MacPorts put libomp.
MACOS_OPENMP_PREFIXES = ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp", "/opt/local"]


@dataclass(frozen=True)
class Target:
    """What the compiler builds for: ``machine`` as in ``$CXX -dumpmachine``'s first field
    (``x86_64``, ``aarch64``, ``arm64``) and ``system`` (``linux``, ``darwin``)."""
    machine: str
    system: str

    @property
    def x86_64(self) -> bool:
        return self.machine in ("x86_64", "amd64")

    @property
    def arm(self) -> bool:
        return self.machine in ("aarch64", "arm64")


@dataclass(frozen=True)
class Variant:
    """One extension module: its dotted name and its compile and link flags."""
    name: str
    compile_args: list[str]
    link_args: list[str] = field(default_factory=list)


def target_of(cxx: str) -> Target:
    """The target of compiler ``cxx``, from ``cxx -dumpmachine`` (``aarch64-linux-gnu``,
    ``arm64-apple-darwin23.0.0``, ...)."""
    triple = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True).stdout.strip()
    return Target(triple.split("-")[0], "darwin" if "apple" in triple or "darwin" in triple else "linux")


def find_macos_openmp(prefixes=MACOS_OPENMP_PREFIXES) -> str | None:
    """The first prefix holding both ``include/omp.h`` and ``lib/libomp.dylib`` (Homebrew's or
    MacPorts' libomp; ``$OpenMP_ROOT`` first when set), else None."""
    candidates = [os.environ["OpenMP_ROOT"]] if os.environ.get("OpenMP_ROOT") else []
    for prefix in candidates + list(prefixes):
        if os.path.isfile(os.path.join(prefix, "include", "omp.h")) and \
                os.path.isfile(os.path.join(prefix, "lib", "libomp.dylib")):
            return prefix
    return None


def openmp_flags(target: Target, macos_openmp_prefix: str | None = None) -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP: ``-fopenmp`` on Linux; on macOS, Apple clang has no
    ``-fopenmp`` driver flag, so ``-Xpreprocessor -fopenmp`` + ``-lomp`` when a libomp was found,
    else nothing (at::parallel_for then runs serially)."""
    if target.system != "darwin":
        return ["-fopenmp"], ["-fopenmp"]
    if macos_openmp_prefix is None:
        return [], []
    return (["-Xpreprocessor", "-fopenmp", f"-I{macos_openmp_prefix}/include"],
            [f"-L{macos_openmp_prefix}/lib", "-lomp", f"-Wl,-rpath,{macos_openmp_prefix}/lib"])


def extension_variants(target: Target, native: bool = False, host_avx2: bool = True,
                       macos_openmp_prefix: str | None = None) -> list[Variant]:
    """The extension modules to build for ``target``.

    ``native`` (``UDN_KERNELS_NATIVE=1``) builds one module for the build machine's own CPU
    (``-march=native``): ``_C_avx2`` on an x86-64 host with AVX2 (``host_avx2``), else ``_C``.
    """
    omp_compile, omp_link = openmp_flags(target, macos_openmp_prefix)
    common = BASE_FLAGS + omp_compile

    def variant(module: str, isa_flags: list[str]) -> Variant:
        return Variant(f"udn_kernels.{module}", common + isa_flags, list(omp_link))

    avx2_macros = [f for f in AVX2_FLAGS if f.startswith("-D")]
    if native:
        if target.x86_64 and host_avx2:
            return [variant("_C_avx2", ["-march=native"] + avx2_macros)]
        # gcc and clang on aarch64 spell the host CPU -mcpu=native (Apple clang has no -march=native).
        return [variant("_C", ["-mcpu=native" if target.arm else "-march=native"] + PORTABLE_FLAGS)]
    if target.x86_64:
        return [variant("_C", PORTABLE_FLAGS), variant("_C_avx2", AVX2_FLAGS), variant("_C_avx512", AVX512_FLAGS)]
    return [variant("_C", PORTABLE_FLAGS)]
