"""Triton kernels of the RNG stream (docs/rng.md): ``philox_uint32/uniform/normal/bernoulli``.

Element ``i`` of the output is stream element ``offset + i``, computed with ``tl.randint`` /
``tl.rand`` / :func:`randn` on int64 counters, so offsets past 2^32 carry into the counter's high
word exactly as in the C++ and reference backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024

# What each kernel draws; a constexpr so one source compiles to four specialised kernels.
_UINT32, _UNIFORM, _NORMAL, _BERNOULLI = 0, 1, 2, 3


@triton.jit
def randn(seed, elem):
    """Normal element ``elem`` (int64) of the stream: ``tl.randn4x(seed, elem >> 2)[elem & 3]``.

    Per element: one Philox call, the word pair picked by ``elem & 2`` and cosine / sine by
    ``elem & 1``, so any tile draws exactly its own elements (docs/rng.md)."""
    w0, w1, w2, w3 = tl.randint4x(seed, elem >> 2)
    high = (elem & 2) != 0
    u1 = tl.uint_to_uniform_float(tl.where(high, w2, w0))
    u2 = tl.uint_to_uniform_float(tl.where(high, w3, w1))
    n_cos, n_sin = tl.pair_uniform_to_normal(u1, u2)
    return tl.where((elem & 1) != 0, n_sin, n_cos)


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


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _launch(kind: int, dtype: torch.dtype, n: int, seed: int, offset: int, p: float = 0.0) -> torch.Tensor:
    out = torch.empty(n, dtype=dtype, device=_device())
    if n > 0:
        _philox_fill_kernel[(triton.cdiv(n, BLOCK),)](out, n, seed, offset, p, KIND=kind, BLOCK=BLOCK)
    return out


def philox_uint32(n: int, seed: int, offset: int) -> torch.Tensor:
    """``n`` uint32 words (int64 tensor) of the stream of ``seed`` from element ``offset``."""
    return _launch(_UINT32, torch.int64, n, seed, offset)


def philox_uniform(n: int, seed: int, offset: int) -> torch.Tensor:
    """``n`` float32 uniforms in [0, 1) (``tl.rand``)."""
    return _launch(_UNIFORM, torch.float32, n, seed, offset)


def philox_normal(n: int, seed: int, offset: int) -> torch.Tensor:
    """``n`` float32 standard normals (``tl.randn``)."""
    return _launch(_NORMAL, torch.float32, n, seed, offset)


def philox_bernoulli(n: int, p: float, seed: int, offset: int) -> torch.Tensor:
    """``n`` float32 Bernoulli(p) draws: 1.0 where the uniform is < p (compared in float32)."""
    return _launch(_BERNOULLI, torch.float32, n, seed, offset, float(p))


KERNELS = {
    "philox_uint32": philox_uint32,
    "philox_uniform": philox_uniform,
    "philox_normal": philox_normal,
    "philox_bernoulli": philox_bernoulli,
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
