"""``bernoulli_linear``: MC dropout, DropConnect and symmetric Bernoulli weights inside the kernel."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from .._checks import (autocast_off, check_choice, check_float_tensor, check_probability, check_same_device,
                       check_shape, resolve_seed)
from ._dispatch import op_caller, stage
from ._stochastic import flatten_input, input_grads, reject_float64_on_gpu
from .gaussian_linear import cast_inputs, check_float_inputs

MASKS = ("input", "weight", "symmetric")
Tensor = torch.Tensor


KERNEL_NAMES = ("bernoulli_linear_fwd", "bernoulli_linear_bwd")


def _fwd_impl(x, weight, bias, p, seed, mask, samples, x_sampled, backend):
    # The seed travels as a tensor so a seed drawn inside a compiled graph stays on the graph. The
    # inputs arrive in the call's compute dtype: autocast must not re-cast the kernels' own GEMMs.
    with autocast_off(x.device):
        return _backend.kernel(backend, "bernoulli_linear_fwd")(x, weight, bias, p, int(seed.item()), mask, samples,
                                                               x_sampled)


@torch.library.custom_op("udn_kernels::bernoulli_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: Tensor, mask: str,
         samples: int, x_sampled: bool, backend: str) -> Tensor:
    return _fwd_impl(x, weight, bias, p, seed, mask, samples, x_sampled, backend)


@_fwd.register_fake
def _(x, weight, bias, p, seed, mask, samples, x_sampled, backend):
    return x.new_empty(samples, x.shape[1], weight.shape[0])


def _bwd_impl(grad_out, x, weight, bias, p, seed, mask, samples, x_sampled, grad_mask, backend):
    with autocast_off(x.device):
        return tuple(_backend.kernel(backend, "bernoulli_linear_bwd")(grad_out, x, weight, bias, p,
                                                                     int(seed.item()), mask, samples, x_sampled,
                                                                     grad_mask))


@torch.library.custom_op("udn_kernels::bernoulli_linear_bwd", mutates_args=())
def _bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: Tensor,
         mask: str, samples: int, x_sampled: bool, grad_mask: list[bool],
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_impl(grad_out, x, weight, bias, p, seed, mask, samples, x_sampled, grad_mask, backend)


@_bwd.register_fake
def _(grad_out, x, weight, bias, p, seed, mask, samples, x_sampled, grad_mask, backend):
    return tuple(torch.empty_like(t) if t is not None and want else x.new_empty(0)
                 for t, want in zip((x, weight, bias), grad_mask))


def _setup_context(ctx, inputs, output):
    x, weight, bias, p, seed, *options = inputs
    # Only the inputs are saved: backward regenerates the masks from (seed, offset).
    ctx.save_for_backward(x, weight, bias, seed)
    ctx.p, ctx.options = p, tuple(options)  # mask, samples, x_sampled, backend


def _backward(ctx, grad_out):
    x, weight, bias, seed = ctx.saved_tensors
    *options, backend = ctx.options
    # The kernels compute only the gradients autograd asks for (x, weight, bias).
    needed = list(ctx.needs_input_grad[:3])
    grads = stage(ctx, _bwd, _bwd_impl)(grad_out.contiguous(), x, weight, bias, ctx.p, seed, *options, needed,
                                        backend)
    return (*input_grads(grads, (x, weight, bias), needed), None, None, None, None, None, None)


_call = op_caller(_fwd, _fwd_impl, _setup_context, _backward)


def bernoulli_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, p: float = 0.5,
                     mask: str = "input", samples: Optional[int] = None, seed=None,
                     input_has_samples: bool = False) -> Tensor:
    """Linear layer with Bernoulli-masked inputs or weights, the mask drawn inside the kernel.

    Args:
        x: ``[..., K]`` input, or ``[S, ..., K]`` with ``input_has_samples=True``.
        weight: ``[N_out, K]``; bias: optional ``[N_out]`` (deterministic).
        p: drop probability in ``[0, 1)`` ("input" and "weight"; unused by "symmetric").
        mask: ``"input"`` — MC dropout of input units per example, kept units scaled by
            ``1/(1-p)`` (Gal & Ghahramani); ``"weight"`` — DropConnect, one mask per weight per
            draw, scaled by ``1/(1-p)``; ``"symmetric"`` — variance-network layer
            ``w = weight * (2 eps - 1)``, ``eps ~ Bernoulli(1/2)``.
        samples: ``S`` independent draws in one call; the output gains a leading ``S`` axis.
        seed: int in ``[0, 2^63)``, a one-element int64 tensor, or ``None`` (drawn from torch's
            default generator). The same seed gives the same masks on every backend.
        input_has_samples: ``x`` already carries the sample axis (needs ``samples``).

    Dtypes: as :func:`gaussian_linear` (docs/precision.md).

    Returns:
        ``[..., N_out]``, or ``[S, ..., N_out]`` when ``samples`` is given.
    """
    check_float_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    check_float_inputs(x=x, weight=weight, bias=bias)
    check_same_device("x", x, weight=weight, bias=bias)
    if bias is not None:
        check_shape("bias", bias, (out_features,))
    p = check_probability("p", p)
    check_choice("mask", mask, MASKS)
    x3, S, lead = flatten_input(x, in_features, samples, input_has_samples)
    args = cast_inputs(x.device, x3, weight, bias, x=x, weight=weight, bias=bias)
    backend = _backend.choose(x.device, *KERNEL_NAMES)
    reject_float64_on_gpu("bernoulli_linear", args[0], backend)
    out = _call(*args, p, resolve_seed(seed), mask, S, input_has_samples, backend)
    return out.reshape(*lead, out_features)
