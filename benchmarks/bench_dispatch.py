"""Per-call overhead of the two ways into an op (udn_kernels/ops/_dispatch.py).

Every op stage is one ``udn_kernels::`` custom op; eager calls run the same implementation,
context and backward through a ``torch.autograd.Function`` that skips the custom op's dispatcher
layers. This measures what that saves per forward + backward call at small shapes, where the
fixed cost dominates (udn-step's heads are L=10, N=256, D=32, C=2):

- ``heads``: ``depth_loglik`` forward + backward (``depth_loglik_fwd`` / ``_bwd``);
- ``fused``: ``depth_mixture_nll`` mean reduction (``depth_loglik_dot``, gradients in the forward);
- ``gaussian``: ``gaussian_linear`` sample estimator forward + backward.

Run: ``python -m pytest benchmarks/bench_dispatch.py --benchmark-enable`` or
``python benchmarks/bench_dispatch.py`` (medians in microseconds, both ways interleaved in one
process).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from udn_kernels.ops import gaussian_linear as gaussian_ops
from udn_kernels.ops import heads as heads_ops

CASES = ("heads", "fused", "gaussian")
WAYS = ("eager", "custom_op")


def _inputs(case: str):
    generator = torch.Generator().manual_seed(0)
    if case == "gaussian":
        x = torch.randn(1, 64, 32, generator=generator, requires_grad=True)
        mu = torch.randn(16, 32, generator=generator, requires_grad=True)
        sigma = torch.rand(16, 32, generator=generator).requires_grad_()
        return (x, mu, sigma, None, None, torch.tensor(7), "sample", 1, False, False, "cpu"), (x, mu, sigma)
    L, N, D, C = 10, 256, 32, 2
    hidden = torch.randn(L, N, D, generator=generator, requires_grad=True)
    weight = torch.randn(L, C, D, generator=generator, requires_grad=True)
    target = torch.randint(0, C, (N,), generator=generator)
    if case == "heads":
        return (hidden, weight, None, target, None, False, -100, "cpu"), (hidden, weight)
    coef = torch.full((L, N), -1.0 / (L * N))
    return (hidden, weight, None, target, None, coef, None, False, -100, [True, True, False, False], "cpu"), \
        (hidden, weight)


def runner(case: str, way: str):
    """A zero-argument callable running one forward + backward of ``case`` the ``way`` given."""
    eager, custom_op = {"heads": (heads_ops._loglik, heads_ops._loglik_fwd),
                        "fused": (heads_ops._loglik_dot_call, heads_ops._loglik_dot),
                        "gaussian": (gaussian_ops._call, gaussian_ops._fwd)}[case]
    op = eager if way == "eager" else custom_op
    args, leaves = _inputs(case)

    def run():
        for leaf in leaves:
            leaf.grad = None
        op(*args)[0].sum().backward()
        return [leaf.grad for leaf in leaves]
    return run


def measure(case: str, repeats: int = 200) -> dict[str, float]:
    """Median seconds per call of each way, the two ways alternating call by call."""
    runs = {way: runner(case, way) for way in WAYS}
    times = {way: [] for way in WAYS}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for way, run in runs.items():
            start = time.perf_counter()
            run()
            times[way].append(time.perf_counter() - start)
    return {way: statistics.median(t) for way, t in times.items()}


@pytest.mark.parametrize("case", CASES)
def test_both_ways_compute_the_same_gradients(case):
    eager, custom_op = runner(case, "eager")(), runner(case, "custom_op")()
    for a, b in zip(eager, custom_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("case", CASES)
def test_call_overhead(benchmark, case, way):
    benchmark(runner(case, way))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"{'case':<10} {'eager us':>10} {'custom op us':>13} {'saved us':>9}")
    for case in CASES:
        median = measure(case)
        print(f"{case:<10} {median['eager'] * 1e6:>10.1f} {median['custom_op'] * 1e6:>13.1f} "
              f"{(median['custom_op'] - median['eager']) * 1e6:>9.1f}")
