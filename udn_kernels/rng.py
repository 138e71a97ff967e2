"""The Philox random stream as tensors (docs/rng.md).

Element ``i`` of every function's output is element ``offset + i`` of the stream of ``seed``:
Philox4x32-10 exactly as Triton's ``tl.randint4x``, so the same (seed, offset) gives the same
numbers on the reference, C++ and Triton backends (words and uniforms bit-identical, normals
within 4e-6). Fused kernels use the same stream, so these functions also reproduce the noise any
op drew, given the op's layout in docs/rng.md.
"""
from __future__ import annotations

import torch

from . import _backend
from ._checks import check_probability, float_dtypes_for, resolve_seed

MAX_OFFSET = 2**63 - 1

__all__ = ["random_uint32", "uniform", "normal", "bernoulli"]


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int >= 0, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n}")
    return n


def _check_offset(offset, n: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int in [0, 2^63), got {type(offset).__name__}")
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset: expected an int in [0, 2^63), got {offset}")
    if offset + n > MAX_OFFSET + 1:
        raise ValueError(f"offset: offset + n must be <= 2^63, got offset={offset}, n={n}")
    return offset


def _run(name: str, n, seed, offset, device, *extra) -> torch.Tensor:
    n = _check_count(n)
    offset = _check_offset(offset, n)
    seed = int(resolve_seed(seed))
    device = torch.device(device if device is not None else "cpu")
    kernel = _backend.kernel(_backend.resolve(device, name), name)
    if device.type == "cuda":
        with torch.cuda.device(device):
            out = kernel(n, *extra, seed, offset)
    else:
        out = kernel(n, *extra, seed, offset)
    return out.to(device)


def _check_dtype(dtype, device) -> torch.dtype:
    allowed = float_dtypes_for(torch.device(device if device is not None else "cpu"))
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"dtype: expected one of ({names}), got {dtype}")
    return dtype


def random_uint32(n: int, seed=None, offset: int = 0, *, device=None) -> torch.Tensor:
    """``n`` uint32 words of the stream (an int64 tensor with values in ``[0, 2^32)``).

    Args:
        n: number of elements (int >= 0).
        seed: int in ``[0, 2^63)``, a one-element int64 tensor, or None to draw one from torch's
            default generator (so ``torch.manual_seed`` makes the call reproducible).
        offset: stream element of output index 0, int in ``[0, 2^63)``; 64-bit, never wraps.
        device: where the result lives (default CPU); selects the backend as every op does.
    """
    return _run("philox_uint32", n, seed, offset, device)


def uniform(n: int, seed=None, offset: int = 0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n`` uniforms in ``[0, 1)`` (Triton's ``tl.rand``), computed in float32 and rounded to ``dtype``
    (16-bit values that would round up to 1.0 are kept below it). Arguments as :func:`random_uint32`."""
    dtype = _check_dtype(dtype, device)
    out = _run("philox_uniform", n, seed, offset, device).to(dtype)
    # Rounding to 16 bits carries values within half an ulp of 1 up to 1.0: keep them in [0, 1).
    return out.clamp_(max=1 - torch.finfo(dtype).eps / 2) if dtype.itemsize == 2 else out


def normal(n: int, seed=None, offset: int = 0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``n`` standard normals, four per Philox call: stream element ``e`` is
    ``tl.randn4x(seed, e >> 2)[e & 3]`` (Box-Muller; layout in docs/rng.md), computed in float32 and
    rounded to ``dtype`` (float64 gets the float32 values exactly: the stream is float32). Within 4e-6
    of the other backends, not bit-identical (float32 ``log``/``sin``/``cos`` differ by an ulp or two).

    Arguments as :func:`random_uint32`.
    """
    dtype = _check_dtype(dtype, device)
    return _run("philox_normal", n, seed, offset, device).to(dtype)


def bernoulli(n: int, p: float, seed=None, offset: int = 0, *, device=None) -> torch.Tensor:
    """``n`` float32 Bernoulli(p) draws: 1.0 where ``uniform(offset + i) < p`` (in float32), else 0.0.

    Args:
        p: success probability, a float in ``[0, 1]``.
        Other arguments as :func:`random_uint32`.
    """
    p = check_probability("p", p, upper_inclusive=True)
    return _run("philox_bernoulli", n, seed, offset, device, p)
