"""Triton KL kernels (udn_kernels/triton/kl.py) vs the reference kernels, in the Triton CPU
interpreter, at small ragged shapes (several blocks and a masked tail). The kernels compute in
float32 (softplus: the atanh series of stochastic_linear._softplus), hence rtol 1e-5.

Without TRITON_INTERPRET=1 this module holds one test that re-runs it in an interpreter subprocess
(tests/triton_interpreter.py).
"""
import pytest
from triton_interpreter import interpreted, rerun_under_interpreter

if not interpreted():

    def test_triton_kl_under_interpreter():
        rerun_under_interpreter(__file__)

else:
    import torch

    from udn_kernels import reference
    from udn_kernels import triton as triton_backend

    SHAPE = (3, 1111)  # 3333 elements: 3 full 1024-blocks and a ragged one
    TOL = {"rtol": 1e-5, "atol": 1e-5}

    def _kernels(name):
        return triton_backend.KERNELS[name], reference.KERNELS[name]

    @pytest.mark.parametrize("softplus", [False, True])
    @pytest.mark.parametrize("has_mu", [True, False])
    @pytest.mark.parametrize("per_element_prior", [False, True])
    def test_gaussian_kl_kernels_match_the_reference(softplus, has_mu, per_element_prior):
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(SHAPE, generator=g) if has_mu else None
        sigma = torch.randn(SHAPE, generator=g) - 3 if softplus else torch.rand(SHAPE, generator=g) + 0.05
        prior = torch.rand(SHAPE, generator=g) + 0.5 if per_element_prior else torch.tensor([0.8])
        grad = torch.tensor(0.37)
        for name, args in (("gaussian_kl_fwd", (mu, sigma, prior, softplus)),
                           ("gaussian_kl_bwd", (grad, mu, sigma, prior, softplus, [True, True, True]))):
            ours, ref = _kernels(name)
            got, want = ours(*args), ref(*args)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, **TOL)
        ours, _ = _kernels("gaussian_kl_bwd")  # unwanted gradients are not computed
        d_mu, d_sigma, d_prior = ours(grad, mu, sigma, prior, softplus, [False, True, False])
        assert d_mu.numel() == 0 and d_prior.numel() == 0 and d_sigma.shape == sigma.shape

    @pytest.mark.parametrize("clamp", [(float("-inf"), float("inf")), (-1.0, 0.5)])
    def test_log_uniform_kl_kernels_match_the_reference(clamp):
        log_alpha = 4 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        grad = torch.tensor(0.37)
        for name, args in (("log_uniform_kl_fwd", (log_alpha, *clamp)),
                           ("log_uniform_kl_bwd", (grad, log_alpha, *clamp))):
            ours, ref = _kernels(name)
            torch.testing.assert_close(ours(*args), ref(*args), **TOL)

    @pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float16, 2e-3)], ids=["fp64", "fp16"])
    def test_kl_kernels_in_other_storage_dtypes(dtype, rtol):
        """float64 and float16 storage (what CUDA takes; docs/triton.md "Dtypes and precision"):
        the same float32 arithmetic, against the float64 reference on the same inputs. float64
        keeps the float32 tolerance (not fp64 precision); float16 adds one fp16 rounding of each
        output (2^-11 relative), hence 2e-3 relative to each output's scale."""
        g = torch.Generator().manual_seed(2)
        mu, rho, log_alpha = (torch.randn(SHAPE, generator=g).to(dtype) * s for s in (1, 1, 4))
        rho = rho - 3
        prior = (torch.rand(SHAPE, generator=g) + 0.5).to(dtype)
        grad = torch.tensor(0.37, dtype=dtype)
        up = lambda a: a.double() if isinstance(a, torch.Tensor) else a  # noqa: E731
        for name, args in (("gaussian_kl_fwd", (mu, rho, prior, True)),
                           ("gaussian_kl_bwd", (grad, mu, rho, prior, True, [True, True, True])),
                           ("log_uniform_kl_fwd", (log_alpha, -1.0, 0.5)),
                           ("log_uniform_kl_bwd", (grad, log_alpha, -1.0, 0.5))):
            ours, ref = _kernels(name)
            got, want = ours(*args), ref(*map(up, args))
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert a.dtype == dtype and a.shape == b.shape, name
                torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * float(b.abs().max()), msg=name)
