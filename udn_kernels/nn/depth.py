"""Distributions over the depth of a UDN: the variational truncated Poisson and the prior."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _softplus_inverse(value: float) -> float:
    return value if value > 20.0 else math.log(math.expm1(value))


def poisson_quantile(rate: float, quantile: float) -> int:
    """Smallest ``k`` with ``P(Poisson(rate) <= k) >= quantile`` (log-space pmf, no scipy)."""
    # A NaN rate would never reach the quantile (e.g. once training diverged): fail loudly instead.
    if not 0.0 < rate < math.inf:
        raise ValueError(f"rate: expected a finite positive float, got {rate}")
    log_rate, cdf, k = math.log(rate), 0.0, 0
    while True:
        cdf += math.exp(k * log_rate - rate - math.lgamma(k + 1))
        if cdf >= quantile or k > rate + 50.0 * math.sqrt(rate) + 50:
            return k
        k += 1


class TruncatedPoisson(nn.Module):
    """Variational depth posterior ``q(l) ∝ nu^(l-1) / (l-1)!`` on ``l = 1..L`` (Nazaret & Blei 2022).

    ``nu = softplus(raw)`` is the learnable rate; the support ends at
    ``L = max(F^-1_{Poisson(nu)}(quantile), floor(nu) + 1) + 1``. ``L`` is piecewise constant in
    ``nu``, so the probabilities below are smooth functions of ``nu`` on a fixed support and their
    autograd gradient is the exact derivative of any finite sum over the support.
    """

    def __init__(self, init_rate: float = 1.0, quantile: float = 0.95):
        super().__init__()
        if not 0 < init_rate < math.inf:
            raise ValueError(f"init_rate: expected a finite positive float, got {init_rate}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile: expected a float in (0, 1), got {quantile}")
        self.quantile = float(quantile)
        self.raw_rate = nn.Parameter(torch.tensor(_softplus_inverse(float(init_rate))))
        self._depth_key: tuple | None = None  # (raw rate, quantile) ``_max_depth`` was computed from
        self._support_cache = None
        self._refresh_max_depth()
        self.register_load_state_dict_post_hook(TruncatedPoisson._after_load)

    @property
    def rate(self) -> torch.Tensor:
        """``nu = softplus(raw_rate)`` (differentiable 0-d tensor)."""
        return F.softplus(self.raw_rate)

    @property
    def max_depth(self) -> int:
        """``L``: the largest depth with non-zero mass under the current rate.

        An eager read computes ``L`` from the rate and remembers it. Inside ``torch.compile`` the rate
        cannot become a Python number without a graph break, so the remembered ``L`` is returned: the
        compiled graph is specialised on it and guarded, and a new ``L`` recompiles. After changing the
        rate outside an optimizer attached with ``UDN.attach_optimizer`` (which refreshes it after every
        step), read ``max_depth`` eagerly once before calling compiled code.
        """
        return self._max_depth if torch.compiler.is_compiling() else self._refresh_max_depth()

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        # a loaded rate changes L: remember the new one for compiled code
        module._refresh_max_depth()

    def _refresh_max_depth(self) -> int:
        # Read every call (an in-place edit of ``raw_rate.data`` leaves no trace to cache on), but
        # cheaply: one scalar read, softplus in Python, the quantile search only when it changed.
        key = (self.raw_rate.item(), self.quantile)
        if key != self._depth_key:  # a NaN rate never equals: poisson_quantile rejects it
            raw = key[0]
            rate = raw if raw > 20.0 else math.log1p(math.exp(raw))  # F.softplus, threshold 20
            self._max_depth = max(poisson_quantile(rate, self.quantile), math.floor(rate) + 1) + 1
            self._depth_key = key
        return self._max_depth

    def _support(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, lgamma(k + 1))`` for ``k = 0..depth-1``: constants of the support, cached eagerly."""
        like = self.raw_rate
        key = (depth, like.dtype, like.device)
        if self._support_cache is not None and self._support_cache[0] == key:
            return self._support_cache[1]
        k = torch.arange(depth, dtype=like.dtype, device=like.device)
        support = (k, torch.lgamma(k + 1))
        if not torch.compiler.is_compiling():  # a compiled graph folds them itself
            self._support_cache = (key, support)
        return support

    def log_probs(self, max_depth: int | None = None) -> torch.Tensor:
        """``[log q(1), ..., log q(L)]`` (``L = max_depth`` or the current truncation)."""
        depth = self.max_depth if max_depth is None else int(max_depth)
        if depth < 1:
            raise ValueError(f"max_depth: expected an int >= 1, got {max_depth}")
        k, log_factorial = self._support(depth)
        return torch.log_softmax(k * torch.log(self.rate) - log_factorial, dim=0)

    def expectation_plus_entropy(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_l q(l) values[l] + H[q]`` over the support ``l = 1..L`` with ``L = len(values)``.

        The ELBO's depth part in one autograd node (the UDN step is dispatch-bound). With
        ``a_k = k log nu - log k!`` and ``F`` the result, ``dF/dvalues = q`` and
        ``dF/da_k = q_k (values_k - log q_k - F)``, chained to ``raw_rate`` through
        ``da_k/draw = k sigmoid(raw) / nu``.
        """
        k, log_factorial = self._support(values.shape[0])
        return _ExpectationPlusEntropy.apply(self.raw_rate, values, k, log_factorial)

    def probs(self, max_depth: int | None = None) -> torch.Tensor:
        """``[q(1), ..., q(L)]``."""
        return self.log_probs(max_depth).exp()

    def mean(self) -> torch.Tensor:
        """``E_q[l]``."""
        log_q = self.log_probs()
        depths = torch.arange(1, log_q.numel() + 1, dtype=log_q.dtype, device=log_q.device)
        return (log_q.exp() * depths).sum()

    def entropy(self) -> torch.Tensor:
        """``H[q] = -sum_l q(l) log q(l)``."""
        log_q = self.log_probs()
        return -(log_q.exp() * log_q).sum()

    def extra_repr(self) -> str:
        return f"rate={float(self.rate.detach()):.4g}, quantile={self.quantile}, max_depth={self.max_depth}"


class _ExpectationPlusEntropy(torch.autograd.Function):
    """See :meth:`TruncatedPoisson.expectation_plus_entropy`."""

    @staticmethod
    def forward(ctx, raw_rate, values, k, log_factorial):
        rate = F.softplus(raw_rate)
        log_q = torch.log_softmax(k * rate.log() - log_factorial, dim=0)
        q = log_q.exp()
        out = q @ (values - log_q)
        ctx.save_for_backward(raw_rate, rate, values, k, log_q, q, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        raw_rate, rate, values, k, log_q, q, out = ctx.saved_tensors
        grad_a = q * (values - log_q - out)
        grad_raw = grad * (k @ grad_a) * torch.sigmoid(raw_rate) / rate
        return grad_raw, grad * q, None, None


class PositivePoisson:
    """Depth prior ``mu(l)``: ``l = 1 + k`` with ``k ~ Poisson(rate)``."""

    def __init__(self, rate: float = 0.5):
        if not rate > 0:
            raise ValueError(f"rate: expected a positive float, got {rate}")
        self.rate = float(rate)

    def log_prob(self, depth: torch.Tensor) -> torch.Tensor:
        """``log mu(l)`` for depths ``l >= 1`` (``-inf`` below 1)."""
        depth = torch.as_tensor(depth)
        if not depth.is_floating_point():
            depth = depth.to(torch.get_default_dtype())
        k = depth - 1
        value = k * math.log(self.rate) - self.rate - torch.lgamma(k + 1)
        return torch.where(k >= 0, value, torch.full_like(value, -math.inf))

    def mean(self) -> float:
        """``E[l] = 1 + rate``."""
        return 1.0 + self.rate

    def __repr__(self) -> str:
        return f"PositivePoisson(rate={self.rate})"
