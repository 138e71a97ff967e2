"""Property-based tests (hypothesis): the C++ kernels equal the reference on random small shapes,
dtypes (float32 / float64), strided inputs (transposed / sliced views) and options. Under
TRITON_INTERPRET=1 (tests/test_triton_properties.py re-runs this module so) the same properties
check the Triton kernels instead, with fewer examples (the interpreter is slow).

Heads: forward and every gradient. Stochastic linear ops: the same seed gives the same noise on
both backends, so outputs and gradients agree to rounding (normals within 4e-6 of each other).
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from triton_interpreter import interpreted

import udn_kernels
from udn_kernels import bernoulli_linear, depth_loglik, depth_mixture_nll, gaussian_linear, rng

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

BACKEND = "triton" if interpreted() else "cpu"
SETTINGS = settings(max_examples=5 if interpreted() else 25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.float64])
# float32: GEMM blocking differs between the fused kernel and the reference loop (~1e-6 relative);
# float64 leaves only rounding.
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}
# The Triton stochastic-linear kernels accumulate in float32 whatever the input dtype (docs/triton.md).
LINEAR_TOL = {torch.float32: TOL[torch.float32],
              torch.float64: TOL[torch.float32] if BACKEND == "triton" else TOL[torch.float64]}


def layout(data, t, name):
    """``t`` as a drawn memory layout: contiguous, transposed (last two dims) or a sliced view."""
    kind = data.draw(st.sampled_from(["contiguous", "transposed", "sliced"]), label=f"{name} layout")
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., 1::2] = t
        return wide[..., 1::2]
    return t


def run(backend, fn, tensors):
    """Output and gradients (w.r.t. every float tensor) of ``fn`` on ``backend``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    with udn_kernels.backend(backend):
        out = fn(*leaves)
        if isinstance(out, tuple):
            out = torch.cat([o.flatten() for o in out])
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad((out * weights).sum(), wanted, allow_unused=True)
    return out.detach(), grads


def assert_backends_agree(fn, tensors, tol):
    ref_out, ref_grads = run("reference", fn, tensors)
    cpu_out, cpu_grads = run(BACKEND, fn, tensors)
    scale = max(1.0, ref_out.abs().max().item()) if ref_out.numel() else 1.0
    torch.testing.assert_close(cpu_out, ref_out, rtol=tol["rtol"], atol=tol["atol"] * scale)
    for i, (c, r) in enumerate(zip(cpu_grads, ref_grads)):
        if r is None or c is None:
            assert (r is None or not r.abs().any()) and (c is None or not c.abs().any()), f"grad {i}"
            continue
        gscale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(c, r, rtol=tol["rtol"], atol=tol["atol"] * gscale, msg=f"grad {i}")


@SETTINGS
@given(data=st.data(), L=st.integers(1, 4), N=st.integers(0, 9), D=st.integers(1, 12),
       C=st.sampled_from([1, 2, 7, 33, 70]), dtype=DTYPES, per_depth=st.booleans(),
       bias=st.sampled_from(["none", "shared", "depth"]), likelihood=st.sampled_from(["categorical", "gaussian"]),
       mode=st.sampled_from(["loglik", "expected", "mixture"]), ignore=st.booleans())
def test_heads_kernel_equals_reference(data, L, N, D, C, dtype, per_depth, bias, likelihood, mode, ignore):
    gen = torch.Generator().manual_seed(L * 1000 + N * 100 + D * 10 + C)
    hidden = layout(data, torch.randn(L, N, D, generator=gen, dtype=dtype), "hidden")
    weight = layout(data, torch.randn(*((L, C, D) if per_depth else (C, D)), generator=gen, dtype=dtype)
                    / math.sqrt(D), "weight")
    b = {"none": None, "shared": torch.randn(C, generator=gen, dtype=dtype),
         "depth": torch.randn(L, C, generator=gen, dtype=dtype)}[bias]
    if b is not None:
        b = layout(data, b, "bias")
    log_w = torch.log_softmax(torch.randn(L, generator=gen, dtype=dtype), 0)
    if L > 1 and data.draw(st.booleans(), label="a -inf log-weight"):
        log_w = log_w.clone()
        log_w[-1] = -math.inf
    noise = None
    if likelihood == "categorical":
        target = torch.randint(0, C, (N,), generator=gen)
        if ignore and N:
            target[::2] = -100
    else:
        target = layout(data, torch.randn(N, C, generator=gen, dtype=dtype), "target")
        noise = torch.rand(C, generator=gen, dtype=dtype) + 0.5

    def fn(h, w, bb, y, s, lw):
        if mode == "loglik":
            return depth_loglik(h, w, bb, y, likelihood=likelihood, noise_std=s)
        return depth_mixture_nll(h, w, bb, y, lw, mode=mode, likelihood=likelihood, noise_std=s,
                                 reduction="none")

    assert_backends_agree(fn, [hidden, weight, b, target, noise, log_w], TOL[dtype])


def _linear_shapes():
    return dict(B=st.integers(0, 6), K=st.integers(1, 12), N_out=st.integers(1, 10),
                samples=st.sampled_from([None, 1, 3]), dtype=DTYPES, lead=st.sampled_from([(), (2,)]),
                seed=st.integers(0, 2**63 - 1))


def _x(data, gen, samples, input_has_samples, lead, B, K, dtype):
    shape = ((samples,) if input_has_samples else ()) + lead + (B, K)
    return layout(data, torch.randn(*shape, generator=gen, dtype=dtype), "x")


@SETTINGS
@given(data=st.data(), estimator=st.sampled_from(["sample", "local", "flipout"]), zero_mean=st.booleans(),
       bias=st.sampled_from(["none", "mu", "sigma", "both"]), **_linear_shapes())
def test_gaussian_linear_kernel_equals_reference(data, estimator, zero_mean, bias, B, K, N_out, samples, dtype,
                                               lead, seed):
    gen = torch.Generator().manual_seed(B * 1000 + K * 10 + N_out)
    has_samples = samples is not None and data.draw(st.booleans(), label="input_has_samples")
    x = _x(data, gen, samples, has_samples, lead, B, K, dtype)
    mu = None if zero_mean else layout(data, torch.randn(N_out, K, generator=gen, dtype=dtype), "weight_mu")
    sigma = layout(data, torch.rand(N_out, K, generator=gen, dtype=dtype) + 0.05, "weight_sigma")
    b_mu = torch.randn(N_out, generator=gen, dtype=dtype) if bias in ("mu", "both") else None
    b_sigma = torch.rand(N_out, generator=gen, dtype=dtype) + 0.05 if bias in ("sigma", "both") else None

    def fn(x, mu, sigma, b_mu, b_sigma):
        return gaussian_linear(x, mu, sigma, b_mu, b_sigma, estimator=estimator, samples=samples, seed=seed,
                               input_has_samples=has_samples)

    # normals differ by <= 4e-6 between backends (float32 log/cos): the float64 tolerance widens to it
    tol = LINEAR_TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-5)
    assert_backends_agree(fn, [x, mu, sigma, b_mu, b_sigma], tol)


@SETTINGS
@given(data=st.data(), mask=st.sampled_from(["input", "weight", "symmetric"]), p=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
       with_bias=st.booleans(), **_linear_shapes())
def test_bernoulli_linear_kernel_equals_reference(data, mask, p, with_bias, B, K, N_out, samples, dtype, lead, seed):
    gen = torch.Generator().manual_seed(B * 1000 + K * 10 + N_out + 7)
    has_samples = samples is not None and data.draw(st.booleans(), label="input_has_samples")
    x = _x(data, gen, samples, has_samples, lead, B, K, dtype)
    weight = layout(data, torch.randn(N_out, K, generator=gen, dtype=dtype), "weight")
    b = torch.randn(N_out, generator=gen, dtype=dtype) if with_bias else None

    def fn(x, w, bb):
        return bernoulli_linear(x, w, bb, p=p, mask=mask, samples=samples, seed=seed, input_has_samples=has_samples)

    assert_backends_agree(fn, [x, weight, b], LINEAR_TOL[dtype])


@SETTINGS
@given(n=st.integers(0, 300), seed=st.integers(0, 2**63 - 1),
       offset=st.one_of(st.integers(0, 2**40), st.integers(2**63 - 2**20, 2**63 - 301),
                        st.integers(0, 2**31).map(lambda k: k * 2**32 - 150).filter(lambda v: v >= 0)))
def test_rng_kernel_equals_reference(n, seed, offset):
    with udn_kernels.backend("reference"):
        ref = [rng.random_uint32(n, seed, offset), rng.uniform(n, seed, offset),
               rng.normal(n, seed, offset), rng.bernoulli(n, 0.3, seed, offset)]
    with udn_kernels.backend(BACKEND):
        cpu = [rng.random_uint32(n, seed, offset), rng.uniform(n, seed, offset),
               rng.normal(n, seed, offset), rng.bernoulli(n, 0.3, seed, offset)]
    for name, r, c in zip(["uint32", "uniform", "normal", "bernoulli"], ref, cpu):
        if name == "normal":
            torch.testing.assert_close(c, r, rtol=0, atol=4e-6)
        else:
            assert torch.equal(c, r), name
