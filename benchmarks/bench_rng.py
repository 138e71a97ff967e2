"""rng (docs/design.md, "Benchmarks"): the Philox stream's C++ kernels vs torch's own generators.

Kinds: ``normal`` (``udn_kernels.rng.normal`` vs ``torch.randn``), ``uniform`` (``rng.uniform`` vs
``torch.rand``), ``bernoulli`` (``rng.bernoulli`` vs ``torch.empty(n).bernoulli_(p)``). Both sides
return a fresh float32 tensor of ``n`` elements, so both pay for the allocation. ``n = 2^24`` with
``UDN_BENCH_FULL=1``, else a tiny ``2^12`` so the suite never rots. The methods are those of
``udn_kernels.bench.cases.rng_methods``.

Run: ``python -m pytest benchmarks/bench_rng.py --benchmark-enable`` (pytest-benchmark table) or
``python benchmarks/bench_rng.py`` (medians and speed-ups measured in one process).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

import udn_kernels
from udn_kernels.bench.cases import BERNOULLI_P as P, RNG_SIZE, rng_methods

FULL = os.environ.get("UDN_BENCH_FULL") == "1"
N = RNG_SIZE if FULL else 2**12
SEED = 1234
KINDS = ("normal", "uniform", "bernoulli")
METHODS = ("udn", "torch")
# (kind, method) -> the name of that method in rng_methods
METHOD_NAMES = {("normal", "udn"): "udn normal", ("normal", "torch"): "torch.randn",
                ("uniform", "udn"): "udn uniform", ("uniform", "torch"): "torch.rand",
                ("bernoulli", "udn"): "udn bernoulli", ("bernoulli", "torch"): "torch.bernoulli_"}


def runner(kind: str, method: str, n: int = N):
    """A zero-argument callable producing ``n`` draws of ``kind`` with ``method``."""
    draw = rng_methods(n, SEED)[METHOD_NAMES[kind, method]]

    def run():
        with udn_kernels.backend("cpu"):
            return draw()
    return run


def measure(kind: str, repeats: int = 7) -> dict[str, float]:
    """Median wall time (seconds) of one call per method, after a warm-up call.

    Calls of the two methods alternate, so load from other processes hits both alike.
    """
    runs = {method: runner(kind, method) for method in METHODS}
    times = {method: [] for method in METHODS}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for method, run in runs.items():
            start = time.perf_counter()
            run()
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(t) for method, t in times.items()}


# ------------------------------------------------------------------ pytest-benchmark suite

needs_cpp = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built")


@needs_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_rng_methods_agree(kind):
    """Both methods give float32 vectors of the requested size with the same first two moments."""
    ours, theirs = runner(kind, "udn", 2**16)(), runner(kind, "torch", 2**16)()
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    # Moments of N(0,1) / U(0,1) / Bernoulli(1/2): 10 standard errors is a generous, honest bound.
    mean, var = {"normal": (0.0, 1.0), "uniform": (0.5, 1 / 12), "bernoulli": (P, P * (1 - P))}[kind]
    for sample in (ours, theirs):
        assert abs(sample.double().mean().item() - mean) < 10 * (var / sample.numel()) ** 0.5
        assert abs(sample.double().var().item() - var) < 0.05 * var


@needs_cpp
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_rng(benchmark, kind, method):
    benchmark.group = f"rng {kind} n={N}"
    out = benchmark.pedantic(runner(kind, method), rounds=5 if FULL else 20, warmup_rounds=1)
    assert out.numel() == N


def main():
    print(f"rng: n = {N}, {torch.get_num_threads()} threads; median of 7 calls, fresh output each call")
    for kind in KINDS:
        medians = measure(kind)
        ours, theirs = medians["udn"], medians["torch"]
        print(f"  {kind:10s} udn {ours * 1e3:8.2f} ms   torch {theirs * 1e3:8.2f} ms   "
              f"speed-up {theirs / ours:5.2f}x   ({N / ours / 1e9:.2f} G draws/s)")


if __name__ == "__main__":
    main()
