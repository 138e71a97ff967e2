"""Shared pieces of the Triton depth-head kernels: launch configs (``CONFIGS``, ``select_config``),
the ``@triton.jit`` tile helpers every head kernel builds on (logits tile, online logsumexp,
log-likelihood statistics, d_logits tile), host-side argument plumbing and the AOT spec builder.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import triton
import triton.language as tl

_HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2.0 * math.pi))

# Shipped launch configurations (A100 / H100), chosen so that none spills on sm_80 / sm_90
# (python -m udn_kernels.triton.aot). 16-bit inputs: the forward uses "narrow" for few classes
# (C <= 32: UDN classifiers, regression outputs) and "wide" for vocabulary-sized heads; in the
# backward BLOCK_DO is the width of the d_hidden / d_weight register accumulator, so "narrow"
# serves D <= 128 and "wide" D <= 256 (a wider D costs one logits recomputation per extra
# BLOCK_DO chunk). float32 inputs use "fp32": exact-fp32 tl.dot runs on FMA units with operands in
# registers, so its tiles are smaller. float64 inputs use "fp64" (fp64 mma, fp64 accumulators): the
# fp32 tiles except where those spilled in fp64 (AOT): fwd [64, 64] Gaussian 516-1008 bytes, hence
# 32 rows; bwd_weight 8 bytes on sm_90 at 2 stages, hence 1.
CONFIGS = {
    "fwd": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, num_warps=4, num_stages=3),
        "wide": dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=3),
        "fp64": dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=3),
    },
    "bwd_rows": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        "wide": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=2),
        "fp64": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=2),
    },
    "bwd_weight": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=128, num_warps=8, num_stages=2),
        "wide": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, BLOCK_DO=256, num_warps=8, num_stages=2),
        "fp32": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=2),
        "fp64": dict(BLOCK_N=32, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=128, num_warps=8, num_stages=1),
    },
    # depth_mixture_predict: (row block, class tile) programs accumulating over depths; its
    # logsumexp pass (_lse_kernel, C > BLOCK_C only) uses the "fwd" configs.
    "predict": {
        "narrow": dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=64, num_warps=4, num_stages=3),
        "wide": dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
        # 4 warps spilled (two fp32 [64, 64] accumulators + the FMA dot operands): 8 warps
        "fp32": dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
        "fp64": dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
    },
    # _fused_rows_kernel (gradient in the forward): elementwise over a materialised logits chunk,
    # no tl.dot, so one config per class count whatever the dtype: "narrow" for C <= 32, "wide"
    # (a few rows, long class tiles) for vocabulary-sized heads. "narrow" at 4 warps spilled 4
    # bytes (Gaussian gradient pass, fp16, sm_90, at 80 registers), and with the loss options 32
    # rows spilled 24 bytes in fp64 (sm_80): 16 rows at 8 warps, 2 elements per thread.
    "fused_rows": {
        "narrow": dict(BLOCK_N=16, BLOCK_C=32, num_warps=8, num_stages=1),
        "wide": dict(BLOCK_N=8, BLOCK_C=256, num_warps=8, num_stages=1),
    },
}
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
def _loss_options(opt_ptr, ACC: tl.constexpr):
    """``(label_smoothing, lse_square_scale, softcap)`` from ``opt_ptr`` (``loss_options``: a tensor
    in the accumulation dtype, so float64 runs keep them exact; Triton passes Python floats as fp32)."""
    return tl.load(opt_ptr).to(ACC), tl.load(opt_ptr + 1).to(ACC), tl.load(opt_ptr + 2).to(ACC)


@triton.jit
def _soft_cap(mu, softcap):
    """Gemma-2 soft-capping ``c tanh(mu / c)`` (``softcap`` 0: ``mu`` unchanged). tanh as
    ``sign(x) (1 - e) / (1 + e)``, ``e = exp(-2|x|)`` (no tanh in tl.math, and libdevice's does
    not run in the interpreter): absolute error about one ulp of 1, so about c ulps on the logit."""
    if softcap > 0:
        x = mu / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        mu = softcap * tl.where(x < 0, -t, t)
    return mu


@triton.jit
def _grad_tile(mu, g, tgt, lse, y_blk, s_blk, rows_left, c0, cols_left, C, smoothing, zscale, softcap,
               GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """d loglik / d logits and (gaussian) d loglik / d noise_std per element, zero off the valid
    tile. ``y_blk`` -> target[row0, c0] (gaussian), ``s_blk`` -> noise_std[c0]. Categorical loss
    options (docs/heads.md, "Loss options"): ``mu`` are the logits before the soft-cap,
    ``d loglik / dt = (1 - eps) onehot + eps / C - (1 + 2 zs lse) softmax(t)`` times
    ``dt / dmu = 1 - (t / c)^2``."""
    if GAUSSIAN:
        valid, z, inv_s = _gaussian_residual(mu, y_blk, s_blk, rows_left, cols_left, C, HAS_NOISE,
                                             BLOCK_N, BLOCK_C, ACC)
        d_mu = tl.where(valid, g[:, None] * z * inv_s[None, :], 0.0)
        d_s = tl.where(valid, g[:, None] * (z * z - 1.0) * inv_s[None, :], 0.0)
    else:
        r = tl.arange(0, BLOCK_N)
        c = tl.arange(0, BLOCK_C)
        valid = (r < rows_left)[:, None] & (c < cols_left)[None, :]
        t = _soft_cap(mu, softcap)
        p = tl.exp(t - lse[:, None])
        onehot = tl.where((c0 + c)[None, :] == tgt[:, None], 1.0 - smoothing, 0.0) + smoothing / C
        d_t = onehot - (1.0 + 2.0 * zscale * lse)[:, None] * p
        if softcap > 0:
            u = t / softcap
            d_t = d_t * (1.0 - u * u)
        d_mu = tl.where(valid, g[:, None] * d_t, 0.0)
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
    and ignored-row mask; ``t_blk`` -> target[row0] (categorical). The argmax state (first index
    of the running maximum) is the last value."""
    r = tl.arange(0, BLOCK_N)
    total = tl.zeros((BLOCK_N,), ACC)
    if GAUSSIAN:
        tgt = r  # unused: gaussian targets are [N, C] tiles, loaded per class tile
        ignored = r < 0
    else:
        tgt = tl.load(t_blk + r, mask=r < rows_left, other=ignore_index)
        ignored = tgt == ignore_index
        tgt = tgt.to(tl.int32)  # valid classes are < C; ignored rows no longer matter
    return total, tl.full((BLOCK_N,), float("-inf"), ACC), total, total, tgt, ignored, tl.full((BLOCK_N,), -1, tl.int32)


@triton.jit
def _loglik_tile(mu, total, run_max, run_sum, tgt_logit, arg, tgt, y_blk, s_blk, rows_left, c0, C,
                 smoothing, softcap, GAUSSIAN: tl.constexpr, HAS_NOISE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Adds the class tile ``mu`` (columns ``c0 + [0, BLOCK_C)``) to a row block's loglik
    statistics: Gaussian ``total``, or categorical online logsumexp (``run_max``, ``run_sum``),
    target logit, first argmax ``arg`` and, with label smoothing, the logit sum in ``total``, all
    of the soft-capped logits; the statistics of the other likelihood pass through unused."""
    if GAUSSIAN:
        valid, z, inv_s = _gaussian_residual(mu, y_blk, s_blk, rows_left, C - c0, C, HAS_NOISE,
                                             BLOCK_N, BLOCK_C, ACC)
        total += tl.sum(tl.where(valid, -0.5 * z * z + tl.log(inv_s)[None, :] - _HALF_LOG_2PI, 0.0), axis=1)
    else:
        mu = _soft_cap(mu, softcap)
        cols = c0 + tl.arange(0, BLOCK_C)
        if smoothing > 0:
            total += tl.sum(tl.where((cols < C)[None, :], mu, 0.0), axis=1)
        old_max = run_max
        mu, run_max, run_sum = _online_lse(mu, run_max, run_sum, C - c0, BLOCK_C)
        # first argmax: a later tile takes over only with a strictly larger maximum
        tile_max = tl.max(mu, axis=1)
        tile_arg = tl.min(tl.where(mu == tile_max[:, None], cols[None, :], C), axis=1)
        arg = tl.where((arg < 0) | (tile_max > old_max), tile_arg, arg)
        tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], mu, 0.0), axis=1)
    return total, run_max, run_sum, tgt_logit, arg


@triton.jit
def _store_loglik(total, run_max, run_sum, tgt_logit, arg, tgt, ignored, out_blk, lse_blk, row_ok, C,
                  smoothing, zscale, hit_offset, GAUSSIAN: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes a row block's loglik (0 on ignored rows) and, categorical, its logsumexp, which it
    returns (``total`` for Gaussian, unused), and with ``hit_offset`` > 0 (stats: ``aux [2, L, N]``)
    1.0 where the argmax is the target at ``lse_blk + hit_offset``. Categorical loglik with the
    loss options: ``(1 - eps) t_y + eps mean_c t_c - lse - zs lse^2``."""
    r = tl.arange(0, BLOCK_N)
    if GAUSSIAN:
        loglik = total
        lse = total
    else:
        lse = run_max + tl.log(run_sum)
        ll = tgt_logit - lse
        if smoothing > 0:
            ll = (1.0 - smoothing) * tgt_logit + smoothing * (total / C) - lse
        if zscale > 0:
            ll -= zscale * lse * lse
        loglik = tl.where(ignored, 0.0, ll)
        tl.store(lse_blk + r, lse.to(lse_blk.dtype.element_ty), mask=row_ok)
        if hit_offset > 0:
            tl.store(lse_blk + hit_offset + r, tl.where(arg == tgt, 1.0, 0.0).to(lse_blk.dtype.element_ty),
                     mask=row_ok)
    tl.store(out_blk + r, loglik.to(out_blk.dtype.element_ty), mask=row_ok)
    return lse


# ----------------------------------------------------------------------------------------------
# Host-side helpers
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
        return CONFIGS[kind]["fp32" if dtype == torch.float32 else "fp64"]
    wide = num_classes > 32 if kind in ("fwd", "predict") else dim > 128
    return CONFIGS[kind]["wide" if wide else "narrow"]


def _split_config(config: dict) -> tuple[dict, dict]:
    constexprs = {k: v for k, v in config.items() if k not in _LAUNCH_OPTIONS}
    return constexprs, {k: config[k] for k in _LAUNCH_OPTIONS if k in config}


def loss_options(hidden, label_smoothing, lse_square_scale, softcap):
    """The kernels' ``opt_ptr`` argument: ``[label_smoothing, lse_square_scale, softcap]`` (softcap
    0: none) in the accumulation dtype."""
    return torch.tensor([label_smoothing, lse_square_scale, softcap], dtype=_acc_dtype(hidden.dtype),
                        device=hidden.device)


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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (python -m udn_kernels.triton.aot): every shipped config and both
# likelihoods, with bias and per-class noise enabled, for every storage dtype the config serves:
# the 16-bit configs bf16 and fp16, "fp32" float32 (exact fp32 dot, torch's default matmul
# precision), "fp64" float64 (fp64 dot and accumulator).
# ----------------------------------------------------------------------------------------------
_AOT_ACC_POINTERS = ("lse_ptr", "col_ptr", "dw_ptr", "mix_ptr", "z_ptr", "opt_ptr")  # fp32, fp64 for fp64 storage


def aot_storages(config_name: str) -> tuple[str, ...]:
    """The storage dtypes (Triton names) launched at ``CONFIGS[kind][config_name]``."""
    return (config_name,) if config_name in ("fp32", "fp64") else ("bf16", "fp16")


def _aot_spec(fn, kind: str, config_name: str, likelihood: str, storage: str,
              passes: str = "fwd+grad") -> dict:
    """Spec of ``fn`` at ``CONFIGS[kind][config_name]`` for ``storage`` ("bf16" | "fp16" | "fp32"
    | "fp64"); ``likelihood``: "categorical", "gaussian" or, for the predict kernel,
    "categorical-one-tile" (every class in one tile); for ``_fused_rows_kernel``, ``passes``:
    "fwd+grad" (expected mode), "fwd" / "grad" (mixture mode's two launches)."""
    gaussian = likelihood == "gaussian"
    params = inspect.signature(fn.fn).parameters
    constexprs, launch = _split_config(CONFIGS[kind][config_name])
    acc = "fp64" if storage == "fp64" else "fp32"
    flags = dict(GAUSSIAN=gaussian, ONE_TILE=likelihood.endswith("one-tile"), HAS_BIAS=True,
                 HAS_NOISE=gaussian, ACC=tl.float64 if acc == "fp64" else tl.float32, PRECISION="ieee",
                 FORWARD=passes != "grad", GRADIENT=passes != "fwd")
    constexprs.update({k: v for k, v in flags.items() if k in params})
    label = f"{config_name}/{likelihood}/{passes + '/' if 'FORWARD' in params else ''}{storage}"
    signature = {}
    for name, param in params.items():
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
        elif name == "t_ptr":
            signature[name] = f"*{storage}" if gaussian else "*i64"
        elif name.endswith("_ptr"):
            signature[name] = f"*{acc}" if name in _AOT_ACC_POINTERS else f"*{storage}"
        else:
            signature[name] = "i32"
    # What the JIT would specialise on at run time: 16-byte aligned tensors and D % 16 == 0 (so
    # row strides are aligned). Without it loads are scalar and cp.async pipelining is off.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature)
             if name.endswith("_ptr") or name in ("D", "stride_wl")}
    return {"name": fn.__name__, "config": label, "dtype": storage, "fn": fn,
            "signature": signature, "constexprs": constexprs, "attrs": attrs, **launch}
