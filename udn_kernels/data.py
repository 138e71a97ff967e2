"""Small synthetic data sets generated in code (no downloads)."""
from __future__ import annotations

import math

import torch


def spirals(n: int, phase: float = 1.0, noise: float = 0.05, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved 2-D spirals: ``(x [n, 2], y [n] int64)`` with balanced classes.

    A point of class ``c`` at radius ``r ~ U(0.1, 1)`` sits at angle ``phase * 2 pi * r + c pi``,
    so ``phase`` is the number of turns of each arm: ``phase = 0`` gives two opposite rays (linearly
    separable); every unit of ``phase`` adds one full turn (harder, needs more depth).
    Gaussian noise of std ``noise`` is added to the coordinates. Deterministic given ``seed``.
    """
    if n < 2:
        raise ValueError(f"n: expected an int >= 2, got {n}")
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    r = 0.1 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    angle = phase * 2.0 * math.pi * r + math.pi * y
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    x = x + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    perm = torch.randperm(n, generator=gen)
    return x[perm].to(dtype), y[perm]
