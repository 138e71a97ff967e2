"""Public KL divergences of stochastic-weight layers (validated wrappers of reference/kl.py)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..reference import kl as _kl
from .._checks import check_float_tensor, check_same, check_shape


def gaussian_kl(mu: Optional[torch.Tensor], sigma: torch.Tensor, prior_std) -> torch.Tensor:
    """Summed ``KL(N(mu, sigma^2) || N(0, prior_std^2))`` over all elements (0-d tensor).

    ``mu=None`` is a zero-mean posterior (variance layer). ``prior_std`` is a positive float or
    a tensor broadcastable to ``sigma`` (its values are checked in eager calls only). ``sigma``
    must be positive (not checked: a device sync on a weight-sized tensor).
    """
    check_float_tensor("sigma", sigma)
    if mu is not None:
        check_float_tensor("mu", mu)
        check_same("sigma", sigma, mu=mu)
        check_shape("mu", mu, sigma.shape)
    if isinstance(prior_std, torch.Tensor):
        check_float_tensor("prior_std", prior_std)
        check_same("sigma", sigma, prior_std=prior_std)
        try:
            torch.broadcast_shapes(prior_std.shape, sigma.shape)
        except RuntimeError:
            raise ValueError(f"prior_std: expected a shape broadcastable to {tuple(sigma.shape)}, "
                             f"got {tuple(prior_std.shape)}") from None
        # Eager calls check the values (one sync on a small tensor); a compiled graph cannot branch on them.
        if not torch.compiler.is_compiling() and not bool((prior_std > 0).all()):
            raise ValueError(f"prior_std: expected positive values, got min {prior_std.min().item()}")
    elif isinstance(prior_std, bool) or not isinstance(prior_std, numbers.Real):
        raise TypeError(f"prior_std: expected a positive float or a tensor, got {type(prior_std).__name__}")
    elif not prior_std > 0:
        raise ValueError(f"prior_std: expected a positive float, got {prior_std}")
    return _kl.gaussian_kl(mu, sigma, prior_std)


def log_uniform_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Summed KL to the log-uniform prior of variational dropout (Molchanov et al. 2017, eq. 14).

    ``log_alpha`` holds per-weight ``log(sigma^2 / mu^2)``; the approximation is
    ``KL ~= k1 - k1 sigmoid(k2 + k3 log_alpha) + 0.5 log1p(1 / alpha)`` with
    ``k1, k2, k3 = 0.63576, 1.87320, 1.48695``, which tends to 0 as ``alpha -> inf``.
    """
    check_float_tensor("log_alpha", log_alpha)
    return _kl.log_uniform_kl(log_alpha)
