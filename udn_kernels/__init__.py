"""udn_kernels: fused kernels for Unbounded Depth Networks and stochastic-weight layers."""
from ._backend import available_backends, backend

__version__ = "0.1.0"
