"""``gaussian_linear``: a linear layer with mean-field Gaussian weights, sampled inside the kernel."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import (autocast_off, check_choice, check_float_tensor, check_same_device, check_shape, checks_values,
                       compute_dtype, resolve_seed)
from ._dispatch import op_caller, stage
from ._stochastic import flatten_input, input_grads, reject_float64_on_gpu, std_shape

ESTIMATORS = ("sample", "local", "flipout")
SIGMA_TRANSFORMS = (None, "softplus")
Tensor = torch.Tensor


KERNEL_NAMES = ("gaussian_linear_fwd", "gaussian_linear_bwd")


def check_float_inputs(**tensors) -> None:
    """Every given tensor (None allowed) is floating, of a dtype its device takes."""
    for name, value in tensors.items():
        if value is not None:
            check_float_tensor(name, value)


def cast_inputs(device, *tensors, **named) -> list:
    """``tensors`` (None allowed) in the compute dtype of the ``named`` inputs (the mixed-precision rule,
    ``_checks.compute_dtype``: the errors name those inputs), contiguous. Casting here, before the
    kernels, is the autocast policy of the stochastic ops, eager and compiled alike; autograd returns
    each gradient in its input's own dtype."""
    dtype = compute_dtype(device, **named)
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _fwd_impl(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, estimator, samples, x_sampled,
              sigma_softplus, backend):
    # The seed travels as a tensor so a seed drawn inside a compiled graph stays on the graph. The
    # inputs arrive in the call's compute dtype: autocast must not re-cast the kernels' own GEMMs.
    with autocast_off(x.device):
        return tuple(_backend.kernel(backend, "gaussian_linear_fwd")(
            x, weight_mu, weight_sigma, bias_mu, bias_sigma, int(seed.item()), estimator, samples, x_sampled,
            sigma_softplus))


@torch.library.custom_op("udn_kernels::gaussian_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight_mu: Optional[Tensor], weight_sigma: Tensor, bias_mu: Optional[Tensor],
         bias_sigma: Optional[Tensor], seed: Tensor, estimator: str, samples: int,
         x_sampled: bool, sigma_softplus: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _fwd_impl(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, estimator, samples, x_sampled,
                     sigma_softplus, backend)


@_fwd.register_fake
def _(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, estimator, samples, x_sampled, sigma_softplus,
      backend):
    return x.new_empty(samples, x.shape[1], weight_sigma.shape[0]), x.new_empty(std_shape(x, weight_sigma, estimator))


def _bwd_impl(grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, seed, estimator, samples,
              x_sampled, sigma_softplus, grad_mask, backend):
    with autocast_off(x.device):
        return tuple(_backend.kernel(backend, "gaussian_linear_bwd")(
            grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, int(seed.item()), estimator,
            samples, x_sampled, sigma_softplus, grad_mask))


@torch.library.custom_op("udn_kernels::gaussian_linear_bwd", mutates_args=())
def _bwd(grad_out: Tensor, x: Tensor, weight_mu: Optional[Tensor], weight_sigma: Tensor,
         bias_mu: Optional[Tensor], bias_sigma: Optional[Tensor], std: Tensor, seed: Tensor, estimator: str,
         samples: int, x_sampled: bool, sigma_softplus: bool, grad_mask: list[bool],
         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _bwd_impl(grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, seed, estimator, samples,
                     x_sampled, sigma_softplus, grad_mask, backend)


@_bwd.register_fake
def _(grad_out, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, seed, estimator, samples, x_sampled,
      sigma_softplus, grad_mask, backend):
    return tuple(torch.empty_like(t) if t is not None and want else x.new_empty(0)
                 for t, want in zip((x, weight_mu, weight_sigma, bias_mu, bias_sigma), grad_mask))


def _setup_context(ctx, inputs, output):
    x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, *options = inputs
    # The inputs and local's output-sized std: backward regenerates the noise from (seed, offset).
    std = output[1]
    ctx.mark_non_differentiable(std)
    ctx.save_for_backward(x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, seed)
    ctx.options = tuple(options)  # estimator, samples, x_sampled, sigma_softplus, backend


def _backward(ctx, grad_out, grad_std):
    saved = ctx.saved_tensors
    *options, backend = ctx.options
    # The kernels compute only the gradients autograd asks for (x, weight_mu, weight_sigma, bias_mu, bias_sigma).
    needed = list(ctx.needs_input_grad[:5])
    grads = stage(ctx, _bwd, _bwd_impl)(grad_out.contiguous(), *saved, *options, needed, backend)
    return (*input_grads(grads, saved[:5], needed), None, None, None, None, None, None)


_call = op_caller(_fwd, _fwd_impl, _setup_context, _backward)


def gaussian_linear(x: Tensor, weight_mu: Optional[Tensor], weight_sigma: Tensor,
                    bias_mu: Optional[Tensor] = None, bias_sigma: Optional[Tensor] = None, *,
                    estimator: str = "sample", samples: Optional[int] = None, seed=None,
                    input_has_samples: bool = False, sigma_transform: Optional[str] = None) -> Tensor:
    """Linear layer with Gaussian weights ``W = weight_mu + weight_sigma * eps``, ``eps ~ N(0, 1)``.

    Args:
        x: ``[..., K]`` input (``B`` = product of the leading dims), or ``[S, ..., K]`` with
            ``input_has_samples=True`` (each weight draw gets its own input, e.g. the output of a
            previous stochastic layer).
        weight_mu: ``[N_out, K]`` posterior means, or ``None`` for a zero-mean (variance) layer.
        weight_sigma: ``[N_out, K]`` posterior standard deviations, ``>= 0`` (0 is a point mass).
            Eager calls reject negative entries (one reduction over sigma); compiled graphs skip
            the check, since it would need a graph break.
        bias_mu, bias_sigma: optional ``[N_out]`` bias mean and standard deviation; with
            ``bias_sigma`` the bias is sampled too (``bias_mu=None`` means a zero-mean bias).
        estimator: ``"sample"`` (one weight draw shared by the batch), ``"local"`` (local
            reparameterisation: independent Gaussian pre-activations per example) or
            ``"flipout"`` (per-example sign flips of a shared draw). All three have the same
            per-output marginal mean and variance.
        samples: ``S`` independent draws in one call; the output gains a leading ``S`` axis.
        seed: int in ``[0, 2^63)``, a one-element int64 tensor, or ``None`` to draw one from
            torch's default generator (``torch.manual_seed`` reproduces runs). The same seed gives
            the same noise on every backend (docs/rng.md).
        input_has_samples: ``x`` already carries the sample axis (needs ``samples``).
        sigma_transform: ``None`` (``weight_sigma`` / ``bias_sigma`` are the standard deviations)
            or ``"softplus"``: they hold unconstrained ``rho`` and the standard deviations are
            ``softplus(rho) = log(1 + exp(rho))`` (``F.softplus``, beta 1), computed inside the
            kernel's noise pass, with gradients returned for ``rho`` — the usual Bayes-by-backprop
            parameterisation, without a separate softplus pass and its weight-sized output.

    Dtypes (docs/precision.md): float32, float64, bfloat16, float16; mixed inputs compute in
    ``_checks.compute_dtype``'s dtype (a 16-bit one beside float32 ones; the autocast dtype inside
    ``torch.autocast``, as ``F.linear``); the output has that dtype, each gradient its input's.

    Returns:
        ``[..., N_out]``, or ``[S, ..., N_out]`` when ``samples`` is given.
    """
    check_float_tensor("weight_sigma", weight_sigma, ndim=2)
    out_features, in_features = weight_sigma.shape
    tensors = dict(x=x, weight_mu=weight_mu, weight_sigma=weight_sigma, bias_mu=bias_mu, bias_sigma=bias_sigma)
    check_float_inputs(**tensors)
    check_same_device("x", x, **tensors)
    if weight_mu is not None:
        check_shape("weight_mu", weight_mu, (out_features, in_features))
    for name, value in (("bias_mu", bias_mu), ("bias_sigma", bias_sigma)):
        if value is not None:
            check_shape(name, value, (out_features,))
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("sigma_transform", sigma_transform, SIGMA_TRANSFORMS)
    sigma_softplus = sigma_transform == "softplus"
    if not sigma_softplus and checks_values(weight_sigma):
        for name, value in (("weight_sigma", weight_sigma), ("bias_sigma", bias_sigma)):
            # One reduction, no mask tensor and no autograd node: this check runs on every call.
            smallest = value.detach().min().item() if value is not None and value.numel() else 0.0
            if smallest < 0:
                raise ValueError(f"{name}: expected standard deviations >= 0, got a minimum of "
                                 f"{smallest:g}")
    x3, S, lead = flatten_input(x, in_features, samples, input_has_samples)
    x3, *contiguous = cast_inputs(x.device, x3, weight_mu, weight_sigma, bias_mu, bias_sigma, **tensors)
    backend = _backend.choose(x.device, *KERNEL_NAMES)
    reject_float64_on_gpu("gaussian_linear", x3, backend)
    out, _ = _call(x3, *contiguous, resolve_seed(seed), estimator, S, input_has_samples, sigma_softplus, backend)
    return out.reshape(*lead, out_features)
