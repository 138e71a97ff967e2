"""``bernoulli_linear``: MC dropout, DropConnect and symmetric Bernoulli weights inside the kernel."""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import get_kernel, use_triton_ops
from .._checks import (check_choice, check_float_tensor, check_probability, check_same, check_shape,
                      resolve_seed, resolve_seed_int)
from ._stochastic import flatten_input, none_if_empty

MASKS = ("input", "weight", "symmetric")
Tensor = torch.Tensor


@torch.library.custom_op("udn_kernels::bernoulli_linear_fwd", mutates_args=())
def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: Tensor, mask: str,
         samples: int, x_sampled: bool) -> Tensor:
    kernel = get_kernel("bernoulli_linear_fwd", x.device)
    # The seed travels as a tensor so a seed drawn inside a compiled graph stays on the graph.
    return kernel(x, weight, bias, p, int(seed.item()), mask, samples, x_sampled)


@_fwd.register_fake
def _(x, weight, bias, p, seed, mask, samples, x_sampled):
    return x.new_empty(samples, x.shape[1], weight.shape[0])


@torch.library.custom_op("udn_kernels::bernoulli_linear_bwd", mutates_args=())
def _bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: Tensor,
         mask: str, samples: int, x_sampled: bool) -> tuple[Tensor, Tensor, Tensor]:
    kernel = get_kernel("bernoulli_linear_bwd", x.device)
    return tuple(kernel(grad_out, x, weight, bias, p, int(seed.item()), mask, samples, x_sampled))


@_bwd.register_fake
def _(grad_out, x, weight, bias, p, seed, mask, samples, x_sampled):
    return torch.empty_like(x), torch.empty_like(weight), x.new_empty(0) if bias is None else torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, p, seed, mask, samples, x_sampled = inputs
    # Only the inputs are saved: backward regenerates the masks from (seed, offset).
    ctx.save_for_backward(x, weight, bias, seed)
    ctx.p, ctx.options = p, (mask, samples, x_sampled)


def _backward(ctx, grad_out):
    x, weight, bias, seed = ctx.saved_tensors
    d_x, d_weight, d_bias = _bwd(grad_out.contiguous(), x, weight, bias, ctx.p, seed, *ctx.options)
    return d_x, d_weight, none_if_empty(d_bias, bias), None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


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

    Returns:
        ``[..., N_out]``, or ``[S, ..., N_out]`` when ``samples`` is given.
    """
    check_float_tensor("weight", weight, ndim=2)
    out_features, in_features = weight.shape
    check_float_tensor("x", x)
    check_same("x", x, weight=weight, bias=bias)
    if bias is not None:
        check_shape("bias", bias, (out_features,))
    p = check_probability("p", p)
    check_choice("mask", mask, MASKS)
    x3, S, lead = flatten_input(x, in_features, samples, input_has_samples)
    args = (x3, weight.contiguous(), None if bias is None else bias.contiguous(), p)
    if use_triton_ops(x.device):  # the triton_op, so torch.compile sees its kernels
        out = torch.ops.udn_kernels_triton.bernoulli_linear_fwd(*args, resolve_seed_int(seed), mask, S,
                                                               input_has_samples)
    else:
        out = _fwd(*args, resolve_seed(seed), mask, S, input_has_samples)
    return out.reshape(*lead, out_features)
