"""Triton kernels of the RNG stream (docs/rng.md): ``philox_uint32/uniform/normal/bernoulli``.

Element ``i`` of the output is stream element ``offset + i``, computed with ``tl.randint`` /
``tl.rand`` / :func:`randn` on int64 counters, so offsets past 2^32 carry into the counter's high
word exactly as in the C++ and reference backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

BLOCK = 1024

# What each kernel draws; a constexpr so one source compiles to four specialised kernels.
_UINT32, _UNIFORM, _NORMAL, _BERNOULLI = 0, 1, 2, 3


@triton.jit
def _cos_or_sin(theta, sine):
    """``sin(theta)`` where ``sine``, else ``cos(theta)``, for theta in [0, 2 pi]: the C++ path's
    sincos (csrc/philox.h: Cody-Waite reduction by pi/2, Cephes polynomials, ~1 ulp). One
    reduction serves both, sin x being cos at quadrant q - 1, and there is no libdevice call: two
    (sinf and cosf, each with its large-argument slow path) made ptxas spill."""
    q = tl.floor(theta * 0.636619772367581343 + 0.5)
    y = tl.fma(q, -1.57079637050628662109375, theta)
    y = tl.fma(q, 4.37113900018624283e-8, y)
    y = tl.fma(q, 1.7151245100059144e-15, y)
    z = y * y
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * y + y
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    k = q.to(tl.int32) - sine.to(tl.int32)  # quadrant: cos x = (c, -s, -c, s)[k & 3]
    v = tl.where((k & 1) != 0, s, c)
    return tl.where(((k + 1) & 2) != 0, -v, v)


@triton.jit
def randn(seed, elem):
    """Normal element ``elem`` (int64) of the stream: ``tl.randn4x(seed, elem >> 2)[elem & 3]``.

    Per element: one Philox call, the word pair picked by ``elem & 2`` and cosine / sine by
    ``elem & 1``, so any tile draws exactly its own elements (docs/rng.md). Same constants as
    Triton's ``pair_uniform_to_normal``; within 1 ulp of it (own sincos, above)."""
    w0, w1, w2, w3 = tl.randint4x(seed, elem >> 2)
    high = (elem & 2) != 0
    u1 = tl.maximum(1.0e-7, tl.uint_to_uniform_float(tl.where(high, w2, w0)))
    theta = 6.283185307179586 * tl.uint_to_uniform_float(tl.where(high, w3, w1))
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_or_sin(theta, (elem & 1) != 0)


@triton.jit
def _philox_fill_kernel(out_ptr, n, seed, offset, p, KIND: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    elem = offset + idx  # int64: the counter's high word is elem >> 32
    if KIND == 0:
        value = tl.randint(seed, elem).to(tl.int64)  # uint32 -> int64 zero-extends
    elif KIND == 1:
        value = tl.rand(seed, elem)
    elif KIND == 2:
        value = randn(seed, elem)
    else:
        value = tl.where(tl.rand(seed, elem) < p, 1.0, 0.0)
    tl.store(out_ptr + idx, value, mask=mask)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _launch(kind: int, dtype: torch.dtype, n: int, seed: int, offset: int, p: float, device) -> Tensor:
    out = torch.empty(n, dtype=dtype, device=device)
    if n > 0:
        wrap_triton(_philox_fill_kernel)[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, p, KIND=kind,
                                                                   BLOCK=BLOCK)
    return out


def philox_normal(n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    """``n`` float32 standard normals (``tl.randn``) on ``device``; a plain launcher for use inside
    other triton_ops."""
    return _launch(_NORMAL, torch.float32, n, seed, offset, 0.0, device)


# The Triton backend's RNG kernels, triton_ops ``udn_kernels_triton::philox_*``.
@triton_op("udn_kernels_triton::philox_uint32", mutates_args=())
def philox_uint32_op(n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    """``n`` uint32 words (int64 tensor) of the stream of ``seed`` from element ``offset``."""
    return _launch(_UINT32, torch.int64, n, seed, offset, 0.0, device)


@triton_op("udn_kernels_triton::philox_uniform", mutates_args=())
def philox_uniform_op(n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    """``n`` float32 uniforms in [0, 1) (``tl.rand``)."""
    return _launch(_UNIFORM, torch.float32, n, seed, offset, 0.0, device)


@triton_op("udn_kernels_triton::philox_normal", mutates_args=())
def philox_normal_op(n: int, seed: int, offset: int, device: torch.device) -> Tensor:
    """``n`` float32 standard normals (``tl.randn``)."""
    return philox_normal(n, seed, offset, device)


@triton_op("udn_kernels_triton::philox_bernoulli", mutates_args=())
def philox_bernoulli_op(n: int, p: float, seed: int, offset: int, device: torch.device) -> Tensor:
    """``n`` float32 Bernoulli(p) draws: 1.0 where the uniform is < p (compared in float32)."""
    return _launch(_BERNOULLI, torch.float32, n, seed, offset, float(p), device)


# Kernel-table entries (docs/internals.md signatures, no device argument): the current device.
KERNELS = {
    "philox_uint32": lambda n, seed, offset: philox_uint32_op(n, seed, offset, _default_device()),
    "philox_uniform": lambda n, seed, offset: philox_uniform_op(n, seed, offset, _default_device()),
    "philox_normal": lambda n, seed, offset: philox_normal_op(n, seed, offset, _default_device()),
    "philox_bernoulli": lambda n, p, seed, offset: philox_bernoulli_op(n, p, seed, offset, _default_device()),
}

_SIGNATURE = {"n": "i64", "seed": "i64", "offset": "i64", "p": "fp32", "KIND": "constexpr", "BLOCK": "constexpr"}

# For udn_kernels/triton/aot.py: one specialisation per kernel name, 64-bit scalars throughout.
AOT_SPECS = [
    {"name": name, "fn": _philox_fill_kernel,
     "signature": {"out_ptr": "*i64" if kind == _UINT32 else "*fp32", **_SIGNATURE},
     "constexprs": {"KIND": kind, "BLOCK": BLOCK}}
    for name, kind in (("philox_uint32", _UINT32), ("philox_uniform", _UNIFORM),
                       ("philox_normal", _NORMAL), ("philox_bernoulli", _BERNOULLI))
]
