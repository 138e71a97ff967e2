"""Loads the C++ extension variant this CPU runs (docs/building.md).

x86-64 builds ship ``udn_kernels._C_avx512`` (AVX-512), ``udn_kernels._C_avx2`` (AVX2 + FMA +
F16C) and ``udn_kernels._C`` (portable); all register the same ``torch.ops.udn_kernels_C``
library, so exactly one may be loaded per process. The AVX-512 module is taken when torch reports
an AVX-512 CPU and ``UDN_KERNELS_NO_AVX512=1`` is not set, else the AVX2 module when torch reports
AVX2 or above and ``UDN_KERNELS_NO_AVX2=1`` is not set; other targets ship ``_C`` only.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

NO_AVX2_ENV = "UDN_KERNELS_NO_AVX2"
NO_AVX512_ENV = "UDN_KERNELS_NO_AVX512"
AVX512_MODULE = "udn_kernels._C_avx512"
AVX2_MODULE = "udn_kernels._C_avx2"
PORTABLE_MODULE = "udn_kernels._C"


def cpu_runs_avx2() -> bool:
    """Whether this CPU runs the AVX2 module: torch's own dispatch level (which already honours
    ``ATEN_CPU_CAPABILITY``) is AVX2 or above, and ``UDN_KERNELS_NO_AVX2`` is not set."""
    if os.environ.get(NO_AVX2_ENV, "0") not in ("", "0"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_runs_avx512() -> bool:
    """Whether this CPU runs the AVX-512 module: it runs the AVX2 one, torch's dispatch level is
    AVX512, and ``UDN_KERNELS_NO_AVX512`` is not set."""
    if os.environ.get(NO_AVX512_ENV, "0") not in ("", "0"):
        return False
    return cpu_runs_avx2() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def candidate_modules() -> list[str]:
    """Module names to try, best first (a build without the AVX-512 module falls back to AVX2)."""
    if not cpu_runs_avx2():
        return [PORTABLE_MODULE]
    return ([AVX512_MODULE] if cpu_runs_avx512() else []) + [AVX2_MODULE, PORTABLE_MODULE]


@functools.lru_cache(maxsize=None)
def load_extension():
    """The loaded extension module, or None if no variant is built (ops then fall back to the
    reference with one warning, or raise in strict mode: udn_kernels/_backend.py)."""
    for name in candidate_modules():
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def extension_info() -> dict:
    """What runs on this CPU: ``module`` (the loaded variant, or None), ``isa`` (compiled for),
    ``philox`` (the Philox fill path taken at run time: avx512, avx2 or scalar) and ``flags``
    (the compile flags recorded at build time)."""
    module = load_extension()
    if module is None:
        return {"module": None, "isa": None, "philox": None, "flags": None}
    facts = dict(line.split("=", 1) for line in torch.ops.udn_kernels_C.build_info().splitlines())
    return {"module": module.__name__, **facts}
