"""Eager oracle of ``gaussian_conv2d``: the textbook formulas, one draw at a time, on the reference
Philox and the offsets of docs/stochastic_conv.md; differentiable by autograd (not a backend
kernel: the op itself composes the Philox fills with ATen convolutions)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from . import philox


def _normal(count: int, offset: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    return philox.normal(count, seed, offset).to(like)


def _sign(count: int, offset: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    return philox.sign_at(torch.arange(offset, offset + count), seed).to(like)


def gaussian_conv2d(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed: int, estimator: str, samples: int,
                    x_sampled: bool, stride, padding, dilation) -> torch.Tensor:
    """``[S, N, O, H', W']`` for ``x [N, C, H, W]`` (or ``[S, N, C, H, W]`` when ``x_sampled``);
    ``weight_sigma`` / ``bias_sigma`` are standard deviations (apply softplus before)."""
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    S, (O, C) = samples, weight_sigma.shape[:2]
    n = x.shape[1] if x_sampled else x.shape[0]
    k, b0 = weight_sigma.numel(), S * weight_sigma.numel()
    zero = torch.zeros((), dtype=x.dtype)
    bias_mu = zero if bias_mu is None else bias_mu
    outs = []
    for s in range(S):
        xs = x[s] if x_sampled else x
        if estimator == "local":
            mean = F.conv2d(xs, weight_mu, None, **conv) + bias_mu[..., None, None]
            var = F.conv2d(xs * xs, weight_sigma ** 2, None, **conv)
            if bias_sigma is not None:
                var = var + (bias_sigma ** 2)[:, None, None]
            eps = _normal(mean.numel(), s * mean.numel(), seed, x).view_as(mean)
            outs.append(mean + var.sqrt() * eps)
            continue
        delta = weight_sigma * _normal(k, s * k, seed, x).view_as(weight_sigma)
        bias = bias_mu if bias_sigma is None else bias_mu + bias_sigma * _normal(O, b0 + s * O, seed, x)
        if estimator == "sample":
            out = F.conv2d(xs, weight_mu + delta, None, **conv)
        else:  # flipout
            start = b0 + S * O
            sign_in = _sign(n * C, start + s * n * C, seed, x).view(n, C, 1, 1)
            sign_out = _sign(n * O, start + S * n * C + s * n * O, seed, x).view(n, O, 1, 1)
            out = F.conv2d(xs, weight_mu, None, **conv) + F.conv2d(xs * sign_in, delta, None, **conv) * sign_out
        outs.append(out + bias[..., None, None])
    return torch.stack(outs)
