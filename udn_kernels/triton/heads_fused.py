"""Triton gradient-in-forward heads, ``depth_loglik_fwd_bwd`` and ``depth_loglik_mixture_fwd_bwd``:
chunks of materialised logits (one GEMM each) that ``_fused_rows_kernel`` turns into the
log-likelihoods and ``d_logits`` in one pass, then two GEMMs for ``d_hidden`` and ``d_weight``.
Their launcher, triton_ops and AOT specs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._formulas import mixture_grad
from .heads_common import (CONFIGS, _acc_dtype, _aot_spec, _common, _grad_tile, _loglik_tile, _loss_options,
                           _row_stats_init, _split_config, _store_loglik, loss_options, select_config)

# Default memory budget of the fused path: logits elements of one materialised chunk (fp32: 256 MiB).
MAX_CHUNK_LOGITS = 2**26


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
                     cols_left, C, smoothing, zscale, softcap, GAUSSIAN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_NOISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC: tl.constexpr):
    """``g * d loglik / d logits`` of one tile into ``gz_blk`` (the chunk's gradient buffer, same
    layout as the logits) and the tile's column sums (-> d_bias, d_noise_std) into ``col_blk``."""
    d_mu, d_s = _grad_tile(mu, g, tgt, lse, y_blk, s_blk, rows_left, c0, cols_left, C, smoothing, zscale, softcap,
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
def _fused_rows_kernel(z_ptr, gz_ptr, b_ptr, t_ptr, s_ptr, g_ptr, out_ptr, lse_ptr, col_ptr, opt_ptr,
                       N, C, k, l0, n0, stride_bl, ignore_index, hit_offset,
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
    smoothing, zscale, softcap = _loss_options(opt_ptr, ACC)
    total, run_max, run_sum, tgt_logit, tgt, ignored, arg = _row_stats_init(t_ptr + row0, rows_left, ignore_index,
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
            total, run_max, run_sum, tgt_logit, arg = _loglik_tile(mu, total, run_max, run_sum, tgt_logit, arg, tgt,
                                                                   t_ptr + row0 * C + c0, s_ptr + c0, rows_left,
                                                                   c0, C, smoothing, softcap, GAUSSIAN, HAS_NOISE,
                                                                   BLOCK_N, BLOCK_C, ACC)
            if GAUSSIAN and GRADIENT:  # one pass: the Gaussian gradient needs no row statistic
                _write_grad_tile(mu, g, tgt, lse, gz_blk + c0, t_ptr + row0 * C + c0, s_ptr + c0,
                                 col_blk + c0, noise_offset, rows_left, c0, C - c0, C, smoothing, zscale, softcap,
                                 GAUSSIAN, HAS_BIAS, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)
        lse = _store_loglik(total, run_max, run_sum, tgt_logit, arg, tgt, ignored, out_ptr + ll_off,
                            lse_ptr + ll_off, row_ok, C, smoothing, zscale, hit_offset, GAUSSIAN, BLOCK_N)
    if GRADIENT and not (GAUSSIAN and FORWARD):
        for c0 in range(0, C, BLOCK_C):
            mu = _chunk_tile(z_blk + c0, b_ptr + c0, rows_left, C - c0, C, HAS_BIAS, BLOCK_N, BLOCK_C, ACC)
            _write_grad_tile(mu, g, tgt, lse, gz_blk + c0, t_ptr + row0 * C + c0, s_ptr + c0,
                             col_blk + c0, noise_offset, rows_left, c0, C - c0, C, smoothing, zscale, softcap,
                             GAUSSIAN, HAS_BIAS, HAS_NOISE, BLOCK_N, BLOCK_C, ACC)


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
                           grad_loglik=None, log_weights=None, row_scale=None, grad_mask=(True, True, True, True),
                           max_chunk_logits=MAX_CHUNK_LOGITS, config=None, label_smoothing=0.0,
                           lse_square_scale=0.0, softcap=0.0, stats=False):
    """``depth_loglik_fwd_bwd`` (``grad_loglik [L, N]`` given) or ``depth_loglik_mixture_fwd_bwd``
    (``log_weights [L]`` and ``row_scale [N]``: upstream gradient ``-row_scale_n r[l, n]``) by
    chunks of materialised logits (``fused_chunks``), with an explicit launch ``config``.

    Per chunk: the logits in fp32 (fp64 for fp64 inputs) with one GEMM, ``_fused_rows_kernel``
    (expected: one launch; mixture: forward launch, ``r`` in torch on the ``[L, k]`` chunk,
    gradient launch) turning them into ``d_logits`` (in place, or into an input-dtype buffer for
    16-bit inputs so the next GEMMs run on tensor cores), then ``d_hidden = d_logits @ W`` and
    ``d_weight += d_logits^T @ H``: 3 GEMMs in all. The gradients ``grad_mask`` leaves out come
    back empty: their GEMM is skipped, and with none wanted no ``d_logits`` are formed.
    """
    sizes, (b, t, s), flags = _common(hidden, weight, bias, target, noise_std, gaussian)
    L, N, C, D, _, stride_bl = sizes
    del flags["PRECISION"]  # no tl.dot here
    acc = _acc_dtype(hidden.dtype)
    device = hidden.device
    mixture = log_weights is not None
    empty = lambda: torch.empty(0, dtype=hidden.dtype, device=device)  # noqa: E731
    loglik = torch.empty((L, N), dtype=hidden.dtype, device=device)
    stats = stats and not gaussian
    aux = torch.empty((0,) if gaussian else ((2, L, N) if stats else (L, N)), dtype=acc, device=device)
    options = loss_options(hidden, label_smoothing, lse_square_scale, softcap)
    want_hidden, want_weight = grad_mask[0], grad_mask[1]
    want_bias, want_noise = grad_mask[2] and bias is not None, grad_mask[3] and gaussian and noise_std is not None
    gradient = want_hidden or want_weight or want_bias or want_noise
    if L == 0 or N == 0:
        zeros = lambda x, want: torch.zeros_like(x) if want else empty()  # noqa: E731
        return (loglik, aux, zeros(hidden, want_hidden), zeros(weight, want_weight), zeros(bias, want_bias),
                zeros(noise_std, want_noise))
    per_depth = weight.dim() == 3
    need_noise = gaussian and noise_std is not None
    d_hidden = torch.empty_like(hidden) if want_hidden else empty()
    d_weight = torch.empty(weight.shape, dtype=acc, device=device) if want_weight else None
    d_bias = torch.empty(bias.shape, dtype=acc, device=device) if want_bias else None
    d_noise = torch.zeros(C, dtype=acc, device=device) if want_noise else None
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
                z, gz, b, t, s, grad, ll, lse, col, options, N, C, k, l0, n0, stride_bl, ignore_index,
                L * N if stats else 0,
                FORWARD=forward, GRADIENT=gradient, **flags, **consts, **launch)

        if mixture or not gradient:
            rows_kernel(True, False)
        if not gradient:
            continue
        if mixture:
            grad[:, n0:n1] = mixture_grad(ll[:, n0:n1], log_weights.to(acc), row_scale[n0:n1].to(acc))
            rows_kernel(False, True)
        else:
            rows_kernel(True, True)

        first = n0 == 0  # the first chunk touching these depths' d_weight / d_bias rows
        if per_depth:
            gz = gz.view(Lc, k, C)
            if want_hidden:
                d_hidden[l0:l1, n0:n1] = torch.bmm(gz, w)
            if want_weight:
                _accumulate(d_weight, _matmul(gz.transpose(1, 2), x, acc), slice(l0, l1), first)
        else:
            if want_hidden:
                d_hidden[l0:l1, n0:n1] = torch.mm(gz, weight).view(Lc, k, D)
            if want_weight:
                _accumulate(d_weight, _matmul(gz.t(), x, acc), slice(None), first and l0 == 0)
        if want_bias:
            per_chunk_depth = col[0].sum(1)  # [Lc, C]
            if bias.dim() == 2:
                _accumulate(d_bias, per_chunk_depth, slice(l0, l1), first)
            else:
                _accumulate(d_bias, per_chunk_depth.sum(0), slice(None), first and l0 == 0)
        if want_noise:
            d_noise += col[1].sum((0, 1))
    if mixture:
        loglik = ll.to(hidden.dtype)
    return (loglik, aux, d_hidden, d_weight.to(weight.dtype) if want_weight else empty(),
            d_bias.to(bias.dtype) if want_bias else empty(),
            d_noise.to(noise_std.dtype) if want_noise else empty())


@triton_op("udn_kernels_triton::depth_loglik_fwd_bwd", mutates_args=())
def depth_loglik_fwd_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         noise_std: Optional[Tensor], grad_loglik: Tensor, gaussian: bool,
                         ignore_index: int, grad_mask: list[bool], label_smoothing: float = 0.0,
                         lse_square_scale: float = 0.0, softcap: float = 0.0, stats: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``depth_loglik_fwd_bwd`` (docs/internals.md): ``(loglik, aux, d_hidden, d_weight,
    d_bias, d_noise_std)`` for the upstream gradient ``grad_loglik [L, N]``, 3 GEMMs."""
    return fused_forward_backward(hidden, weight, bias, target, noise_std, gaussian, ignore_index,
                                  grad_loglik=grad_loglik, grad_mask=grad_mask, label_smoothing=label_smoothing,
                                  lse_square_scale=lse_square_scale, softcap=softcap, stats=stats)


@triton_op("udn_kernels_triton::depth_loglik_mixture_fwd_bwd", mutates_args=())
def depth_loglik_mixture_fwd_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                 noise_std: Optional[Tensor], log_weights: Tensor, row_scale: Tensor,
                                 gaussian: bool, ignore_index: int, grad_mask: list[bool],
                                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float = 0.0,
                                 stats: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton ``depth_loglik_mixture_fwd_bwd`` (docs/internals.md): the forward and the head
    gradients of ``-sum_n row_scale_n logsumexp_l(log_weights_l + loglik[l, n])``, 3 GEMMs."""
    return fused_forward_backward(hidden, weight, bias, target, noise_std, gaussian, ignore_index,
                                  log_weights=log_weights, row_scale=row_scale, grad_mask=grad_mask,
                                  label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                  softcap=softcap, stats=stats)


KERNELS = {"depth_loglik_fwd_bwd": depth_loglik_fwd_bwd,
           "depth_loglik_mixture_fwd_bwd": depth_loglik_mixture_fwd_bwd}

AOT_SPECS = [_aot_spec(_fused_rows_kernel, "fused_rows", name, likelihood, storage, passes)
             for name in CONFIGS["fused_rows"]
             for likelihood in ("categorical", "gaussian")
             for passes in ("fwd+grad", "fwd", "grad")
             for storage in ("bf16", "fp16", "fp32", "fp64")]
