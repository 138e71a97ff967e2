"""Shared plumbing of the stochastic-weight linear ops: input flattening and output shapes."""
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


def input_grads(grads, sources, needed) -> tuple:
    """The backward's gradients for autograd: None where the input is None or needs no gradient
    (the kernels, told by their ``grad_mask``, return an empty tensor there)."""
    return tuple(g if t is not None and want else None for g, t, want in zip(grads, sources, needed))


def std_shape(x: torch.Tensor, weight_sigma: torch.Tensor, estimator: str) -> tuple:
    """Shape of gaussian_linear_fwd's second output: local's output std ``[Sx, B, N]``, else empty."""
    return (x.shape[0], x.shape[1], weight_sigma.shape[0]) if estimator == "local" else (0,)


def reject_float64_on_gpu(op: str, x: torch.Tensor, backend: str) -> None:
    """float64 on a GPU's Triton kernels: a TypeError before any launch. Their tiles accumulate in
    fp32 and the fp64 ``tl.dot`` does not compile into them (checked by AOT-compiling the fp64
    specialisation for sm_80); the interpreter, the CPU kernels and the reference take float64."""
    if backend == "triton" and x.device.type == "cuda" and x.dtype == torch.float64:
        raise TypeError(f"{op}: float64 is not supported by the Triton kernels on CUDA; use float32, "
                        f"bfloat16 or float16 (or the reference backend), got x of dtype {x.dtype}")
