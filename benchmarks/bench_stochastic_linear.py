"""gauss-linear / bern-linear (docs/design.md, "Benchmarks"): in-kernel weight sampling vs what users write.

gauss-linear (B=256, K=N_out=1024; estimators sample/local/flipout; samples 1 and 8):
``udn`` (``udn_kernels.gaussian_linear(x, mu, rho, sigma_transform="softplus")`` on the C++
backend: softplus inside the kernel), ``eager``
(bayesian-torch style: ``mu + softplus(rho) * randn_like(mu)`` then ``F.linear`` for "sample"; the
eager local-reparameterisation / Flipout formulas for the others; a Python loop of draws for
S=8) and ``floor`` (the 3 GEMMs of forward + backward, ``x W^T``, ``dY W``, ``dY^T x``, per draw).
bern-linear (same shapes; masks input/weight/symmetric): ``udn``, ``eager`` (``F.dropout`` +
``F.linear``; a ``torch.bernoulli`` weight mask; a random-sign weight) and ``floor``.
Tiny shapes by default so the suite never rots; ``UDN_BENCH_FULL=1`` selects the full sizes of
``udn bench``. The baselines, floors and full shapes are those of ``udn_kernels.bench.cases``.

Run: ``python -m pytest benchmarks/bench_stochastic_linear.py --benchmark-enable`` (pytest-benchmark
table) or ``python benchmarks/bench_stochastic_linear.py [--memory]`` (forward / backward /
forward+backward medians and ratios measured in one process; ``--memory`` adds the peak extra RSS
of each method in a fresh subprocess).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import udn_kernels
from udn_kernels.bench.cases import BERNOULLI_P as P, LINEAR_SHAPE, eager_bern, eager_gauss, linear_floor
from udn_kernels.bench.harness import Method, time_method

FULL = os.environ.get("UDN_BENCH_FULL") == "1"
B, K, N = LINEAR_SHAPE if FULL else (16, 32, 24)
ESTIMATORS = ("sample", "local", "flipout")
MASKS = ("input", "weight", "symmetric")
SAMPLES = (1, 8)


def _gauss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).requires_grad_()
    mu = (torch.randn(N, K, generator=g) / K**0.5).requires_grad_()
    rho = torch.full((N, K), -4.0).requires_grad_()  # sigma = softplus(rho) ~ 0.018
    bias = torch.zeros(N, requires_grad=True)
    return x, mu, rho, bias


def _loop(fn, samples):
    return fn if samples == 1 else (lambda: torch.stack([fn() for _ in range(samples)]))


def gauss_methods(estimator: str, samples: int) -> list[Method]:
    """udn / eager / floor for one gauss-linear configuration (inputs shared by the methods)."""
    x, mu, rho, bias = _gauss_inputs()
    S = None if samples == 1 else samples

    def udn():
        return udn_kernels.gaussian_linear(x, mu, rho, bias, estimator=estimator, samples=S,
                                           sigma_transform="softplus")

    eager = _loop(lambda: eager_gauss(estimator, x, mu, rho, bias), samples)
    return [Method("udn", udn, role="ours"), Method("eager", eager),
            Method("floor", linear_floor(x, mu, samples), backward=False, role="floor")]


def bern_methods(mask: str, samples: int = 1) -> list[Method]:
    """udn / eager / floor for one bern-linear configuration."""
    x, weight, _, bias = _gauss_inputs()
    S = None if samples == 1 else samples

    def udn():
        return udn_kernels.bernoulli_linear(x, weight, bias, p=P, mask=mask, samples=S)

    return [Method("udn", udn, role="ours"), Method("eager", _loop(lambda: eager_bern(mask, x, weight, bias, P), samples)),
            Method("floor", linear_floor(x, weight, samples), backward=False, role="floor")]


def _fwd_bwd(method: Method):
    out = method.forward()
    if method.backward:
        out.sum().backward()
    return out


# ------------------------------------------------------------------ pytest-benchmark suite

needs_cpp = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built")


@needs_cpp
@pytest.mark.parametrize("method", ["udn", "eager", "floor"])
@pytest.mark.parametrize("samples", SAMPLES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gauss_linear(benchmark, estimator, samples, method):
    benchmark.group = f"gauss-linear {estimator} S={samples} B={B} K={K} N={N} fwd+bwd"
    chosen = {m.name: m for m in gauss_methods(estimator, samples)}[method]
    with udn_kernels.backend("cpu"):
        out = benchmark.pedantic(_fwd_bwd, (chosen,), rounds=3 if FULL else 5, warmup_rounds=1)
    if method != "floor":
        assert out.shape == ((B, N) if samples == 1 else (samples, B, N))
        assert torch.isfinite(out).all()


@needs_cpp
@pytest.mark.parametrize("method", ["udn", "eager", "floor"])
@pytest.mark.parametrize("mask", MASKS)
def test_bern_linear(benchmark, mask, method):
    benchmark.group = f"bern-linear {mask} B={B} K={K} N={N} fwd+bwd"
    chosen = {m.name: m for m in bern_methods(mask)}[method]
    with udn_kernels.backend("cpu"):
        out = benchmark.pedantic(_fwd_bwd, (chosen,), rounds=3 if FULL else 5, warmup_rounds=1)
    if method != "floor":
        assert out.shape == (B, N) and torch.isfinite(out).all()


# ------------------------------------------------------------------ one-process report

CONFIGS = [("gauss", e, s) for e in ESTIMATORS for s in SAMPLES] + [("bern", m, s) for m in MASKS for s in SAMPLES]


def _methods(kind, name, samples):
    return gauss_methods(name, samples) if kind == "gauss" else bern_methods(name, samples)


def _peak_mb(kind, name, samples, method) -> float | None:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_stochastic_linear as b; from udn_kernels.bench import harness; "
            f"m = {{x.name: x for x in b._methods({kind!r}, {name!r}, {samples})}}[{method!r}]; "
            "print(harness.measure_peak_in_this_process(m))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    return float(result.stdout.split()[-1]) if result.returncode == 0 else None


def main(memory: bool = False):
    print(f"B={B} K={K} N_out={N}, {torch.get_num_threads()} threads, median ms "
          "(forward | backward | forward+backward); ratios on forward+backward")
    for kind, name, samples in CONFIGS:
        with udn_kernels.backend("cpu"):
            timings = {m.name: time_method(m) for m in _methods(kind, name, samples)}
        udn, eager, floor = timings["udn"], timings["eager"], timings["floor"]
        line = (f"{kind}-linear {name:9s} S={samples}: udn {udn.forward_ms:7.2f} | {udn.backward_ms:7.2f} | "
                f"{udn.total_ms:7.2f}   eager {eager.forward_ms:7.2f} | {eager.backward_ms:7.2f} | "
                f"{eager.total_ms:7.2f}   floor {floor.total_ms:7.2f}   "
                f"eager/udn {eager.total_ms / udn.total_ms:5.2f}x   udn/floor {udn.total_ms / floor.total_ms:5.2f}x")
        if memory:
            peaks = {m: _peak_mb(kind, name, samples, m) for m in ("udn", "eager")}
            line += "   peak MB " + " ".join(f"{m} {v:.1f}" if v is not None else f"{m} n/a" for m, v in peaks.items())
        print(line, flush=True)


if __name__ == "__main__":
    main(memory="--memory" in sys.argv)
