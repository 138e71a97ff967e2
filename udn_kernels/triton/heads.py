"""Triton kernels for the fused depth heads: ``depth_loglik_fwd`` / ``depth_loglik_bwd``.

The ``[L, N, C]`` logits never exist in memory. Every kernel walks class tiles, recomputes a
``[BLOCK_N, BLOCK_C]`` logits tile with ``tl.dot`` (K-loop over D) and reduces it in registers:

- ``_fwd_kernel``, grid (row blocks, depths): online logsumexp + target logit (categorical) or
  the Gaussian log-density sum.
- ``_bwd_rows_kernel``, grid (row blocks, depths, D chunks): the ``d_hidden`` tile accumulates in
  registers over class tiles; per-row-block column sums feed ``d_bias`` / ``d_noise_std``.
- ``_bwd_weight_kernel``, grid (class tiles, D chunks, splits x head depths): the ``d_weight``
  tile accumulates in registers over its share of the (depth, row block) work items.

No atomics: every output element has one owner program, so gradients are bitwise reproducible
(docs/triton.md explains the choice). Index arithmetic that can pass 2^31 is done in int64.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops.heads import loglik_dot_kernel, register_triton_autograd
from ..reference import heads as _reference

_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))

# Shipped launch configurations (A100 / H100), chosen so that none spills on sm_80 / sm_90
# (python -m udn_kernels.triton.aot). 16-bit inputs: the forward uses "narrow" for few classes
# (C <= 32: UDN classifiers, regression outputs) and "wide" for vocabulary-sized heads; in the
# backward BLOCK_DO is the width of the d_hidden / d_weight register accumulator, so "narrow"
# serves D <= 128 and "wide" D <= 256 (a wider D costs one logits recomputation per extra
# BLOCK_DO chunk). float32 / float64 inputs use "fp32": exact-fp32 tl.dot runs on FMA units with
# operands in registers, so its tiles are smaller.
CONFIGS = {
    "fwd": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, num_warps=4, num_stages=3),
        "wide": dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=3),
    },
    "bwd_rows": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        "wide": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=2),
    },
    "bwd_weight": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        "wide": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=2),
    },
    # depth_mixture_predict: (row block, class tile) programs accumulating over depths; its
    # logsumexp pass (_lse_kernel, C > BLOCK_C only) uses the "fwd" configs.
    "predict": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, num_warps=4, num_stages=3),
        "wide": dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
        # 4 warps spilled (two fp32 [64, 64] accumulators + the FMA dot operands): 8 warps
        "fp32": dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
    },
    # _fused_rows_kernel (gradient in the forward): elementwise over a materialised logits chunk,
    # no tl.dot, so one config per class count whatever the dtype: "narrow" for C <= 32, "wide"
    # (a few rows, long class tiles) for vocabulary-sized heads.
    "fused_rows": {
        "narrow": dict(BLOCK_N=32, BLOCK_C=32, num_warps=4, num_stages=1),
        "wide": dict(BLOCK_N=8, BLOCK_C=256, num_warps=8, num_stages=1),
    },
}
# Default memory budget of the fused path: logits elements of one materialised chunk (fp32: 256 MiB).
MAX_CHUNK_LOGITS = 2**26
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


# ----------------------------------------------------------------------------------------------
# Device helpers. Addressing: a 64-bit scalar base pointer per block (depth, first row, first
# class), plus int32 offsets inside the tile. This keeps >2^31-element tensors safe without
# carrying a 64-bit pointer per tile element in registers (which made every kernel spill).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mean_tile(h_blk, w_blk, b_blk, rows_left, cols_left, D, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr):
    """``hidden_block @ head_block^T + bias``: a [BLOCK_N, BLOCK_C] tile of logits / means.

    ``h_blk`` -> hidden[depth, row0, 0], ``w_blk`` -> head[c0, 0], ``b_blk`` -> bias[depth, c0].
    """
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    row_ok = r < rows_left
    col_ok = c < cols_left
    acc = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_blk + r[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_blk + c[None, :] * D + ds[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_blk + c, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _row_inputs(g_blk, t_blk, lse_blk, rows_left, ignore_index, GAUSSIAN: tl.constexpr,
                BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Upstream gradient (0 on ignored / padding rows), target class (int32) and logsumexp of a
    row block; the ``*_blk`` pointers address its first row."""
    r = tl.arange(0, BLOCK_N)
    row_ok = r < rows_left
    g = tl.load(g_blk + r, mask=row_ok, other=0.0).to(ACC)
    if GAUSSIAN:
        tgt = r  # unused: gaussian targets are [N, C] tiles, loaded per class tile
        lse = g
    else:
        tgt = tl.load(t_blk + r, mask=row_ok, other=ignore_index)
        g = tl.where(tgt == ignore_index, 0.0, g)
        tgt = tgt.to(tl.int32)  # valid classes are < C; ignored rows no longer matter
        lse = tl.load(lse_blk + r, mask=row_ok, other=0.0).to(ACC)
    return g, tgt, lse


@triton.jit
def _gaussian_residual(mu, y_blk, s_blk, rows_left, cols_left, C, HAS_NOISE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """``valid`` tile mask, standardised residual ``z = (y - mu) / s`` and ``1 / s`` of a tile;
    ``y_blk`` -> target[row0, c0], ``s_blk`` -> noise_std[c0] (s = 1 without noise)."""
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    valid = (r < rows_left)[:, None] & (c < cols_left)[None, :]
    y = tl.load(y_blk + r[:, None] * C + c[None, :], mask=valid, other=0.0).to(ACC)
    if HAS_NOISE:
        inv_s = 1.0 / tl.load(s_blk + c, mask=c < cols_left, other=1.0).to(ACC)
    else:
        inv_s = tl.full((BLOCK_C,), 1.0, ACC)
    return valid, (y - mu) * inv_s[None, :], inv_s


@triton.jit
def _grad_tile(mu, g, tgt, lse, y_blk, s_blk, rows_left, c0, cols_left, C,
               GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """d loglik / d logits and (gaussian) d loglik / d noise_std per element, zero off the valid
    tile. ``y_blk`` -> target[row0, c0] (gaussian), ``s_blk`` -> noise_std[c0]."""
    if GAUSSIAN:
        valid, z, inv_s = _gaussian_residual(mu, y_blk, s_blk, rows_left, cols_left, C, HAS_NOISE,
                                             BLOCK_N, BLOCK_C, ACC)
        d_mu = tl.where(valid, g[:, None] * z * inv_s[None, :], 0.0)
        d_s = tl.where(valid, g[:, None] * (z * z - 1.0) * inv_s[None, :], 0.0)
    else:
        r = tl.arange(0, BLOCK_N)
        c = tl.arange(0, BLOCK_C)
        valid = (r < rows_left)[:, None] & (c < cols_left)[None, :]
        p = tl.exp(mu - lse[:, None])
        onehot = tl.where((c0 + c)[None, :] == tgt[:, None], 1.0, 0.0)
        d_mu = tl.where(valid, g[:, None] * (onehot - p), 0.0)
        d_s = d_mu
    return d_mu, d_s


@triton.jit
def _online_lse(mu, run_max, run_sum, cols_left, BLOCK_C: tl.constexpr):
    """One class tile of an online logsumexp per row: padding columns become -inf; returns the
    masked tile and the updated running max and rescaled running sum. A NaN logit makes the sum
    NaN; an all -inf row gives exp(-inf - -inf) = NaN, as torch.softmax / logsumexp do."""
    mu = tl.where((tl.arange(0, BLOCK_C) < cols_left)[None, :], mu, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(mu, axis=1))
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(mu - new_max[:, None]), axis=1)
    return mu, new_max, run_sum


@triton.jit
def _row_stats_init(t_blk, rows_left, ignore_index, GAUSSIAN: tl.constexpr, BLOCK_N: tl.constexpr,
                    ACC: tl.constexpr):
    """Zeroed loglik statistics of a row block (see ``_loglik_tile``), its target classes (int32)
    and ignored-row mask; ``t_blk`` -> target[row0] (categorical)."""
    r = tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_N,), ACC)
    if GAUSSIAN:
        tgt = r  # unused: gaussian targets are [N, C] tiles, loaded per class tile
        ignored = r < 0
    else:
        tgt = tl.load(t_blk + r, mask=r < rows_left, other=ignore_index)
        ignored = tgt == ignore_index
        tgt = tgt.to(tl.int32)  # valid classes are < C; ignored rows no longer matter
    return total, tl.full((BLOCK_N,), float("-inf"), ACC), total, total, tgt, ignored


@triton.jit
def _loglik_tile(mu, total, run_max, run_sum, tgt_logit, tgt, y_blk, s_blk, rows_left, c0, C,
                 GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Adds the class tile ``mu`` (columns ``c0 + [0, BLOCK_C)``) to a row block's loglik
    statistics: Gaussian ``total``, or categorical online logsumexp (``run_max``, ``run_sum``) and
    target logit; the statistics of the other likelihood pass through unused."""
    if GAUSSIAN:
        valid, z, inv_s = _gaussian_residual(mu, y_blk, s_blk, rows_left, C - c0, C, HAS_NOISE,
                                             BLOCK_N, BLOCK_C, ACC)
        total += tl.sum(tl.where(valid, -0.5 * z * z + tl.log(inv_s)[None, :] - _HALF_LOG_2PI, 0.0), axis=1)
    else:
        mu, run_max, run_sum = _online_lse(mu, run_max, run_sum, C - c0, BLOCK_C)
        tgt_logit += tl.sum(tl.where((c0 + tl.arange(0, BLOCK_C))[None, :] == tgt[:, None], mu, 0.0), axis=1)
    return total, run_max, run_sum, tgt_logit


@triton.jit
def _store_loglik(total, run_max, run_sum, tgt_logit, ignored, out_blk, lse_blk, row_ok,
                  GAUSSIAN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes a row block's loglik (0 on ignored rows) and, categorical, its logsumexp, which it
    returns (``total`` for Gaussian, unused)."""
    r = tl.arange(0, BLOCK_N)
    if GAUSSIAN:
        loglik = total
        lse = total
    else:
        lse = run_max + tl.log(run_sum)
        loglik = tl.where(ignored, 0.0, tgt_logit - lse)
        tl.store(lse_blk + r, lse.to(lse_blk.dtype.element_ty), mask=row_ok)
    tl.store(out_blk + r, loglik.to(out_blk.dtype.element_ty), mask=row_ok)
    return lse


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, s_ptr, out_ptr, lse_ptr,
                N, C, D, stride_wl, stride_bl, ignore_index,
                GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                ACC: tl.constexpr, PRECISION: tl.constexpr):
    depth = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    r = tl.arange(0, BLOCK_N)
    row_ok = r < rows_left
    h_blk = h_ptr + (depth * N + row0) * D
    w_ptr += depth * stride_wl
    b_ptr += depth * stride_bl
    total, run_max, run_sum, tgt_logit, tgt, ignored = _row_stats_init(t_ptr + row0, rows_left, ignore_index,
                                                                        GAUSSIAN, BLOCK_N, ACC)
    for c0 in range(0, C, BLOCK_C):
        mu = _mean_tile(h_blk, w_ptr, b_ptr + c0, rows_left, C - c0, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        w_ptr += BLOCK_C * D  # pointer arithmetic is 64-bit: no int32 c0 * D overflow
        total, run_max, run_sum, tgt_logit = _loglik_tile(mu, total, run_max, run_sum, tgt_logit, tgt,
                                                          t_ptr + row0 * C + c0, s_ptr + c0, rows_left, c0, C,
                                                          GAUSSIAN, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
    _store_loglik(total, run_max, run_sum, tgt_logit, ignored, out_ptr + depth * N + row0,
                  lse_ptr + depth * N + row0, row_ok, GAUSSIAN, BLOCK_N)


@triton.jit
def _bwd_rows_kernel(g_ptr, h_ptr, w_ptr, b_ptr, t_ptr, s_ptr, lse_ptr, dh_ptr, col_ptr,
                     N, C, D, stride_wl, stride_bl, ignore_index,
                     GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """d_hidden[depth, row block, D chunk] and, from the first D chunk, per-row-block column sums
    of d_logits (-> d_bias) and d_noise_std into ``col_ptr`` laid out [2, L, n_row_blocks, C]."""
    pid_n = tl.program_id(0)
    depth = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    h_blk = h_ptr + (depth * N + row0) * D
    w_ptr += depth * stride_wl
    b_ptr += depth * stride_bl
    g, tgt, lse = _row_inputs(g_ptr + depth * N + row0, t_ptr + row0, lse_ptr + depth * N + row0,
                              rows_left, ignore_index, GAUSSIAN, BLOCK_N, ACC)
    col_blk = col_ptr + (depth * tl.num_programs(0) + pid_n) * C
    noise_offset = tl.num_programs(1).to(tl.int64) * tl.num_programs(0) * C
    is_first_chunk = (tl.zeros((BLOCK_C,), tl.int32) + pid_d) == 0  # column sums come from chunk 0
    acc = tl.zeros((BLOCK_N, BLOCK_DO), ACC)
    for c0 in range(0, C, BLOCK_C):
        mu = _mean_tile(h_blk, w_ptr, b_ptr + c0, rows_left, C - c0, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        d_mu, d_s = _grad_tile(mu, g, tgt, lse, t_ptr + row0 * C + c0, s_ptr + c0, rows_left, c0,
                               C - c0, C, GAUSSIAN, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
        col_ok = c < C - c0
        w = tl.load(w_ptr + c[:, None] * D + dout[None, :], mask=col_ok[:, None] & dout_ok[None, :],
                    other=0.0)
        acc = tl.dot(d_mu.to(w.dtype), w, acc, input_precision=PRECISION)
        w_ptr += BLOCK_C * D
        if HAS_BIAS:
            tl.store(col_blk + c0 + c, tl.sum(d_mu, axis=0), mask=col_ok & is_first_chunk)
        if GAUSSIAN and HAS_NOISE:
            tl.store(col_blk + noise_offset + c0 + c, tl.sum(d_s, axis=0), mask=col_ok & is_first_chunk)
    tl.store(dh_ptr + (depth * N + row0) * D + r[:, None] * D + dout[None, :],
             acc.to(dh_ptr.dtype.element_ty), mask=(r < rows_left)[:, None] & dout_ok[None, :])


@triton.jit
def _bwd_weight_kernel(g_ptr, h_ptr, w_ptr, b_ptr, t_ptr, s_ptr, lse_ptr, dw_ptr,
                       N, C, D, stride_wl, stride_bl, ignore_index,
                       n_heads, depths_per_head, items_per_split,
                       GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DO: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Partial d_weight[head, class tile, D chunk] over work items [split * items_per_split, ...)
    of that head; a work item is one (depth, row block). ``dw_ptr`` is laid out
    [splits, n_heads, C, D] and program axis 2 enumerates (split, head)."""
    c0 = tl.program_id(0) * BLOCK_C
    c = tl.arange(0, BLOCK_C)
    col_ok = c < C - c0
    r = tl.arange(0, BLOCK_N)
    dout = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    dout_ok = dout < D
    pid_z = tl.program_id(2)
    head = pid_z % n_heads
    w_blk = w_ptr + head.to(tl.int64) * stride_wl + c0.to(tl.int64) * D
    n_blocks = tl.cdiv(N, BLOCK_N)
    start = (pid_z // n_heads) * items_per_split
    stop = tl.minimum(start + items_per_split, depths_per_head * n_blocks)
    acc = tl.zeros((BLOCK_C, BLOCK_DO), ACC)
    for item in range(start, stop):
        depth = (head + item // n_blocks).to(tl.int64)
        row0 = (item % n_blocks).to(tl.int64) * BLOCK_N
        rows_left = tl.minimum(N - row0, BLOCK_N).to(tl.int32)
        h_blk = h_ptr + (depth * N + row0) * D
        g, tgt, lse = _row_inputs(g_ptr + depth * N + row0, t_ptr + row0, lse_ptr + depth * N + row0,
                                  rows_left, ignore_index, GAUSSIAN, BLOCK_N, ACC)
        mu = _mean_tile(h_blk, w_blk, b_ptr + depth * stride_bl + c0, rows_left, C - c0, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        d_mu, d_s = _grad_tile(mu, g, tgt, lse, t_ptr + row0 * C + c0, s_ptr + c0, rows_left, c0,
                               C - c0, C, GAUSSIAN, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
        h = tl.load(h_blk + r[:, None] * D + dout[None, :],
                    mask=(r < rows_left)[:, None] & dout_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(d_mu.to(h.dtype)), h, acc, input_precision=PRECISION)
    tl.store(dw_ptr + (pid_z.to(tl.int64) * C + c0) * D + c[:, None] * D + dout[None, :],
             acc, mask=col_ok[:, None] & dout_ok[None, :])


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


@triton.jit
def _chunk_tile(z_blk, b_blk, rows_left, cols_left, C, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """A [BLOCK_N, BLOCK_C] tile of a materialised logits chunk plus the bias (the chunk's GEMM
    leaves it out, so one chunk may span depths with their own bias rows); ``z_blk`` -> the
    tile's first element (row stride C), ``b_blk`` -> bias[depth, c0]."""
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    mask = (r < rows_left)[:, None] & (c < cols_left)[None, :]
    mu = tl.load(z_blk + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        mu += tl.load(b_blk + c, mask=c < cols_left, other=0.0).to(ACC)[None, :]
    return mu


@triton.jit
def _write_grad_tile(mu, g, tgt, lse, gz_blk, y_blk, s_blk, col_blk, noise_offset, rows_left, c0,
                     cols_left, C, GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_NOISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    """``g * d loglik / d logits`` of one tile into ``gz_blk`` (the chunk's gradient buffer, same
    layout as the logits) and the tile's column sums (-> d_bias, d_noise_std) into ``col_blk``."""
    d_mu, d_s = _grad_tile(mu, g, tgt, lse, y_blk, s_blk, rows_left, c0, cols_left, C,
                           GAUSSIAN, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_C)
    col_ok = c < cols_left
    tl.store(gz_blk + r[:, None] * C + c[None, :], d_mu.to(gz_blk.dtype.element_ty),
             mask=(r < rows_left)[:, None] & col_ok[None, :])
    if HAS_BIAS:
        tl.store(col_blk + c, tl.sum(d_mu, axis=0), mask=col_ok)
    if GAUSSIAN and HAS_NOISE:
        tl.store(col_blk + noise_offset + c, tl.sum(d_s, axis=0), mask=col_ok)


@triton.jit
def _fused_rows_kernel(z_ptr, gz_ptr, b_ptr, t_ptr, s_ptr, g_ptr, out_ptr, lse_ptr, col_ptr,
                       N, C, k, l0, n0, stride_bl, ignore_index,
                       GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr,
                       FORWARD: tl.constexpr, GRADIENT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Grid (row blocks of the chunk, chunk depths), on a materialised chunk of logits
    ``z [Lc, k, C]`` (no bias) of depths ``l0 + [0, Lc)`` and samples ``n0 + [0, k)``.

    ``FORWARD``: writes loglik and (categorical) logsumexp of the rows, at ``depth * N + n`` of
    ``out_ptr`` / ``lse_ptr``. ``GRADIENT``: writes ``g * d loglik / d logits`` (``g`` from
    ``g_ptr [L, N]``, 0 on ignored rows) into ``gz_ptr`` (``z_ptr`` itself for fp32 / fp64: in
    place) and per-row-block column sums into ``col_ptr [2, Lc, n_row_blocks, C]``; without
    ``FORWARD`` it reads the logsumexp back. Categorical takes two passes over a row (logsumexp,
    then the gradient), Gaussian one."""
    pid_n = tl.program_id(0)
    dl = tl.program_id(1).to(tl.int64)
    depth = l0 + dl
    r0 = pid_n.to(tl.int64) * BLOCK_N
    rows_left = tl.minimum(k - r0, BLOCK_N).to(tl.int32)
    row0 = n0 + r0  # first sample of the block
    r = tl.arange(0, BLOCK_N)
    row_ok = r < rows_left
    z_blk = z_ptr + (dl * k + r0) * C
    gz_blk = gz_ptr + (dl * k + r0) * C
    b_ptr += depth * stride_bl
    ll_off = depth * N + row0
    col_blk = col_ptr + (dl * tl.num_programs(0) + pid_n) * C
    noise_offset = tl.num_programs(1).to(tl.int64) * tl.num_programs(0) * C
    total, run_max, run_sum, tgt_logit, tgt, ignored = _row_stats_init(t_ptr + row0, rows_left, ignore_index,
                                                                        GAUSSIAN, BLOCK_N, ACC)
    if FORWARD or GAUSSIAN:
        lse = total  # set by the forward pass; unused by Gaussian
    else:
        lse = tl.load(lse_ptr + ll_off + r, mask=row_ok, other=0.0).to(ACC)
    if GRADIENT:
        g = tl.where(ignored, 0.0, tl.load(g_ptr + ll_off + r, mask=row_ok, other=0.0).to(ACC))
    else:
        g = tl.zeros((BLOCK_N,), ACC)
    if FORWARD:
        for c0 in range(0, C, BLOCK_C):
            mu = _chunk_tile(z_blk + c0, b_ptr + c0, rows_left, C - c0, C, HAS_BIAS, BLOCK_N, BLOCK_C, ACC)
            total, run_max, run_sum, tgt_logit = _loglik_tile(mu, total, run_max, run_sum, tgt_logit, tgt,
                                                              t_ptr + row0 * C + c0, s_ptr + c0, rows_left, c0,
                                                              C, GAUSSIAN, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
            if GAUSSIAN and GRADIENT:  # one pass: the Gaussian gradient needs no row statistic
                _write_grad_tile(mu, g, tgt, lse, gz_blk + c0, t_ptr + row0 * C + c0, s_ptr + c0,
                                 col_blk + c0, noise_offset, rows_left, c0, C - c0, C, GAUSSIAN,
                                 HAS_BIAS, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
        lse = _store_loglik(total, run_max, run_sum, tgt_logit, ignored, out_ptr + ll_off, lse_ptr + ll_off,
                            row_ok, GAUSSIAN, BLOCK_N)
    if GRADIENT and not (GAUSSIAN and FORWARD):
        for c0 in range(0, C, BLOCK_C):
            mu = _chunk_tile(z_blk + c0, b_ptr + c0, rows_left, C - c0, C, HAS_BIAS, BLOCK_N, BLOCK_C, ACC)
            _write_grad_tile(mu, g, tgt, lse, gz_blk + c0, t_ptr + row0 * C + c0, s_ptr + c0,
                             col_blk + c0, noise_offset, rows_left, c0, C - c0, C, GAUSSIAN,
                             HAS_BIAS, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)


# ----------------------------------------------------------------------------------------------
# Launchers (signatures of docs/internals.md)
# ----------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's TF32 switch (off by default), so fp32 results match torch.matmul's.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def select_config(kind: str, num_classes: int, dim: int, dtype: torch.dtype) -> dict:
    """The shipped config of kernel family ``kind`` ("fwd" | "bwd_rows" | "bwd_weight" | "predict"
    | "fused_rows") for a head with ``num_classes`` classes, hidden size ``dim`` and input ``dtype``."""
    if kind == "fused_rows":
        return CONFIGS[kind]["wide" if num_classes > 32 else "narrow"]
    if dtype in (torch.float32, torch.float64):
        return CONFIGS[kind]["fp32"]
    wide = num_classes > 32 if kind in ("fwd", "predict") else dim > 128
    return CONFIGS[kind]["wide" if wide else "narrow"]


def _split_config(config: dict) -> tuple[dict, dict]:
    constexprs = {k: v for k, v in config.items() if k not in _LAUNCH_OPTIONS}
    return constexprs, {k: config[k] for k in _LAUNCH_OPTIONS if k in config}


def _common(hidden, weight, bias, target, noise_std, gaussian):
    """Shared scalar arguments and pointer stand-ins (absent tensors become ``weight``, never read)."""
    L, N, D = hidden.shape
    C = weight.shape[-2]
    stride_wl = C * D if weight.dim() == 3 else 0
    stride_bl = C if bias is not None and bias.dim() == 2 else 0
    flags = dict(GAUSSIAN=bool(gaussian), HAS_BIAS=bias is not None, HAS_NOISE=noise_std is not None,
                 ACC=tl.float64 if hidden.dtype == torch.float64 else tl.float32,
                 PRECISION=_precision(hidden.dtype))
    ptrs = (weight if bias is None else bias, target, weight if noise_std is None else noise_std)
    return (L, N, C, D, stride_wl, stride_bl), ptrs, flags


def forward(hidden, weight, bias, target, noise_std, gaussian, ignore_index, config=None):
    """``depth_loglik_fwd`` with an explicit launch ``config`` (default: the shipped selection)."""
    (L, N, C, D, stride_wl, stride_bl), (b, t, s), flags = _common(hidden, weight, bias, target,
                                                                   noise_std, gaussian)
    acc = _acc_dtype(hidden.dtype)
    loglik = torch.empty((L, N), dtype=hidden.dtype, device=hidden.device)
    aux = torch.empty((0,) if gaussian else (L, N), dtype=acc, device=hidden.device)
    if loglik.numel() == 0:
        return loglik, aux
    consts, launch = _split_config(config or select_config("fwd", C, D, hidden.dtype))
    grid = (triton.cdiv(N, consts["BLOCK_N"]), L)
    wrap_triton(_fwd_kernel)[grid](hidden, weight, b, t, s, loglik, loglik if gaussian else aux,
                      N, C, D, stride_wl, stride_bl, ignore_index, **flags, **consts, **launch)
    return loglik, aux


def _weight_splits(work_items: int, programs: int, device: torch.device) -> int:
    """How many programs share one d_weight tile's work items: enough to fill the GPU, deterministic."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: still exercise the split path at tiny shapes
    return max(1, min(work_items, triton.cdiv(target, programs)))


def _weight_grad(grad_loglik, hidden, weight, b, t, s, lse, sizes, ignore_index, flags, config):
    """d_weight from ``_bwd_weight_kernel``: fp32 (fp64) partials per split, summed, cast."""
    L, N, C, D, stride_wl, stride_bl = sizes
    if D == 0:
        return torch.zeros_like(weight)
    consts, launch = _split_config(config)
    n_heads = L if weight.dim() == 3 else 1
    depths_per_head = L // n_heads
    work_items = depths_per_head * triton.cdiv(N, consts["BLOCK_N"])
    grid_cd = (triton.cdiv(C, consts["BLOCK_C"]), triton.cdiv(D, consts["BLOCK_DO"]))
    splits = _weight_splits(work_items, grid_cd[0] * grid_cd[1] * n_heads, hidden.device)
    items_per_split = triton.cdiv(work_items, splits)
    splits = triton.cdiv(work_items, items_per_split)
    partial = torch.empty((splits, n_heads, C, D), dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    wrap_triton(_bwd_weight_kernel)[grid_cd + (splits * n_heads,)](
        grad_loglik, hidden, weight, b, t, s, lse, partial, N, C, D, stride_wl, stride_bl, ignore_index,
        n_heads, depths_per_head, items_per_split, **flags, **consts, **launch)
    return (partial[0] if splits == 1 else partial.sum(0)).reshape(weight.shape).to(weight.dtype)


def backward(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian, ignore_index,
             rows_config=None, weight_config=None):
    """``depth_loglik_bwd`` with explicit launch configs (default: the shipped selection)."""
    sizes, (b, t, s), flags = _common(hidden, weight, bias, target, noise_std, gaussian)
    L, N, C, D, stride_wl, stride_bl = sizes
    acc = _acc_dtype(hidden.dtype)
    device = hidden.device
    lse = grad_loglik if gaussian else aux
    # A fresh empty tensor per absent gradient: custom-op outputs may not alias each other.
    empty = lambda: torch.empty(0, dtype=hidden.dtype, device=device)  # noqa: E731
    need_noise = gaussian and noise_std is not None
    if L == 0 or N == 0:
        zeros = lambda x: empty() if x is None else torch.zeros_like(x)  # noqa: E731
        return torch.zeros_like(hidden), torch.zeros_like(weight), zeros(bias), zeros(noise_std)

    consts, launch = _split_config(rows_config or select_config("bwd_rows", C, D, hidden.dtype))
    n_blocks = triton.cdiv(N, consts["BLOCK_N"])
    d_hidden = torch.empty_like(hidden)
    col_sums = torch.empty((2, L, n_blocks, C) if bias is not None or need_noise else (0,),
                           dtype=acc, device=device)
    grid = (n_blocks, L, max(1, triton.cdiv(D, consts["BLOCK_DO"])))  # D = 0 still needs column sums
    wrap_triton(_bwd_rows_kernel)[grid](grad_loglik, hidden, weight, b, t, s, lse, d_hidden, col_sums,
                           N, C, D, stride_wl, stride_bl, ignore_index, **flags, **consts, **launch)

    d_weight = _weight_grad(grad_loglik, hidden, weight, b, t, s, lse, sizes, ignore_index, flags,
                            weight_config or select_config("bwd_weight", C, D, hidden.dtype))
    d_bias = empty()
    if bias is not None:
        per_depth = col_sums[0].sum(1)
        d_bias = (per_depth if bias.dim() == 2 else per_depth.sum(0)).to(bias.dtype)
    d_noise = col_sums[1].sum((0, 1)).to(noise_std.dtype) if need_noise else empty()
    return d_hidden, d_weight, d_bias, d_noise


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


def _matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` (mm or bmm) with a ``dtype`` result. 16-bit operands with an fp32 result: cuBLAS
    with ``out_dtype`` on CUDA (fp32 accumulation, no rounding of the result); elsewhere (the
    interpreter tests) an fp32 product of the upcast operands."""
    if a.dtype == dtype:
        return torch.matmul(a, b)
    if a.is_cuda:
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=dtype)
    return torch.matmul(a.to(dtype), b.to(dtype))


def fused_chunks(L: int, N: int, C: int, mixture: bool, max_chunk_logits: int) -> list[tuple]:
    """``(l0, l1, n0, n1)``: the depth x sample rectangles of the fused path, in order, each with
    at most ``max_chunk_logits`` logits (at least one row per depth it spans). Expected mode:
    as many whole depths as fit, else row ranges of one depth; mixture mode: row ranges of
    every depth (the gradient of a sample needs all its depths' log-likelihoods)."""
    per_row = max(1, C)
    if mixture:
        k = max(1, max_chunk_logits // (L * per_row))
        return [(0, L, n0, min(n0 + k, N)) for n0 in range(0, N, k)]
    if N * per_row <= max_chunk_logits:
        depths = max_chunk_logits // (N * per_row)
        return [(l0, min(l0 + depths, L), 0, N) for l0 in range(0, L, depths)]
    k = max(1, max_chunk_logits // per_row)
    return [(depth, depth + 1, n0, min(n0 + k, N)) for depth in range(L) for n0 in range(0, N, k)]


def _accumulate(total, part, index, first):
    """``total[index] = part`` on the first chunk touching those rows, else ``+=``."""
    if first:
        total[index] = part
    else:
        total[index] += part


def fused_forward_backward(hidden, weight, bias, target, noise_std, gaussian, ignore_index,
                           grad_loglik=None, log_weights=None, row_scale=None,
                           max_chunk_logits=MAX_CHUNK_LOGITS, config=None):
    """``depth_loglik_fwd_bwd`` (``grad_loglik [L, N]`` given) or ``depth_loglik_mixture_fwd_bwd``
    (``log_weights [L]`` and ``row_scale [N]``: upstream gradient ``-row_scale_n r[l, n]``) by
    chunks of materialised logits (``fused_chunks``), with an explicit launch ``config``.

    Per chunk: the logits in fp32 (fp64 for fp64 inputs) with one GEMM, ``_fused_rows_kernel``
    (expected: one launch; mixture: forward launch, ``r`` in torch on the ``[L, k]`` chunk,
    gradient launch) turning them into ``d_logits`` (in place, or into an input-dtype buffer for
    16-bit inputs so the next GEMMs run on tensor cores), then ``d_hidden = d_logits @ W`` and
    ``d_weight += d_logits^T @ H``: 3 GEMMs in all.
    """
    sizes, (b, t, s), flags = _common(hidden, weight, bias, target, noise_std, gaussian)
    L, N, C, D, _, stride_bl = sizes
    del flags["PRECISION"]  # no tl.dot here
    acc = _acc_dtype(hidden.dtype)
    device = hidden.device
    mixture = log_weights is not None
    empty = lambda: torch.empty(0, dtype=hidden.dtype, device=device)  # noqa: E731
    loglik = torch.empty((L, N), dtype=hidden.dtype, device=device)
    aux = torch.empty((0,) if gaussian else (L, N), dtype=acc, device=device)
    if L == 0 or N == 0:
        zeros = lambda x: empty() if x is None else torch.zeros_like(x)  # noqa: E731
        return (loglik, aux, torch.zeros_like(hidden), torch.zeros_like(weight), zeros(bias),
                zeros(noise_std))
    per_depth = weight.dim() == 3
    need_noise = gaussian and noise_std is not None
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.empty(weight.shape, dtype=acc, device=device)
    d_bias = None if bias is None else torch.empty(bias.shape, dtype=acc, device=device)
    d_noise = torch.zeros(C, dtype=acc, device=device) if need_noise else None
    grad = torch.empty((L, N), dtype=acc, device=device) if mixture else grad_loglik
    # Mixture mode forms r from the fp32 log-likelihoods (a 16-bit loglik of -40 is off by 0.1).
    ll = torch.empty((L, N), dtype=acc, device=device) if mixture else loglik
    consts, launch = _split_config(config or select_config("fused_rows", C, D, hidden.dtype))
    # The aux output doubles as the logsumexp the gradient pass reads back (Gaussian: unused).
    lse = grad if gaussian else aux

    for l0, l1, n0, n1 in fused_chunks(L, N, C, mixture, max_chunk_logits):
        Lc, k = l1 - l0, n1 - n0
        x = hidden[l0:l1, n0:n1]
        if per_depth:
            w = weight[l0:l1]
            z = _matmul(x, w.transpose(1, 2), acc)  # [Lc, k, C]
        else:
            x = x.reshape(Lc * k, D)  # a copy only for a mixture chunk of a shared head
            z = _matmul(x, weight.t(), acc)  # [Lc * k, C]
        gz = z if z.dtype == hidden.dtype else torch.empty(z.shape, dtype=hidden.dtype, device=device)
        n_blocks = triton.cdiv(k, consts["BLOCK_N"])
        col = torch.empty((2, Lc, n_blocks, C) if bias is not None or need_noise else (0,),
                          dtype=acc, device=device)

        def rows_kernel(forward, gradient):
            wrap_triton(_fused_rows_kernel)[(n_blocks, Lc)](
                z, gz, b, t, s, grad, ll, lse, col, N, C, k, l0, n0, stride_bl, ignore_index,
                FORWARD=forward, GRADIENT=gradient, **flags, **consts, **launch)

        if mixture:
            rows_kernel(True, False)
            grad[:, n0:n1] = _reference.mixture_grad(ll[:, n0:n1], log_weights.to(acc),
                                                     row_scale[n0:n1].to(acc))
            rows_kernel(False, True)
        else:
            rows_kernel(True, True)

        first = n0 == 0  # the first chunk touching these depths' d_weight / d_bias rows
        if per_depth:
            gz = gz.view(Lc, k, C)
            d_hidden[l0:l1, n0:n1] = torch.bmm(gz, w)
            _accumulate(d_weight, _matmul(gz.transpose(1, 2), x, acc), slice(l0, l1), first)
        else:
            d_hidden[l0:l1, n0:n1] = torch.mm(gz, weight).view(Lc, k, D)
            _accumulate(d_weight, _matmul(gz.t(), x, acc), slice(None), first and l0 == 0)
        if bias is not None:
            per_chunk_depth = col[0].sum(1)  # [Lc, C]
            if bias.dim() == 2:
                _accumulate(d_bias, per_chunk_depth, slice(l0, l1), first)
            else:
                _accumulate(d_bias, per_chunk_depth.sum(0), slice(None), first and l0 == 0)
        if need_noise:
            d_noise += col[1].sum((0, 1))
    if mixture:
        loglik = ll.to(hidden.dtype)
    return (loglik, aux, d_hidden, d_weight.to(weight.dtype),
            empty() if bias is None else d_bias.to(bias.dtype),
            d_noise.to(noise_std.dtype) if need_noise else empty())


# ----------------------------------------------------------------------------------------------
# torch.library.triton_op registrations (DESIGN section 5): the CUDA path of udn_kernels.ops.heads
# calls these, so torch.compile traces through them to the triton_kernel_wrapper nodes and
# Inductor schedules the kernels itself. Eagerly (real tensors) they call the kernels directly.
# Autograd: the formulas shared with the C++ path (ops.heads.register_triton_autograd, below).
# ----------------------------------------------------------------------------------------------
@triton_op("udn_kernels_triton::depth_loglik_fwd", mutates_args=())
def depth_loglik_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     noise_std: Optional[Tensor], gaussian: bool, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Triton ``depth_loglik_fwd`` (docs/internals.md): ``(loglik [L, N], logsumexp [L, N] | empty)``."""
    return forward(hidden, weight, bias, target, noise_std, gaussian, ignore_index)


@triton_op("udn_kernels_triton::depth_loglik_bwd", mutates_args=())
def depth_loglik_bwd(grad_loglik: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                     target: Tensor, noise_std: Optional[Tensor], aux: Tensor, gaussian: bool,
                     ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton ``depth_loglik_bwd`` (docs/internals.md): ``(d_hidden, d_weight, d_bias, d_noise_std)``."""
    return backward(grad_loglik, hidden, weight, bias, target, noise_std, aux, gaussian, ignore_index)


@triton_op("udn_kernels_triton::depth_mixture_predict", mutates_args=())
def depth_mixture_predict(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], log_weights: Tensor,
                          gaussian: bool, noise_std: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Triton ``depth_mixture_predict`` (docs/heads.md): ``(probs, empty)`` or ``(mean, var)``, [N, C]."""
    return predict(hidden, weight, bias, log_weights, gaussian, noise_std)


def _fused_expected(hidden, weight, bias, target, noise_std, grad_loglik, gaussian, ignore_index):
    return fused_forward_backward(hidden, weight, bias, target, noise_std, gaussian, ignore_index,
                                  grad_loglik=grad_loglik)


def _fused_mixture(hidden, weight, bias, target, noise_std, log_weights, row_scale, gaussian, ignore_index):
    return fused_forward_backward(hidden, weight, bias, target, noise_std, gaussian, ignore_index,
                                  log_weights=log_weights, row_scale=row_scale)


@triton_op("udn_kernels_triton::depth_loglik_fwd_bwd", mutates_args=())
def depth_loglik_fwd_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise_std: Optional[Tensor], grad_loglik: Tensor, gaussian: bool,
                         ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``depth_loglik_fwd_bwd`` (docs/internals.md): ``(loglik, aux, d_hidden, d_weight,
    d_bias, d_noise_std)`` for the upstream gradient ``grad_loglik [L, N]``, 3 GEMMs."""
    return _fused_expected(hidden, weight, bias, target, noise_std, grad_loglik, gaussian, ignore_index)


@triton_op("udn_kernels_triton::depth_loglik_mixture_fwd_bwd", mutates_args=())
def depth_loglik_mixture_fwd_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                 noise_std: Optional[Tensor], log_weights: Tensor, row_scale: Tensor,
                                 gaussian: bool, ignore_index: int
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``depth_loglik_mixture_fwd_bwd`` (docs/internals.md): the forward and the head
    gradients of ``-sum_n row_scale_n logsumexp_l(log_weights_l + loglik[l, n])``, 3 GEMMs."""
    return _fused_mixture(hidden, weight, bias, target, noise_std, log_weights, row_scale, gaussian,
                          ignore_index)


@triton_op("udn_kernels_triton::depth_loglik_dot", mutates_args=())
def depth_loglik_dot(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     noise_std: Optional[Tensor], coef: Tensor, log_weights: Optional[Tensor], gaussian: bool,
                     ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton path's ``udn_kernels::depth_loglik_dot`` (ops/heads.py): the fused kernels
    above, traceable by torch.compile (the custom op would be an opaque call)."""
    return loglik_dot_kernel(hidden, weight, bias, target, noise_std, coef, log_weights, gaussian,
                             ignore_index, _fused_expected, _fused_mixture)


register_triton_autograd(depth_loglik_fwd, depth_mixture_predict, depth_loglik_dot)

KERNELS = {"depth_loglik_fwd": depth_loglik_fwd, "depth_loglik_bwd": depth_loglik_bwd,
           "depth_loglik_fwd_bwd": depth_loglik_fwd_bwd,
           "depth_loglik_mixture_fwd_bwd": depth_loglik_mixture_fwd_bwd,
           "depth_mixture_predict": depth_mixture_predict}


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m udn_kernels.triton.aot): every shipped config and both
# likelihoods, with bias and per-class noise enabled; 16-bit configs are compiled for bf16
# storage, "fp32" for float32 (exact fp32 dot, torch's default matmul precision).
# ----------------------------------------------------------------------------------------------
_AOT_FLOAT32_POINTERS = ("lse_ptr", "col_ptr", "dw_ptr", "mix_ptr", "z_ptr")


def _aot_spec(fn, kind: str, config_name: str, likelihood: str, storage: Optional[str] = None,
              passes: str = "fwd+grad") -> dict:
    """Spec of ``fn`` at ``CONFIGS[kind][config_name]``; ``likelihood``: "categorical", "gaussian"
    or, for the predict kernel, "categorical-one-tile" (every class in one tile). ``storage``
    (default: "fp32" for the fp32 config, else "bf16") and, for ``_fused_rows_kernel``,
    ``passes``: "fwd+grad" (expected mode), "fwd" / "grad" (mixture mode's two launches)."""
    gaussian = likelihood == "gaussian"
    params = inspect.signature(fn.fn).parameters
    constexprs, launch = _split_config(CONFIGS[kind][config_name])
    flags = dict(GAUSSIAN=gaussian, ONE_TILE=likelihood.endswith("one-tile"), HAS_BIAS=True,
                 HAS_NOISE=gaussian, ACC=tl.float32, PRECISION="ieee",
                 FORWARD=passes != "grad", GRADIENT=passes != "fwd")
    constexprs.update({k: v for k, v in flags.items() if k in params})
    storage = storage or ("fp32" if config_name == "fp32" else "bf16")
    label = f"{config_name}/{likelihood}/{passes + '/' if 'FORWARD' in params else ''}{storage}"
    signature = {}
    for name, param in params.items():
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
        elif name == "t_ptr":
            signature[name] = f"*{storage}" if gaussian else "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _AOT_FLOAT32_POINTERS else f"*{storage}"
        else:
            signature[name] = "i32"
    # What the JIT would specialise on at run time: 16-byte aligned tensors and D % 16 == 0 (so
    # row strides are aligned). Without it loads are scalar and cp.async pipelining is off.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name.endswith("_ptr") or name in ("D", "stride_wl")}
    return {"name": fn.__name__, "config": label, "fn": fn,
            "signature": signature, "constexprs": constexprs, "attrs": attrs, **launch}


AOT_SPECS = [_aot_spec(fn, kind, name, likelihood)
             for kind, fn, likelihoods in (
                 ("fwd", _fwd_kernel, ("categorical", "gaussian")),
                 ("bwd_rows", _bwd_rows_kernel, ("categorical", "gaussian")),
                 ("bwd_weight", _bwd_weight_kernel, ("categorical", "gaussian")),
                 ("fwd", _lse_kernel, ("categorical",)),
                 ("predict", _predict_kernel, ("categorical", "categorical-one-tile", "gaussian")))
             for name in CONFIGS[kind]
             for likelihood in likelihoods] + [
    _aot_spec(_fused_rows_kernel, "fused_rows", name, likelihood, storage, passes)
    for name in CONFIGS["fused_rows"]
    for likelihood in ("categorical", "gaussian")
    for passes in ("fwd+grad", "fwd", "grad")
    for storage in ("bf16", "fp32")]
