"""Determinism: a fixed seed gives bit-identical outputs and gradients run to run (CPU, fixed thread
count) for every op, and seed=None follows torch.manual_seed. What changes with the thread count is
measured by ``python tests/test_determinism.py`` and documented in docs/hardening.md."""
import math
import sys

import pytest
import torch

import udn_kernels
from udn_kernels import (bernoulli_linear, depth_loglik, depth_mixture_nll, depth_mixture_predict,
                         gaussian_kl, gaussian_linear, log_uniform_kl, rng)
from udn_kernels import nn as unn

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _heads(per_depth, likelihood, C):
    gen = torch.Generator().manual_seed(0)
    L, N, D = 4, 300, 24  # > one 256-row tile per depth: several parallel tasks
    h = torch.randn(L, N, D, generator=gen)
    w = torch.randn(*((L, C, D) if per_depth else (C, D)), generator=gen) / math.sqrt(D)
    b = torch.randn(*((L, C) if per_depth else (C,)), generator=gen)
    lw = torch.log_softmax(torch.randn(L, generator=gen), 0)
    if likelihood == "categorical":
        y, s = torch.randint(0, C, (N,), generator=gen), None
    else:
        y, s = torch.randn(N, C, generator=gen), torch.rand(C, generator=gen) + 0.5

    def fn(h, w, b, lw, s):
        nll = depth_mixture_nll(h, w, b, y, lw, mode="mixture", likelihood=likelihood, noise_std=s, reduction="none")
        ll = depth_loglik(h, w, b, y, likelihood=likelihood, noise_std=s)
        pred = depth_mixture_predict(h, w, b, lw, likelihood=likelihood, noise_std=s)
        pred = torch.cat(pred, 1) if isinstance(pred, tuple) else pred
        return torch.cat([nll, ll.flatten(), pred.flatten()])

    return fn, [h, w, b, lw] + ([s] if s is not None else [None])


def _linear(op, option, samples):
    gen = torch.Generator().manual_seed(1)
    B, K, N = 70, 300, 260  # several weight tiles and row blocks
    x = torch.randn(B, K, generator=gen)
    mu, sigma = torch.randn(N, K, generator=gen) / 20, torch.rand(N, K, generator=gen) / 20
    bmu, bsigma = torch.randn(N, generator=gen), torch.rand(N, generator=gen)
    if op == "gaussian_linear":
        return (lambda x, mu, sigma, bmu, bsigma: gaussian_linear(x, mu, sigma, bmu, bsigma, estimator=option,
                                                                  samples=samples, seed=123)), [x, mu, sigma, bmu, bsigma]
    return (lambda x, w, b: bernoulli_linear(x, w, b, p=0.25, mask=option, samples=samples, seed=123)), [x, mu, bmu]


CASES = {f"heads-{'depth' if pd else 'shared'}-{lik}-C{C}": (_heads, (pd, lik, C))
         for pd in (False, True) for lik in ("categorical", "gaussian") for C in (10, 700)}
CASES.update({f"gaussian_linear-{e}-S{S}": (_linear, ("gaussian_linear", e, S))
              for e in ("sample", "local", "flipout") for S in (None, 3)})
CASES.update({f"bernoulli_linear-{m}-S{S}": (_linear, ("bernoulli_linear", m, S))
              for m in ("input", "weight", "symmetric") for S in (None, 3)})
CASES["kl"] = (lambda: ((lambda mu, s, la: gaussian_kl(mu, s, 0.3) + log_uniform_kl(la)),
                        [torch.randn(300, 300), torch.rand(300, 300) + 0.1, torch.randn(300, 300)]), ())


def outputs_and_grads(fn, tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t is not None])
    return [out.detach(), *grads]


def build(name):
    make, args = CASES[name]
    return make(*args)


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bit_identical_run_to_run(name, two_threads):
    fn, tensors = build(name)
    first = outputs_and_grads(fn, tensors)
    for _ in range(1):
        again = outputs_and_grads(fn, tensors)
        for a, b in zip(first, again):
            assert torch.equal(a, b), name


def test_rng_bit_identical_and_thread_independent(two_threads):
    for fn in (rng.random_uint32, rng.uniform, rng.normal):
        a = fn(100_000, seed=9, offset=2**40)
        torch.set_num_threads(1)
        b = fn(100_000, seed=9, offset=2**40)
        torch.set_num_threads(2)
        assert torch.equal(a, b) and torch.equal(a, fn(100_000, seed=9, offset=2**40))


def test_seed_none_follows_manual_seed():
    x, w, s = torch.randn(4, 6), torch.randn(3, 6), torch.rand(3, 6)
    torch.manual_seed(5)
    a = [gaussian_linear(x, w, s), bernoulli_linear(x, w), rng.normal(10)]
    torch.manual_seed(5)
    b = [gaussian_linear(x, w, s), bernoulli_linear(x, w), rng.normal(10)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], gaussian_linear(x, w, s))


def test_udn_training_reproducible():
    def train():
        torch.manual_seed(0)
        model = unn.UDN.mlp(2, 8, 3, layer="gaussian")
        opt = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
        x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
        for _ in range(3):
            opt.zero_grad()
            model.loss(x, y, 64).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(), train()))


def thread_count_report():
    """Max |1 thread - 2 threads| (relative to max |value|) of every case's outputs and gradients."""
    rows = []
    for name in sorted(CASES):
        fn, tensors = build(name)
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = outputs_and_grads(fn, tensors)
        diffs = [((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() if a.numel() else 0.0
                 for a, b in zip(results[1], results[2])]
        identical = all(torch.equal(a, b) for a, b in zip(results[1], results[2]))
        rows.append((name, identical, max(diffs)))
    return rows


if __name__ == "__main__":
    for name, identical, rel in thread_count_report():
        print(f"{name:40s} {'bit-identical' if identical else f'max rel diff {rel:.2e}'}")
    sys.exit(0)
