"""Triton kernels (the CUDA path). On CPU tensors they run only under ``TRITON_INTERPRET=1``.

``KERNELS`` maps kernel names of docs/internals.md to launch functions with the same signature
as the reference ones.
"""
import importlib

KERNELS: dict = {}

for _name in ("rng", "heads", "stochastic_linear"):
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__name__}.{_name}", "triton"):
            raise
        continue
    KERNELS.update(_module.KERNELS)
