"""Fused depth-mixture heads: per-depth log-likelihoods and their mixture over depths.

``depth_loglik`` runs one kernel over every depth's output head without materialising the
``[L, N, C]`` logits (custom ops ``udn_kernels::depth_loglik_fwd`` / ``_bwd``, which run the kernels
of the backend chosen once at forward; ops/_dispatch.py). The combination over depths (``depth_mixture_nll``) is O(L·N) eager
torch on top of it, so gradients reach ``log_weights`` through ordinary autograd.

Expected mode with a mean/sum reduction is a fixed linear function of the log-likelihoods,
``sum_{l,n} coef[l, n] loglik[l, n]``, so when gradients are wanted its upstream gradient is known
before the forward: ``udn_kernels::depth_loglik_dot`` then computes the parameter gradients in the
forward pass (kernel ``depth_loglik_fwd_bwd``, no logits recompute) and its backward only scales
them. Mixture mode's upstream gradient is known once every depth's log-likelihood of a sample is:
kernel ``depth_loglik_mixture_fwd_bwd`` forms it between its forward and backward loops
(docs/heads.md, "Gradient in the forward").
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend
from .._formulas import mixture_grad
from ._dispatch import op_caller, stage
from .._checks import (accumulate_dtype, autocast_off, check_choice, check_float_tensor, check_same_device, check_shape,
                       check_tensor, checks_values, compute_dtype)

LIKELIHOODS = ("categorical", "gaussian")
MODES = ("expected", "mixture")
REDUCTIONS = ("mean", "sum", "none")


LOGLIK_KERNELS = ("depth_loglik_fwd", "depth_loglik_bwd")


def _aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-likelihoods, logsumexps and losses of a ``dtype`` computation (float32 for 16-bit)."""
    return accumulate_dtype(dtype) if dtype != torch.float32 else torch.float32


class DepthStats(NamedTuple):
    """Per-depth statistics of ``depth_mixture_nll(..., return_stats=True)`` (no gradient):
    ``nll [L]`` float32, each depth's mean per-token loss over non-ignored rows with the call's
    loss options; ``accuracy [L]`` float32, the fraction of non-ignored rows whose (first) argmax
    logit is the target; ``count``, 0-d int64, the number of non-ignored rows."""
    nll: Tensor
    accuracy: Tensor
    count: Tensor


def _aux_shape(L, N, gaussian, stats):
    """The kernels' ``aux``: empty (gaussian), the logsumexp ``[L, N]``, or with ``stats``
    ``[2, L, N]`` (logsumexp, then 1.0 where the argmax logit is the target)."""
    return (0,) if gaussian else ((2, L, N) if stats else (L, N))


def _lse_of(aux):
    """The logsumexp part of a forward's ``aux`` (what the backward kernels read)."""
    return aux[0] if aux.dim() == 3 else aux


def _loglik_fwd_impl(hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend,
                     label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, stats=False):
    loglik, aux = _backend.kernel(backend, "depth_loglik_fwd")(hidden, weight, bias, target, noise_std,
                                                               gaussian, ignore_index, label_smoothing,
                                                               lse_square_scale, softcap, stats)
    return loglik.to(_aux_dtype(hidden.dtype)), aux  # Triton writes 16-bit log-likelihoods


@torch.library.custom_op("udn_kernels::depth_loglik_fwd", mutates_args=())
def _loglik_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                noise_std: Optional[Tensor], gaussian: bool, ignore_index: int,
                backend: str, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                softcap: float = 0.0, stats: bool = False) -> tuple[Tensor, Tensor]:
    return _loglik_fwd_impl(hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend,
                            label_smoothing, lse_square_scale, softcap, stats)


@_loglik_fwd.register_fake
def _(hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend, label_smoothing=0.0,
      lse_square_scale=0.0, softcap=0.0, stats=False):
    L, N = hidden.shape[0], hidden.shape[1]
    acc = _aux_dtype(hidden.dtype)
    return hidden.new_empty((L, N), dtype=acc), hidden.new_empty(_aux_shape(L, N, gaussian, stats), dtype=acc)


def _loglik_bwd_impl(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian, ignore_index,
                     grad_mask, backend, label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0):
    grads = _backend.kernel(backend, "depth_loglik_bwd")(grad_loglik.contiguous(), hidden, weight, bias,
                                                         target, noise_std, aux, gaussian, ignore_index,
                                                         grad_mask, label_smoothing, lse_square_scale, softcap)
    return tuple(grads)


@torch.library.custom_op("udn_kernels::depth_loglik_bwd", mutates_args=())
def _loglik_bwd(grad_loglik: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                target: Tensor, noise_std: Optional[Tensor], aux: Tensor, gaussian: bool,
                ignore_index: int, grad_mask: list[bool], backend: str, label_smoothing: float = 0.0,
                lse_square_scale: float = 0.0, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _loglik_bwd_impl(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian,
                            ignore_index, grad_mask, backend, label_smoothing, lse_square_scale, softcap)


def _empty_grads(hidden, weight, bias, noise_std, grad_mask):
    """Uninitialised ``(d_hidden, d_weight, d_bias, d_noise_std)``: empty where not wanted
    (``grad_mask``) or for None inputs."""
    wanted = zip(grad_mask, (hidden, weight, bias, noise_std))
    return tuple(torch.empty_like(x) if want and x is not None else hidden.new_empty(0) for want, x in wanted)


def _grad_mask(hidden, weight, bias, noise_std, wanted) -> list[bool]:
    """Which of ``(d_hidden, d_weight, d_bias, d_noise_std)`` the kernels compute: those ``wanted``
    (four bools) of the inputs that are given."""
    return [bool(want) and x is not None for want, x in zip(wanted, (hidden, weight, bias, noise_std))]


@_loglik_bwd.register_fake
def _(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian, ignore_index, grad_mask, backend,
      label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0):
    return _empty_grads(hidden, weight, bias, noise_std, grad_mask)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, target, noise_std, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # aux never gets a gradient: no zero fill for it
    ctx.gaussian, ctx.ignore_index, ctx.backend = gaussian, ignore_index, backend
    ctx.loss_options = tuple(options[:3])  # (label_smoothing, lse_square_scale, softcap); stats unused


def _gaussian_target_grad(grad, hidden, weight, bias, target, noise_std):
    """``d/d target`` of the Gaussian log-likelihood: ``-sum_l g_l (y - mu_l) / s^2`` (O(N·C) memory)."""
    L, N, D = hidden.shape
    hidden, weight = hidden.to(grad.dtype), weight.to(grad.dtype)  # 16-bit inputs: float32, as the kernels
    bias = None if bias is None else bias.to(grad.dtype)
    gh = grad[:, :, None] * hidden
    if weight.dim() == 2:
        weighted_mean = gh.sum(0) @ weight.t()
    else:  # one GEMM over the concatenated depth axis: [N, L*D] @ [L*D, C]
        weighted_mean = gh.transpose(0, 1).reshape(N, L * D) @ weight.transpose(1, 2).reshape(L * D, -1)
    if bias is not None:
        weighted_mean = weighted_mean + (grad.sum(0)[:, None] * bias if bias.dim() == 1 else grad.t() @ bias)
    return -(grad.sum(0)[:, None] * target - weighted_mean) / (noise_std * noise_std)


def _backward(ctx, grad_loglik, grad_aux):
    if grad_loglik is None:  # not materialised: no gradient reached loglik
        return (None,) * 12
    hidden, weight, bias, target, noise_std, aux = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_mask = _grad_mask(hidden, weight, bias, noise_std, (needs[0], needs[1], needs[2], needs[4]))
    grads = [None] * 4
    if any(grad_mask):
        bwd = stage(ctx, _loglik_bwd, _loglik_bwd_impl)
        with autocast_off(hidden.device):  # a backward run inside an autocast region
            grads = bwd(grad_loglik, hidden, weight, bias, target, noise_std, _lse_of(aux), ctx.gaussian,
                        ctx.ignore_index, grad_mask, ctx.backend, *ctx.loss_options)
    d_hidden, d_weight, d_bias, d_noise = (g if want else None for g, want in zip(grads, grad_mask))
    d_target = None
    if ctx.gaussian and needs[3]:
        d_target = _gaussian_target_grad(grad_loglik, hidden, weight, bias, target, noise_std)
    return (d_hidden, d_weight, d_bias, d_target, d_noise) + (None,) * 7


_loglik = op_caller(_loglik_fwd, _loglik_fwd_impl, _setup_context, _backward)


def _loglik_dot_impl(hidden, weight, bias, target, noise_std, coef, log_weights, gaussian, ignore_index,
                     grad_mask, backend, label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, stats=False):
    """``depth_loglik_dot``'s body on ``backend``'s ``depth_loglik_fwd_bwd`` (expected mode) or
    ``depth_loglik_mixture_fwd_bwd`` (mixture mode) kernel."""
    options = (label_smoothing, lse_square_scale, softcap, stats)
    if log_weights is None:
        loglik, aux, d_hidden, d_weight, d_bias, d_noise = _backend.kernel(backend, "depth_loglik_fwd_bwd")(
            hidden, weight, bias, target, noise_std, coef.contiguous(), gaussian, ignore_index, grad_mask, *options)
        loglik = loglik.to(coef.dtype)
        total = (coef * loglik).sum()
    else:
        loglik, aux, d_hidden, d_weight, d_bias, d_noise = _backend.kernel(
            backend, "depth_loglik_mixture_fwd_bwd")(hidden, weight, bias, target, noise_std,
                                                     log_weights.contiguous(), coef.contiguous(), gaussian,
                                                     ignore_index, grad_mask, *options)
        loglik = loglik.to(coef.dtype)
        total = -(coef * torch.logsumexp(log_weights[:, None] + loglik, dim=0)).sum()
    return total, loglik, d_hidden, d_weight, d_bias, d_noise, aux


@torch.library.custom_op("udn_kernels::depth_loglik_dot", mutates_args=())
def _loglik_dot(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                noise_std: Optional[Tensor], coef: Tensor, log_weights: Optional[Tensor], gaussian: bool,
                ignore_index: int, grad_mask: list[bool], backend: str, label_smoothing: float = 0.0,
                lse_square_scale: float = 0.0, softcap: float = 0.0,
                stats: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(total, loglik, d_hidden, d_weight, d_bias, d_noise, aux)``: ``total`` and its head gradients
    (those ``grad_mask`` asks for, the others empty), computed in the forward pass; only ``total``
    is differentiable. Without ``log_weights`` ``total = sum(coef * loglik)`` (expected mode,
    ``coef [L, N]``); with them the mixture NLL
    ``total = -sum_n coef_n logsumexp_l(log_weights_l + loglik[l, n])`` (``coef [N]``). ``aux``: the
    kernel's (``_aux_shape``; with ``stats`` its second half holds the argmax hits)."""
    return _loglik_dot_impl(hidden, weight, bias, target, noise_std, coef, log_weights, gaussian,
                            ignore_index, grad_mask, backend, label_smoothing, lse_square_scale, softcap, stats)


@_loglik_dot.register_fake
def _(hidden, weight, bias, target, noise_std, coef, log_weights, gaussian, ignore_index, grad_mask, backend,
      label_smoothing=0.0, lse_square_scale=0.0, softcap=0.0, stats=False):
    L, N = hidden.shape[0], hidden.shape[1]
    acc = _aux_dtype(hidden.dtype)
    aux = hidden.new_empty(_aux_shape(L, N, gaussian, stats), dtype=acc)
    return ((hidden.new_empty((), dtype=acc), hidden.new_empty((L, N), dtype=acc))
            + _empty_grads(hidden, weight, bias, noise_std, grad_mask) + (aux,))


def _setup_dot(ctx, inputs, output):
    hidden, weight, bias, target, noise_std, coef, log_weights, gaussian, ignore_index, grad_mask, backend = inputs[:11]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    ctx.save_for_backward(hidden, weight, bias, target, noise_std, coef, log_weights, *output[1:6])
    ctx.gaussian, ctx.grad_mask = gaussian, grad_mask


def _passes_saved_grads(ctx, grad_total) -> bool:
    """Whether the backward may return the saved gradients themselves instead of scaled copies:
    eager CPU only (the custom op's backward is traced by torch.compile), an upstream gradient of
    exactly 1 (``loss.backward()``), and a graph freed by this backward, so autograd may take them
    over (as ``.grad``, possibly through a view) while no later backward can read them again."""
    return (getattr(ctx, "eager", False) and grad_total.device.type == "cpu"
            and not torch._C._autograd._get_current_graph_task_keep_graph() and grad_total.item() == 1.0)


def _backward_dot(ctx, grad_total, *unused):
    if torch.is_grad_enabled():
        raise RuntimeError("depth_mixture_nll: double backward (create_graph=True) is not supported "
                           "with a mean/sum reduction: the head gradients are computed in the forward "
                           "pass")
    if grad_total is None:  # not materialised (set_materialize_grads(False)): no gradient reached total
        return (None,) * 15
    hidden, weight, bias, target, noise_std, coef, log_weights, loglik, d_hidden, d_weight, d_bias, d_noise = \
        ctx.saved_tensors
    unit = _passes_saved_grads(ctx, grad_total)

    def scaled(index, saved):
        if not ctx.needs_input_grad[index]:
            return None
        return saved if unit else grad_total * saved

    # the forward computed the head gradients it was asked for (grad_mask); needs_input_grad, from
    # the same requires_grad flags, asks for no other
    d_hidden, d_weight, d_bias, d_noise = (g if want else None
                                           for g, want in zip((d_hidden, d_weight, d_bias, d_noise), ctx.grad_mask))

    # d total / d loglik: coef (expected), -coef_n r[l, n] (mixture; r = softmax over depths)
    grad_loglik = coef if log_weights is None else mixture_grad(loglik, log_weights, coef)
    d_target = d_coef = d_log_weights = None
    if ctx.gaussian and ctx.needs_input_grad[3]:
        d_target = _gaussian_target_grad(grad_total * grad_loglik, hidden, weight, bias, target, noise_std)
    if log_weights is None:
        d_coef = scaled(5, loglik)
    elif ctx.needs_input_grad[6]:
        d_log_weights = grad_total * grad_loglik.sum(1)
    return (scaled(0, d_hidden), scaled(1, d_weight), scaled(2, d_bias), d_target, scaled(4, d_noise), d_coef,
            d_log_weights) + (None,) * 8


_loglik_dot_call = op_caller(_loglik_dot, _loglik_dot_impl, _setup_dot, _backward_dot)


def _check_head(hidden, weight, bias):
    """Checks ``hidden``, ``weight`` and ``bias`` agree; returns ``(L, N, D, C)``."""
    check_float_tensor("hidden", hidden, ndim=3)
    L, N, D = hidden.shape
    check_float_tensor("weight", weight, ndim=(2, 3))
    check_same_device("hidden", hidden, weight=weight)
    C = weight.shape[-2]
    check_shape("weight", weight, (C, D) if weight.dim() == 2 else (L, C, D))
    if bias is not None:
        check_float_tensor("bias", bias, ndim=(1, 2))
        check_same_device("hidden", hidden, bias=bias)
        check_shape("bias", bias, (C,) if bias.dim() == 1 else (L, C))
    return L, N, D, C


def _validate_heads(hidden, weight, bias, target, likelihood, noise_std, ignore_index):
    """Checks the head inputs; returns contiguous tensors and ``noise_std`` as a ``[C]`` tensor or None."""
    check_choice("likelihood", likelihood, LIKELIHOODS)
    gaussian = likelihood == "gaussian"
    L, N, D, C = _check_head(hidden, weight, bias)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if gaussian:
        check_float_tensor("target", target, ndim=2)
        check_same_device("hidden", hidden, target=target)
        check_shape("target", target, (N, C))
        noise_std = _normalise_noise_std(noise_std, hidden, C)
    else:
        check_tensor("target", target, ndim=1, dtypes=(torch.int64,))
        if target.device != hidden.device:
            raise ValueError(f"target: expected device {hidden.device} (as hidden), got {target.device}")
        check_shape("target", target, (N,))
        if noise_std is not None:
            raise ValueError("noise_std: only used with likelihood='gaussian', expected None")
    dtype = compute_dtype(hidden.device, hidden=hidden, weight=weight, bias=bias,
                          target=target if gaussian else None, noise_std=noise_std)
    cast = _caster(dtype)
    return cast(hidden), cast(weight), cast(bias), target.contiguous() if not gaussian else cast(target), \
        cast(noise_std), gaussian


def _caster(dtype):
    """Tensor -> contiguous ``dtype`` tensor (None stays None): the inputs of a computation in ``dtype``
    (docs/precision.md). Autograd casts each gradient back to its input's dtype."""
    return lambda t: None if t is None else t.to(dtype).contiguous()


def _loss_options(gaussian, label_smoothing, lse_square_scale, softcap, return_stats=False):
    """Checks the categorical loss options; returns them as the kernels take them
    ``(label_smoothing, lse_square_scale, softcap)``, softcap 0.0 meaning none."""
    if gaussian and (label_smoothing or lse_square_scale or softcap is not None or return_stats):
        raise ValueError("label_smoothing, lse_square_scale, softcap, return_stats: only used with "
                         "likelihood='categorical', expected their defaults (0.0, 0.0, None, False) with "
                         "likelihood='gaussian'")
    for name, value in (("label_smoothing", label_smoothing), ("lse_square_scale", lse_square_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing}")
    if not (math.isfinite(lse_square_scale) and lse_square_scale >= 0.0):
        raise ValueError(f"lse_square_scale: expected a finite float >= 0, got {lse_square_scale}")
    if softcap is None:
        return float(label_smoothing), float(lse_square_scale), 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected None or a positive float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"softcap: expected None or a positive finite float, got {softcap}")
    return float(label_smoothing), float(lse_square_scale), float(softcap)


def _depth_stats(loglik, hits, valid):
    """``DepthStats`` from the per-row log-likelihoods (``-loss`` term) and argmax hits ``[L, N]``."""
    count = valid.sum()
    keep = valid.to(torch.float32)
    with torch.no_grad():
        nll = -(loglik.detach().to(torch.float32) * keep).sum(1) / count
        accuracy = (hits.to(torch.float32) * keep).sum(1) / count
    return DepthStats(nll, accuracy, count)


def _check_targets(target, num_classes, ignore_index, gaussian, backend):
    """Class indices in range (eager calls; the C++ kernels bound-check targets themselves and
    raise the same IndexError)."""
    if gaussian or backend == "cpu" or not checks_values(target) or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        raise IndexError(f"target: expected class indices in [0, {num_classes}) or ignore_index="
                         f"{ignore_index}, got {int(target[bad][0])}")


def _choose(hidden, weight, target, gaussian, ignore_index, *kernel_names):
    """The backend of this call (chosen once: the backward runs the same one), after the target check."""
    backend = _backend.choose(hidden.device, *kernel_names)
    _check_targets(target, weight.shape[-2], ignore_index, gaussian, backend)
    return backend


def _normalise_noise_std(noise_std, hidden, C):
    """None -> unit noise; a positive number -> constant ``[C]`` tensor (no gradient); a 0-d or
    ``[C]`` tensor is kept on the autograd graph."""
    if noise_std is None:
        noise_std = 1.0
    if isinstance(noise_std, (int, float)) and not isinstance(noise_std, bool):
        if not (math.isfinite(noise_std) and noise_std > 0):
            raise ValueError(f"noise_std: expected a positive finite float, got {noise_std}")
        return torch.full((C,), float(noise_std), dtype=hidden.dtype, device=hidden.device)
    if not isinstance(noise_std, torch.Tensor):
        raise TypeError(f"noise_std: expected a positive float or a [C] tensor, got "
                        f"{type(noise_std).__name__}")
    check_float_tensor("noise_std", noise_std, ndim=(0, 1))
    check_same_device("hidden", hidden, noise_std=noise_std)
    if noise_std.dim() == 1:
        check_shape("noise_std", noise_std, (C,))
    if checks_values(noise_std) and not bool((noise_std > 0).all()):
        raise ValueError("noise_std: expected positive values, got a non-positive entry")
    return noise_std.expand(C).contiguous()


def depth_loglik(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                 likelihood: str = "categorical", noise_std=None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                 softcap: Optional[float] = None) -> Tensor:
    """Per-depth log-likelihoods ``log p(y_i | Omega_l(x_i))`` as a ``[L, N]`` tensor.

    ``hidden [L, N, D]``; ``weight [C, D]`` (shared head) or ``[L, C, D]`` (a head per depth);
    ``bias`` None, ``[C]`` or ``[L, C]``. Categorical: ``target`` int64 ``[N]`` class indices,
    rows equal to ``ignore_index`` give 0. Gaussian: ``target`` float ``[N, C]`` and ``noise_std``
    a positive float (default 1, no gradient) or a ``[C]`` / 0-d tensor (differentiable).
    Never materialises the ``[L, N, C]`` logits. Dtypes: docs/precision.md (16-bit inputs give
    float32 log-likelihoods).

    Categorical loss options (docs/heads.md, "Loss options"): ``softcap`` c > 0 turns the logits
    into ``c tanh(z / c)`` first; ``label_smoothing`` in [0, 1] and ``lse_square_scale`` (z-loss,
    ``+ zs lse^2``) as in ``F.cross_entropy`` / PaLM. The result is then minus each row's loss term.
    """
    hidden, weight, bias, target, noise_std, gaussian = _validate_heads(
        hidden, weight, bias, target, likelihood, noise_std, ignore_index)
    options = _loss_options(gaussian, label_smoothing, lse_square_scale, softcap)
    backend = _choose(hidden, weight, target, gaussian, ignore_index, *LOGLIK_KERNELS)
    with autocast_off(hidden.device):
        loglik, _ = _loglik(hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend, *options,
                            False)
    return loglik


def depth_mixture_nll(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                      log_weights: Tensor, *, mode: str = "expected", likelihood: str = "categorical",
                      noise_std=None, reduction: str = "mean", ignore_index: int = -100,
                      label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                      softcap: Optional[float] = None, return_stats: bool = False):
    """Negative log-likelihood of a depth mixture with weights ``w = exp(log_weights)``.

    ``mode="expected"``: ``-sum_l w_l log p(y_i | l)`` (the ELBO data term);
    ``mode="mixture"``: ``-log sum_l w_l p(y_i | l)`` (the predictive NLL).
    ``log_weights [L]`` may hold ``-inf`` (depth outside the support: weight 0). Reduction
    ``"mean"`` averages over non-ignored rows, ``"sum"`` sums, ``"none"`` returns ``[N]``
    (ignored rows contribute 0, as in ``F.cross_entropy``). Other arguments as ``depth_loglik``.

    With ``"mean"`` / ``"sum"``, when a head input requires grad: the head gradients are computed
    during the forward pass (one logits GEMM fewer, both modes); the backward only scales them.
    Double backward is not supported on any path.

    Categorical only: ``label_smoothing``, ``lse_square_scale`` and ``softcap`` as in
    ``depth_loglik`` (each depth's log-likelihood is minus its loss term). ``return_stats=True``
    returns ``(loss, DepthStats)``: per-depth mean loss and accuracy over non-ignored rows and
    their count, from the same pass (no logits), without gradient.
    """
    check_choice("mode", mode, MODES)
    check_choice("reduction", reduction, REDUCTIONS)
    hidden, weight, bias, target, noise_std, gaussian = _validate_heads(
        hidden, weight, bias, target, likelihood, noise_std, ignore_index)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats: expected a bool, got {type(return_stats).__name__}")
    options = _loss_options(gaussian, label_smoothing, lse_square_scale, softcap, return_stats)
    check_float_tensor("log_weights", log_weights, ndim=1)
    log_weights = _log_weights_in(log_weights, hidden)
    check_shape("log_weights", log_weights, (hidden.shape[0],))
    if mode == "mixture" and checks_values(log_weights) and not bool(torch.isfinite(log_weights).any()):
        raise ValueError("log_weights: mode='mixture' needs at least one finite log-weight, got all -inf")
    if reduction != "none" and _wants_head_grad(hidden, weight, bias, target, noise_std, gaussian):
        loss, loglik, aux = _nll_grad_in_forward(hidden, weight, bias, target, noise_std, gaussian, log_weights,
                                                  mode, reduction, ignore_index, options, return_stats)
        return (loss, _depth_stats(loglik, aux[1], target != ignore_index)) if return_stats else loss
    backend = _choose(hidden, weight, target, gaussian, ignore_index, *LOGLIK_KERNELS)
    with autocast_off(hidden.device):
        loglik, aux = _loglik(hidden, weight, bias, target, noise_std, gaussian, ignore_index, backend,
                              *options, return_stats)
    loss = _combine(loglik, log_weights, target, mode, likelihood, reduction, ignore_index)
    return (loss, _depth_stats(loglik, aux[1], target != ignore_index)) if return_stats else loss


def _combine(loglik, log_weights, target, mode, likelihood, reduction, ignore_index):
    """The NLL of the depth mixture from the per-depth log-likelihoods (eager, O(L·N))."""
    if mode == "expected":
        loss = -(torch.exp(log_weights) @ loglik)
    else:
        loss = -torch.logsumexp(log_weights[:, None] + loglik, dim=0)
    if likelihood == "categorical":
        valid = target != ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        count = valid.sum()
    else:
        count = loss.shape[0]
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / count


def _predict_impl(hidden, weight, bias, log_weights, gaussian, noise_std, backend):
    out1, out2 = _backend.kernel(backend, "depth_mixture_predict")(hidden, weight, bias, log_weights,
                                                                   gaussian, noise_std)
    return out1, out2


@torch.library.custom_op("udn_kernels::depth_mixture_predict", mutates_args=())
def _predict(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], log_weights: Tensor, gaussian: bool,
             noise_std: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return _predict_impl(hidden, weight, bias, log_weights, gaussian, noise_std, backend)


@_predict.register_fake
def _(hidden, weight, bias, log_weights, gaussian, noise_std, backend):
    N, C = hidden.shape[1], weight.shape[-2]
    return hidden.new_empty((N, C)), hidden.new_empty((N, C) if gaussian else (0,))


def _predict_setup_context(ctx, inputs, output):
    hidden, weight, bias, log_weights, gaussian, noise_std, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, log_weights, noise_std, output[0])
    ctx.gaussian = gaussian


def _predict_backward(ctx, grad1, grad2):
    """Recomputes each depth's logits (one ``[N, C]`` matrix alive at a time, never ``[L, N, C]``).

    Categorical ``P = sum_l w_l p_l``: ``dz_l = w_l p_l (g - <g, p_l>)``, ``dw_l = sum <g, p_l>``.
    Gaussian ``mean = sum_l w_l mu_l``, ``var = s^2 + sum_l w_l mu_l^2 - mean^2``: with
    ``g' = g_mean - 2 mean g_var``, ``dmu_l = w_l (g' + 2 g_var mu_l)``, ``dw_l = sum g' mu_l + g_var mu_l^2``,
    ``ds = 2 s sum_rows g_var``. Then the softmax backward from ``w`` to ``log_weights``. Only the
    gradients ``needs_input_grad`` asks for are computed (no ``dz @ W`` / ``dz^T H`` GEMM otherwise).
    """
    hidden, weight, bias, log_weights, noise_std, out1 = ctx.saved_tensors
    gaussian = ctx.gaussian
    needs = ctx.needs_input_grad
    want_hidden, want_weight, want_bias, want_lw = needs[0], needs[1], needs[2] and bias is not None, needs[3]
    w = torch.softmax(log_weights, dim=0)
    w_h = w.to(hidden.dtype)  # 16-bit inputs: the per-depth products in their dtype, as eager
    per_depth = weight.dim() == 3
    d_hidden = torch.empty_like(hidden) if want_hidden else None
    d_weight = (torch.empty_like(weight) if per_depth else torch.zeros_like(weight)) if want_weight else None
    d_bias = None
    if want_bias:
        d_bias = torch.empty_like(bias) if bias.dim() == 2 else torch.zeros_like(bias)
    d_w = []
    if gaussian:
        g_var = grad2
        g_mean = grad1 - 2.0 * out1 * g_var
    for depth in range(hidden.shape[0] if want_hidden or want_weight or want_bias or want_lw else 0):
        h = hidden[depth]
        wl = weight[depth] if per_depth else weight
        bl = None if bias is None else (bias[depth] if bias.dim() == 2 else bias)
        z = torch.nn.functional.linear(h, wl, bl)
        if gaussian:
            dz = w_h[depth] * (g_mean + 2.0 * g_var * z)
            d_w.append((g_mean * z + g_var * z * z).sum(dtype=w.dtype))
        else:
            p = torch.softmax(z, dim=-1)
            gp = (grad1 * p).sum(-1, keepdim=True)
            dz = w_h[depth] * p * (grad1 - gp)
            d_w.append(gp.sum(dtype=w.dtype))
        if want_hidden:
            d_hidden[depth] = dz @ wl
        if want_weight:
            if per_depth:
                d_weight[depth] = dz.t() @ h
            else:
                d_weight += dz.t() @ h
        if want_bias:
            if bias.dim() == 2:
                d_bias[depth] = dz.sum(0)
            else:
                d_bias += dz.sum(0)
    d_log_weights = None
    if want_lw:
        d_w = torch.stack(d_w)
        d_log_weights = w * (d_w - (w * d_w).sum())
    d_noise = None
    if gaussian and noise_std is not None and needs[5]:
        d_noise = 2.0 * noise_std * grad2.sum(0)
    return d_hidden, d_weight, d_bias, d_log_weights, None, d_noise, None


_predict_call = op_caller(_predict, _predict_impl, _predict_setup_context, _predict_backward)


def _wants_head_grad(hidden, weight, bias, target, noise_std, gaussian) -> bool:
    """Whether autograd will ask for a gradient of the head inputs (not only of ``log_weights``)."""
    inputs = (hidden, weight, bias, noise_std) + ((target,) if gaussian else ())
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)


def _nll_grad_in_forward(hidden, weight, bias, target, noise_std, gaussian, log_weights, mode,
                         reduction, ignore_index, options, stats):
    """NLL with mean/sum reduction whose head gradients come out of the forward pass, with
    ``scale_n`` = 1 or 1/count on kept rows, 0 on ignored ones. Expected mode:
    ``sum(coef * loglik)``, ``coef[l, n] = -exp(lw_l) * scale_n``, so ``log_weights`` gets its
    gradient through ``coef``; mixture mode: ``-sum_n scale_n logsumexp_l(lw_l + loglik[l, n])``,
    gradients formed in the kernel from all depths' log-likelihoods. Returns ``(loss, loglik, aux)``
    (the kernel's ``aux``: with ``stats``, logsumexp and argmax hits)."""
    N = hidden.shape[1]
    if gaussian:
        valid = torch.ones(N, dtype=torch.bool, device=hidden.device)
    else:
        valid = target != ignore_index
    scale = valid.to(log_weights.dtype)
    count = valid.sum()
    if reduction == "mean":
        scale = scale / count.clamp(min=1)
    if mode == "expected":
        coef, log_weights = -(torch.exp(log_weights)[:, None] * scale), None
    else:
        coef = scale
    fused_kernel = "depth_loglik_fwd_bwd" if mode == "expected" else "depth_loglik_mixture_fwd_bwd"
    backend = _choose(hidden, weight, target, gaussian, ignore_index, fused_kernel)
    # decided here, at forward: the gradients the backward will be asked for
    grad_mask = _grad_mask(hidden, weight, bias, noise_std, [x is not None and x.requires_grad
                                                             for x in (hidden, weight, bias, noise_std)])
    with autocast_off(hidden.device):
        outputs = _loglik_dot_call(hidden, weight, bias, target, noise_std, coef, log_weights, gaussian, ignore_index,
                                   grad_mask, backend, *options, stats)
        total = outputs[0]
    if reduction == "mean":  # no kept row: NaN like F.cross_entropy (and like the eager path)
        total = torch.where(count > 0, total, torch.full_like(total, math.nan))
    return total, outputs[1], outputs[6]


def depth_mixture_predict(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], log_weights: Tensor,
                          *, likelihood: str = "categorical", noise_std=None):
    """Posterior predictive over depths with weights ``softmax(log_weights)`` (normalised).

    Categorical: mixture probabilities ``[N, C]``; gaussian: ``(mean, var)``, each ``[N, C]``,
    the mixture's mean and variance (noise included). One fused kernel (custom op
    ``udn_kernels::depth_mixture_predict``) writes only the ``[N, C]`` outputs; the backward recomputes one depth's
    ``[N, C]`` logits at a time.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    gaussian = likelihood == "gaussian"
    L, N, D, C = _check_head(hidden, weight, bias)
    check_float_tensor("log_weights", log_weights, ndim=1)
    check_shape("log_weights", log_weights, (L,))
    if gaussian:
        noise_std = _normalise_noise_std(noise_std, hidden, C)
    elif noise_std is not None:
        raise ValueError("noise_std: only used with likelihood='gaussian', expected None")
    cast = _caster(compute_dtype(hidden.device, hidden=hidden, weight=weight, bias=bias, noise_std=noise_std))
    hidden, weight, bias, noise_std = cast(hidden), cast(weight), cast(bias), cast(noise_std)
    log_weights = _log_weights_in(log_weights, hidden)
    backend = _backend.choose(hidden.device, "depth_mixture_predict")
    with autocast_off(hidden.device):
        out1, out2 = _predict_call(hidden, weight, bias, log_weights, gaussian, noise_std, backend)
    return (out1, out2) if gaussian else out1


def _log_weights_in(log_weights, hidden):
    """``log_weights`` for heads computed in ``hidden.dtype`` (inputs already cast): float32 beside
    16-bit inputs; otherwise hidden's dtype (float32 beside float64 is a TypeError)."""
    check_same_device("hidden", hidden, log_weights=log_weights)
    compute_dtype(hidden.device, hidden=hidden, log_weights=log_weights)
    return log_weights.to(accumulate_dtype(hidden.dtype)).contiguous()
