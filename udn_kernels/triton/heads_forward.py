"""Triton ``depth_loglik_fwd``: ``_fwd_kernel``, grid (row blocks, depths), walks class tiles
(logits tile by ``tl.dot``, K-loop over D) and reduces them in registers: online logsumexp and
target logit (categorical) or the Gaussian log-density sum. Its launcher, triton_op and AOT specs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .heads_common import (CONFIGS, _acc_dtype, _aot_spec, _common, aot_storages, _loglik_tile, _loss_options,
                           _mean_tile, _row_stats_init, _split_config, _store_loglik, loss_options, select_config)


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, s_ptr, out_ptr, lse_ptr, opt_ptr,
                N, C, D, stride_wl, stride_bl, ignore_index, hit_offset,
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
    smoothing, zscale, softcap = _loss_options(opt_ptr, ACC)
    total, run_max, run_sum, tgt_logit, tgt, ignored, arg = _row_stats_init(t_ptr + row0, rows_left, ignore_index,
                                                                             GAUSSIAN, BLOCK_N, ACC)
    for c0 in range(0, C, BLOCK_C):
        mu = _mean_tile(h_blk, w_ptr, b_ptr + c0, rows_left, C - c0, D,
                        HAS_BIAS, BLOCK_N, BLOCK_C, BLOCK_D, ACC, PRECISION)
        w_ptr += BLOCK_C * D  # pointer arithmetic is 64-bit: no int32 c0 * D overflow
        total, run_max, run_sum, tgt_logit, arg = _loglik_tile(mu, total, run_max, run_sum, tgt_logit, arg, tgt,
                                                               t_ptr + row0 * C + c0, s_ptr + c0, rows_left, c0, C,
                                                               smoothing, softcap, GAUSSIAN, HAS_NOISE, BLOCK_N,
                                                               BLOCK_C, ACC)
    _store_loglik(total, run_max, run_sum, tgt_logit, arg, tgt, ignored, out_ptr + depth * N + row0,
                  lse_ptr + depth * N + row0, row_ok, C, smoothing, zscale, hit_offset, GAUSSIAN, BLOCK_N)


def forward(hidden, weight, bias, target, noise_std, gaussian, ignore_index, config=None, label_smoothing=0.0,
            lse_square_scale=0.0, softcap=0.0, stats=False):
    """``depth_loglik_fwd`` with an explicit launch ``config`` (default: the shipped selection)."""
    (L, N, C, D, stride_wl, stride_bl), (b, t, s), flags = _common(hidden, weight, bias, target,
                                                                   noise_std, gaussian)
    acc = _acc_dtype(hidden.dtype)
    loglik = torch.empty((L, N), dtype=hidden.dtype, device=hidden.device)
    stats = stats and not gaussian
    aux = torch.empty((0,) if gaussian else ((2, L, N) if stats else (L, N)), dtype=acc, device=hidden.device)
    if loglik.numel() == 0:
        return loglik, aux
    consts, launch = _split_config(config or select_config("fwd", C, D, hidden.dtype))
    grid = (triton.cdiv(N, consts["BLOCK_N"]), L)
    options = loss_options(hidden, label_smoothing, lse_square_scale, softcap)
    wrap_triton(_fwd_kernel)[grid](hidden, weight, b, t, s, loglik, loglik if gaussian else aux, options,
                      N, C, D, stride_wl, stride_bl, ignore_index, L * N if stats else 0,
                      **flags, **consts, **launch)
    return loglik, aux


@triton_op("udn_kernels_triton::depth_loglik_fwd", mutates_args=())
def depth_loglik_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     noise_std: Optional[Tensor], gaussian: bool, ignore_index: int, label_smoothing: float = 0.0,
                     lse_square_scale: float = 0.0, softcap: float = 0.0,
                     stats: bool = False) -> tuple[Tensor, Tensor]:
    """Triton ``depth_loglik_fwd`` (docs/internals.md): ``(loglik [L, N], logsumexp [L, N] | empty)``
    (with ``stats`` aux is ``[2, L, N]``: logsumexp, argmax hits)."""
    return forward(hidden, weight, bias, target, noise_std, gaussian, ignore_index, None, label_smoothing,
                   lse_square_scale, softcap, stats)


KERNELS = {"depth_loglik_fwd": depth_loglik_fwd}

AOT_SPECS = [_aot_spec(_fwd_kernel, "fwd", name, likelihood, storage)
             for name in CONFIGS["fwd"] for likelihood in ("categorical", "gaussian")
             for storage in aot_storages(name)]
