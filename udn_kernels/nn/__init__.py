"""Thin model API: stochastic-weight layers, depth distributions, the UDN, distributed training.

Stochastic layers sample in train and eval mode; use :func:`deterministic` for mean-weight
prediction and :func:`mc_predict` (or ``UDN.predict(samples=S)``) for batched Monte-Carlo
prediction. :func:`bayesianize`, :func:`to_mc_dropout` and :func:`from_bayesian_torch`
convert existing models (docs/bayesianize.md). The training loss of a UDN is ``-ELBO / n`` (docs/design.md, "Mathematics").
"""
from .depth import PositivePoisson, TruncatedPoisson, poisson_quantile
from .conv import BernoulliConv2d, GaussianConv2d
from .layers import (BernoulliLinear, GaussianLinear, StochasticLayer, VariationalDropoutLinear, active_samples,
                     deterministic, kl, sampling)
from .convert import SampleFold, bayesianize, from_bayesian_torch, to_mc_dropout
from .udn import UDN, mc_predict

__all__ = [
    "BernoulliConv2d", "BernoulliLinear", "GaussianConv2d", "GaussianLinear", "PositivePoisson",
    "SampleFold", "StochasticLayer", "TruncatedPoisson", "UDN", "VariationalDropoutLinear", "active_samples",
    "bayesianize", "deterministic", "from_bayesian_torch", "kl", "mc_predict", "poisson_quantile", "sampling",
    "to_mc_dropout",
]
