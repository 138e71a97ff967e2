"""KL divergences of stochastic-weight posteriors (plain differentiable PyTorch).

Both are summed over elements, never averaged: the loss convention is ``-ELBO / n`` (docs/design.md, "Mathematics").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
