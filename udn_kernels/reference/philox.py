"""Pure-PyTorch Philox4x32-10: words bit-identical to Triton's ``tl.randint4x``, uniforms to
``tl.rand``, normals laid out as ``tl.randn4x``.

This is the oracle of the random-number contract (docs/rng.md). Element ``e`` of the uint32 /
uniform stream of ``seed`` is word 0 of Philox4x32-10 with key ``(seed_lo, seed_hi)`` and counter
``(e_lo, e_hi, 0, 0)``; element ``e`` of the normal stream is ``tl.randn4x(seed, e >> 2)[e & 3]``.

uint32 arithmetic is emulated in int64 tensors: a 32x32-bit product is split into 16-bit
halves so no intermediate overflows int64.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit words
_TWO_PI = 6.283185307179586


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``const * x`` for a uint32 constant and uint32 values in int64."""
    c_hi, c_lo = const >> 16, const & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    lo_lo = c_lo * x_lo
    mid = c_hi * x_lo + c_lo * x_hi + (lo_lo >> 16)  # < 2^34, fits
    lo = ((mid & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    hi = c_hi * x_hi + (mid >> 16)
    return hi & _MASK32, lo


def philox4x32(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four uint32 words (as int64) of Philox4x32-10 for 64-bit ``counter`` values (int64)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _counters(offsets: torch.Tensor | None, n: int | None, offset: int, device) -> torch.Tensor:
    if offsets is not None:
        return offsets.to(torch.int64)
    return torch.arange(n, dtype=torch.int64, device=device) + offset


def uint_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in [0, 1)."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor, sine: torch.Tensor) -> torch.Tensor:
    """Triton's ``pair_uniform_to_normal`` in float32: its sine output where ``sine``, else its cosine."""
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.where(sine, torch.sin(theta), torch.cos(theta))


def random_uint32_at(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """uint32 words (int64 dtype) of the stream at the given int64 element offsets."""
    return philox4x32(seed, offsets.to(torch.int64))[0]


def uniform_at(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 uniforms in [0, 1) at the given element offsets (``tl.rand``)."""
    return uint_to_uniform(random_uint32_at(offsets, seed))


def normal_at(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 standard normals at the given element offsets: ``tl.randn4x(seed, e >> 2)[e & 3]``,
    i.e. four normals per Philox call (words 0, 1 for ``e & 3`` in {0, 1}, words 2, 3 for {2, 3};
    cosine for even ``e``, sine for odd)."""
    e = offsets.to(torch.int64)
    w0, w1, w2, w3 = philox4x32(seed, e >> 2)
    high = (e & 2) != 0
    u1 = uint_to_uniform(torch.where(high, w2, w0))
    u2 = uint_to_uniform(torch.where(high, w3, w1))
    return box_muller(u1, u2, (e & 1) != 0)


def sign_at(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 +1 where the word's top bit is set, -1 otherwise (flipout and symmetric masks)."""
    return torch.where(random_uint32_at(offsets, seed) >= 2**31, 1.0, -1.0).to(torch.float32)


def random_uint32(n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """``n`` consecutive uint32 words (int64 dtype) starting at element ``offset``."""
    return random_uint32_at(_counters(None, n, offset, device), seed)


def uniform(n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """``n`` consecutive float32 uniforms starting at element ``offset``."""
    return uniform_at(_counters(None, n, offset, device), seed)


def normal(n: int, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """``n`` consecutive float32 standard normals starting at element ``offset``."""
    return normal_at(_counters(None, n, offset, device), seed)


def bernoulli(n: int, p: float, seed: int, offset: int = 0, device=None) -> torch.Tensor:
    """``n`` float32 Bernoulli(p) draws: 1 where ``uniform < p``."""
    return (uniform(n, seed, offset, device) < p).to(torch.float32)
