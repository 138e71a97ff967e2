"""``gaussian_conv2d``: a 2-D convolution with mean-field Gaussian kernels (docs/stochastic_conv.md).

No conv kernel of its own: the noise comes from the Philox fills of ``udn_kernels.rng`` (C++ on
CPU, Triton on CUDA) at the offsets of docs/stochastic_conv.md, the convolutions are ATen's
(forward ``F.conv2d``, backward ``aten.convolution_backward``), and the backward regenerates every
noise tensor from ``(seed, offset)`` instead of saving it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .. import rng
from .._checks import check_choice, check_float_tensor, check_same, check_samples, check_shape, resolve_seed
from ._conv import conv_backward, conv_per_sample, conv_per_sample_backward, pair

ESTIMATORS = ("sample", "local", "flipout")
SIGMA_TRANSFORMS = (None, "softplus")
Tensor = torch.Tensor


class _Noise:
    """The op's random elements: ``S`` draws of a weight ``[O, C, kh, kw]`` (``K = C kh kw``) and
    bias ``[O]``, ``N`` examples; the offsets are the table of docs/stochastic_conv.md."""

    def __init__(self, seed: int, samples: int, weight_shape, n: int, like: Tensor):
        self.seed, self.S, self.shape, self.n, self.like = seed, samples, tuple(weight_shape), n, like
        self.weights = samples * torch.Size(weight_shape).numel()
        self.biases = samples * weight_shape[0]

    def _normal(self, count: int, offset: int) -> Tensor:
        return rng.normal(count, self.seed, offset, device=self.like.device).to(self.like.dtype)

    def _sign(self, count: int, offset: int) -> Tensor:  # the sign draw of docs/rng.md: top bit of word 0
        words = rng.random_uint32(count, self.seed, offset, device=self.like.device)
        return torch.where(words >= 2**31, 1.0, -1.0).to(self.like.dtype)

    def weight_eps(self) -> Tensor:  # sample, flipout: [S, O, C, kh, kw]
        return self._normal(self.weights, 0).view(self.S, *self.shape)

    def bias_eps(self) -> Tensor:  # sample, flipout: [S, O]
        return self._normal(self.biases, self.weights).view(self.S, self.shape[0])

    def signs(self) -> tuple[Tensor, Tensor]:
        """flipout: input-channel signs ``[S, N, 1, C, 1, 1]``, output-channel signs ``[S, N, O, 1, 1, 1]``."""
        out_ch, in_ch = self.shape[:2]
        start = self.weights + self.biases
        sign_in = self._sign(self.S * self.n * in_ch, start)
        sign_out = self._sign(self.S * self.n * out_ch, start + sign_in.numel())
        return sign_in.view(self.S, self.n, 1, in_ch, 1, 1), sign_out.view(self.S, self.n, out_ch, 1, 1, 1)

    def output_eps(self, out_shape) -> Tensor:  # local: [S, N, O, H', W']
        return self._normal(self.S * torch.Size(out_shape).numel(), 0).view(self.S, *out_shape)


def _sigma(t: Optional[Tensor], softplus: bool) -> Optional[Tensor]:
    return F.softplus(t) if softplus and t is not None else t


def _chain(grad: Tensor, t: Tensor, softplus: bool) -> Tensor:
    """``d/d rho`` from ``d/d sigma`` (sigma = softplus(rho)), or ``d/d sigma`` itself."""
    return grad.mul_(torch.sigmoid(t)) if softplus else grad


def _draw(mu: Optional[Tensor], sigma: Optional[Tensor], eps: Tensor) -> Optional[Tensor]:
    """``mu + sigma * eps`` written into ``eps`` (``mu``, ``sigma`` broadcast over the draws)."""
    if sigma is None:
        return None if mu is None else mu.expand_as(eps)
    eps = eps.mul_(sigma)
    return eps if mu is None else eps.add_(mu)


def _per_example(flipout_weights: int, x_numel: int) -> bool:
    """flipout folds its signs into per-example weights (one grouped convolution instead of two)
    while those weights are no larger than the input they multiply."""
    return flipout_weights <= x_numel


class _GaussianConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, estimator, samples, x_sampled,
                softplus, conv, squeeze):
        ctx.set_materialize_grads(False)
        n = x.shape[1] if x_sampled else x.shape[0]
        noise = _Noise(seed, samples, weight_mu.shape, n, x)
        sigma, bias_sigma = _sigma(weight_rho, softplus), _sigma(bias_rho, softplus)
        std = None
        if estimator == "local":
            xf = x.flatten(0, 1) if x_sampled else x
            mean = F.conv2d(xf, weight_mu, bias_mu, *conv)
            var = F.conv2d(xf * xf, sigma * sigma, None if bias_sigma is None else bias_sigma * bias_sigma, *conv)
            std = var.sqrt_().view(-1, n, *var.shape[1:])  # [Sx, N, O, H', W']
            out = noise.output_eps(std.shape[1:]).mul_(std).add_(mean.view_as(std))
        else:
            delta = noise.weight_eps()
            bias = _draw(bias_mu, bias_sigma, noise.bias_eps())  # [S, O]
            if estimator == "sample":
                out = conv_per_sample(x, _draw(weight_mu, sigma, delta), bias, x_sampled, *conv)
            else:
                out = _flipout_forward(x, weight_mu, _draw(None, sigma, delta), bias, noise, x_sampled, conv)
        ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, std)
        ctx.options = (seed, estimator, samples, x_sampled, softplus, conv, squeeze)
        # without samples=: the draw axis goes here, not in an indexing node whose backward would
        # zero-fill and copy an output-sized gradient
        return out[0] if squeeze else out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return (None,) * 12
        x, mu, rho, bias_mu, bias_rho, std = ctx.saved_tensors
        seed, estimator, samples, x_sampled, softplus, conv, squeeze = ctx.options
        grad = grad.unsqueeze(0) if squeeze else grad
        need = ctx.needs_input_grad
        n = x.shape[1] if x_sampled else x.shape[0]
        noise = _Noise(seed, samples, mu.shape, n, x)
        sigma, bias_sigma = _sigma(rho, softplus), _sigma(bias_rho, softplus)
        if estimator == "local":
            return _local_backward(grad, x, mu, rho, sigma, bias_rho, bias_sigma, std, noise, need, x_sampled,
                                   softplus, conv)
        eps = noise.weight_eps()
        need_bias = need[3] or need[4]
        if estimator == "sample":
            weight = _draw(mu, sigma, eps.clone())
            d_x, d_delta, g_bias = conv_per_sample_backward(grad, x, weight, x_sampled, *conv, need[0],
                                                            need[1] or need[2], need_bias)
            d_mu = d_delta.sum(0) if need[1] else None
        else:
            d_x, d_mu, d_delta, g_bias = _flipout_backward(grad, x, mu, sigma * eps, noise, x_sampled, conv, need)
        d_rho = _chain((d_delta * eps).sum(0), rho, softplus) if need[2] else None
        d_bias_mu = g_bias.sum(0) if need[3] else None  # g_bias: [S, O], the gradient of each draw's bias
        d_bias_rho = _chain((g_bias * noise.bias_eps()).sum(0), bias_rho, softplus) if need[4] else None
        return d_x, d_mu, d_rho, d_bias_mu, d_bias_rho, *(None,) * 7


def _flipout_forward(x, mu, delta, bias, noise: _Noise, x_sampled, conv) -> Tensor:
    """``out[s, n] = conv(x_n, mu) + conv(x_n * sign_in[s, n], delta[s]) * sign_out[s, n] + bias[s]``
    ``[S, N, O, H', W']``."""
    sign_in, sign_out = noise.signs()
    S, n = noise.S, noise.n
    xs = x if x_sampled else x.expand(S, *x.shape)
    if _per_example(S * n * delta[0].numel(), xs.numel()):
        # sign_out[o] sign_in[c] delta[o, c] is the perturbation of example n's own kernel
        weight = (delta[:, None] * sign_out).mul_(sign_in).add_(mu)  # [S, N, O, C, kh, kw]
        flat_bias = None if bias is None else bias[:, None].expand(S, n, -1).reshape(-1)
        out = F.conv2d(xs.reshape(1, -1, *x.shape[-2:]), weight.flatten(0, 2), flat_bias, *conv, S * n)
        return out.view(S, n, mu.shape[0], *out.shape[-2:])
    mean = F.conv2d(xs.flatten(0, 1) if x_sampled else x, mu, None, *conv)
    perturbed = conv_per_sample(xs * sign_in.view(S, n, -1, 1, 1), delta, None, True, *conv)
    out = perturbed.mul_(sign_out.view(S, n, -1, 1, 1)).add_(mean.view(-1, *perturbed.shape[1:]))
    return out if bias is None else out.add_(bias[:, None, :, None, None])


def _flipout_backward(grad, x, mu, delta, noise: _Noise, x_sampled, conv, need) -> tuple:
    """``(d_x, d_mu, d_delta [S, O, C, kh, kw], d_bias [S, O])`` of :func:`_flipout_forward` (None
    where not needed)."""
    sign_in, sign_out = noise.signs()
    S, n = noise.S, noise.n
    xs = x if x_sampled else x.expand(S, *x.shape)
    need_w, need_bias = need[1] or need[2], need[3] or need[4]
    if _per_example(S * n * delta[0].numel(), xs.numel()):
        weight = (delta[:, None] * sign_out).mul_(sign_in).add_(mu)
        d_xs, d_weight, d_bias = conv_backward(grad.reshape(1, -1, *grad.shape[-2:]), xs.reshape(1, -1, *x.shape[-2:]),
                                               weight.flatten(0, 2), *conv, need[0], need_w, need_bias, S * n)
        d_weight = None if d_weight is None else d_weight.view(weight.shape)
        d_mu = d_weight.sum((0, 1)) if need[1] else None
        d_delta = d_weight.mul_(sign_out).mul_(sign_in).sum(1) if need[2] else None
        d_bias = None if d_bias is None else d_bias.view(S, n, -1).sum(1)
        if d_xs is None:
            return None, d_mu, d_delta, d_bias
        d_xs = d_xs.view(xs.shape)
        return (d_xs if x_sampled else d_xs.sum(0)), d_mu, d_delta, d_bias
    # two convolutions: the mean part on x, the flipped perturbation on x * sign_in
    g_sum = grad.flatten(0, 1) if x_sampled else grad.sum(0)
    d_mean_x, d_mu, _ = conv_backward(g_sum, xs.flatten(0, 1) if x_sampled else x, mu, *conv, need[0], need[1])
    d_bias = grad.sum((1, 3, 4)) if need_bias else None
    sin = sign_in.view(S, n, -1, 1, 1)
    d_flipped, d_delta, _ = conv_per_sample_backward(grad * sign_out.view(S, n, -1, 1, 1), xs * sin, delta, True,
                                                     *conv, need[0], need[2], False)
    if d_flipped is None:
        return None, d_mu, d_delta, d_bias
    d_flipped = d_flipped.mul_(sin)
    d_x = d_flipped.add_(d_mean_x.view_as(x)) if x_sampled else d_flipped.sum(0).add_(d_mean_x)
    return d_x, d_mu, d_delta, d_bias


def _local_backward(grad, x, mu, rho, sigma, bias_rho, bias_sigma, std, noise: _Noise, need, x_sampled, softplus,
                    conv) -> tuple:
    """out = mean + std * eps: ``d mean = sum_s g``, ``d var = sum_s g eps / (2 std)`` (0 where std = 0)."""
    shared = std.shape[0] == 1  # every draw saw the same x, so the draws' gradients add up
    d_var = (grad * noise.output_eps(std.shape[1:])).div_(std * 2).masked_fill_(std == 0, 0)
    g_mean, d_var = (grad.sum(0), d_var.sum(0)) if shared else (grad.flatten(0, 1), d_var.flatten(0, 1))
    xf = x.flatten(0, 1) if x_sampled else x
    d_x, d_mu, d_bias_mu = conv_backward(g_mean, xf, mu, *conv, need[0], need[1], need[3])
    d_x2, d_s2, d_bias_var = conv_backward(d_var, xf * xf, sigma * sigma, *conv, need[0], need[2], need[4])
    if need[0]:
        d_x = d_x.add_(d_x2.mul_(xf).mul_(2)).view_as(x)
    d_rho = _chain(d_s2.mul_(sigma).mul_(2), rho, softplus) if need[2] else None
    d_bias_rho = _chain(d_bias_var.mul_(bias_sigma).mul_(2), bias_rho, softplus) if need[4] else None
    return d_x, d_mu, d_rho, d_bias_mu, d_bias_rho, *(None,) * 7


def gaussian_conv2d(x: Tensor, weight_mu: Tensor, weight_sigma: Tensor, bias_mu: Optional[Tensor] = None,
                    bias_sigma: Optional[Tensor] = None, *, stride=1, padding=0, dilation=1,
                    estimator: str = "sample", samples: Optional[int] = None, seed=None,
                    input_has_samples: bool = False, sigma_transform: Optional[str] = None) -> Tensor:
    """2-D convolution with Gaussian kernels ``W = weight_mu + weight_sigma * eps``, ``eps ~ N(0, 1)``.

    Args:
        x: ``[N, C, H, W]``, or ``[S, N, C, H, W]`` with ``input_has_samples=True``.
        weight_mu, weight_sigma: ``[O, C, kh, kw]`` kernel means and standard deviations (``>= 0``).
        bias_mu, bias_sigma: optional ``[O]`` bias mean and standard deviation (the bias is
            sampled when ``bias_sigma`` is given).
        stride, padding, dilation: as ``F.conv2d`` (ints or pairs of ints).
        estimator: ``"sample"`` (one kernel draw per call / per draw, shared by the batch),
            ``"flipout"`` (a shared draw whose perturbation gets per-example signs on the input
            and output channels, Wen et al. 2018) or ``"local"`` (local reparameterisation:
            ``conv(x, mu) + sqrt(conv(x^2, sigma^2) + bias_sigma^2) * eps`` with independent
            noise per output element). All three have the same per-output marginals.
        samples: ``S`` independent draws in one call; the output gains a leading ``S`` axis.
        seed: int in ``[0, 2^63)``, a one-element int64 tensor, or None to draw one from torch's
            default generator. The same seed gives the same noise on every backend (offsets:
            docs/stochastic_conv.md).
        input_has_samples: ``x`` already carries the sample axis (needs ``samples``).
        sigma_transform: None, or ``"softplus"``: the sigma arguments hold ``rho`` and the standard
            deviations are ``softplus(rho)``; gradients are returned for ``rho``.

    Returns:
        ``[N, O, H', W']``, or ``[S, N, O, H', W']`` when ``samples`` is given.
    """
    check_float_tensor("weight_sigma", weight_sigma, ndim=4)
    check_float_tensor("x", x)
    check_same("x", x, weight_mu=weight_mu, weight_sigma=weight_sigma, bias_mu=bias_mu, bias_sigma=bias_sigma)
    check_shape("weight_mu", weight_mu, tuple(weight_sigma.shape))
    for name, value in (("bias_mu", bias_mu), ("bias_sigma", bias_sigma)):
        if value is not None:
            check_shape(name, value, (weight_sigma.shape[0],))
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("sigma_transform", sigma_transform, SIGMA_TRANSFORMS)
    samples = check_samples(samples)
    if not isinstance(input_has_samples, bool):
        raise TypeError(f"input_has_samples: expected a bool, got {type(input_has_samples).__name__}")
    if input_has_samples and samples is None:
        raise ValueError("input_has_samples: True needs samples=S (x of shape [S, N, C, H, W]), got samples=None")
    S = 1 if samples is None else samples
    expected = (5 if input_has_samples else 4)
    if x.dim() != expected or x.shape[-3] != weight_sigma.shape[1] or (input_has_samples and x.shape[0] != S):
        lead = f"[{S}, N, " if input_has_samples else "["
        raise ValueError(f"x: expected shape {lead}{weight_sigma.shape[1]}, H, W] (in_channels of the weight), "
                         f"got {tuple(x.shape)}")
    conv = (pair("stride", stride), pair("padding", padding), pair("dilation", dilation))
    params = [None if t is None else t.contiguous() for t in (weight_mu, weight_sigma, bias_mu, bias_sigma)]
    return _apply(x, *params, resolve_seed(seed), estimator, S, input_has_samples, sigma_transform == "softplus", conv,
                  samples is None)


# Not a torch.library custom op: torch.compile runs the op eagerly behind a graph break (the
# Philox fills it calls have no fake kernels, and the seed is read as a Python int).
@torch.compiler.disable
def _apply(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed: Tensor, *options) -> Tensor:
    return _GaussianConv2d.apply(x, weight_mu, weight_sigma, bias_mu, bias_sigma, int(seed), *options)
