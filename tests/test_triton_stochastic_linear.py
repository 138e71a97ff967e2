"""Triton stochastic-linear kernels (udn_kernels/triton/stochastic_linear.py) vs the reference, in
the Triton CPU interpreter, at tiny shapes (ragged against the 16-wide tiles).

TRITON_INTERPRET=1 must be set before triton is first imported, and other test modules in this
pytest process may already have imported it compiled-mode. So without the variable this module
only holds one test that re-runs the module in a fresh interpreter subprocess; with it the real
cases run.

The noise is the same Philox stream on both sides (weights/masks/signs bit-identical, normals
within 1e-6), so outputs and gradients agree up to float32 summation order: rtol = atol = 1e-4.
float16 inputs against the float64 reference: 2e-3 of the output scale.
With sigma_softplus the kernels' softplus / sigmoid (an atanh series on exp(-|rho|)) agree with
F.softplus / torch.sigmoid to a few float32 ulps, inside the same tolerance.
"""
import itertools

import pytest
from triton_interpreter import interpreted, rerun_under_interpreter

if not interpreted():

    def test_triton_stochastic_linear_under_interpreter():
        rerun_under_interpreter(__file__)

else:
    import torch
    import triton
    import triton.language as tl

    import udn_kernels
    from udn_kernels import reference
    from udn_kernels import triton as triton_backend
    from udn_kernels.triton.stochastic_linear import _softplus

    S, B, K, N = 2, 5, 19, 7  # K > 16 exercises the K-loop and its masked tail
    TOL = {"rtol": 1e-4, "atol": 1e-4}

    def _float64(arg):
        return arg.double() if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg

    def _close(got, want):
        torch.testing.assert_close(got, want, **TOL)

    def _check(name, args_fwd, args_bwd_tail, grad, close=_close, reference_dtype=None):
        """Triton forward and backward against the reference, which gets the arguments cast to
        ``reference_dtype`` (float64) when given; ``close(got, want)`` per output."""
        cast = _float64 if reference_dtype == torch.float64 else (lambda arg: arg)
        out = triton_backend.KERNELS[f"{name}_fwd"](*args_fwd)
        want = reference.KERNELS[f"{name}_fwd"](*map(cast, args_fwd))
        for o, w in zip(out, want) if name == "gaussian_linear" else ((out, want),):  # gaussian: local's std too
            close(o, w)
        tail_got, tail_want = args_bwd_tail, tuple(map(cast, args_bwd_tail))
        if name == "gaussian_linear":  # each backend's backward takes its own forward's std
            tail_got, tail_want = ((*tail[:5], std, *tail[5:]) for tail, std in ((tail_got, out[1]),
                                                                                  (tail_want, want[1])))
        got = triton_backend.KERNELS[f"{name}_bwd"](grad, *tail_got)
        want = reference.KERNELS[f"{name}_bwd"](cast(grad), *tail_want)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            close(g, w)

    def _rho(shape, gen):
        """rho spanning [-30, 25]: softplus underflow to ~exp(rho), ~0 (sigma = log 2, sigmoid 1/2)
        and past F.softplus's threshold of 20 (sigma = rho, sigmoid 1)."""
        rho = torch.empty(shape).uniform_(-30, 25, generator=gen)
        edges = torch.tensor([-30.0, -17.5, -1e-3, 0.0, 1e-3, 19.9, 20.1, 25.0])
        rho.view(-1)[:edges.numel()] = edges[:rho.numel()]
        return rho

    @pytest.mark.parametrize("sigma_softplus", [False, True])
    @pytest.mark.parametrize("estimator, has_mu, has_bias, x_sampled", list(itertools.product(
        ("sample", "flipout", "local"), (True, False), ("none", "mu", "both", "sigma"), (False, True))))
    def test_gaussian_linear_matches_reference(estimator, has_mu, has_bias, x_sampled, sigma_softplus):
        """Forward, local's std and every gradient; with sigma_softplus the sigma arguments hold rho
        (the gradients are d rho)."""
        gen = torch.Generator().manual_seed(7)
        sigmas = ((lambda shape: _rho(shape, gen)) if sigma_softplus
                  else (lambda shape: torch.rand(shape, generator=gen) + 0.1))
        x = torch.randn(S if x_sampled else 1, B, K, generator=gen)
        mu = torch.randn(N, K, generator=gen) if has_mu else None
        sigma = sigmas((N, K))
        bias_mu = torch.randn(N, generator=gen) if has_bias in ("mu", "both") else None
        bias_sigma = sigmas((N,)) if has_bias in ("sigma", "both") else None
        grad = torch.randn(S, B, N, generator=gen)
        args = (x, mu, sigma, bias_mu, bias_sigma, 2**40 + 3, estimator, S, x_sampled, sigma_softplus)
        _check("gaussian_linear", args, (*args, [True] * 5), grad)

    @triton.jit
    def _softplus_kernel(r_ptr, sp_ptr, sg_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        sp, sg = _softplus(tl.load(r_ptr + offs, mask=mask))
        tl.store(sp_ptr + offs, sp, mask=mask)
        tl.store(sg_ptr + offs, sg, mask=mask)

    def test_softplus_helper_matches_torch():
        """The in-kernel softplus / sigmoid against float64 F.softplus / torch.sigmoid over
        [-30, 25] (plus +-88 and 0) at float32 ulp level: rtol 2e-6, atol 1e-30."""
        r = torch.cat([torch.linspace(-30, 25, 4001), torch.tensor([-88.0, 0.0, 88.0])])
        sp, sg = torch.empty_like(r), torch.empty_like(r)
        _softplus_kernel[(triton.cdiv(r.numel(), 1024),)](r, sp, sg, r.numel(), BLOCK=1024)
        r64 = r.double()
        torch.testing.assert_close(sp, torch.nn.functional.softplus(r64).float(), rtol=2e-6, atol=1e-30)
        torch.testing.assert_close(sg, torch.sigmoid(r64).float(), rtol=2e-6, atol=1e-30)

    @pytest.mark.parametrize("mask, has_bias, x_sampled", list(itertools.product(
        ("input", "weight", "symmetric"), (True, False), (False, True))))
    def test_bernoulli_linear_matches_reference(mask, has_bias, x_sampled):
        gen = torch.Generator().manual_seed(8)
        x = torch.randn(S if x_sampled else 1, B, K, generator=gen)
        weight = torch.randn(N, K, generator=gen)
        bias = torch.randn(N, generator=gen) if has_bias else None
        grad = torch.randn(S, B, N, generator=gen)
        args = (x, weight, bias, 0.3, 2**32 - 5, mask, S, x_sampled)
        _check("bernoulli_linear", args, (*args, [True] * 3), grad)

    # float16 against the float64 reference on the same fp16 inputs and noise: the kernels round the
    # sampled weight / masked input tiles to fp16 for tl.dot (fp32 accumulation) and the outputs
    # once, so 2e-3 of the output scale, 4 fp16 units of roundoff (4.2e-4 seen; bf16 is not
    # checked: the interpreter's bf16 tl.dot is wrong, docs/triton.md).
    FP16_BOUND = 2e-3

    def _close_fp16(got, want):
        assert got.shape == want.shape
        if want.numel():  # not an output left out (std of sample / flipout)
            assert got.dtype == torch.float16, got.dtype
            error = float((got.double() - want).abs().max())
            assert error <= FP16_BOUND * max(1.0, float(want.abs().max())), error

    @pytest.mark.parametrize("name, mode", [("gaussian_linear", e) for e in ("sample", "flipout", "local")]
                             + [("bernoulli_linear", m) for m in ("input", "weight", "symmetric")])
    def test_float16_matches_float64_reference(name, mode):
        """Forward (and local's std) and every gradient, fp16 inputs with the sample axis on x."""
        gen = torch.Generator().manual_seed(10)
        half = lambda *shape, low=None: (torch.randn(*shape, generator=gen) if low is None  # noqa: E731
                                         else torch.rand(*shape, generator=gen) * 0.2 + low).half()
        x, weight, bias, grad = half(S, B, K), half(N, K), half(N), half(S, B, N)
        if name == "gaussian_linear":
            args = (x, weight, half(N, K, low=0.05), bias, half(N, low=0.05), 2**40 + 3, mode, S, True, False)
            masks = [True] * 5
        else:
            args = (x, weight, bias, 0.3, 2**32 - 5, mode, S, True)
            masks = [True] * 3
        _check(name, args, (*args, masks), grad, close=_close_fp16, reference_dtype=torch.float64)

    def test_noise_offsets_are_64_bit():
        """A seed/offset past 2^32 and a different seed give different, reference-exact noise."""
        x = torch.randn(1, 3, 17)
        sigma = torch.rand(5, 17) + 0.1
        a = triton_backend.KERNELS["gaussian_linear_fwd"](x, None, sigma, None, None, 2**63 - 1, "sample", 3, False)[0]
        b = triton_backend.KERNELS["gaussian_linear_fwd"](x, None, sigma, None, None, 1, "sample", 3, False)[0]
        torch.testing.assert_close(a, reference.KERNELS["gaussian_linear_fwd"](
            x, None, sigma, None, None, 2**63 - 1, "sample", 3, False)[0], **TOL)
        assert not torch.allclose(a, b)

    def test_public_ops_run_on_triton_backend_with_autograd():
        """udn_kernels.gaussian_linear / bernoulli_linear dispatch here and backprop through it."""
        gen = torch.Generator().manual_seed(9)
        x = torch.randn(4, 18, generator=gen, requires_grad=True)
        mu = torch.randn(6, 18, generator=gen, requires_grad=True)
        sigma = (torch.rand(6, 18, generator=gen) + 0.1).requires_grad_()
        rho = (torch.rand(6, 18, generator=gen) * 8 - 6).requires_grad_()
        bias_rho = torch.randn(6, generator=gen, requires_grad=True)
        w = torch.randn(6, 18, generator=gen, requires_grad=True)
        leaves = (x, mu, sigma, rho, bias_rho, w)
        grads = {}
        for name in ("triton", "reference"):
            with udn_kernels.backend(name):
                assert udn_kernels._backend.resolve(x.device, "gaussian_linear_fwd") == name
                out = udn_kernels.gaussian_linear(x, mu, sigma, estimator="flipout", samples=2, seed=5)
                out = out + udn_kernels.gaussian_linear(x, mu, rho, None, bias_rho, estimator="sample",
                                                        samples=2, seed=7, sigma_transform="softplus")
                out = out + udn_kernels.gaussian_linear(x, None, rho, estimator="local", samples=2, seed=8,
                                                        sigma_transform="softplus")
                out = out + udn_kernels.bernoulli_linear(x, w, mask="weight", p=0.25, samples=2, seed=6)
                grads[name] = (out, *torch.autograd.grad(out.square().sum(), leaves))
        for got, want in zip(grads["triton"], grads["reference"]):
            torch.testing.assert_close(got, want, **TOL)
