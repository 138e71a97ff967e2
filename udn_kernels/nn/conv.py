"""Stochastic 2-D convolutions: Gaussian kernels (``udn_kernels.gaussian_conv2d``) and Bernoulli masks.

Both follow the sample-axis protocol of :mod:`udn_kernels.nn.layers`: inside ``sampling(S)`` the
first stochastic layer turns ``[N, C, H, W]`` into ``[S, N, O, H', W']``, later ones take and
return the leading ``S`` axis. Noise layouts: docs/stochastic_conv.md.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import udn_kernels
from .. import rng
from .._checks import check_choice, check_probability, resolve_seed
from ..ops._conv import conv_per_sample
from .depth import _softplus_inverse
from .layers import StochasticLayer, _bernoulli_kl, _gaussian_kl, _init_like_linear


def _signs(n: int, seed: int, device) -> torch.Tensor:
    """``+1`` where the stream's word has its top bit set, else ``-1`` (the sign draw of docs/rng.md)."""
    return torch.where(rng.random_uint32(n, seed, device=device) >= 2**31, 1.0, -1.0)


class _StochasticConv2d(StochasticLayer):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _unpack(self, x: torch.Tensor) -> tuple[int | None, bool]:
        """``(samples, x_sampled)`` of this call under the sample protocol, after checking ``x``'s rank."""
        samples, x_sampled = self._sample_args(x)
        expected = 5 if x_sampled else 4
        if x.dim() != expected:
            raise ValueError(f"{type(self).__name__}: expected a {expected}-D input, got shape {tuple(x.shape)}")
        return samples, x_sampled

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class GaussianConv2d(_StochasticConv2d):
    """Mean-field Gaussian 2-D convolution ``W = mu + softplus(rho) * eps``, prior ``N(0, prior_std^2)``.

    ``estimator``: ``"sample"`` (one kernel draw per call / MC sample, shared by the batch),
    ``"flipout"`` (per-example channel signs on a shared draw) or ``"local"`` (local
    reparameterisation) — see ``udn_kernels.gaussian_conv2d``. Input ``[N, C, H, W]``; inside
    :func:`sampling` the output (and every later stochastic input) carries a leading ``S`` axis.
    ``kl()`` is the fused ``gaussian_kl`` on ``rho``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, prior_std: float = 1.0, init_sigma: float = 1e-2,
                 estimator: str = "sample"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.prior_std = float(prior_std)
        self.estimator = check_choice("estimator", estimator, ("sample", "local", "flipout"))
        self.weight_mu = nn.Parameter(torch.empty(self._weight_shape()))
        self.weight_rho = nn.Parameter(torch.full(self._weight_shape(), _softplus_inverse(init_sigma)))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out_channels))
            self.bias_rho = nn.Parameter(torch.full((out_channels,), _softplus_inverse(init_sigma)))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        _init_like_linear(self.weight_mu, self.bias_mu, self.weight_mu[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic_mode:
            return self._conv(x, self.weight_mu, self.bias_mu)
        samples, x_sampled = self._unpack(x)
        return udn_kernels.gaussian_conv2d(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho,
                                           stride=self.stride, padding=self.padding, dilation=self.dilation,
                                           estimator=self.estimator, samples=samples, input_has_samples=x_sampled,
                                           sigma_transform="softplus")

    def kl(self) -> torch.Tensor:
        return _gaussian_kl(self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, self.prior_std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, estimator={self.estimator!r}"


class BernoulliConv2d(_StochasticConv2d):
    """2-D convolution with Bernoulli noise: masks ``"input"`` (dropout of input elements per example),
    ``"weight"`` (DropConnect per kernel weight per sample) or ``"symmetric"`` (``w = phi * sign``).

    Masks come from ``udn_kernels.rng`` (docs/stochastic_conv.md) and the convolution is eager
    ``F.conv2d``. Deterministic mode and ``kl()`` as :class:`BernoulliLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, p: float = 0.5, mask: str = "input",
                 prior_std: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.p = check_probability("p", p)
        self.mask = check_choice("mask", mask, ("input", "weight", "symmetric"))
        self.prior_std = float(prior_std)
        self.weight = nn.Parameter(torch.empty(self._weight_shape()))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_like_linear(self.weight, self.bias, self.weight[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic_mode:
            weight = torch.zeros_like(self.weight) if self.mask == "symmetric" else self.weight
            return self._conv(x, weight, self.bias)
        samples, x_sampled = self._unpack(x)
        S, seed = samples or 1, int(resolve_seed(None))
        if self.mask == "input":
            shape = x.shape[1:] if x_sampled else x.shape
            keep = rng.uniform(S * shape.numel(), seed, device=x.device) >= self.p
            x = x * (keep.to(x.dtype) / (1.0 - self.p)).view(S, *shape)
            out = self._conv(x.flatten(0, 1), self.weight, self.bias)
            out = out.view(S, -1, *out.shape[1:])
        else:
            n_weights = S * self.weight.numel()
            if self.mask == "weight":
                noise = (rng.uniform(n_weights, seed, device=x.device) >= self.p).to(x.dtype) / (1.0 - self.p)
            else:
                noise = _signs(n_weights, seed, x.device).to(x.dtype)
            weight = self.weight * noise.view(S, *self._weight_shape())
            bias = None if self.bias is None else self.bias.expand(S, -1)
            out = conv_per_sample(x, weight, bias, x_sampled, self.stride, self.padding, self.dilation)
        return out if samples is not None else out[0]

    def kl(self) -> torch.Tensor:
        return _bernoulli_kl(self.weight, self.bias, self.p, self.mask, self.prior_std)
