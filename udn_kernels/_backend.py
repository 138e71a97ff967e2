"""Backend selection: which implementation of a kernel runs for a given device.

Backends: ``"reference"`` (eager PyTorch, always there), ``"cpu"`` (the C++ extension
``udn_kernels._C``), ``"triton"`` (GPU kernels; on CPU tensors only under ``TRITON_INTERPRET=1``).
Automatic choice is by device: CUDA -> triton, CPU -> cpu. Force one with
``udn_kernels.backend(name)`` or the environment variable ``UDN_KERNELS_BACKEND``.

An op calls :func:`resolve` once, at forward, naming every kernel it may run (forward and
backward); the backend it gets has all of them, and the op keeps that name in its autograd
context, so its backward runs the same backend's kernels through :func:`kernel`, whatever
thread-local state is active when (and on whichever thread) the backward runs. Where the wanted
backend cannot serve the op (extension not built, Triton missing on CUDA, kernel not written yet)
the op runs on the reference with one warning, or raises in strict mode
(``UDN_KERNELS_STRICT=1`` or ``backend(..., strict=True)``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("reference", "cpu", "triton")
_ENV_VAR = "UDN_KERNELS_BACKEND"
_STRICT_ENV_VAR = "UDN_KERNELS_STRICT"
_state = threading.local()
_warned: set[str] = set()


class FallbackError(RuntimeError):
    """Strict mode: an op would have fallen back to the reference implementation."""


def load_extension():
    """The C++ extension variant this CPU runs, or None (``udn_kernels._extension``)."""
    from ._extension import load_extension
    return load_extension()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> dict[str, bool]:
    """Which backends can run here: ``{"reference": True, "cpu": <extension built>, "triton": <importable>}``."""
    return {"reference": True, "cpu": load_extension() is not None, "triton": _triton_importable()}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: Optional[str] = None, *, strict: bool = False) -> Iterator[None]:
    """Ops called inside the ``with`` block (this thread) run on backend ``name`` (None: the
    automatic choice by device). ``strict=True`` turns every fallback to the reference
    implementation into a :class:`FallbackError`. The choice is made when an op's forward runs;
    its backward follows the forward wherever it runs."""
    if name is not None:
        _check_name(name)
    previous = getattr(_state, "forced", None), getattr(_state, "strict", False)
    _state.forced, _state.strict = name, strict or previous[1]
    try:
        yield
    finally:
        _state.forced, _state.strict = previous


def forced_backend() -> str | None:
    """The backend forced by ``backend(...)`` or ``UDN_KERNELS_BACKEND``, else None."""
    name = getattr(_state, "forced", None) or os.environ.get(_ENV_VAR) or None
    return _check_name(name) if name else None


def strict() -> bool:
    """Whether a fallback to the reference raises (``backend(strict=True)`` or ``UDN_KERNELS_STRICT=1``)."""
    return getattr(_state, "strict", False) or os.environ.get(_STRICT_ENV_VAR, "0") == "1"


def _fall_back(key: str, message: str) -> str:
    """``"reference"``, after one warning per ``key`` — or a FallbackError in strict mode."""
    if strict():
        raise FallbackError(f"{message} (strict mode: no fallback to the reference implementation)")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{message}; using the reference implementation", RuntimeWarning, stacklevel=4)
    return "reference"


def _preferred(device: torch.device) -> str:
    """The backend wanted for ``device`` (forced or automatic), after checking it can run there."""
    name = forced_backend()
    if name is None:
        if device.type == "cuda":
            if not _triton_importable():
                return _fall_back("cuda:triton", "udn_kernels: Triton is not installed, so CUDA ops "
                                  "cannot run their kernels (pip install triton)")
            return "triton"
        if device.type != "cpu":
            return "reference"
        name = "cpu"
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' cannot run on {device.type} tensors")
    if name == "cpu" and load_extension() is None:
        return _fall_back("extension", "udn_kernels: the C++ extension udn_kernels._C is not built "
                          "(reinstall with `pip install --no-build-isolation -e .`), so CPU ops cannot "
                          "run their kernels")
    return name


def resolve(device: torch.device, *kernel_names: str) -> str:
    """The backend an op on ``device`` runs on: the forced or automatic one if it has every kernel
    in ``kernel_names``, else the reference (warned once, or FallbackError in strict mode)."""
    name = _preferred(device)
    if name != "reference":
        missing = [k for k in kernel_names if kernels(name).get(k) is None]
        if missing:
            return _fall_back(f"{name}:{missing[0]}", f"udn_kernels: no {name} kernel for {missing[0]!r}")
    return name


@torch.compiler.assume_constant_result
def resolve_for_graph(device_type: str, *kernel_names: str) -> str:
    """:func:`resolve` as a constant to torch.compile: the backend chosen when a graph is traced
    stays baked into it (ops call this inside compiled regions)."""
    return resolve(torch.device(device_type), *kernel_names)


def choose(device: torch.device, *kernel_names: str) -> str:
    """What ops call at forward: :func:`resolve`, traced as a constant under torch.compile."""
    if torch.compiler.is_compiling():
        return resolve_for_graph(device.type, *kernel_names)
    return resolve(device, *kernel_names)


def kernels(name: str) -> dict[str, Callable]:
    """The kernels of backend ``name`` (a dict from kernel name to callable)."""
    if name == "reference":
        from . import reference
        return reference.KERNELS
    if name == "triton":
        from . import triton as triton_kernels
        return triton_kernels.KERNELS
    _check_name(name)
    return _cpp_kernels() if load_extension() is not None else {}


def kernel(backend_name: str, name: str) -> Callable:
    """Kernel ``name`` of backend ``backend_name``, which :func:`resolve` has promised has it."""
    found = kernels(backend_name).get(name)
    if found is None:
        raise RuntimeError(f"udn_kernels: backend {backend_name!r} has no kernel {name!r}")
    return found


class _CppKernels(dict):
    """Dict view over ``torch.ops.udn_kernels_C``: a kernel is present once C++ registers it
    (found ops are cached: the op lookup costs microseconds on every small call)."""

    def __init__(self, ops):
        super().__init__()
        self._ops = ops

    def get(self, name, default=None):
        if name not in self:
            try:
                self[name] = getattr(self._ops, name)
            except (AttributeError, RuntimeError):
                return default
        return self[name]


@functools.lru_cache(maxsize=None)
def _cpp_kernels() -> _CppKernels:
    return _CppKernels(torch.ops.udn_kernels_C)
