"""Eager PyTorch implementations of every kernel: the test oracle and the fallback backend.

``KERNELS`` maps each kernel name of docs/internals.md to its reference implementation.
"""
from . import philox

KERNELS: dict = {
    "philox_uint32": lambda n, seed, offset: philox.random_uint32(n, seed, offset),
    "philox_uniform": lambda n, seed, offset: philox.uniform(n, seed, offset),
    "philox_normal": lambda n, seed, offset: philox.normal(n, seed, offset),
    "philox_bernoulli": lambda n, p, seed, offset: philox.bernoulli(n, p, seed, offset),
}


def _register_optional(module_name: str) -> None:
    import importlib
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{module_name}":
            raise
        return
    KERNELS.update(module.KERNELS)


for _name in ("heads", "stochastic_linear"):
    _register_optional(_name)
