"""Reference kernels of ``gaussian_linear`` and ``bernoulli_linear`` (docs/internals.md signatures).

Noise is materialised from the Philox stream at the offsets of docs/rng.md; backward kernels
regenerate it and differentiate the forward with autograd, except gaussian "local", whose backward
uses the forward's output std (the kernel contract: no variance recompute). ``x`` is ``[Sx, B, K]``
(``Sx`` is 1 when the input is shared by the ``samples`` draws), outputs are ``[S, B, N]``.
16-bit inputs are computed in float32 on widened copies (:func:`widened`): the oracle's only error
is the final rounding, and the noise is the float32 stream.
"""
from __future__ import annotations

import functools

import torch

from .._checks import HALF_DTYPES

from .._formulas import local_reparam_grads
from .philox import normal_at, sign_at, uniform_at


def widened(kernel=None, *, round_results: bool = True):
    """``kernel`` for 16-bit tensor arguments: run on float32 copies of them, its tensor results rounded
    back to that 16-bit dtype (``round_results``) or left float32 (sums such as the KL)."""
    if kernel is None:
        return functools.partial(widened, round_results=round_results)

    @functools.wraps(kernel)
    def run(*args):
        half = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in HALF_DTYPES), None)
        if half is None:
            return kernel(*args)
        result = kernel(*(a.float() if isinstance(a, torch.Tensor) and a.dtype == half else a for a in args))
        if not round_results:
            return result
        return tuple(r.to(half) for r in result) if isinstance(result, tuple) else result.to(half)
    return run


def _offsets(start: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """int64 offsets ``start + row-major index`` of a tensor of ``shape``."""
    count = 1
    for size in shape:
        count *= size
    return (torch.arange(count, dtype=torch.int64, device=device) + start).view(shape)


def _normal(start, shape, seed, like):
    return normal_at(_offsets(start, shape, like.device), seed).to(like.dtype)


def _sign(start, shape, seed, like):
    return sign_at(_offsets(start, shape, like.device), seed).to(like.dtype)


def _keep(start, shape, p, seed, like):
    keep = uniform_at(_offsets(start, shape, like.device), seed) >= p
    return keep.to(like.dtype) / (1.0 - p)


def gaussian_linear_fwd(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed: int, estimator: str,
                        samples: int, x_sampled: bool, sigma_softplus: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [S, B, N], std)``: outputs of S Gaussian weight draws (estimator "sample", "local" or
    "flipout") and, for "local", the output standard deviations ``std [Sx, B, N]`` the backward
    takes (empty otherwise). With ``sigma_softplus`` the sigma arguments hold ``rho`` and the
    standard deviations are ``softplus(rho)``."""
    if sigma_softplus:
        weight_sigma, bias_sigma = _softplus_or_none(weight_sigma), _softplus_or_none(bias_sigma)
    S, N, K = samples, weight_sigma.shape[0], weight_sigma.shape[1]
    B = x.shape[1]
    if estimator == "local":
        var = (x * x) @ (weight_sigma * weight_sigma).t()  # [Sx, B, N]
        if bias_sigma is not None:
            var = var + bias_sigma * bias_sigma
        # sqrt with a zero (not NaN) gradient where the variance is exactly 0; a NaN variance stays NaN
        zero = var == 0
        std = torch.where(zero, 0, torch.where(zero, 1, var).sqrt())
        return _mean(x, weight_mu, bias_mu) + std * _normal(0, (S, B, N), seed, x), std
    return _gaussian_weight_draws(x.expand(S, B, K), weight_mu, weight_sigma, bias_mu, bias_sigma, seed,
                                  estimator, S), x.new_empty(0)


def _softplus_or_none(rho):
    return None if rho is None else torch.nn.functional.softplus(rho)


def _mean(x, weight_mu, bias_mu):
    mean = 0 if weight_mu is None else x @ weight_mu.t()
    return mean if bias_mu is None else mean + bias_mu


def _gaussian_weight_draws(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, estimator, S):
    """``[S, B, N]`` outputs of the weight-noise estimators ("sample", "flipout"); ``x`` is ``[S, B, K]``."""
    N, K = weight_sigma.shape
    B = x.shape[1]
    mean = _mean(x, weight_mu, bias_mu)
    eps = _normal(0, (S, N, K), seed, x)
    if estimator == "sample":
        out = mean + x @ (weight_sigma * eps).transpose(1, 2)
    else:  # flipout
        base = S * N * K + S * N
        sign_in = _sign(base, (S, B, K), seed, x)
        sign_out = _sign(base + S * B * K, (S, B, N), seed, x)
        out = mean + ((x * sign_in) @ (weight_sigma * eps).transpose(1, 2)) * sign_out
    if bias_sigma is not None:
        out = out + (bias_sigma * _normal(S * N * K, (S, N), seed, x)).unsqueeze(1)
    return out


def _autograd_recompute(forward, tensors, grad_mask, grad_out):
    """Gradients of ``forward(*tensors)`` w.r.t. the ``tensors`` that ``grad_mask`` asks for (empty
    tensors for the others and for None): only those take part in autograd's recompute."""
    inputs = [None if t is None else t.detach().requires_grad_(bool(want)) for t, want in zip(tensors, grad_mask)]
    present = [t for t in inputs if t is not None and t.requires_grad]
    if not present:
        return tuple(tensors[0].new_empty(0) for _ in tensors)
    # Custom-op implementations run below the Autograd dispatch key; re-enable it to recompute.
    with torch.enable_grad(), torch._C._SetExcludeDispatchKeyGuard(
            torch._C.DispatchKey.AutogradFunctionality, False):
        out = forward(*inputs)
        grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True))
    like = tensors[0]
    return tuple(like.new_empty(0) if t is None or not t.requires_grad else _zeros_if_none(next(grads), t)
                 for t in inputs)


def _zeros_if_none(grad, t):
    return torch.zeros_like(t) if grad is None else grad


def gaussian_linear_bwd(grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, seed: int,
                        estimator: str, samples: int, x_sampled: bool, sigma_softplus: bool, grad_mask):
    """Gradients ``(d_x, d_weight_mu, d_weight_sigma, d_bias_mu, d_bias_sigma)``, empty for None and
    where ``grad_mask`` (a bool per input, same order) is False; ``std`` is the forward's second
    output (used by "local" only). With ``sigma_softplus`` the sigma arguments hold ``rho`` and
    their gradients are with respect to ``rho``."""
    if sigma_softplus:  # d rho = d sigma * softplus'(rho) = d sigma * sigmoid(rho)
        grads = gaussian_linear_bwd(grad_out, x, weight_mu, _softplus_or_none(weight_sigma), bias_mu,
                                    _softplus_or_none(bias_sigma), std, seed, estimator, samples, x_sampled,
                                    False, grad_mask)
        return (grads[0], grads[1], grads[2] * torch.sigmoid(weight_sigma) if grads[2].numel() else grads[2],
                grads[3], grads[4] * torch.sigmoid(bias_sigma) if grads[4].numel() else grads[4])
    if estimator == "local":
        return local_reparam_grads(grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std,
                                   _normal(0, tuple(grad_out.shape), seed, x), x_sampled, grad_mask)

    def forward(x, weight_mu, weight_sigma, bias_mu, bias_sigma):
        return _gaussian_weight_draws(x.expand(samples, -1, -1), weight_mu, weight_sigma, bias_mu,
                                      bias_sigma, seed, estimator, samples)
    return _autograd_recompute(forward, (x, weight_mu, weight_sigma, bias_mu, bias_sigma), grad_mask, grad_out)


def _bernoulli_weights(weight, p, seed, mask, samples):
    S, N, K = samples, weight.shape[0], weight.shape[1]
    if mask == "weight":
        return weight * _keep(0, (S, N, K), p, seed, weight)
    return weight * _sign(0, (S, N, K), seed, weight)  # symmetric


def bernoulli_linear_fwd(x, weight, bias, p: float, seed: int, mask: str, samples: int,
                         x_sampled: bool) -> torch.Tensor:
    """``[S, B, N]`` outputs of S Bernoulli draws (mask "input", "weight" or "symmetric")."""
    S, K = samples, weight.shape[1]
    B = x.shape[1]
    x = x.expand(S, B, K)
    if mask == "input":
        out = (x * _keep(0, (S, B, K), p, seed, x)) @ weight.t()
    else:
        out = x @ _bernoulli_weights(weight, p, seed, mask, S).transpose(1, 2)
    return out if bias is None else out + bias


def bernoulli_linear_bwd(grad_out, x, weight, bias, p: float, seed: int, mask: str, samples: int,
                         x_sampled: bool, grad_mask):
    """Gradients ``(d_x, d_weight, d_bias)``, empty for a None bias and where ``grad_mask`` (a bool
    per input, same order) is False."""
    return _autograd_recompute(lambda x, weight, bias: bernoulli_linear_fwd(
        x, weight, bias, p, seed, mask, samples, x_sampled), (x, weight, bias), grad_mask, grad_out)


KERNELS = {
    "gaussian_linear_fwd": widened(gaussian_linear_fwd),
    "gaussian_linear_bwd": widened(gaussian_linear_bwd),
    "bernoulli_linear_fwd": widened(bernoulli_linear_fwd),
    "bernoulli_linear_bwd": widened(bernoulli_linear_bwd),
}
