"""kl: the KL term of a ``GaussianLinear(1024, 1024)`` / ``VariationalDropoutLinear(1024, 1024)``,
forward + backward (docs/stochastic_linear.md, "KL").

``udn``: ``udn_kernels.gaussian_kl(mu, rho, prior_std, sigma_transform="softplus")`` (what the
layer's ``kl()`` runs: one fused pass each way on the C++ backend) and
``udn_kernels.log_uniform_kl(log_alpha, clamp=(-10, 8))``; ``eager``: the eager formulas of
reference/kl.py on ``F.softplus(rho)`` / ``log_alpha.clamp(-10, 8)`` (what the layers ran before,
and what bayesian-torch's ``kl_loss`` computes). Tiny shapes by default so the suite never rots;
``UDN_BENCH_FULL=1`` selects 1024 x 1024.

Run: ``python -m pytest benchmarks/bench_kl.py --benchmark-enable`` (pytest-benchmark table) or
``python benchmarks/bench_kl.py`` (forward / backward / forward+backward medians and the ratio,
measured in one process).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels.bench.harness import Method, time_method
from udn_kernels.reference import kl as ref_kl

FULL = os.environ.get("UDN_BENCH_FULL") == "1"
SHAPE = (1024, 1024) if FULL else (24, 32)
PRIOR_STD = 1.0
LOG_ALPHA_RANGE = (-10.0, 8.0)


def _params():
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(SHAPE, generator=g) / SHAPE[1] ** 0.5).requires_grad_()
    rho = torch.full(SHAPE, -4.0).requires_grad_()  # sigma = softplus(rho) ~ 0.018
    log_alpha = (torch.randn(SHAPE, generator=g) - 4.0).requires_grad_()
    return mu, rho, log_alpha


def methods(kind: str) -> list[Method]:
    """udn / eager for ``kind`` "gaussian" or "log-uniform" (inputs shared by the methods)."""
    mu, rho, log_alpha = _params()
    if kind == "gaussian":
        return [Method("udn", lambda: udn_kernels.gaussian_kl(mu, rho, PRIOR_STD, sigma_transform="softplus"),
                       role="ours"),
                Method("eager", lambda: ref_kl.gaussian_kl(mu, F.softplus(rho), PRIOR_STD))]
    return [Method("udn", lambda: udn_kernels.log_uniform_kl(log_alpha, clamp=LOG_ALPHA_RANGE), role="ours"),
            Method("eager", lambda: ref_kl.log_uniform_kl(log_alpha.clamp(*LOG_ALPHA_RANGE)))]


def _fwd_bwd(method: Method):
    out = method.forward()
    out.backward()
    return out


# ------------------------------------------------------------------ pytest-benchmark suite

needs_cpp = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built")


@needs_cpp
@pytest.mark.parametrize("method", ["udn", "eager"])
@pytest.mark.parametrize("kind", ["gaussian", "log-uniform"])
def test_kl(benchmark, kind, method):
    benchmark.group = f"kl {kind} {SHAPE[0]}x{SHAPE[1]} fwd+bwd"
    chosen = {m.name: m for m in methods(kind)}[method]
    with udn_kernels.backend("cpu"):
        out = benchmark.pedantic(_fwd_bwd, (chosen,), rounds=5 if FULL else 10, warmup_rounds=1)
    assert out.shape == () and torch.isfinite(out)


# ------------------------------------------------------------------ one-process report

def main():
    print(f"{SHAPE[0]}x{SHAPE[1]}, {torch.get_num_threads()} threads, median ms (forward | backward | forward+backward)")
    for kind in ("gaussian", "log-uniform"):
        with udn_kernels.backend("cpu"):
            timings = {m.name: time_method(m) for m in methods(kind)}
        udn, eager = timings["udn"], timings["eager"]
        print(f"kl {kind:11s}: udn {udn.forward_ms:6.2f} | {udn.backward_ms:6.2f} | {udn.total_ms:6.2f}   "
              f"eager {eager.forward_ms:6.2f} | {eager.backward_ms:6.2f} | {eager.total_ms:6.2f}   "
              f"eager/udn {eager.total_ms / udn.total_ms:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
