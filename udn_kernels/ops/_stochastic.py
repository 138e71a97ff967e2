"""Shared plumbing of the stochastic-weight linear ops: input flattening, output shapes
and the local-reparameterisation backward shared by the reference and Triton kernels."""
from __future__ import annotations

import math

import torch

from .._checks import check_samples


def flatten_input(x: torch.Tensor, in_features: int, samples, input_has_samples) -> tuple:
    """Validate ``x`` against ``samples`` and view it as the kernels' ``[Sx, B, K]``.

    Returns ``(x3, S, lead)``: ``S`` draws (1 when ``samples`` is None) and the leading output
    shape (without the feature axis) the ``[S, B, N]`` kernel output is reshaped to.
    """
    samples = check_samples(samples)
    if not isinstance(input_has_samples, bool):
        raise TypeError(f"input_has_samples: expected a bool, got {type(input_has_samples).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x: expected shape [..., {in_features}] (in_features of the weight), "
                         f"got {tuple(x.shape)}")
    S = 1 if samples is None else samples
    if input_has_samples:
        if samples is None:
            raise ValueError("input_has_samples: True needs samples=S (x of shape [S, ..., K]), "
                             "got samples=None")
        if x.dim() < 2 or x.shape[0] != S:
            raise ValueError(f"x: expected shape [{S}, ..., {in_features}] (input_has_samples=True, "
                             f"samples={S}), got {tuple(x.shape)}")
        batch_shape = tuple(x.shape[1:-1])
    else:
        batch_shape = tuple(x.shape[:-1])
    x3 = x.reshape(S if input_has_samples else 1, math.prod(batch_shape), in_features).contiguous()
    lead = batch_shape if samples is None else (S,) + batch_shape
    return x3, S, lead


def none_if_empty(grad: torch.Tensor, source) -> torch.Tensor | None:
    """Kernels return an empty tensor for the gradient of a None input; autograd wants None."""
    return None if source is None else grad


def std_shape(x: torch.Tensor, weight_sigma: torch.Tensor, estimator: str) -> tuple:
    """Shape of gaussian_linear_fwd's second output: local's output std ``[Sx, B, N]``, else empty."""
    return (x.shape[0], x.shape[1], weight_sigma.shape[0]) if estimator == "local" else (0,)


def local_reparam_grads(grad, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, eps, x_sampled: bool):
    """Gradients ``(d_x, d_weight_mu, d_weight_sigma, d_bias_mu, d_bias_sigma)`` (empty for None) of
    local reparameterisation ``out = x mu^T + bias_mu + std * eps``, ``std^2 = x^2 (sigma^2)^T +
    bias_sigma^2``, from the forward's ``std [Sx, B, N]`` and the regenerated output noise
    ``eps [S, B, N]``: the variance GEMM is not recomputed. Computed in at least float32; zero
    gradient through the variance where ``std`` is 0 (or NaN)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    g, std, eps = grad.to(ct), std.to(ct), eps.to(ct)
    xs = x.to(ct).expand(g.shape[0], -1, -1)
    positive = std > 0
    # 2 dL/dvar = g eps / std: the 2 cancels those of d(x^2) and d(sigma^2).
    g_var = torch.where(positive, g * eps / torch.where(positive, std, 1), 0)
    sigma = weight_sigma.to(ct)
    d_x = xs * (g_var @ sigma.square())
    if weight_mu is not None:
        d_x = d_x + g @ weight_mu.to(ct)
    d_x = d_x if x_sampled else d_x.sum(0, keepdim=True)
    d_mu = x.new_empty(0) if weight_mu is None else (g.transpose(1, 2) @ xs).sum(0).to(weight_mu.dtype)
    d_sigma = (sigma * (g_var.transpose(1, 2) @ xs.square()).sum(0)).to(weight_sigma.dtype)
    d_bmu = x.new_empty(0) if bias_mu is None else g.sum((0, 1)).to(bias_mu.dtype)
    d_bsig = x.new_empty(0) if bias_sigma is None else \
        (bias_sigma.to(ct) * g_var.sum((0, 1))).to(bias_sigma.dtype)
    return d_x.to(x.dtype), d_mu, d_sigma, d_bmu, d_bsig
