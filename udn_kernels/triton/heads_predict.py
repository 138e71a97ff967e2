"""Triton ``depth_mixture_predict``: ``_predict_kernel``, grid (row blocks, class tiles), accumulates
the mixture over depths in registers; categorical heads wider than one class tile first run
``_lse_kernel`` for each depth's logsumexp. Their launcher, triton_op and AOT specs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .heads_common import (CONFIGS, _acc_dtype, _aot_spec, _common, aot_storages, _mean_tile, _online_lse,
                           _split_config, select_config)


@triton.jit
def _lse_kernel(h_ptr, w_ptr, b_ptr, lse_ptr, N, C, D, stride_wl, stride_bl,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (row blocks, depths): ``lse[depth, rows]`` of the logits, online over class tiles
    (pass 1 of the class-tiled ``depth_mixture_predict``)."""
    depth = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    h_blk = h_ptr + (depth * N + row0) * D
    w_ptr += depth * stride_wl
    b_ptr += depth * stride_bl
    run_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_N,), ACC)
    for c0 in range(0, C, BLOCK_C):
        mu = _mean_tile(h_blk, w_ptr, b_ptr + c0, rows_left, C - c0, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        w_ptr += BLOCK_C * D
        _, run_max, run_sum = _online_lse(mu, run_max, run_sum, C - c0, BLOCK_C)
    r = tl.arange(0, BLOCK_N)
    tl.store(lse_ptr + depth * N + row0 + r, run_max + tl.log(run_sum), mask=r < rows_left)


@triton.jit
def _predict_kernel(h_ptr, w_ptr, b_ptr, mix_ptr, lse_ptr, s_ptr, out1_ptr, out2_ptr,
                    L, N, C, D, stride_wl, stride_bl,
                    GAUSSIAN: tl.constexpr, ONE_TILE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_NOISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (row blocks, class tiles): ``out[rows, classes]`` accumulated over depths in registers,
    written once. Categorical: ``sum_l w_l exp(z_l - lse_l)`` with ``lse`` from ``_lse_kernel``, or
    (``ONE_TILE``: every class in this tile) the tile's own softmax, so one GEMM per depth.
    Gaussian: ``sum_l w_l mu_l`` and ``s^2 + sum_l w_l mu_l^2 - mean^2``. ``mix_ptr``: the mixture
    weights ``softmax(log_weights)``, NaN ones included (they poison the output, as the reference)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    cols_left = tl.minimum(C - c0, BLOCK_C).to(tl.int32)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    row_ok = r < rows_left
    col_ok = c < cols_left
    acc1 = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    acc2 = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    for depth in range(L):
        depth64 = tl.full((), depth, tl.int64)
        mu = _mean_tile(h_ptr + (depth64 * N + row0) * D, w_ptr + depth64 * stride_wl + c0 * D,
                        b_ptr + depth64 * stride_bl + c0, rows_left, cols_left, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        w_l = tl.load(mix_ptr + depth).to(ACC)
        if GAUSSIAN:
            acc1 += w_l * mu
            acc2 += w_l * mu * mu
        elif ONE_TILE:
            mu, run_max, run_sum = _online_lse(mu, tl.full((BLOCK_N,), float("-inf"), ACC),
                                               tl.zeros((BLOCK_N,), ACC), cols_left, BLOCK_C)
            acc1 += tl.exp(mu - run_max[:, None]) * (w_l / run_sum)[:, None]
        else:
            lse = tl.load(lse_ptr + depth64 * N + row0 + r, mask=row_ok, other=0.0)
            acc1 += w_l * tl.exp(mu - lse[:, None])
    base = row0 * C + c0  # 64-bit block base, int32 offsets inside the tile
    offs = r[:, None] * C + c[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(out1_ptr + base + offs, acc1.to(out1_ptr.dtype.element_ty), mask=mask)
    if GAUSSIAN:
        if HAS_NOISE:
            s = tl.load(s_ptr + c0 + c, mask=col_ok, other=1.0).to(ACC)
            var_noise = s * s
        else:
            var_noise = tl.full((BLOCK_C,), 1.0, ACC)
        tl.store(out2_ptr + base + offs, (var_noise[None, :] + acc2 - acc1 * acc1).to(out2_ptr.dtype.element_ty),
                 mask=mask)


def predict(hidden, weight, bias, log_weights, gaussian, noise_std, config=None, lse_config=None):
    """``depth_mixture_predict`` with explicit launch configs (default: the shipped selection).

    Categorical with more classes than one tile: ``_lse_kernel`` writes ``lse [L, N]`` (fp32),
    then ``_predict_kernel`` recomputes each tile once more (two logits GEMMs per depth, as the
    C++ two-pass path); with one class tile the predict kernel alone does it (one GEMM per depth).
    """
    (L, N, C, D, stride_wl, stride_bl), (b, _, s), flags = _common(hidden, weight, bias, None, noise_std,
                                                                  gaussian)
    del flags["GAUSSIAN"]
    has_noise = flags.pop("HAS_NOISE")  # flags now: HAS_BIAS, ACC, PRECISION
    acc = _acc_dtype(hidden.dtype)
    out1 = torch.empty((N, C), dtype=hidden.dtype, device=hidden.device)
    out2 = torch.empty((N, C) if gaussian else (0,), dtype=hidden.dtype, device=hidden.device)
    if out1.numel() == 0:
        return out1, out2
    mix = torch.softmax(log_weights.to(acc), dim=0)  # all -inf or a NaN entry: NaN, as the reference
    consts, launch = _split_config(config or select_config("predict", C, D, hidden.dtype))
    one_tile = C <= consts["BLOCK_C"]
    lse = mix  # stand-in, never read by the Gaussian or one-tile kernels
    if not gaussian and not one_tile:
        lse = torch.empty((L, N), dtype=acc, device=hidden.device)
        lse_consts, lse_launch = _split_config(lse_config or select_config("fwd", C, D, hidden.dtype))
        wrap_triton(_lse_kernel)[(triton.cdiv(N, lse_consts["BLOCK_N"]), L)](
            hidden, weight, b, lse, N, C, D, stride_wl, stride_bl, **flags, **lse_consts, **lse_launch)
    grid = (triton.cdiv(N, consts["BLOCK_N"]), triton.cdiv(C, consts["BLOCK_C"]))
    wrap_triton(_predict_kernel)[grid](
        hidden, weight, b, mix, lse, s, out1, out2 if gaussian else out1, L, N, C, D, stride_wl, stride_bl,
        GAUSSIAN=bool(gaussian), ONE_TILE=one_tile, HAS_NOISE=has_noise, **flags, **consts, **launch)
    return out1, out2


@triton_op("udn_kernels_triton::depth_mixture_predict", mutates_args=())
def depth_mixture_predict(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], log_weights: Tensor,
                          gaussian: bool, noise_std: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Triton ``depth_mixture_predict`` (docs/heads.md): ``(probs, empty)`` or ``(mean, var)``, [N, C]."""
    return predict(hidden, weight, bias, log_weights, gaussian, noise_std)


KERNELS = {"depth_mixture_predict": depth_mixture_predict}

# The logsumexp pass runs at the "fwd" configs.
AOT_SPECS = [_aot_spec(fn, kind, name, likelihood, storage)
             for kind, fn, likelihoods in (
                 ("fwd", _lse_kernel, ("categorical",)),
                 ("predict", _predict_kernel, ("categorical", "categorical-one-tile", "gaussian")))
             for name in CONFIGS[kind] for likelihood in likelihoods for storage in aot_storages(name)]
