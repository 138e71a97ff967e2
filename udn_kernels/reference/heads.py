"""Reference (eager PyTorch) depth-head kernels: the oracle for the CPU and Triton kernels.

Signatures as docs/internals.md ("Depth heads"). Loops over depths so at most one ``[N, C]``
logits matrix is alive; computes in the input dtype (float64 in, float64 out), 16-bit inputs in
float32: log-likelihoods, logsumexps and predictions in float32, gradients rounded once to the
inputs' dtype.
"""
from __future__ import annotations

import math

import torch

from .._formulas import mixture_grad

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _head(weight: torch.Tensor, bias: torch.Tensor | None, depth: int):
    """Weight ``[C, D]`` and bias ``[C]`` (or None) of depth ``depth``."""
    w = weight if weight.dim() == 2 else weight[depth]
    b = None if bias is None else (bias if bias.dim() == 1 else bias[depth])
    return w, b


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(hidden, weight, bias, depth):
    """Depth ``depth``'s logits in the accumulation dtype (16-bit inputs: one float32 head at a time)."""
    acc = _acc_dtype(hidden.dtype)
    w, b = _head(weight, bias, depth)
    return torch.nn.functional.linear(hidden[depth].to(acc), w.to(acc), None if b is None else b.to(acc))


def _gaussian_loglik(mean, target, noise_std):
    """``sum_c log N(target | mean, noise_std_c^2)`` per row."""
    s = torch.ones_like(mean[0]) if noise_std is None else noise_std
    z = (target - mean) / s
    return (-0.5 * z * z - torch.log(s) - _HALF_LOG_2PI).sum(-1)


def _capped(logits, softcap: float):
    """Gemma-2 soft-capping ``c tanh(z / c)`` (``softcap`` 0: none)."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def depth_loglik_fwd(hidden, weight, bias, target, noise_std, gaussian: bool, ignore_index: int,
                     label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0,
                     stats: bool = False):
    """``(loglik [L, N], aux)``; aux = logsumexp ``[L, N]`` (categorical; with ``stats`` ``[2, L, N]``:
    logsumexp, then 1.0 where the first argmax logit is the target) or empty (gaussian).

    Categorical loss options (docs/heads.md, "Loss options"): logits ``t = c tanh(z / c)`` when
    ``softcap`` c > 0, ``loglik = (1 - eps) t_y + eps mean_c t_c - lse - zs lse^2``.
    """
    acc = _acc_dtype(hidden.dtype)
    L = hidden.shape[0]
    lls, lses, hits = [], [], []
    for depth in range(L):
        logits = _logits(hidden, weight, bias, depth).to(acc)
        if gaussian:
            nstd = None if noise_std is None else noise_std.to(acc)
            lls.append(_gaussian_loglik(logits, target.to(acc), nstd))
        else:
            logits = _capped(logits, softcap)
            valid = target != ignore_index
            safe = torch.where(valid, target, torch.zeros_like(target))
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None])[:, 0]
            # each option's term only when set: 0 * inf is NaN, and an infinite input must give -inf
            ll = picked - lse
            if label_smoothing:
                ll = ll + label_smoothing * (logits.mean(-1) - picked)
            if lse_square_scale:
                ll = ll - lse_square_scale * lse * lse
            lls.append(torch.where(valid, ll, torch.zeros_like(lse)))
            lses.append(lse)
            hits.append((logits.argmax(-1) == target).to(acc))
    loglik = torch.stack(lls)
    if not lses:
        return loglik, hidden.new_empty(0, dtype=acc)
    aux = torch.stack([torch.stack(lses), torch.stack(hits)]) if stats else torch.stack(lses)
    return loglik, aux


def depth_loglik_bwd(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian: bool,
                     ignore_index: int, grad_mask, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                     softcap: float = 0.0):
    """``(d_hidden, d_weight, d_bias, d_noise_std)``; ``grad_mask`` (four bools) says which are
    wanted: the others, and those of None inputs, are empty tensors, never computed.

    Analytic gradients of ``depth_loglik_fwd`` per depth (custom-op impls run below autograd, so
    no autograd here; the tests check these against autograd through ``depth_loglik_fwd``):
    categorical ``dlogits = g ((1 - eps) onehot + eps / C - (1 + 2 zs lse) softmax(t)) (1 - (t / c)^2)``
    (``t`` the soft-capped logits; the last factor only with ``softcap``), gaussian
    ``dmu = g (y - mu) / s^2``.
    """
    del aux  # recomputed per depth
    want_hidden, want_weight = grad_mask[0], grad_mask[1]
    want_bias, want_noise = grad_mask[2] and bias is not None, grad_mask[3] and gaussian and noise_std is not None
    acc = _acc_dtype(hidden.dtype)
    L = hidden.shape[0]
    d_hidden = torch.empty_like(hidden) if want_hidden else None
    d_weight = torch.zeros_like(weight, dtype=acc) if want_weight else None
    d_bias = torch.zeros_like(bias, dtype=acc) if want_bias else None
    d_noise = None
    if gaussian:
        s = torch.ones(weight.shape[-2], dtype=acc) if noise_std is None else noise_std.to(acc)
        d_noise = torch.zeros_like(s)
    for depth in range(L if want_hidden or want_weight or want_bias or want_noise else 0):
        h = hidden[depth].to(acc)
        w, _ = _head(weight, bias, depth)
        w = w.to(acc)
        logits = _logits(hidden, weight, bias, depth).to(acc)
        g = grad_loglik[depth].to(acc)[:, None]
        if gaussian:
            resid = target.to(acc) - logits
            dlogits = g * resid / (s * s)
            d_noise += (g * (resid * resid / s**3 - 1.0 / s)).sum(0)
        else:
            valid = target != ignore_index
            capped = _capped(logits, softcap)
            onehot = torch.nn.functional.one_hot(torch.where(valid, target, 0), logits.shape[1]).to(acc)
            lse = torch.logsumexp(capped, dim=-1, keepdim=True)
            dcapped = ((1.0 - label_smoothing) * onehot + label_smoothing / logits.shape[1]
                       - (1.0 + 2.0 * lse_square_scale * lse) * torch.exp(capped - lse))
            if softcap:
                dcapped = dcapped * (1.0 - (capped / softcap) ** 2)
            dlogits = torch.where(valid[:, None], g * dcapped, 0.0)
        if want_hidden:
            d_hidden[depth] = dlogits @ w
        if want_weight:
            if weight.dim() == 2:
                d_weight += dlogits.t() @ h
            else:
                d_weight[depth] = dlogits.t() @ h
        if want_bias:
            if bias.dim() == 1:
                d_bias += dlogits.sum(0)
            else:
                d_bias[depth] = dlogits.sum(0)
    empty = lambda: hidden.new_empty(0)  # noqa: E731
    return (d_hidden if want_hidden else empty(), d_weight.to(weight.dtype) if want_weight else empty(),
            d_bias.to(bias.dtype) if want_bias else empty(),
            d_noise.to(noise_std.dtype) if want_noise else empty())


def depth_mixture_predict(hidden, weight, bias, log_weights, gaussian: bool, noise_std=None):
    """Posterior predictive mixture over depths with weights ``softmax(log_weights)``.

    ``(out1 [N, C], out2)``: categorical ``(probs, empty)``; gaussian ``(mean, var)`` of the mixture
    (``var = s^2 + sum_l w_l mu_l^2 - mean^2``, unit noise when ``noise_std`` is None).
    """
    w = torch.softmax(log_weights, dim=0)
    L = hidden.shape[0]
    first = None
    second = None
    for depth in range(L):
        out = _logits(hidden, weight, bias, depth)
        if not gaussian:
            out = torch.softmax(out, dim=-1)
        term = w[depth] * out
        first = term if first is None else first + term
        if gaussian:
            sq = w[depth] * out * out
            second = sq if second is None else second + sq
    if not gaussian:
        return first.to(hidden.dtype), hidden.new_empty(0)
    var_noise = 1.0 if noise_std is None else noise_std.to(first.dtype) ** 2
    return first.to(hidden.dtype), (var_noise + second - first * first).to(hidden.dtype)


def fwd_bwd_from(fwd, bwd):
    """``depth_loglik_fwd_bwd`` (forward plus the gradient of ``sum(grad_loglik * loglik)``) of a
    backend without a fused kernel: its forward, then its (recomputing) backward."""
    def depth_loglik_fwd_bwd(hidden, weight, bias, target, noise_std, grad_loglik, gaussian: bool,
                             ignore_index: int, grad_mask, label_smoothing: float = 0.0,
                             lse_square_scale: float = 0.0, softcap: float = 0.0, stats: bool = False):
        options = (label_smoothing, lse_square_scale, softcap)
        loglik, aux = fwd(hidden, weight, bias, target, noise_std, gaussian, ignore_index, *options, stats)
        grads = bwd(grad_loglik, hidden, weight, bias, target, noise_std, aux[0] if stats else aux, gaussian,
                    ignore_index, grad_mask, *options)
        return (loglik, aux) + tuple(grads)
    return depth_loglik_fwd_bwd


def depth_loglik_mixture_fwd_bwd(hidden, weight, bias, target, noise_std, log_weights, row_scale,
                                 gaussian: bool, ignore_index: int, grad_mask, label_smoothing: float = 0.0,
                                 lse_square_scale: float = 0.0, softcap: float = 0.0, stats: bool = False):
    """``depth_loglik_fwd`` plus the head gradients of the mixture NLL (``mixture_grad``): the
    forward, then the backward with that upstream gradient."""
    options = (label_smoothing, lse_square_scale, softcap)
    loglik, aux = depth_loglik_fwd(hidden, weight, bias, target, noise_std, gaussian, ignore_index, *options, stats)
    grad = mixture_grad(loglik, log_weights, row_scale)
    grads = depth_loglik_bwd(grad, hidden, weight, bias, target, noise_std, aux[0] if stats else aux, gaussian,
                             ignore_index, grad_mask, *options)
    return (loglik, aux) + tuple(grads)


KERNELS = {"depth_loglik_fwd": depth_loglik_fwd, "depth_loglik_bwd": depth_loglik_bwd,
           "depth_loglik_fwd_bwd": fwd_bwd_from(depth_loglik_fwd, depth_loglik_bwd),
           "depth_loglik_mixture_fwd_bwd": depth_loglik_mixture_fwd_bwd,
           "depth_mixture_predict": depth_mixture_predict}
