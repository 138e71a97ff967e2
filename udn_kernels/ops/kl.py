"""Public KL divergences of stochastic-weight layers, as fused ops (docs/stochastic_linear.md, "KL").

Each KL is two ``udn_kernels::`` stages: the forward kernel reads the parameters once and returns
the sum, the backward kernel writes the scaled gradients in one pass; neither makes a weight-sized
intermediate (with ``sigma_transform="softplus"`` not even sigma). The eager formulas of
reference/kl.py are the oracle.

Dtypes: mixed inputs follow ``_checks.compute_dtype`` without autocast (a reduction stays out of
autocast's low-precision ops, as ``torch.sum`` does); 16-bit parameters are computed in float32,
the KL is returned in float32 (``accumulate_dtype``) and each gradient in its input's dtype.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import _backend
from .._checks import (accumulate_dtype, autocast_off, check_choice, check_float_tensor, check_same_device,
                       check_shape, checks_values, compute_dtype)
from ._dispatch import op_caller, stage
from ._stochastic import input_grads

Tensor = torch.Tensor
SIGMA_TRANSFORMS = (None, "softplus")
GAUSSIAN_KERNELS = ("gaussian_kl_fwd", "gaussian_kl_bwd")
LOG_UNIFORM_KERNELS = ("log_uniform_kl_fwd", "log_uniform_kl_bwd")


# ------------------------------------------------------------------ gaussian_kl

def _gauss_fwd_impl(mu, sigma, prior_std, sigma_softplus, backend):
    with autocast_off(sigma.device):
        kl = _backend.kernel(backend, "gaussian_kl_fwd")(mu, sigma, prior_std, sigma_softplus)
    # float32 for 16-bit parameters (the cpu and reference kernels sum in float32 and return it; the
    # Triton kernel returns the parameters' dtype).
    return kl.to(accumulate_dtype(sigma.dtype))


@torch.library.custom_op("udn_kernels::gaussian_kl_fwd", mutates_args=())
def _gauss_fwd(mu: Optional[Tensor], sigma: Tensor, prior_std: Tensor, sigma_softplus: bool, backend: str) -> Tensor:
    return _gauss_fwd_impl(mu, sigma, prior_std, sigma_softplus, backend)


@_gauss_fwd.register_fake
def _(mu, sigma, prior_std, sigma_softplus, backend):
    return sigma.new_empty((), dtype=accumulate_dtype(sigma.dtype))


def _gauss_bwd_impl(grad, mu, sigma, prior_std, sigma_softplus, grad_mask, backend):
    with autocast_off(sigma.device):
        return tuple(_backend.kernel(backend, "gaussian_kl_bwd")(grad, mu, sigma, prior_std, sigma_softplus,
                                                                grad_mask))


@torch.library.custom_op("udn_kernels::gaussian_kl_bwd", mutates_args=())
def _gauss_bwd(grad: Tensor, mu: Optional[Tensor], sigma: Tensor, prior_std: Tensor, sigma_softplus: bool,
               grad_mask: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _gauss_bwd_impl(grad, mu, sigma, prior_std, sigma_softplus, grad_mask, backend)


@_gauss_bwd.register_fake
def _(grad, mu, sigma, prior_std, sigma_softplus, grad_mask, backend):
    want_mu, want_sigma, want_prior = grad_mask
    return (torch.empty_like(sigma) if want_mu and mu is not None else sigma.new_empty(0),
            torch.empty_like(sigma) if want_sigma else sigma.new_empty(0),
            torch.empty_like(prior_std) if want_prior else sigma.new_empty(0))


def _gauss_setup_context(ctx, inputs, output):
    mu, sigma, prior_std, *options = inputs
    ctx.save_for_backward(mu, sigma, prior_std)
    ctx.options = tuple(options)  # sigma_softplus, backend


def _gauss_backward(ctx, grad):
    mu, sigma, prior_std = ctx.saved_tensors
    sigma_softplus, backend = ctx.options
    grad_mask = list(ctx.needs_input_grad[:3])
    grads = stage(ctx, _gauss_bwd, _gauss_bwd_impl)(grad, mu, sigma, prior_std, sigma_softplus, grad_mask,
                                                     backend)
    return (*input_grads(grads, (mu, sigma, prior_std), grad_mask), None, None)


_gauss_call = op_caller(_gauss_fwd, _gauss_fwd_impl, _gauss_setup_context, _gauss_backward)


def _prior_tensor(prior_std, sigma: Tensor) -> Tensor:
    """``prior_std`` as the kernels take it: one element, or a tensor of sigma's shape (a
    broadcastable prior is expanded; autograd sums its gradient back)."""
    if isinstance(prior_std, torch.Tensor):
        if prior_std.numel() == 1 or prior_std.shape == sigma.shape:
            return prior_std.contiguous()
        return prior_std.expand(sigma.shape).contiguous()
    return torch.full((), float(prior_std), dtype=sigma.dtype, device=sigma.device)


def gaussian_kl(mu: Optional[Tensor], sigma: Tensor, prior_std, *,
                sigma_transform: Optional[str] = None) -> Tensor:
    """Summed ``KL(N(mu, sigma^2) || N(0, prior_std^2))`` over all elements (0-d tensor).

    ``mu=None`` is a zero-mean posterior (variance layer). ``prior_std`` is a positive float or
    a tensor broadcastable to ``sigma`` (its values are checked in eager CPU calls, elsewhere only
    with ``UDN_KERNELS_CHECK_VALUES=1``). ``sigma`` must be positive (not checked: a device sync
    on a weight-sized tensor).
    ``sigma_transform="softplus"``: ``sigma`` holds unconstrained ``rho`` and the standard deviations
    are ``softplus(rho)``, computed inside the kernels (gradients are for ``rho``) — what the
    layers' ``kl()`` use, so no sigma tensor is made.
    """
    check_float_tensor("sigma", sigma)
    check_choice("sigma_transform", sigma_transform, SIGMA_TRANSFORMS)
    prior_tensor = prior_std if isinstance(prior_std, torch.Tensor) else None
    if mu is not None:
        check_float_tensor("mu", mu)
        check_same_device("sigma", sigma, mu=mu)
        check_shape("mu", mu, sigma.shape)
    if prior_tensor is not None:
        check_float_tensor("prior_std", prior_std)
        check_same_device("sigma", sigma, prior_std=prior_std)
        try:
            broadcast = torch.broadcast_shapes(prior_std.shape, sigma.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != sigma.shape:
            raise ValueError(f"prior_std: expected a shape broadcastable to {tuple(sigma.shape)}, "
                             f"got {tuple(prior_std.shape)}")
        if checks_values(prior_std) and not bool((prior_std > 0).all()):
            raise ValueError(f"prior_std: expected positive values, got min {prior_std.min().item()}")
    elif isinstance(prior_std, bool) or not isinstance(prior_std, numbers.Real):
        raise TypeError(f"prior_std: expected a positive float or a tensor, got {type(prior_std).__name__}")
    elif not prior_std > 0:
        raise ValueError(f"prior_std: expected a positive float, got {prior_std}")
    with autocast_off(sigma.device):
        dtype = compute_dtype(sigma.device, sigma=sigma, mu=mu, prior_std=prior_tensor)
    mu, sigma = (None if t is None else t.to(dtype).contiguous() for t in (mu, sigma))
    if prior_tensor is not None:
        prior_std = prior_std.to(dtype)
    backend = _backend.choose(sigma.device, *GAUSSIAN_KERNELS)
    return _gauss_call(mu, sigma, _prior_tensor(prior_std, sigma), sigma_transform == "softplus", backend)


# ------------------------------------------------------------------ log_uniform_kl

def _lu_fwd_impl(log_alpha, min, max, backend):  # noqa: A002 (the schema's names)
    with autocast_off(log_alpha.device):
        kl = _backend.kernel(backend, "log_uniform_kl_fwd")(log_alpha, min, max)
    return kl.to(accumulate_dtype(log_alpha.dtype))


@torch.library.custom_op("udn_kernels::log_uniform_kl_fwd", mutates_args=())
def _lu_fwd(log_alpha: Tensor, min: float, max: float, backend: str) -> Tensor:  # noqa: A002
    return _lu_fwd_impl(log_alpha, min, max, backend)


@_lu_fwd.register_fake
def _(log_alpha, min, max, backend):  # noqa: A002
    return log_alpha.new_empty((), dtype=accumulate_dtype(log_alpha.dtype))


def _lu_bwd_impl(grad, log_alpha, min, max, backend):  # noqa: A002
    with autocast_off(log_alpha.device):
        return _backend.kernel(backend, "log_uniform_kl_bwd")(grad, log_alpha, min, max)


@torch.library.custom_op("udn_kernels::log_uniform_kl_bwd", mutates_args=())
def _lu_bwd(grad: Tensor, log_alpha: Tensor, min: float, max: float, backend: str) -> Tensor:  # noqa: A002
    return _lu_bwd_impl(grad, log_alpha, min, max, backend)


@_lu_bwd.register_fake
def _(grad, log_alpha, min, max, backend):  # noqa: A002
    return torch.empty_like(log_alpha)


def _lu_setup_context(ctx, inputs, output):
    log_alpha, *options = inputs
    ctx.save_for_backward(log_alpha)
    ctx.options = tuple(options)  # min, max, backend


def _lu_backward(ctx, grad):
    (log_alpha,) = ctx.saved_tensors
    return stage(ctx, _lu_bwd, _lu_bwd_impl)(grad, log_alpha, *ctx.options), None, None, None


_lu_call = op_caller(_lu_fwd, _lu_fwd_impl, _lu_setup_context, _lu_backward)


def log_uniform_kl(log_alpha: Tensor, *, clamp: Optional[tuple[float, float]] = None) -> Tensor:
    """Summed KL to the log-uniform prior of variational dropout (Molchanov et al. 2017, eq. 14).

    ``log_alpha`` holds per-weight ``log(sigma^2 / mu^2)``; the approximation is
    ``KL ~= k1 - k1 sigmoid(k2 + k3 log_alpha) + 0.5 log1p(1 / alpha)`` with
    ``k1, k2, k3 = 0.63576, 1.87320, 1.48695``, which tends to 0 as ``alpha -> inf``.
    ``clamp=(min, max)``: the KL of ``log_alpha.clamp(min, max)`` (gradients as torch.clamp's),
    clamped inside the kernels instead of in a weight-sized copy.
    """
    check_float_tensor("log_alpha", log_alpha)
    low, high = (-math.inf, math.inf) if clamp is None else (float(clamp[0]), float(clamp[1]))
    if not low <= high:
        raise ValueError(f"clamp: expected min <= max, got {clamp}")
    backend = _backend.choose(log_alpha.device, *LOG_UNIFORM_KERNELS)
    return _lu_call(log_alpha.contiguous(), low, high, backend)
