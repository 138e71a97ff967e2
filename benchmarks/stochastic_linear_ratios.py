"""Interleaved ratios of the stochastic-linear methods to their GEMM floors (docs/internals.md).

Every round runs each method once, in turn, so machine load hits all of them alike; the report is
the median over rounds of each method's time and of each ratio. The inputs' ``.grad`` are reset
to None before each timed call (untimed), as ``optimizer.zero_grad()`` does in a training step. With ``--threads 1`` (default) the
clock is the thread's CPU time, which other jobs on a shared box do not inflate; with more threads
it is wall time. Shapes of the gauss-linear case (docs/design.md, "Benchmarks"): B=256, K=N_out=1024, fp32, forward + ``sum().backward()``. Ours takes ``rho`` with
``sigma_transform="softplus"`` (softplus inside the kernel); "udn sample, sigma given" is the same
layer fed ``F.softplus(rho)`` by the caller, as eager does.

``--phases`` times the pieces of the "sample" path instead: the C++ forward and backward kernels
(fed sigma, and fed rho), the GEMMs they contain, 1M Philox normals and the caller's
``softplus(rho)`` and its backward.

Run: ``python benchmarks/stochastic_linear_ratios.py [--threads N] [--rounds R] [--phases]
[--shape B K N_OUT]``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import _backend, rng
from udn_kernels.bench.cases import LINEAR_SHAPE, eager_bern, eager_gauss, linear_floor

SHAPE = LINEAR_SHAPE  # B, K, N_out
S8 = 8


def _inputs(B, K, N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, K, generator=g).requires_grad_()
    mu = (torch.randn(N, K, generator=g) / math.sqrt(K)).requires_grad_()
    rho = torch.full((N, K), -4.0, requires_grad=True)
    bias = torch.zeros(N, requires_grad=True)
    return x, mu, rho, bias


def _fwd_bwd(fn):
    return lambda: fn().sum().backward()


def methods(B: int, K: int, N: int) -> tuple[dict, list, tuple]:
    """Name -> callable, the (numerator, denominator) ratios to report, and the leaf tensors."""
    x, mu, rho, bias = _inputs(B, K, N)

    def ours(estimator, samples=None):
        return _fwd_bwd(lambda: udn_kernels.gaussian_linear(x, mu, rho, estimator=estimator, samples=samples,
                                                            sigma_transform="softplus"))

    def eager(estimator):
        return lambda: eager_gauss(estimator, x, mu, rho)

    m = {
        "udn sample": ours("sample"), "eager sample": _fwd_bwd(eager("sample")),
        "udn sample, sigma given": _fwd_bwd(lambda: udn_kernels.gaussian_linear(x, mu, F.softplus(rho))),
        "udn local": ours("local"), "eager local": _fwd_bwd(eager("local")),
        "udn flipout": ours("flipout"), "eager flipout": _fwd_bwd(eager("flipout")),
        "udn sample S=8": ours("sample", S8),
        "eager loop S=8": _fwd_bwd(lambda: torch.stack([eager("sample")() for _ in range(S8)])),
        "udn bern input": _fwd_bwd(lambda: udn_kernels.bernoulli_linear(x, mu, bias, p=0.5, mask="input")),
        "F.dropout+F.linear": _fwd_bwd(lambda: eager_bern("input", x, mu, bias)),
        "floor": linear_floor(x, mu, 1), "floor S=8": linear_floor(x, mu, S8),
    }
    ratios = [("eager sample", "udn sample"), ("udn sample", "floor"), ("eager sample", "floor"),
              ("udn sample, sigma given", "floor"),
              ("eager local", "udn local"), ("udn local", "floor"), ("eager local", "floor"),
              ("eager flipout", "udn flipout"), ("udn flipout", "floor"), ("eager flipout", "floor"),
              ("eager loop S=8", "udn sample S=8"), ("udn sample S=8", "floor S=8"),
              ("eager loop S=8", "floor S=8"),
              ("F.dropout+F.linear", "udn bern input"), ("udn bern input", "floor"),
              ("F.dropout+F.linear", "floor")]
    return m, ratios, (x, mu, rho, bias)


def phases(B: int, K: int, N: int) -> tuple[dict, list, tuple]:
    """The pieces of the "sample" path, as raw kernel calls."""
    _backend.load_extension()
    ops = torch.ops.udn_kernels_C
    x, mu, rho, _ = (t.detach() for t in _inputs(B, K, N))
    sigma, x3, grad = F.softplus(rho), x[None], torch.randn(1, B, N)
    args = (x3, mu, sigma, None, None, 5, "sample", 1, False)
    rho_args = (x3, mu, rho, None, None, 5, "sample", 1, False, True)
    m = {
        "kernel fwd": lambda: ops.gaussian_linear_fwd(*args),
        "kernel bwd": lambda: ops.gaussian_linear_bwd(grad, *args[:5], x.new_empty(0), *args[5:], False,
                                                     [True] * 5),
        "kernel fwd, rho": lambda: ops.gaussian_linear_fwd(*rho_args),
        "kernel bwd, rho": lambda: ops.gaussian_linear_bwd(grad, *rho_args[:5], x.new_empty(0), *rho_args[5:],
                                                          [True] * 5),
        "GEMM x W^T": lambda: x @ mu.t(),
        "GEMMs dY W, dY^T x": lambda: (grad[0] @ mu, grad[0].t() @ x),
        "N*K normals": lambda: rng.normal(N * K, seed=5),
        "softplus": lambda: F.softplus(rho),
        "softplus_backward": lambda: torch.ops.aten.softplus_backward(sigma, rho, 1.0, 20.0),
    }
    ratios = [("kernel fwd", "GEMM x W^T"), ("kernel bwd", "GEMMs dY W, dY^T x"),
              ("kernel fwd, rho", "GEMM x W^T"), ("kernel bwd, rho", "GEMMs dY W, dY^T x"),
              ("N*K normals", "GEMM x W^T"), ("softplus", "GEMM x W^T"), ("softplus_backward", "GEMM x W^T")]
    return m, ratios, ()


def run(table: dict, ratios: list, rounds: int, clock, leaves=()) -> dict:
    """Times every entry of ``table`` once per round, in turn, with ``leaves``' gradients reset
    before each call; prints and returns the median ratios."""
    times = {name: [] for name in table}
    for fn in table.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in table.items():
            for leaf in leaves:
                leaf.grad = None
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    for name, t in times.items():
        print(f"{name:24s} {statistics.median(t):9.2f} ms")
    result = {}
    for a, b in ratios:
        result[a, b] = statistics.median(p / q for p, q in zip(times[a], times[b]))
        print(f"{a:>24s} / {b:<22s} {result[a, b]:6.3f}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, metavar=("B", "K", "N_OUT"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    B, K, N = args.shape
    print(f"B={B} K={K} N_out={N} fp32, {args.threads} thread(s), "
          f"{'CPU' if args.threads == 1 else 'wall'} time, median of {args.rounds} interleaved rounds")
    with udn_kernels.backend("cpu"):
        table, ratios, leaves = (phases if args.phases else methods)(B, K, N)
        run(table, ratios, args.rounds, clock, leaves)


if __name__ == "__main__":
    main()
