"""Depth distributions: truncation rule, probabilities, exact rate gradients, the Poisson prior."""
import math

import pytest
import torch
from scipy import stats

from udn_kernels.nn import PositivePoisson, TruncatedPoisson, poisson_quantile
from udn_kernels.nn.depth import _ExpectationPlusEntropy


def test_rate_one_and_five_match_the_reference_rule():
    q = TruncatedPoisson(init_rate=1.0)
    assert q.max_depth == 4
    torch.testing.assert_close(q.probs().detach(), torch.tensor([0.375, 0.375, 0.1875, 0.0625]))
    assert TruncatedPoisson(init_rate=5.0).max_depth == 10
    assert abs(float(q.rate.detach()) - 1.0) < 1e-6


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.999, 1.7, 2.5, 4.2, 9.9, 23.0, 101.5])
def test_max_depth_is_max_of_quantile_and_floor_plus_one(rate):
    q = TruncatedPoisson(init_rate=rate)
    nu = float(q.rate.detach())  # the float32 parameter may differ from `rate` in the last bits
    expected = max(int(stats.poisson.ppf(0.95, nu)), math.floor(nu) + 1) + 1
    assert q.max_depth == expected
    assert poisson_quantile(nu, 0.5) == int(stats.poisson.ppf(0.5, nu))


def test_probs_mean_entropy_are_the_truncated_poisson():
    q = TruncatedPoisson(init_rate=3.3).double()
    nu, L = float(q.rate.detach()), q.max_depth
    k = torch.arange(L, dtype=torch.float64)
    unnorm = torch.tensor([stats.poisson.pmf(int(i), nu) for i in k], dtype=torch.float64)
    expected = unnorm / unnorm.sum()
    torch.testing.assert_close(q.probs().detach(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.log_probs().detach(), expected.log(), rtol=1e-12, atol=1e-12)
    assert float(q.mean().detach()) == pytest.approx(float((expected * (k + 1)).sum()), rel=1e-12)
    assert float(q.entropy().detach()) == pytest.approx(float(-(expected * expected.log()).sum()), rel=1e-12)
    # An explicit support size renormalises over l = 1..L'.
    wider = q.probs(L + 3).detach()
    torch.testing.assert_close(wider[:L] / wider[:L].sum(), expected, rtol=1e-12, atol=0)


def test_rate_gradient_is_exact():
    q = TruncatedPoisson(init_rate=2.3).double()
    L = q.max_depth
    # d E_q[l] / d nu = Var_q[k] / nu for an exponential family in log(nu) on a fixed support.
    mean = q.mean()
    (grad_raw,) = torch.autograd.grad(mean, q.raw_rate)
    probs = q.probs().detach()
    k = torch.arange(L, dtype=torch.float64)
    var = (probs * k ** 2).sum() - (probs * k).sum() ** 2
    nu = q.rate.detach()
    assert float(grad_raw) == pytest.approx(float(var / nu * torch.sigmoid(q.raw_rate.detach())), rel=1e-10)

    coeffs = torch.randn(L, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    raw = q.raw_rate.detach().clone().requires_grad_(True)

    def objective(r):
        k = torch.arange(L, dtype=torch.float64)
        nu = torch.nn.functional.softplus(r)
        log_q = torch.log_softmax(k * torch.log(nu) - torch.lgamma(k + 1), 0)
        return (log_q.exp() * coeffs).sum() - (log_q.exp() * log_q).sum()

    assert torch.autograd.gradcheck(objective, (raw,))
    # And the module computes that same function.
    value = (q.probs() * coeffs).sum() + q.entropy()
    torch.testing.assert_close(value, objective(q.raw_rate))


def test_positive_poisson_log_prob():
    prior = PositivePoisson(0.5)
    depths = torch.arange(0, 8)
    got = prior.log_prob(depths)
    assert got[0] == -math.inf
    expected = torch.tensor(stats.poisson.logpmf(depths[1:].numpy() - 1, 0.5), dtype=got.dtype)
    torch.testing.assert_close(got[1:], expected)
    assert prior.mean() == 1.5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="init_rate"):
        TruncatedPoisson(init_rate=0.0)
    with pytest.raises(ValueError, match="quantile"):
        TruncatedPoisson(quantile=1.0)
    with pytest.raises(ValueError, match="rate"):
        PositivePoisson(-1.0)


def test_expectation_plus_entropy_value_and_exact_gradients():
    """The one-node ELBO depth part against autograd through log_probs, and float64 gradcheck."""
    q = TruncatedPoisson(init_rate=2.7).double()
    L = q.max_depth
    values = torch.randn(L, dtype=torch.float64, requires_grad=True)
    fused = q.expectation_plus_entropy(values)
    log_q = q.log_probs(L)
    explicit = (log_q.exp() * (values - log_q)).sum()
    torch.testing.assert_close(fused, explicit, rtol=1e-12, atol=1e-12)
    inputs = (q.raw_rate, values)
    for a, b in zip(torch.autograd.grad(fused, inputs), torch.autograd.grad(explicit, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    raw = q.raw_rate.detach().clone().requires_grad_(True)
    k, log_factorial = q._support(L)
    assert torch.autograd.gradcheck(lambda r, v: _ExpectationPlusEntropy.apply(r, v, k, log_factorial),
                                    (raw, values.detach().clone().requires_grad_(True)))
