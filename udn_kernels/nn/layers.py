"""Stochastic-weight layers, the Monte-Carlo sample-axis protocol and mean-weight prediction.

Every stochastic layer draws fresh weights (or masks) on every call, in ``train()`` and ``eval()``
mode alike; :func:`deterministic` switches a model to mean-weight / weight-scaling prediction
(why one rule, and not PyTorch's dropout-only-in-train: docs/bayesianize.md).

Sample axis. Inside ``with sampling(S):`` the *first* stochastic layer called in a forward pass
draws ``S`` weight samples for its shared input and returns ``[S, ...]``; every other stochastic
layer treats the leading axis of its input as that sample axis and draws one weight sample per
slice. Deterministic modules (``nn.Linear``, activations, residual additions) broadcast over the
extra leading axis, so ``S`` Monte-Carlo samples flow through the whole model in one batched pass
(:func:`udn_kernels.nn.mc_predict`). The protocol assumes every stochastic layer after the first
sees a tensor derived from the first one's output (true for chains, residual nets and UDNs).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

import udn_kernels
from .._checks import check_choice, check_probability, check_samples
from .depth import _softplus_inverse

LOG_ALPHA_RANGE = (-10.0, 8.0)  # VariationalDropoutLinear's clamp of log_alpha


class _SamplingState(threading.local):
    def __init__(self):
        self.samples: int | None = None
        self.origin: nn.Module | None = None  # the layer that added the sample axis


_state = _SamplingState()


@contextlib.contextmanager
def sampling(samples: int) -> Iterator[None]:
    """Run one forward pass with ``samples`` Monte-Carlo weight draws flowing through the model."""
    samples = check_samples(samples)
    previous = (_state.samples, _state.origin)
    _state.samples, _state.origin = samples, None
    try:
        yield
    finally:
        _state.samples, _state.origin = previous


def active_samples() -> int | None:
    """The ``S`` of the enclosing :func:`sampling` block, or None."""
    return _state.samples


def _sample_axis_added() -> bool:
    return _state.origin is not None


class StochasticLayer(nn.Module):
    """Base class of the stochastic layers: ``kl()``, the sample-axis protocol, deterministic mode."""

    def __init__(self):
        super().__init__()
        self.deterministic_mode = False  # set by udn_kernels.nn.deterministic(model)

    def kl(self) -> torch.Tensor:
        """``KL(q(weights) || p(weights))`` summed over the layer's weights (nats)."""
        raise NotImplementedError

    def _sample_args(self, x: torch.Tensor) -> tuple[int | None, bool]:
        """``(samples, input_has_samples)`` for this call under the sample-axis protocol."""
        samples = _state.samples
        if samples is None:
            return None, False
        if _state.origin is None or _state.origin is self:
            _state.origin = self  # first stochastic layer of the pass: the input is shared
            return samples, False
        if x.dim() < 2 or x.shape[0] != samples:
            raise ValueError(f"{type(self).__name__}: inside sampling({samples}) expected an input "
                             f"with a leading sample axis of size {samples}, got shape {tuple(x.shape)}")
        return samples, True


def kl(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.kl()`` over every stochastic layer in ``model`` (0 if there is none)."""
    terms = [m.kl() for m in model.modules() if isinstance(m, StochasticLayer)]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), dtype=param.dtype if param is not None else None,
                           device=param.device if param is not None else None)
    return torch.stack(terms).sum()


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Predict with mean weights (Gaussian layers) / weight scaling (Bernoulli layers) inside the block."""
    layers = [m for m in model.modules() if isinstance(m, StochasticLayer)]
    previous = [m.deterministic_mode for m in layers]
    for m in layers:
        m.deterministic_mode = True
    try:
        yield model
    finally:
        for m, value in zip(layers, previous):
            m.deterministic_mode = value


def _gaussian_kl(weight_mu, weight_rho, bias_mu, bias_rho, prior_std: float) -> torch.Tensor:
    """KL of a layer parameterised by ``rho`` (sigma = softplus(rho), taken inside the fused kernels)."""
    total = udn_kernels.gaussian_kl(weight_mu, weight_rho, prior_std, sigma_transform="softplus")
    if bias_rho is not None:
        total = total + udn_kernels.gaussian_kl(bias_mu, bias_rho, prior_std, sigma_transform="softplus")
    return total


def _bernoulli_kl(weight, bias, p: float, mask: str, prior_std: float) -> torch.Tensor:
    """Gal & Ghahramani's weight-decay form: ``((1-p)||W||^2 + ||b||^2) / (2 s^2)`` (1-p -> 1 if symmetric)."""
    keep = 1.0 if mask == "symmetric" else 1.0 - p
    total = keep * weight.pow(2).sum()
    if bias is not None:
        total = total + bias.pow(2).sum()
    return total / (2.0 * prior_std ** 2)


def _init_like_linear(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class GaussianLinear(StochasticLayer):
    """Mean-field Gaussian linear layer ``W = mu + sigma * eps``, ``sigma = softplus(rho)``.

    ``estimator``: ``"sample"`` (one weight draw per call / MC sample, shared by the batch),
    ``"local"`` (local reparameterisation) or ``"flipout"`` — see ``udn_kernels.gaussian_linear``.
    ``zero_mean=True`` gives the variance layer of Neklyudov et al. (``mu ≡ 0``; its mean-weight
    prediction is the bias alone). Prior ``N(0, prior_std^2)`` on every weight and bias.
    ``init_sigma`` defaults to 1e-2; the variance layer draws its sigmas uniformly from
    ``(0, sqrt(3) init_sigma]`` (RMS ``init_sigma``, default ``1/sqrt(in_features)``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_std: float = 1.0,
                 estimator: str = "sample", zero_mean: bool = False, init_sigma: float | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.prior_std = float(prior_std)
        self.estimator = check_choice("estimator", estimator, ("sample", "local", "flipout"))
        self.zero_mean = zero_mean
        if init_sigma is None:
            init_sigma = 1.0 / math.sqrt(in_features) if zero_mean else 1e-2
        self.weight_mu = None if zero_mean else nn.Parameter(torch.empty(out_features, in_features))
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), _softplus_inverse(init_sigma)))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out_features))
            self.bias_rho = nn.Parameter(torch.full((out_features,), _softplus_inverse(1e-2)))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        if self.weight_mu is not None:
            _init_like_linear(self.weight_mu, self.bias_mu, in_features)
        else:
            # Random sigmas with RMS init_sigma: from a constant init every unit of a variance layer
            # has the same output distribution, only sampling noise breaks the symmetry, and
            # training stalls near chance (docs/experiments.md, variance-network).
            with torch.no_grad():
                sigma = init_sigma * math.sqrt(3.0) * torch.rand(out_features, in_features).clamp_min(1e-3)
                self.weight_rho.copy_(sigma.expm1().log())
            if self.bias_mu is not None:
                nn.init.zeros_(self.bias_mu)

    @property
    def weight_sigma(self) -> torch.Tensor:
        return F.softplus(self.weight_rho)

    @property
    def bias_sigma(self) -> torch.Tensor | None:
        return None if self.bias_rho is None else F.softplus(self.bias_rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic_mode:
            mean = self.weight_mu if self.weight_mu is not None else torch.zeros_like(self.weight_rho)
            return F.linear(x, mean, self.bias_mu)
        samples, has_samples = self._sample_args(x)
        # rho goes to the kernel, which computes softplus in its noise pass (no sigma tensor)
        return udn_kernels.gaussian_linear(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho,
                                           estimator=self.estimator, samples=samples,
                                           input_has_samples=has_samples, sigma_transform="softplus")

    def kl(self) -> torch.Tensor:
        return _gaussian_kl(self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho, self.prior_std)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_mu is not None}, estimator={self.estimator!r}, zero_mean={self.zero_mean}")


class BernoulliLinear(StochasticLayer):
    """Linear layer with Bernoulli noise: MC dropout (``mask="input"``), DropConnect (``"weight"``)
    or the symmetric variance-network layer ``w = phi * (2 eps - 1)`` (``"symmetric"``).

    Deterministic mode uses the weight-scaling rule (inverted dropout already rescales kept units,
    so the mean weight is ``weight``; for ``"symmetric"`` the mean weight is 0).
    ``kl()`` is Gal & Ghahramani's (2016) weight-decay form of the KL up to constants:
    ``(1 - p) ||W||^2 / (2 prior_std^2) + ||b||^2 / (2 prior_std^2)`` (``1 - p`` -> 1 for "symmetric").
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5,
                 mask: str = "input", prior_std: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.p = check_probability("p", p)
        self.mask = check_choice("mask", mask, ("input", "weight", "symmetric"))
        self.prior_std = float(prior_std)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_like_linear(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic_mode:
            weight = torch.zeros_like(self.weight) if self.mask == "symmetric" else self.weight
            return F.linear(x, weight, self.bias)
        samples, has_samples = self._sample_args(x)
        return udn_kernels.bernoulli_linear(x, self.weight, self.bias, p=self.p, mask=self.mask,
                                            samples=samples, input_has_samples=has_samples)

    def kl(self) -> torch.Tensor:
        return _bernoulli_kl(self.weight, self.bias, self.p, self.mask, self.prior_std)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, p={self.p}, mask={self.mask!r}")


class VariationalDropoutLinear(StochasticLayer):
    """Sparse variational dropout (Molchanov et al. 2017): ``w ~ N(theta, alpha theta^2)`` per weight.

    Forward uses the local reparameterisation (``udn_kernels.gaussian_linear(estimator="local")``);
    ``log_alpha`` is clamped to ``[-10, 8]``; ``kl()`` is the log-uniform-prior approximation
    ``udn_kernels.log_uniform_kl``. The bias is a point estimate. Deterministic mode predicts with
    ``theta`` and drops weights whose ``log_alpha > threshold`` (the sparsification rule).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_log_alpha: float = -4.0, threshold: float = 3.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold = float(threshold)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.log_alpha = nn.Parameter(torch.full((out_features, in_features), float(init_log_alpha)))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        _init_like_linear(self.weight, self.bias, in_features)

    def clamped_log_alpha(self) -> torch.Tensor:
        return self.log_alpha.clamp(*LOG_ALPHA_RANGE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deterministic_mode:
            return F.linear(x, self.weight * (self.log_alpha <= self.threshold), self.bias)
        samples, has_samples = self._sample_args(x)
        sigma = torch.exp(0.5 * self.clamped_log_alpha()) * self.weight.abs()
        return udn_kernels.gaussian_linear(x, self.weight, sigma, self.bias, None, estimator="local",
                                           samples=samples, input_has_samples=has_samples)

    def kl(self) -> torch.Tensor:
        return udn_kernels.log_uniform_kl(self.log_alpha, clamp=LOG_ALPHA_RANGE)

    def sparsity(self) -> float:
        """Fraction of weights dropped by the ``log_alpha > threshold`` rule."""
        return float((self.log_alpha > self.threshold).float().mean())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")
