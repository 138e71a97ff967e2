"""Eager PyTorch implementations of every kernel: the test oracle and the fallback backend.

``KERNELS`` maps each kernel name of docs/internals.md to its reference implementation.
"""
from . import heads, kl, philox, stochastic_linear

KERNELS: dict = {
    "philox_uint32": lambda n, seed, offset: philox.random_uint32(n, seed, offset),
    "philox_uniform": lambda n, seed, offset: philox.uniform(n, seed, offset),
    "philox_normal": lambda n, seed, offset: philox.normal(n, seed, offset),
    "philox_bernoulli": lambda n, p, seed, offset: philox.bernoulli(n, p, seed, offset),
    **heads.KERNELS,
    **stochastic_linear.KERNELS,
    **kl.KERNELS,
}
