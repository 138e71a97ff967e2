"""Shared plumbing of the stochastic convolutions: ``S`` weight draws as one ATen convolution."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def pair(name: str, value) -> tuple[int, int]:
    """An int or a pair of ints, as ``F.conv2d`` takes ``stride`` / ``padding`` / ``dilation``."""
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return values


def _fold(x: torch.Tensor, weight: torch.Tensor, x_sampled: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Input, flat weight and groups of the one convolution serving ``weight [S, O, C, kh, kw]``:
    a sampled input ``[S, N, C, H, W]`` is folded into channels (``groups=S``), a shared one is
    convolved with all ``S * O`` output channels at once."""
    samples, out_ch = weight.shape[:2]
    flat = weight.reshape(samples * out_ch, *weight.shape[2:])
    if x_sampled:
        return x.transpose(0, 1).reshape(x.shape[1], samples * x.shape[2], *x.shape[3:]), flat, samples
    return x, flat, 1


def conv_per_sample(x: torch.Tensor, weight: torch.Tensor, bias, x_sampled: bool, stride, padding,
                    dilation) -> torch.Tensor:
    """``out[s] = conv2d(x[s] or x, weight[s], bias[s])`` for ``weight [S, O, C, kh, kw]``, ``bias [S, O]``
    or None -> ``[S, N, O, H', W']`` (a transposed view of the ``[N, S*O, H', W']`` result, so a
    later layer's fold is free; the bias goes into the convolution, not a pass over the output)."""
    samples, out_ch = weight.shape[:2]
    xf, flat, groups = _fold(x, weight, x_sampled)
    out = F.conv2d(xf, flat, None if bias is None else bias.reshape(-1), stride, padding, dilation, groups)
    return out.reshape(out.shape[0], samples, out_ch, *out.shape[2:]).transpose(0, 1)


def conv_per_sample_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, x_sampled: bool,
                             stride, padding, dilation, need_x: bool, need_weight: bool, need_bias: bool) -> tuple:
    """``(d_x, d_weight, d_bias [S, O])`` of :func:`conv_per_sample` (None where not needed): one ATen backward."""
    samples, out_ch = weight.shape[:2]
    xf, flat, groups = _fold(x, weight, x_sampled)
    g = grad.transpose(0, 1).reshape(grad.shape[1], samples * out_ch, *grad.shape[3:])
    d_xf, d_w, d_b = conv_backward(g, xf, flat, stride, padding, dilation, need_x, need_weight, need_bias, groups)
    if d_xf is not None and x_sampled:
        d_xf = d_xf.reshape(x.shape[1], samples, *x.shape[2:]).transpose(0, 1)
    return (d_xf, None if d_w is None else d_w.view(weight.shape),
            None if d_b is None else d_b.view(samples, out_ch))


def conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                  need_x: bool, need_weight: bool, need_bias: bool = False, groups: int = 1) -> tuple:
    """``(d_x, d_weight, d_bias)`` of ``F.conv2d(x, weight, bias, ...)`` (None where not needed)."""
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if need_bias else None, stride,
                                               padding, dilation, False, [0, 0], groups,
                                               [need_x, need_weight, need_bias])
