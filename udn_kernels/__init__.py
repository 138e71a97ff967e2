"""udn_kernels: fused kernels for Unbounded Depth Networks and stochastic-weight layers."""
from . import rng
from ._backend import FallbackError, available_backends, backend
from .ops.heads import DepthStats, depth_loglik, depth_mixture_nll, depth_mixture_predict
from .ops.bernoulli_linear import bernoulli_linear
from .ops.gaussian_conv import gaussian_conv2d
from .ops.gaussian_linear import gaussian_linear
from .ops.kl import gaussian_kl, log_uniform_kl

__version__ = "0.1.0"
