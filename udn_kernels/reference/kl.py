"""KL divergences of stochastic-weight posteriors (plain differentiable PyTorch).

Both are summed over elements, never averaged: the loss convention is ``-ELBO / n`` (docs/design.md, "Mathematics").
``gaussian_kl`` / ``log_uniform_kl`` are the eager formulas (the oracle of the tests);
``KERNELS`` are the reference backend's kernels of the fused ops (docs/internals.md, "KL"): the
same values, and the gradients written out by hand.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .stochastic_linear import widened

# Molchanov et al. 2017, "Variational Dropout Sparsifies Deep Neural Networks", eq. (14).
K1, K2, K3 = 0.63576, 1.87320, 1.48695


def gaussian_kl(mu: torch.Tensor | None, sigma: torch.Tensor, prior_std) -> torch.Tensor:
    """``sum KL(N(mu, sigma^2) || N(0, prior_std^2))``; ``mu=None`` means a zero-mean posterior."""
    prior_var = torch.as_tensor(prior_std, dtype=sigma.dtype, device=sigma.device) ** 2
    second_moment = sigma * sigma if mu is None else sigma * sigma + mu * mu
    kl = 0.5 * (torch.log(prior_var) - 2.0 * torch.log(sigma) + second_moment / prior_var - 1.0)
    return kl.sum()


def log_uniform_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(q || log-uniform prior)`` of variational dropout, Molchanov et al.'s approximation

    ``-KL ~= k1 sigmoid(k2 + k3 log alpha) - 0.5 log1p(1 / alpha) - k1``, so KL -> 0 as alpha -> inf.
    """
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1
    return -neg_kl.sum()


def gaussian_kl_fwd(mu, sigma, prior_std, sigma_softplus):
    """:func:`gaussian_kl` of ``sigma`` (``softplus(sigma)`` with ``sigma_softplus``); ``prior_std``
    has one element or sigma's shape."""
    with torch.no_grad():
        return gaussian_kl(mu, F.softplus(sigma) if sigma_softplus else sigma, prior_std.reshape(-1)[0]
                           if prior_std.numel() == 1 else prior_std)


def gaussian_kl_bwd(grad, mu, sigma, prior_std, sigma_softplus, grad_mask):
    """``(d_mu, d_sigma, d_prior_std)`` of ``grad * gaussian_kl_fwd``; empty where ``grad_mask``
    is False (and for d_mu when mu is None); d_sigma is d_rho with ``sigma_softplus``."""
    std = F.softplus(sigma) if sigma_softplus else sigma
    inv_var = grad / (prior_std * prior_std)
    # a fresh empty tensor per unwanted output: custom-op outputs must not alias each other
    d_mu = inv_var * mu if grad_mask[0] and mu is not None else sigma.new_empty(0)
    d_sigma = sigma.new_empty(0)
    if grad_mask[1]:
        d_sigma = inv_var * std - grad / std
        d_sigma = d_sigma * torch.sigmoid(sigma) if sigma_softplus else d_sigma
    d_prior = sigma.new_empty(0)
    if grad_mask[2]:
        second_moment = std * std if mu is None else std * std + mu * mu
        d_prior = (grad - inv_var * second_moment) / prior_std
        d_prior = d_prior.sum().reshape(prior_std.shape) if prior_std.numel() == 1 else d_prior
    return d_mu, d_sigma, d_prior


def log_uniform_kl_fwd(log_alpha, min, max):  # noqa: A002 (the schema's names)
    """:func:`log_uniform_kl` of ``log_alpha.clamp(min, max)``."""
    with torch.no_grad():
        return log_uniform_kl(log_alpha.clamp(min, max))


def log_uniform_kl_bwd(grad, log_alpha, min, max):  # noqa: A002
    """``d log_alpha`` of ``grad * log_uniform_kl_fwd`` (0 where the clamp cuts, torch.clamp's rule)."""
    clamped = log_alpha.clamp(min, max)
    s = torch.sigmoid(K2 + K3 * clamped)
    d = grad * (-K1 * K3 * s * (1 - s) - 0.5 * torch.sigmoid(-clamped))
    return torch.where((log_alpha >= min) & (log_alpha <= max), d, torch.zeros_like(d))


# 16-bit parameters: computed in float32; the sums stay float32, the gradients take the parameters' dtype.
KERNELS = {
    "gaussian_kl_fwd": widened(gaussian_kl_fwd, round_results=False),
    "gaussian_kl_bwd": widened(gaussian_kl_bwd),
    "log_uniform_kl_fwd": widened(log_uniform_kl_fwd, round_results=False),
    "log_uniform_kl_bwd": widened(log_uniform_kl_bwd),
}
