"""Stochastic layers: noise layout, the MC sample-axis protocol, deterministic mode, KL terms."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import udn_kernels
from udn_kernels import nn as unn
from udn_kernels.reference import philox

MAX_SEED = 2**63 - 1
NORMAL_TOL = dict(rtol=1e-5, atol=1e-5)  # normals agree within 4e-6 across backends (docs/rng.md)


def _next_seeds(torch_seed: int, count: int) -> list[int]:
    """The seeds layers draw with seed=None after torch.manual_seed(torch_seed) (docs/rng.md)."""
    torch.manual_seed(torch_seed)
    return [int(torch.randint(0, MAX_SEED, (), dtype=torch.int64)) for _ in range(count)]


def _gaussian_weights(layer: unn.GaussianLinear, seed: int, samples: int):
    """Per-sample weights and biases of the "sample" estimator from the documented layout."""
    n, k = layer.weight_sigma.shape
    eps = philox.normal(samples * n * k, seed).view(samples, n, k).double()
    beps = philox.normal(samples * n, seed, samples * n * k).view(samples, n).double()
    weight = layer.weight_mu + layer.weight_sigma * eps
    bias = layer.bias_mu + layer.bias_sigma * beps
    return weight, bias


def test_gaussian_chain_under_mc_predict_is_per_sample_forward():
    torch.manual_seed(0)
    first, second = unn.GaussianLinear(3, 5, init_sigma=0.3), unn.GaussianLinear(5, 2, init_sigma=0.3)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(5, 5), second).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    S = 3
    seed1, seed2 = _next_seeds(7, 2)
    torch.manual_seed(7)
    mean, per_sample = unn.mc_predict(model, x, samples=S, softmax=False, return_samples=True)
    assert per_sample.shape == (S, 4, 2)
    w1, b1 = _gaussian_weights(first, seed1, S)
    w2, b2 = _gaussian_weights(second, seed2, S)
    for s in range(S):
        h = model[2](torch.relu(F.linear(x, w1[s], b1[s])))
        torch.testing.assert_close(per_sample[s], F.linear(h, w2[s], b2[s]), **NORMAL_TOL)
    torch.testing.assert_close(mean, per_sample.mean(0))
    # Classifier form: mean of softmaxes.
    torch.manual_seed(7)
    torch.testing.assert_close(unn.mc_predict(model, x, samples=S), per_sample.softmax(-1).mean(0))


def test_single_call_draws_one_weight_sample_shared_by_the_batch():
    torch.manual_seed(0)
    layer = unn.GaussianLinear(3, 4, init_sigma=0.5).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    (seed,) = _next_seeds(3, 1)
    torch.manual_seed(3)
    out = layer(x)
    weight, bias = _gaussian_weights(layer, seed, 1)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out, F.linear(x, weight[0], bias[0]), **NORMAL_TOL)
    layer.eval()  # still stochastic in eval mode
    assert not torch.equal(layer(x), layer(x))


def test_deterministic_mode_uses_mean_weights_and_restores():
    torch.manual_seed(0)
    g = unn.GaussianLinear(3, 4)
    b = unn.BernoulliLinear(4, 4, p=0.3)
    v = unn.VariationalDropoutLinear(4, 2)
    zero = unn.GaussianLinear(3, 2, zero_mean=True)
    model = nn.Sequential(g, nn.ReLU(), b, v)
    with torch.no_grad():
        v.log_alpha[0, :2] = 5.0  # above the threshold: pruned in deterministic mode
    x = torch.randn(6, 3)
    with unn.deterministic(model):
        out = model(x)
        expected = F.linear(torch.relu(F.linear(x, g.weight_mu, g.bias_mu)), b.weight, b.bias)
        expected = F.linear(expected, v.weight * (v.log_alpha <= 3.0), v.bias)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(model(x), out)
    assert not any(m.deterministic_mode for m in model.modules() if isinstance(m, unn.StochasticLayer))
    with unn.deterministic(zero):
        torch.testing.assert_close(zero(x), zero.bias_mu.expand(6, 2))
    assert v.sparsity() == pytest.approx(2 / 8)


def test_variance_layer_draws_distinct_sigmas_with_rms_init_sigma():
    # A constant init makes every unit of a zero-mean layer identical in distribution: only sampling
    # noise breaks the symmetry and training stalls near chance (the variance-network experiment).
    torch.manual_seed(0)
    sigma = unn.GaussianLinear(400, 300, zero_mean=True).weight_sigma.detach()
    assert sigma.min() > 0 and sigma.max() <= math.sqrt(3.0) / 20 * (1 + 1e-5)
    assert sigma.pow(2).mean().sqrt().item() == pytest.approx(1 / 20, rel=0.02)  # RMS 1/sqrt(in)
    assert sigma.std() > 0.4 * sigma.mean()  # uniform spread (0.58), not a constant


@pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
def test_gaussian_output_moments(estimator):
    torch.manual_seed(1)
    layer = unn.GaussianLinear(4, 3, estimator=estimator, init_sigma=0.4).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    S = 4000
    with unn.sampling(S), torch.no_grad():
        out = layer(x)
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)
        var = F.linear(x ** 2, layer.weight_sigma ** 2, layer.bias_sigma ** 2)
    z = (out.mean(0) - mean) / (var / S).sqrt()
    assert float(z.abs().max()) < 5.0
    # Sample variance of a Gaussian: relative std sqrt(2/S) ~ 2.2%.
    assert float((out.var(0) / var - 1).abs().max()) < 0.12


def test_variational_dropout_moments_and_kl():
    torch.manual_seed(2)
    layer = unn.VariationalDropoutLinear(4, 3, init_log_alpha=-1.0).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    S = 4000
    with unn.sampling(S), torch.no_grad():
        out = layer(x)
        mean = F.linear(x, layer.weight, layer.bias)
        var = F.linear(x ** 2, math.exp(-1.0) * layer.weight ** 2)
    assert float(((out.mean(0) - mean) / (var / S).sqrt()).abs().max()) < 5.0
    assert float((out.var(0) / var - 1).abs().max()) < 0.12
    torch.testing.assert_close(layer.kl(), udn_kernels.log_uniform_kl(layer.log_alpha))


def test_bernoulli_layout_and_unbiased_mean():
    torch.manual_seed(3)
    layer = unn.BernoulliLinear(5, 3, p=0.25, mask="input").double()
    x = torch.randn(4, 5, dtype=torch.float64)
    (seed,) = _next_seeds(11, 1)
    torch.manual_seed(11)
    with unn.sampling(2):
        out = layer(x)
    keep = (philox.uniform(2 * 4 * 5, seed).view(2, 4, 5) >= 0.25).double() / 0.75
    torch.testing.assert_close(out, F.linear(x * keep, layer.weight, layer.bias))
    with unn.sampling(4000), torch.no_grad():
        many = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
    spread = many.std(0) / math.sqrt(4000)
    assert float(((many.mean(0) - expected) / spread).abs().max()) < 5.0


def test_kl_terms_closed_form_and_model_sum():
    torch.manual_seed(4)
    g = unn.GaussianLinear(3, 2, prior_std=0.7, init_sigma=0.2).double()
    b = unn.BernoulliLinear(2, 2, p=0.2, prior_std=2.0).double()
    sigma, mu = g.weight_sigma, g.weight_mu
    expected = (math.log(0.7) - sigma.log() + (sigma ** 2 + mu ** 2) / (2 * 0.49) - 0.5).sum()
    bs, bm = g.bias_sigma, g.bias_mu
    expected = expected + (math.log(0.7) - bs.log() + (bs ** 2 + bm ** 2) / (2 * 0.49) - 0.5).sum()
    torch.testing.assert_close(g.kl(), expected)
    torch.testing.assert_close(b.kl(), (0.8 * b.weight.pow(2).sum() + b.bias.pow(2).sum()) / 8.0)
    model = nn.Sequential(g, nn.Tanh(), nn.Linear(2, 2).double(), b)
    torch.testing.assert_close(unn.kl(model), g.kl() + b.kl())
    assert float(unn.kl(nn.Linear(2, 2))) == 0.0
    (unn.kl(model)).backward()
    assert g.weight_rho.grad is not None and b.weight.grad is not None


def test_deterministic_model_mc_predict_and_protocol_errors():
    model = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    mean, per_sample = unn.mc_predict(model, x, samples=4, return_samples=True)
    torch.testing.assert_close(mean, model(x).softmax(-1))
    assert per_sample.shape == (4, 5, 4)
    bad = nn.Sequential(unn.GaussianLinear(3, 4), nn.Flatten(0, 1), unn.GaussianLinear(4, 2))
    with pytest.raises(ValueError, match="leading sample axis of size 3"):
        unn.mc_predict(bad, x, samples=3)
    with pytest.raises(ValueError, match="samples"):
        unn.mc_predict(model, x, samples=0)
    assert unn.active_samples() is None
