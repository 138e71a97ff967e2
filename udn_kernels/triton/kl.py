"""Triton kernels of the fused KL terms (``gaussian_kl``, ``log_uniform_kl``; docs/internals.md signatures).

One elementwise pass each way, in float32 registers: the forward kernels write one partial sum per
block (summed by the launcher in float64, in block order: no atomics, so the value is
deterministic), the backward kernels the gradients scaled by the upstream gradient, which they read
from its 0-d tensor (no device sync). Softplus is ``stochastic_linear._softplus``, the formula of
the C++ kernels.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..reference import kl as reference_kl
from .stochastic_linear import _softplus

BLOCK = 1024
LAUNCH = {"num_warps": 4, "num_stages": 1}  # the launchers' and the AOT specs'
# Molchanov et al. 2017, eq. (14); constexpr, since compiled kernels read no other globals
# (and kept right of tensors in expressions: the interpreter cannot multiply a constexpr by a tensor).
K1, K2, K3 = (tl.constexpr(k) for k in (reference_kl.K1, reference_kl.K2, reference_kl.K3))


@triton.jit
def _gaussian_terms(mu_ptr, sig_ptr, prior_ptr, off, mask, HAS_MU: tl.constexpr, SOFTPLUS: tl.constexpr,
                    PRIOR_PER_ELEMENT: tl.constexpr):
    """``(raw sigma argument, sigma, sigmoid(rho) or 1, mu, sigma^2 + mu^2, prior std)`` at ``off``
    (float32; masked lanes read sigma = prior = 1, mu = 0)."""
    raw = tl.load(sig_ptr + off, mask=mask, other=1.0).to(tl.float32)
    if SOFTPLUS:
        sigma, slope = _softplus(raw)
    else:
        sigma, slope = raw, tl.full(raw.shape, 1.0, tl.float32)
    if HAS_MU:
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:
        mu = tl.zeros(raw.shape, tl.float32)
    if PRIOR_PER_ELEMENT:
        prior = tl.load(prior_ptr + off, mask=mask, other=1.0).to(tl.float32)
    else:
        prior = tl.load(prior_ptr).to(tl.float32)
    return raw, sigma, slope, mu, sigma * sigma + mu * mu, prior


@triton.jit
def _gaussian_kl_fwd_kernel(mu_ptr, sig_ptr, prior_ptr, partial_ptr, n, HAS_MU: tl.constexpr,
                            SOFTPLUS: tl.constexpr, PRIOR_PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr):
    """``partial[block] = sum 0.5 (s^2 + m^2) / p^2 + log(p / s) - 0.5`` over the block's elements."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    _, sigma, _, _, second_moment, prior = _gaussian_terms(mu_ptr, sig_ptr, prior_ptr, off, mask, HAS_MU,
                                                           SOFTPLUS, PRIOR_PER_ELEMENT)
    term = 0.5 * second_moment / (prior * prior) + tl.log(prior / sigma) - 0.5
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, term, 0.0), axis=0))


@triton.jit
def _gaussian_kl_bwd_kernel(grad_ptr, mu_ptr, sig_ptr, prior_ptr, dmu_ptr, dsig_ptr, dprior_ptr, n,
                            HAS_MU: tl.constexpr, SOFTPLUS: tl.constexpr, PRIOR_PER_ELEMENT: tl.constexpr,
                            WANT_MU: tl.constexpr, WANT_SIGMA: tl.constexpr, WANT_PRIOR: tl.constexpr,
                            BLOCK: tl.constexpr):
    """``d_mu = g mu / p^2``, ``d_sigma = g (s / p^2 - 1 / s)`` (times sigmoid(rho) with SOFTPLUS),
    ``d_p = g (1 / p - (s^2 + m^2) / p^3)``: per element, or one partial per block for a scalar prior."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    _, sigma, slope, mu, second_moment, prior = _gaussian_terms(mu_ptr, sig_ptr, prior_ptr, off, mask, HAS_MU,
                                                                SOFTPLUS, PRIOR_PER_ELEMENT)
    g = tl.load(grad_ptr).to(tl.float32)
    g_inv_var = g / (prior * prior)
    if WANT_MU:
        tl.store(dmu_ptr + off, (g_inv_var * mu).to(dmu_ptr.dtype.element_ty), mask=mask)
    if WANT_SIGMA:
        d_sigma = (g_inv_var * sigma - g / sigma) * slope
        tl.store(dsig_ptr + off, d_sigma.to(dsig_ptr.dtype.element_ty), mask=mask)
    if WANT_PRIOR:
        d_prior = (g - g_inv_var * second_moment) / prior
        if PRIOR_PER_ELEMENT:
            tl.store(dprior_ptr + off, d_prior.to(dprior_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dprior_ptr + tl.program_id(0), tl.sum(tl.where(mask, d_prior, 0.0), axis=0))


@triton.jit
def _log_uniform_terms(la_ptr, off, mask, low, high):
    """``(clamped log_alpha, inside the clamp, sigmoid(K2 + K3 la))`` at ``off`` (float32)."""
    raw = tl.load(la_ptr + off, mask=mask, other=0.0).to(tl.float32)
    la = tl.minimum(tl.maximum(raw, low), high)
    return la, (raw >= low) & (raw <= high), tl.sigmoid(la * K3 + K2)


@triton.jit
def _log_uniform_kl_fwd_kernel(la_ptr, partial_ptr, n, low, high, BLOCK: tl.constexpr):
    """``partial[block] = sum K1 - K1 sigmoid(K2 + K3 la) + 0.5 softplus(-la)``."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    la, _, s = _log_uniform_terms(la_ptr, off, mask, low, high)
    term = (1.0 - s) * K1 + 0.5 * _softplus(-la)[0]
    tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(mask, term, 0.0), axis=0))


@triton.jit
def _log_uniform_kl_bwd_kernel(grad_ptr, la_ptr, dla_ptr, n, low, high, BLOCK: tl.constexpr):
    """``d la = g (-K1 K3 s (1 - s) - 0.5 sigmoid(-la))``, 0 where the clamp cuts."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < n
    la, inside, s = _log_uniform_terms(la_ptr, off, mask, low, high)
    g = tl.load(grad_ptr).to(tl.float32)
    d = -g * (s * (1.0 - s) * K1 * K3 + 0.5 * _softplus(-la)[1])
    tl.store(dla_ptr + off, tl.where(inside, d, 0.0).to(dla_ptr.dtype.element_ty), mask=mask)


def _sum_partials(partial: Tensor, like: Tensor) -> Tensor:
    return partial.sum(dtype=torch.float64).to(like.dtype)


# The Triton backend's kernels (``KERNELS``), run by the ``udn_kernels::`` ops of ops/kl.py.
@triton_op("udn_kernels_triton::gaussian_kl_fwd", mutates_args=())
def gaussian_kl_fwd(mu: Optional[Tensor], sigma: Tensor, prior_std: Tensor, sigma_softplus: bool) -> Tensor:
    """Summed Gaussian KL (0-d); ``prior_std`` has one element or sigma's shape."""
    n = sigma.numel()
    partial = torch.zeros(triton.cdiv(n, BLOCK), dtype=torch.float32, device=sigma.device)
    if n:
        wrap_triton(_gaussian_kl_fwd_kernel)[(partial.numel(),)](
            sigma if mu is None else mu, sigma, prior_std, partial, n, HAS_MU=mu is not None,
            SOFTPLUS=sigma_softplus, PRIOR_PER_ELEMENT=prior_std.numel() > 1, BLOCK=BLOCK, **LAUNCH)
    return _sum_partials(partial, sigma)


@triton_op("udn_kernels_triton::gaussian_kl_bwd", mutates_args=())
def gaussian_kl_bwd(grad: Tensor, mu: Optional[Tensor], sigma: Tensor, prior_std: Tensor, sigma_softplus: bool,
                    grad_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_mu, d_sigma, d_prior_std)`` of ``grad * gaussian_kl_fwd``, empty where not wanted."""
    n, per_element = sigma.numel(), prior_std.numel() > 1
    want_mu, want_sigma, want_prior = bool(grad_mask[0]) and mu is not None, bool(grad_mask[1]), bool(grad_mask[2])
    # a fresh empty tensor per unwanted output: custom-op outputs must not alias each other
    d_mu = torch.empty_like(sigma) if want_mu else sigma.new_empty(0)
    d_sigma = torch.empty_like(sigma) if want_sigma else sigma.new_empty(0)
    blocks = triton.cdiv(n, BLOCK)
    d_prior = sigma.new_empty(0)
    if want_prior:
        d_prior = torch.empty_like(sigma) if per_element else torch.zeros(blocks, dtype=torch.float32,
                                                                         device=sigma.device)
    if n and (want_mu or want_sigma or want_prior):
        wrap_triton(_gaussian_kl_bwd_kernel)[(blocks,)](
            grad, sigma if mu is None else mu, sigma, prior_std, d_mu, d_sigma, d_prior, n, HAS_MU=mu is not None,
            SOFTPLUS=sigma_softplus, PRIOR_PER_ELEMENT=per_element, WANT_MU=want_mu, WANT_SIGMA=want_sigma,
            WANT_PRIOR=want_prior, BLOCK=BLOCK, **LAUNCH)
    if want_prior and not per_element:
        d_prior = _sum_partials(d_prior, sigma).reshape(prior_std.shape)
    return d_mu, d_sigma, d_prior


@triton_op("udn_kernels_triton::log_uniform_kl_fwd", mutates_args=())
def log_uniform_kl_fwd(log_alpha: Tensor, min: float, max: float) -> Tensor:  # noqa: A002 (the schema's names)
    """Summed log-uniform KL (0-d) of ``log_alpha.clamp(min, max)``."""
    n = log_alpha.numel()
    partial = torch.zeros(triton.cdiv(n, BLOCK), dtype=torch.float32, device=log_alpha.device)
    if n:
        wrap_triton(_log_uniform_kl_fwd_kernel)[(partial.numel(),)](log_alpha, partial, n, min, max, BLOCK=BLOCK,
                                                                      **LAUNCH)
    return _sum_partials(partial, log_alpha)


@triton_op("udn_kernels_triton::log_uniform_kl_bwd", mutates_args=())
def log_uniform_kl_bwd(grad: Tensor, log_alpha: Tensor, min: float, max: float) -> Tensor:  # noqa: A002
    """``d log_alpha`` of ``grad * log_uniform_kl_fwd``."""
    n = log_alpha.numel()
    d = torch.empty_like(log_alpha)
    if n:
        wrap_triton(_log_uniform_kl_bwd_kernel)[(triton.cdiv(n, BLOCK),)](grad, log_alpha, d, n, min, max,
                                                                          BLOCK=BLOCK, **LAUNCH)
    return d


KERNELS = {
    "gaussian_kl_fwd": gaussian_kl_fwd,
    "gaussian_kl_bwd": gaussian_kl_bwd,
    "log_uniform_kl_fwd": log_uniform_kl_fwd,
    "log_uniform_kl_bwd": log_uniform_kl_bwd,
}


# ------------------------------------------------------------------ AOT specs

def _ordered(fn, types: dict) -> dict:
    """``types`` in the kernel's parameter order (what ASTSource expects)."""
    return {name: types[name] for name in inspect.signature(fn.fn).parameters}


def _aot_specs():
    """Each kernel for float32, bf16, fp16 and float64 storage (the registers are float32 for all);
    the Gaussian ones for sigma and rho (``softplus``), scalar and per-element prior (labels
    ``<sigma|rho>[+prior]/<dtype>``, ``log_alpha/<dtype>``)."""
    specs = []
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        ptr = f"*{dtype}"
        for softplus in (False, True):
            for per_element in (False, True):
                config = f"{'rho' if softplus else 'sigma'}{'+prior' if per_element else ''}/{dtype}"
                flags = {"HAS_MU": True, "SOFTPLUS": softplus, "PRIOR_PER_ELEMENT": per_element, "BLOCK": BLOCK}
                sig = {"mu_ptr": ptr, "sig_ptr": ptr, "prior_ptr": ptr, "partial_ptr": "*fp32", "n": "i64",
                       **{k: "constexpr" for k in flags}}
                specs.append({"name": "gaussian_kl_fwd", "config": config, "dtype": dtype,
                              "fn": _gaussian_kl_fwd_kernel,
                              "signature": _ordered(_gaussian_kl_fwd_kernel, sig), "constexprs": flags, **LAUNCH})
                bwd_flags = {**flags, "WANT_MU": True, "WANT_SIGMA": True, "WANT_PRIOR": True}
                sig = {"grad_ptr": ptr, "mu_ptr": ptr, "sig_ptr": ptr, "prior_ptr": ptr, "dmu_ptr": ptr,
                       "dsig_ptr": ptr, "dprior_ptr": ptr if per_element else "*fp32", "n": "i64",
                       **{k: "constexpr" for k in bwd_flags}}
                specs.append({"name": "gaussian_kl_bwd", "config": config, "dtype": dtype,
                              "fn": _gaussian_kl_bwd_kernel,
                              "signature": _ordered(_gaussian_kl_bwd_kernel, sig), "constexprs": bwd_flags,
                              **LAUNCH})
        consts = {"BLOCK": BLOCK}
        scalars = {"n": "i64", "low": "fp32", "high": "fp32", "BLOCK": "constexpr"}
        specs.append({"name": "log_uniform_kl_fwd", "config": f"log_alpha/{dtype}", "dtype": dtype,
                      "fn": _log_uniform_kl_fwd_kernel,
                      "signature": _ordered(_log_uniform_kl_fwd_kernel, {"la_ptr": ptr, "partial_ptr": "*fp32",
                                                                         **scalars}),
                      "constexprs": consts, **LAUNCH})
        specs.append({"name": "log_uniform_kl_bwd", "config": f"log_alpha/{dtype}", "dtype": dtype,
                      "fn": _log_uniform_kl_bwd_kernel,
                      "signature": _ordered(_log_uniform_kl_bwd_kernel, {"grad_ptr": ptr, "la_ptr": ptr,
                                                                         "dla_ptr": ptr, **scalars}),
                      "constexprs": consts, **LAUNCH})
    return specs


AOT_SPECS = _aot_specs()
