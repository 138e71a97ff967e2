"""The Triton backend (the CUDA path). On CPU tensors its kernels run only under ``TRITON_INTERPRET=1``.

``KERNELS`` maps kernel names of docs/internals.md to triton_ops with the same signature as the
reference ones; the ``udn_kernels::`` ops call them (docs/triton.md, "Dispatch").
"""
import importlib

KERNELS: dict = {}

for _name in ("rng", "heads", "stochastic_linear", "kl"):
    try:
        _module = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__name__}.{_name}", "triton"):
            raise
        continue
    KERNELS.update(_module.KERNELS)
