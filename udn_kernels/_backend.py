"""Backend selection: which implementation of a kernel runs for a given device.

Backends: ``"reference"`` (eager PyTorch, always there), ``"cpu"`` (the C++ extension
``udn_kernels._C``), ``"triton"`` (GPU kernels; on CPU tensors only under ``TRITON_INTERPRET=1``).
Automatic choice is by device: CUDA -> triton, CPU -> cpu (reference if the extension is not built).
Force one with ``udn_kernels.backend(name)`` or the environment variable ``UDN_KERNELS_BACKEND``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("reference", "cpu", "triton")
_ENV_VAR = "UDN_KERNELS_BACKEND"
_state = threading.local()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


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
def backend(name: str) -> Iterator[None]:
    """Force every op inside the ``with`` block (this thread) onto backend ``name``."""
    _check_name(name)
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def forced_backend() -> str | None:
    """The backend forced by ``backend(...)`` or ``UDN_KERNELS_BACKEND``, else None."""
    name = getattr(_state, "forced", None) or os.environ.get(_ENV_VAR) or None
    return _check_name(name) if name else None


def resolve(device: torch.device) -> str:
    """The backend that ops on ``device`` run on now."""
    name = forced_backend()
    if name is None:
        if device.type == "cuda":
            name = "triton" if _triton_importable() else "reference"
        elif device.type == "cpu":
            name = "cpu" if load_extension() is not None else "reference"
        else:
            name = "reference"
    if name == "triton" and device.type == "cpu" and not triton_interpreted():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"backend 'cpu' cannot run on {device.type} tensors")
    return name


def _kernels_of(name: str) -> dict[str, Callable]:
    if name == "reference":
        from . import reference
        return reference.KERNELS
    if name == "triton":
        from . import triton as triton_kernels
        return triton_kernels.KERNELS
    ext = load_extension()
    if ext is None:
        return {}
    return _cpp_kernels()


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


def get_kernel(name: str, device: torch.device) -> Callable:
    """The implementation of kernel ``name`` for tensors on ``device`` (reference fallback, warned once)."""
    chosen = resolve(device)
    kernel = _kernels_of(chosen).get(name)
    if kernel is None:
        if chosen != "reference":
            _warn_once(f"{chosen}:{name}", f"udn_kernels: no {chosen} kernel for {name!r} yet; "
                       "using the reference implementation")
        from . import reference
        kernel = reference.KERNELS[name]
    return kernel


def use_triton_ops(device: torch.device) -> bool:
    """Whether ops on ``device`` call the ``udn_kernels_triton::`` triton_ops directly.

    True on the triton backend (CUDA tensors by default), so ``torch.compile`` traces into the
    Triton kernels (``torch.library.triton_op`` + ``wrap_triton``). CPU tensors on the triton
    backend (``TRITON_INTERPRET=1``) use them eagerly only: the interpreter cannot run under
    torch.compile (fake tensors have no data), so compiled CPU graphs keep the opaque
    ``udn_kernels::`` custom ops.
    """
    if device.type == "cpu" and torch.compiler.is_compiling():
        return False
    return _triton_ops_selected(device.type)


@torch.compiler.assume_constant_result
def _triton_ops_selected(device_type: str) -> bool:
    """``resolve(device) == "triton"``, importing (registering) the triton_ops if so. A constant
    to torch.compile: the backend chosen when a graph is traced stays baked into it."""
    if resolve(torch.device(device_type)) != "triton":
        return False
    importlib.import_module("udn_kernels.triton")
    return True


def kernel_backend(name: str, device: torch.device) -> str:
    """Which backend actually serves kernel ``name`` on ``device`` (after fallback)."""
    chosen = resolve(device)
    return chosen if _kernels_of(chosen).get(name) is not None else "reference"
