"""Plumbing shared by the experiments: registration, output files, tables, data and training loops."""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn

from .._cli_support import CLIError

EXPERIMENTS: dict = {}  # name -> run(args) -> dict, filled by @register


def register(name: str) -> Callable:
    """Decorator: add ``run(args) -> dict`` to ``EXPERIMENTS`` under ``name``."""
    def wrap(run: Callable) -> Callable:
        EXPERIMENTS[name] = run
        return run
    return wrap


def output_path(args, name: str, suffix: str) -> str:
    """``<--out>/<name>.<suffix>`` (the directory is created)."""
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out: cannot create {args.out!r}: {exc}") from exc
    if not os.access(args.out, os.W_OK):
        raise CLIError(f"--out: directory {args.out!r} is not writable")
    return os.path.join(args.out, f"{name}.{suffix}")


def finish(args, name: str, result: dict, fig) -> dict:
    """Save ``fig`` as ``<name>.png`` and ``result`` (plus run settings) as ``<name>.json``."""
    png, path = output_path(args, name, "png"), output_path(args, name, "json")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    result = {"experiment": name, "quick": bool(args.quick), "seed": args.seed, **result}
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {png}\nwrote {path}")
    return result


def table(header: list[str], rows: Iterable[list], widths: list[int] | None = None) -> str:
    """Fixed-width text table; floats printed with 4 significant decimals, strings as they are."""
    rows = [list(r) for r in rows]
    widths = widths or [max(12, len(h) + 2) for h in header]

    def cell(value, width):
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.rjust(width)

    lines = ["".join(h.rjust(w) for h, w in zip(header, widths)), "-" * sum(widths)]
    lines += ["".join(cell(v, w) for v, w in zip(r, widths)) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of a list of numbers."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def pm(values: list[float], spec: str = ".3f") -> str:
    """``"mean ± std"`` of ``values``."""
    m, s = mean_std(values)
    return f"{m:{spec}} ± {s:{spec}}"


def sklearn_dataset(name: str, seed: int, standardise: bool = True):
    """``(x_tr, y_tr, x_te, y_te, likelihood)`` of a bundled scikit-learn set, 80/20 split by ``seed``."""
    from ..train import load_dataset
    return load_dataset(name, seed=seed, standardise=standardise)


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Index tensors of one shuffled epoch."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def fit(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
        lr: float, batch_size: int = 128, seed: int = 0, optimizer=None, on_epoch: Callable | None = None):
    """Adam (or ``optimizer``) on ``loss_fn(model, xb, yb)`` for ``epochs`` shuffled epochs."""
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        for idx in batches(len(x), batch_size, generator):
            optimizer.zero_grad()
            loss = loss_fn(model, x[idx], y[idx])
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch, float(loss.detach()))
    return model


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
