"""Triton kernels of ``gaussian_linear`` and ``bernoulli_linear`` (docs/internals.md signatures).

Weight noise (Gaussian eps, dropout keep masks, symmetric signs) and flipout signs are generated
in registers from the Philox stream at the offsets of docs/rng.md, tile by tile inside the
``tl.dot`` K-loops, and never written to memory; the backward kernels regenerate them from
``(seed, offset)``. Three kernels serve all modes (a ``MODE`` constexpr picks the noise):

- ``_fwd_kernel``: ``out[s] = x[s] W_s^T`` (+ flipout / local / bias terms) over an (M=B, N) tile grid;
- ``_dx_kernel``: ``d_x[s] = grad[s] W_s`` (summed over draws when ``x`` is shared);
- ``_dw_kernel``: ``d_W = sum_s grad[s]^T x[s]``, weighted per draw by that draw's weight noise.

The local-reparameterisation estimator has only output noise: ``_fwd_kernel`` also writes the
output std ``[Sx, B, N]``, and the backward (``_formulas.local_reparam_grads``) regenerates
the output eps and finishes with plain matrix products, without recomputing the variance.

``sigma_softplus`` (the ``SOFTPLUS`` constexpr): the sigma arguments hold rho, softplus is applied
in registers wherever sigma is loaded, and ``_dw_kernel`` scales its final ``d_sigma`` tile by
``sigmoid(rho)``; local's torch backward and the bias's ``d_rho`` use F.softplus / torch.sigmoid.
"""
from __future__ import annotations

import inspect

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._formulas import local_reparam_grads
from .rng import philox_normal, randn

# MODE values (constexpr).
SAMPLE, FLIPOUT, LOCAL, BERN_INPUT, BERN_WEIGHT, SYMMETRIC = 0, 1, 2, 3, 4, 5
_GAUSSIAN_MODES = {"sample": SAMPLE, "flipout": FLIPOUT, "local": LOCAL}
_BERNOULLI_MODES = {"input": BERN_INPUT, "weight": BERN_WEIGHT, "symmetric": SYMMETRIC}


@triton.jit
def _sign(seed, elem):
    """+1 where the Philox word's top bit is set, else -1 (docs/rng.md sign)."""
    return tl.where((tl.randint(seed, elem) >> 31) != 0, 1.0, -1.0)


@triton.jit
def _keep(seed, elem, p, scale):
    """Dropout keep mask: ``scale`` where uniform >= p, else 0."""
    return tl.where(tl.rand(seed, elem) >= p, scale, 0.0)


@triton.jit
def _softplus(r):
    """``(softplus(r), sigmoid(r))`` in float32 without overflow, the formula of the C++ kernels:
    ``softplus(r) = max(r, 0) + log1p(t)``, ``t = exp(-|r|)``, with ``log1p(t) = 2 atanh(s)``,
    ``s = t / (2 + t) <= 1/3``, as its odd series to s^13 (truncation < 2e-8 relative)."""
    t = tl.exp(-tl.abs(r))
    s = t / (2.0 + t)
    s2 = s * s
    series = 1.0 + s2 * (1.0 / 3 + s2 * (1.0 / 5 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11 + s2 / 13)))))
    return tl.maximum(r, 0.0) + 2.0 * s * series, tl.where(r >= 0, 1.0, t) / (1.0 + t)


@triton.jit
def _load_sigma(sig_ptr, off, mask, SOFTPLUS: tl.constexpr):
    """Standard deviations at ``off`` (float32): the stored values, or ``softplus`` of the stored
    ``rho``. Masked lanes read rho = 0, i.e. sigma = log 2; they only meet zeros of ``x`` / ``grad``
    or masked-out outputs."""
    sig = tl.load(sig_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if SOFTPLUS:
        sig = _softplus(sig)[0]
    return sig


@triton.jit
def _weight_tile(w_ptr, sig_ptr, seed, p, scale, s, rn, rk, N, K, MODE: tl.constexpr, HAS_W: tl.constexpr,
                 SOFTPLUS: tl.constexpr):
    """The noisy weight tile ``W_s[rn, rk]`` (float32, shape of ``rn[:, None] + rk[None, :]``) for
    modes whose weight noise enters the product directly: sample, weight, symmetric."""
    mask = (rn < N) & (rk < K)
    off = rn * K + rk
    elem = s * N * K + off
    if MODE == 0:
        w = _load_sigma(sig_ptr, off, mask, SOFTPLUS) * randn(seed, elem)
        if HAS_W:
            w += tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.load(w_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if MODE == 4:
            w = w * _keep(seed, elem, p, scale)
        else:
            w = w * _sign(seed, elem)
    return w


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, sig_ptr, bmu_ptr, bsig_ptr, out_ptr, std_ptr,
                B, N, K, x_draw_stride, seed, p, scale, bias_base, sign_in_base, sign_out_base,
                MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_BMU: tl.constexpr, HAS_BSIG: tl.constexpr,
                SOFTPLUS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Grid (B tiles, N tiles, S). ``out[s, b, n]``; local also writes ``std[sx, b, n]`` (one
    writer per input draw ``sx``: draw 0 when ``x`` is shared)."""
    s = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rn = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
    rk0 = tl.arange(0, BK).to(tl.int64)
    x_base = x_ptr + s * x_draw_stride
    dot_ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)  # flipout noise term / local variance
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        x_mask = (rm[:, None] < B) & (rk[None, :] < K)
        x = tl.load(x_base + rm[:, None] * K + rk[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if MODE == 1 or MODE == 2 or MODE == 3:
            t_mask = (rn[None, :] < N) & (rk[:, None] < K)
            t_off = rn[None, :] * K + rk[:, None]
            if MODE == 3:  # input dropout: mask x, deterministic weight
                xe = s * B * K + rm[:, None] * K + rk[None, :]
                x = x * _keep(seed, xe, p, scale)
                w = tl.load(w_ptr + t_off, mask=t_mask, other=0.0)
                acc += tl.dot(x.to(dot_ty), w.to(dot_ty), input_precision=PRECISION)
            else:
                if HAS_W:
                    w = tl.load(w_ptr + t_off, mask=t_mask, other=0.0)
                    acc += tl.dot(x.to(dot_ty), w.to(dot_ty), input_precision=PRECISION)
                sig = _load_sigma(sig_ptr, t_off, t_mask, SOFTPLUS)
                if MODE == 1:
                    xe = sign_in_base + s * B * K + rm[:, None] * K + rk[None, :]
                    eps = randn(seed, s * N * K + t_off)
                    acc2 += tl.dot((x * _sign(seed, xe)).to(dot_ty), (sig * eps).to(dot_ty), input_precision=PRECISION)
                else:
                    acc2 += tl.dot((x * x).to(dot_ty), (sig * sig).to(dot_ty), input_precision=PRECISION)
        else:
            w = _weight_tile(w_ptr, sig_ptr, seed, p, scale, s, rn[None, :], rk[:, None], N, K, MODE, HAS_W,
                             SOFTPLUS)
            acc += tl.dot(x.to(dot_ty), w.to(dot_ty), input_precision=PRECISION)

    n_mask = rn < N
    out_mask = (rm[:, None] < B) & n_mask[None, :]
    out_elem = s * B * N + rm[:, None] * N + rn[None, :]
    if MODE == 1:
        acc += acc2 * _sign(seed, sign_out_base + out_elem)
    if MODE == 2:
        var = acc2
        if HAS_BSIG:
            bsig = _load_sigma(bsig_ptr, rn, n_mask, SOFTPLUS)
            var += (bsig * bsig)[None, :]
        positive = var > 0
        std = tl.where(positive, tl.sqrt(tl.where(positive, var, 1.0)), 0.0)
        acc += std * randn(seed, out_elem)
        if (x_draw_stride != 0) | (s == 0):
            tl.store(std_ptr + out_elem, std.to(std_ptr.dtype.element_ty), mask=out_mask)
    if HAS_BMU:
        acc += tl.load(bmu_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BSIG and (MODE == 0 or MODE == 1):
        bsig = _load_sigma(bsig_ptr, rn, n_mask, SOFTPLUS)
        acc += (bsig * randn(seed, bias_base + s * N + rn))[None, :]
    tl.store(out_ptr + out_elem, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dx_kernel(g_ptr, w_ptr, sig_ptr, dx_ptr, S, B, N, K, seed, p, scale, sign_in_base, sign_out_base,
               MODE: tl.constexpr, HAS_W: tl.constexpr, X_SAMPLED: tl.constexpr, SOFTPLUS: tl.constexpr,
               PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Grid (B tiles, K tiles, Sx). ``d_x[sx, b, k] = sum_{s in draws of sx} (grad[s] W_s)[b, k]``."""
    sx = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    rn0 = tl.arange(0, BN).to(tl.int64)
    dot_ty = g_ptr.dtype.element_ty
    mk_mask = (rm[:, None] < B) & (rk[None, :] < K)
    x_elem = rm[:, None] * K + rk[None, :]
    if X_SAMPLED:
        s_end = sx + 1
    else:
        s_end = S
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for draw in range(sx, s_end):
        s = tl.cast(draw, tl.int64)  # the interpreter hands loop indices over as (int32) Python ints
        # Flipout's noise term and input dropout need a per-draw factor on d_x after the N-sum.
        per_draw = tl.zeros((BM, BK), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + rn0
            g_elem = s * B * N + rm[:, None] * N + rn[None, :]
            g = tl.load(g_ptr + g_elem, mask=(rm[:, None] < B) & (rn[None, :] < N), other=0.0)
            if MODE == 1 or MODE == 3:
                t_mask = (rn[:, None] < N) & (rk[None, :] < K)
                t_off = rn[:, None] * K + rk[None, :]
                if MODE == 3:
                    w = tl.load(w_ptr + t_off, mask=t_mask, other=0.0)
                    per_draw += tl.dot(g, w.to(dot_ty), input_precision=PRECISION)
                else:
                    if HAS_W:
                        w = tl.load(w_ptr + t_off, mask=t_mask, other=0.0)
                        acc += tl.dot(g, w.to(dot_ty), input_precision=PRECISION)
                    sig = _load_sigma(sig_ptr, t_off, t_mask, SOFTPLUS)
                    w_noise = sig * randn(seed, s * N * K + t_off)
                    g_flip = g.to(tl.float32) * _sign(seed, sign_out_base + g_elem)
                    per_draw += tl.dot(g_flip.to(dot_ty), w_noise.to(dot_ty), input_precision=PRECISION)
            else:
                w = _weight_tile(w_ptr, sig_ptr, seed, p, scale, s, rn[:, None], rk[None, :], N, K, MODE, HAS_W,
                                 SOFTPLUS)
                acc += tl.dot(g, w.to(dot_ty), input_precision=PRECISION)
        if MODE == 1:
            acc += per_draw * _sign(seed, sign_in_base + s * B * K + x_elem)
        if MODE == 3:
            acc += per_draw * _keep(seed, s * B * K + x_elem, p, scale)
    tl.store(dx_ptr + sx * B * K + x_elem, acc.to(dx_ptr.dtype.element_ty), mask=mk_mask)


@triton.jit
def _dw_kernel(g_ptr, x_ptr, sig_ptr, dw_ptr, dsig_ptr, S, B, N, K, x_draw_stride, seed, p, scale,
               sign_in_base, sign_out_base, MODE: tl.constexpr, NEED_DW: tl.constexpr, NEED_DSIG: tl.constexpr,
               SOFTPLUS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr):
    """Grid (N tiles, K tiles). ``G_s = grad[s]^T x[s]``; ``d_W = sum_s G_s * m_s`` for Bernoulli
    masks ``m_s`` (1 for input dropout, whose mask is applied to ``x``), and for Gaussian weights
    ``d_mu = sum_s G_s`` (``NEED_DW``), ``d_sigma = sum_s G_s * eps_s`` (``NEED_DSIG``; flipout: the
    sign-flipped product); with ``SOFTPLUS`` (``sig_ptr`` holds rho) ``d_rho = d_sigma * sigmoid(rho)``,
    applied once to the final tile. A gradient not needed costs neither its products nor its noise."""
    rn = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rk = tl.program_id(1).to(tl.int64) * BK + tl.arange(0, BK)
    rb0 = tl.arange(0, BM).to(tl.int64)
    dot_ty = g_ptr.dtype.element_ty
    nk_mask = (rn[:, None] < N) & (rk[None, :] < K)
    w_off = rn[:, None] * K + rk[None, :]
    acc = tl.zeros((BN, BK), dtype=tl.float32)
    acc_sig = tl.zeros((BN, BK), dtype=tl.float32)
    for draw in range(0, S):
        s = tl.cast(draw, tl.int64)  # an int32 index would wrap in s * N * K once S * N * K > 2^31
        per_draw = tl.zeros((BN, BK), dtype=tl.float32)  # the part weighted by this draw's noise
        x_base = x_ptr + s * x_draw_stride
        for b0 in range(0, B, BM):
            rb = b0 + rb0
            g_elem = s * B * N + rb[None, :] * N + rn[:, None]  # [BN, BM]: grad[s]^T tile
            g_t = tl.load(g_ptr + g_elem, mask=(rn[:, None] < N) & (rb[None, :] < B), other=0.0)
            x_elem = rb[:, None] * K + rk[None, :]
            x = tl.load(x_base + x_elem, mask=(rb[:, None] < B) & (rk[None, :] < K), other=0.0)
            if MODE == 1:
                if NEED_DW:
                    acc += tl.dot(g_t, x.to(dot_ty), input_precision=PRECISION)
                if NEED_DSIG:
                    g_flip = g_t.to(tl.float32) * _sign(seed, sign_out_base + g_elem)
                    x_flip = x.to(tl.float32) * _sign(seed, sign_in_base + s * B * K + x_elem)
                    per_draw += tl.dot(g_flip.to(dot_ty), x_flip.to(dot_ty), input_precision=PRECISION)
            elif MODE == 3:
                x_kept = x.to(tl.float32) * _keep(seed, s * B * K + x_elem, p, scale)
                acc += tl.dot(g_t, x_kept.to(dot_ty), input_precision=PRECISION)
            else:
                per_draw += tl.dot(g_t, x.to(dot_ty), input_precision=PRECISION)
        elem = s * N * K + w_off
        if MODE == 0 or MODE == 1:
            if MODE == 0:
                acc += per_draw
            if NEED_DSIG:
                acc_sig += per_draw * randn(seed, elem)
        elif MODE == 4:
            acc += per_draw * _keep(seed, elem, p, scale)
        elif MODE == 5:
            acc += per_draw * _sign(seed, elem)
    if NEED_DW:
        tl.store(dw_ptr + w_off, acc.to(dw_ptr.dtype.element_ty), mask=nk_mask)
    if NEED_DSIG:
        if SOFTPLUS:
            acc_sig *= _softplus(tl.load(sig_ptr + w_off, mask=nk_mask, other=0.0).to(tl.float32))[1]
        tl.store(dsig_ptr + w_off, acc_sig.to(dsig_ptr.dtype.element_ty), mask=nk_mask)


# ------------------------------------------------------------------ launchers

# Tile caps, warps and stages per kernel. Every noise element costs a Philox call in registers, so
# tiles are small per thread; chosen so every AOT_SPECS build has zero ptxas spill stores
# on sm_80 and sm_90 (`python -m udn_kernels.triton.aot`). Single-stage kernels and BK=16 dx: two
# stages spilled flipout fp32 fwd and tf32 dw on sm_90; 8-warp / BK=32 dx spilled bf16 or fp32.
CONFIGS = {
    "fwd": {"BM": 64, "BN": 64, "BK": 16, "num_warps": 8, "num_stages": 1},
    "dx": {"BM": 64, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1},
    "dw": {"BM": 16, "BN": 32, "BK": 64, "num_warps": 8, "num_stages": 1},
}


def _tiles(kernel: str, B: int, N: int, K: int) -> dict:
    """Launch constexprs of ``kernel``: its CONFIGS tiles, shrunk (to >= 16, tl.dot's minimum) for small problems."""
    cfg = CONFIGS[kernel]

    def fit(size, cap):
        return max(16, min(cap, triton.next_power_of_2(size)))
    return {"BM": fit(B, cfg["BM"]), "BN": fit(N, cfg["BN"]), "BK": fit(K, cfg["BK"]),
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _precision(x: torch.Tensor) -> str:
    """tl.dot input precision: float32 products use TF32 only where torch's matmuls would."""
    return "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bases(S, B, N, K):
    """Stream offsets of the bias eps, flipout input signs and output signs (docs/rng.md)."""
    bias = S * N * K
    sign_in = bias + S * N
    return bias, sign_in, sign_in + S * B * K


def _forward(x, w, sig, bmu, bsig, seed, mode, S, p=0.0, softplus=False):
    """``(out [S, B, N], std)``: std is local's ``[Sx, B, N]`` output std, empty for other modes;
    with ``softplus`` ``sig`` / ``bsig`` hold rho."""
    Sx, B, K = x.shape
    N = (sig if sig is not None else w).shape[0]
    tiles = _tiles("fwd", B, N, K)
    out = torch.empty(S, B, N, device=x.device, dtype=x.dtype)
    std = x.new_empty((Sx, B, N) if mode == LOCAL else (0,))
    bias_base, sign_in_base, sign_out_base = _bases(S, B, N, K)
    dummy = x
    grid = (triton.cdiv(B, tiles["BM"]), triton.cdiv(N, tiles["BN"]), S)
    wrap_triton(_fwd_kernel)[grid](x, dummy if w is None else w, dummy if sig is None else sig,
                      dummy if bmu is None else bmu, dummy if bsig is None else bsig, out,
                      std if mode == LOCAL else out,
                      B, N, K, 0 if Sx == 1 else B * K, seed, p, 1.0 / (1.0 - p) if p < 1 else 0.0,
                      bias_base, sign_in_base, sign_out_base,
                      MODE=mode, HAS_W=w is not None, HAS_BMU=bmu is not None, HAS_BSIG=bsig is not None,
                      SOFTPLUS=softplus, PRECISION=_precision(x), **tiles)
    return out, std


def _grad_x(grad, x, w, sig, seed, mode, S, x_sampled, p=0.0, softplus=False):
    Sx, B, K = x.shape
    N = grad.shape[2]
    tiles = _tiles("dx", B, N, K)
    dx = torch.empty_like(x)
    _, sign_in_base, sign_out_base = _bases(S, B, N, K)
    grid = (triton.cdiv(B, tiles["BM"]), triton.cdiv(K, tiles["BK"]), Sx)
    wrap_triton(_dx_kernel)[grid](grad, grad if w is None else w, grad if sig is None else sig, dx, S, B, N, K, seed, p,
                     1.0 / (1.0 - p), sign_in_base, sign_out_base, MODE=mode, HAS_W=w is not None,
                     X_SAMPLED=x_sampled, SOFTPLUS=softplus, PRECISION=_precision(x), **tiles)
    return dx


def _grad_w(grad, x, like_w, seed, mode, S, need_dw, need_dsig, p=0.0, softplus=False):
    """``(d_W, d_sigma)``, each empty when not needed (no launch when neither is); ``like_w`` is the
    weight (Bernoulli) or weight_sigma / rho (Gaussian), read by the kernel only for softplus's
    ``d_rho = d_sigma * sigmoid(rho)``."""
    dw = torch.empty_like(like_w) if need_dw else like_w.new_empty(0)
    dsig = torch.empty_like(like_w) if need_dsig else like_w.new_empty(0)
    if not (need_dw or need_dsig):
        return dw, dsig
    Sx, B, K = x.shape
    N = grad.shape[2]
    tiles = _tiles("dw", B, N, K)
    _, sign_in_base, sign_out_base = _bases(S, B, N, K)
    grid = (triton.cdiv(N, tiles["BN"]), triton.cdiv(K, tiles["BK"]))
    wrap_triton(_dw_kernel)[grid](grad, x, like_w, dw if need_dw else like_w, dsig if need_dsig else like_w, S, B, N,
                     K, 0 if Sx == 1 else B * K, seed, p, 1.0 / (1.0 - p), sign_in_base, sign_out_base,
                     MODE=mode, NEED_DW=need_dw, NEED_DSIG=need_dsig, SOFTPLUS=softplus, PRECISION=_precision(x),
                     **tiles)
    return dw, dsig


def _empty(like):
    return like.new_empty(0)


# The Triton backend's kernels (``KERNELS``), run by the ``udn_kernels::`` ops. triton_ops so that
# a graph of these calls shows the Triton kernels themselves (torch.compile, make_fx).
@triton_op("udn_kernels_triton::gaussian_linear_fwd", mutates_args=())
def gaussian_linear_fwd(x: Tensor, weight_mu: Optional[Tensor], weight_sigma: Tensor, bias_mu: Optional[Tensor],
                        bias_sigma: Optional[Tensor], seed: int, estimator: str, samples: int,
                        x_sampled: bool, sigma_softplus: bool = False) -> tuple[Tensor, Tensor]:
    """``(out [S, B, N], std)``: outputs of S Gaussian weight draws, noise drawn inside the kernel,
    and local's output std ``[Sx, B, N]`` for the backward (empty for sample / flipout). With
    ``sigma_softplus`` the sigma arguments hold rho and the kernels apply softplus as they load them."""
    return _forward(x, weight_mu, weight_sigma, bias_mu, bias_sigma, seed, _GAUSSIAN_MODES[estimator], samples,
                    softplus=sigma_softplus)


@triton_op("udn_kernels_triton::gaussian_linear_bwd", mutates_args=())
def gaussian_linear_bwd(grad_out: Tensor, x: Tensor, weight_mu: Optional[Tensor], weight_sigma: Tensor,
                        bias_mu: Optional[Tensor], bias_sigma: Optional[Tensor], std: Tensor, seed: int,
                        estimator: str, samples: int, x_sampled: bool, sigma_softplus: bool,
                        grad_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(d_x, d_weight_mu, d_weight_sigma, d_bias_mu, d_bias_sigma)``, empty for None and where
    ``grad_mask`` (a bool per input, same order) is False: their kernels are not launched; noise
    regenerated, local's variance taken from the forward's ``std``. With ``sigma_softplus`` the sigma
    arguments hold rho and their gradients are ``d_rho = d_sigma * sigmoid(rho)``."""
    S, mode = samples, _GAUSSIAN_MODES[estimator]
    N = weight_sigma.shape[0]
    grad = grad_out.contiguous()
    want_x, want_mu, want_sig, want_bmu, want_bsig = (
        want and t is not None for want, t in zip(grad_mask, (x, weight_mu, weight_sigma, bias_mu, bias_sigma)))
    if mode == LOCAL:  # output noise only: the products are noise-free
        eps = philox_normal(grad.numel(), seed, 0, grad.device).view(grad.shape)
        if not sigma_softplus:
            return local_reparam_grads(grad, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, eps, x_sampled,
                                       grad_mask)
        # torch code on sigma: softplus and its derivative are weight-sized elementwise passes here
        d_x, d_mu, d_sig, d_bmu, d_bsig = local_reparam_grads(
            grad, x, weight_mu, F.softplus(weight_sigma), bias_mu, _softplus_or_none(bias_sigma), std, eps, x_sampled,
            grad_mask)
        d_bsig = d_bsig * torch.sigmoid(bias_sigma) if want_bsig else d_bsig
        return d_x, d_mu, d_sig * torch.sigmoid(weight_sigma) if want_sig else d_sig, d_bmu, d_bsig
    d_bmu = grad.sum((0, 1)).to(bias_mu.dtype) if want_bmu else _empty(x)
    dx = _grad_x(grad, x, weight_mu, weight_sigma, seed, mode, S, x_sampled, softplus=sigma_softplus) if want_x \
        else _empty(x)
    d_mu, d_sig = _grad_w(grad, x, weight_sigma, seed, mode, S, need_dw=want_mu, need_dsig=want_sig,
                          softplus=sigma_softplus)
    if want_bsig:
        beps = philox_normal(S * N, seed, S * N * weight_sigma.shape[1], grad.device).view(S, N)
        d_bsig = (grad.float().sum(1) * beps).sum(0)
        d_bsig = (d_bsig * torch.sigmoid(bias_sigma.float()) if sigma_softplus else d_bsig).to(bias_sigma.dtype)
    else:
        d_bsig = _empty(x)
    return dx, d_mu, d_sig, d_bmu, d_bsig


def _softplus_or_none(rho):
    return None if rho is None else F.softplus(rho)


@triton_op("udn_kernels_triton::bernoulli_linear_fwd", mutates_args=())
def bernoulli_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: int, mask: str,
                         samples: int, x_sampled: bool) -> Tensor:
    """``[S, B, N]`` outputs of S Bernoulli draws (mask "input", "weight" or "symmetric")."""
    return _forward(x, weight, None, bias, None, seed, _BERNOULLI_MODES[mask], samples, p=p)[0]


@triton_op("udn_kernels_triton::bernoulli_linear_bwd", mutates_args=())
def bernoulli_linear_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: float, seed: int,
                         mask: str, samples: int, x_sampled: bool,
                         grad_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_x, d_weight, d_bias)``, empty for a None bias and where ``grad_mask`` (a bool per input,
    same order) is False: their kernels are not launched; masks regenerated from (seed, offset)."""
    mode = _BERNOULLI_MODES[mask]
    grad = grad_out.contiguous()
    dx = _grad_x(grad, x, weight, None, seed, mode, samples, x_sampled, p=p) if grad_mask[0] else _empty(x)
    dw, _ = _grad_w(grad, x, weight, seed, mode, samples, need_dw=grad_mask[1], need_dsig=False, p=p)
    d_bias = grad.sum((0, 1)).to(bias.dtype) if bias is not None and grad_mask[2] else _empty(x)
    return dx, dw, d_bias


KERNELS = {
    "gaussian_linear_fwd": gaussian_linear_fwd,
    "gaussian_linear_bwd": gaussian_linear_bwd,
    "bernoulli_linear_fwd": bernoulli_linear_fwd,
    "bernoulli_linear_bwd": bernoulli_linear_bwd,
}


# ------------------------------------------------------------------ AOT specs

def _ordered(fn, types: dict) -> dict:
    """``types`` in the kernel's parameter order (what ASTSource expects)."""
    return {name: types[name] for name in inspect.signature(fn.fn).parameters}


def _aot_specs():
    """Every (kernel, mode) at the CONFIGS tiles the launchers use for large shapes, float32 (also
    with TF32), bf16 and fp16 (float64 is refused on CUDA: ops/_stochastic.py);
    the Gaussian modes also with sigma_softplus (labels ``<mode>+softplus/<dtype>``)."""
    scalars = {"seed": "i64", "p": "fp32", "scale": "fp32", "sign_in_base": "i64", "sign_out_base": "i64"}
    def tiles(kernel):
        return {k: CONFIGS[kernel][k] for k in ("BM", "BN", "BK")}

    def launch(kernel):
        return {k: CONFIGS[kernel][k] for k in ("num_warps", "num_stages")}
    specs = []
    mode_names = {SAMPLE: "sample", FLIPOUT: "flipout", LOCAL: "local", BERN_INPUT: "input",
                  BERN_WEIGHT: "weight", SYMMETRIC: "symmetric"}
    for dtype, precision, tag in (("fp32", "ieee", "fp32"), ("fp32", "tf32", "fp32-tf32"), ("bf16", "ieee", "bf16"),
                                  ("fp16", "ieee", "fp16")):
        ptr = f"*{dtype}"
        for mode, mode_name in mode_names.items():
            family = "gaussian" if mode <= LOCAL else "bernoulli"
            for softplus in (False, True) if family == "gaussian" else (False,):
                config = f"{mode_name}{'+softplus' if softplus else ''}/{tag}"
                sig = {"x_ptr": ptr, "w_ptr": ptr, "sig_ptr": ptr, "bmu_ptr": ptr, "bsig_ptr": ptr,
                       "out_ptr": ptr, "std_ptr": ptr, "B": "i32", "N": "i32", "K": "i32",
                       "x_draw_stride": "i64", "bias_base": "i64", **scalars}
                consts = {"MODE": mode, "HAS_W": True, "HAS_BMU": True, "HAS_BSIG": family == "gaussian",
                          "SOFTPLUS": softplus, "PRECISION": precision, **tiles("fwd")}
                sig.update({name: "constexpr" for name in consts})
                specs.append({"name": f"{family}_linear_fwd", "config": config, "dtype": dtype, "fn": _fwd_kernel,
                              "signature": _ordered(_fwd_kernel, sig), "constexprs": consts,
                              **launch("fwd")})
                if mode == LOCAL:
                    continue
                sig = {"g_ptr": ptr, "w_ptr": ptr, "sig_ptr": ptr, "dx_ptr": ptr, "S": "i32", "B": "i32",
                       "N": "i32", "K": "i32", **scalars}
                consts = {"MODE": mode, "HAS_W": True, "X_SAMPLED": False, "SOFTPLUS": softplus,
                          "PRECISION": precision, **tiles("dx")}
                sig.update({name: "constexpr" for name in consts})
                specs.append({"name": f"{family}_linear_bwd_dx", "config": config, "dtype": dtype, "fn": _dx_kernel,
                              "signature": _ordered(_dx_kernel, sig), "constexprs": consts,
                              **launch("dx")})
                sig = {"g_ptr": ptr, "x_ptr": ptr, "sig_ptr": ptr, "dw_ptr": ptr, "dsig_ptr": ptr, "S": "i32",
                       "B": "i32", "N": "i32", "K": "i32", "x_draw_stride": "i64", **scalars}
                consts = {"MODE": mode, "NEED_DW": True, "NEED_DSIG": family == "gaussian", "SOFTPLUS": softplus,
                          "PRECISION": precision, **tiles("dw")}
                sig.update({name: "constexpr" for name in consts})
                specs.append({"name": f"{family}_linear_bwd_dw", "config": config, "dtype": dtype, "fn": _dw_kernel,
                              "signature": _ordered(_dw_kernel, sig), "constexprs": consts,
                              **launch("dw")})
    return specs


AOT_SPECS = _aot_specs()
