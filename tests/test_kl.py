"""gaussian_kl and log_uniform_kl against numeric integration and the published constants."""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import udn_kernels
from udn_kernels.reference import kl as ref_kl


def _numeric_gaussian_kl(mu, sigma, prior_std):
    q, p = stats.norm(mu, sigma), stats.norm(0.0, prior_std)
    lo, hi = mu - 12 * sigma, mu + 12 * sigma  # q has < 1e-30 mass outside
    value, err = integrate.quad(lambda w: q.pdf(w) * (q.logpdf(w) - p.logpdf(w)), lo, hi, limit=200,
                                epsabs=1e-12, epsrel=1e-12)
    assert err < 1e-8
    return value


def test_gaussian_kl_matches_numeric_integration():
    mu = torch.tensor([0.0, 0.3, -1.2, 2.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.05, 0.7, 3.0], dtype=torch.float64)
    for prior_std in (1.0, 0.1, 2.5):
        expected = sum(_numeric_gaussian_kl(m, s, prior_std) for m, s in zip(mu.tolist(), sigma.tolist()))
        got = udn_kernels.gaussian_kl(mu, sigma, prior_std).item()
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-9)
    # zero-mean posterior (variance layer)
    expected = sum(_numeric_gaussian_kl(0.0, s, 0.5) for s in sigma.tolist())
    assert udn_kernels.gaussian_kl(None, sigma, 0.5).item() == pytest.approx(expected, rel=1e-8)


def test_gaussian_kl_is_summed_zero_at_prior_and_differentiable():
    sigma = torch.full((3, 4), 0.8, dtype=torch.float64)
    assert udn_kernels.gaussian_kl(torch.zeros_like(sigma), sigma, 0.8).item() == pytest.approx(0.0, abs=1e-12)
    one = udn_kernels.gaussian_kl(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 2.0)
    many = udn_kernels.gaussian_kl(torch.ones(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64), 2.0)
    assert many.item() == pytest.approx(12 * one.item())  # summed, not averaged
    mu = torch.randn(5, dtype=torch.float64, requires_grad=True)
    sg = (torch.rand(5, dtype=torch.float64) + 0.1).requires_grad_(True)
    prior = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, s: udn_kernels.gaussian_kl(m, s, prior), (mu, sg))


def _numeric_log_uniform_kl(log_alpha):
    """Exact KL(N(theta, alpha theta^2) || log-uniform) up to the constant fixed by KL -> 0 as alpha -> inf:
    KL = -0.5 log alpha + E_{e ~ N(1, alpha)} log|e| + (gamma + log 2) / 2 (Molchanov et al. 2017, eq. 13)."""
    scale = math.exp(0.5 * log_alpha)
    f = lambda e: math.log(abs(e)) * stats.norm.pdf(e, 1.0, scale)
    expectation = sum(integrate.quad(f, lo, hi, limit=200)[0] for lo, hi in ((-np.inf, 0.0), (0.0, np.inf)))
    return -0.5 * log_alpha + expectation + 0.5 * (np.euler_gamma + math.log(2.0))


def test_log_uniform_kl_matches_numeric_integration():
    # Molchanov et al.'s sigmoid fit is an approximation: over log alpha in [-6, 8] its largest
    # deviation from the integral is 0.0085 (at log alpha = -4); 0.01 is the bound.
    log_alpha = np.linspace(-6.0, 8.0, 15)
    for la in log_alpha:
        got = udn_kernels.log_uniform_kl(torch.tensor([la], dtype=torch.float64)).item()
        assert abs(got - _numeric_log_uniform_kl(la)) < 0.01, la


def test_log_uniform_kl_published_constants_and_limits():
    assert (ref_kl.K1, ref_kl.K2, ref_kl.K3) == (0.63576, 1.87320, 1.48695)
    la = torch.tensor([-3.0, 0.0, 2.0], dtype=torch.float64)
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    expected = sum(-(k1 / (1 + math.exp(-(k2 + k3 * v))) - 0.5 * math.log1p(math.exp(-v)) - k1)
                   for v in la.tolist())
    assert udn_kernels.log_uniform_kl(la).item() == pytest.approx(expected, rel=1e-12)
    # alpha -> inf: KL -> 0; alpha -> 0: KL ~ k1 - 0.5 log alpha; never negative
    assert udn_kernels.log_uniform_kl(torch.tensor([30.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert udn_kernels.log_uniform_kl(torch.tensor([-30.0], dtype=torch.float64)).item() == \
        pytest.approx(k1 + 15.0, rel=1e-6)
    grid = torch.linspace(-20, 20, 401, dtype=torch.float64)
    assert all(udn_kernels.log_uniform_kl(v[None]).item() >= 0 for v in grid)
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(udn_kernels.log_uniform_kl, (x,))


@pytest.mark.parametrize("call, match", [
    (lambda: udn_kernels.gaussian_kl(torch.zeros(3), torch.ones(4), 1.0), r"mu: expected shape \(4,\)"),
    (lambda: udn_kernels.gaussian_kl(None, torch.ones(4), 0.0), "prior_std: expected a positive float"),
    (lambda: udn_kernels.gaussian_kl(None, torch.ones(4), "1"), "prior_std: expected a positive float or a tensor"),
    (lambda: udn_kernels.gaussian_kl(None, torch.ones(4), torch.ones(3)), "prior_std: expected a shape broadcastable"),
    (lambda: udn_kernels.gaussian_kl(torch.zeros(4).double(), torch.ones(4), 1.0), "mu: expected dtype"),
    (lambda: udn_kernels.gaussian_kl(None, torch.ones(4, dtype=torch.long), 1.0), "sigma: expected dtype"),
    (lambda: udn_kernels.gaussian_kl(None, [1.0], 1.0), "sigma: expected a torch.Tensor"),
    (lambda: udn_kernels.log_uniform_kl(torch.ones(3, dtype=torch.long)), "log_alpha: expected dtype"),
    (lambda: udn_kernels.log_uniform_kl(0.5), "log_alpha: expected a torch.Tensor"),
])
def test_validation_errors_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
