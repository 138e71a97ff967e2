"""Stochastic convolutions: gaussian_conv2d against its eager oracle, gradients, moments, the layers."""
import math

import pytest
import torch
from torch.nn import functional as F

import udn_kernels
from udn_kernels import nn as unn
from udn_kernels.ops.gaussian_conv import ESTIMATORS, _per_example
from udn_kernels.reference import philox
from udn_kernels.reference.stochastic_conv import gaussian_conv2d as oracle

MAX_SEED = 2**63 - 1
NORMAL_TOL = dict(rtol=1e-5, atol=1e-5)  # normals agree within 4e-6 across backends (docs/rng.md)


def _next_seeds(torch_seed: int, count: int) -> list[int]:
    """The seeds layers draw after torch.manual_seed(torch_seed) (resolve_seed(None))."""
    torch.manual_seed(torch_seed)
    return [int(torch.randint(0, MAX_SEED, (), dtype=torch.int64)) for _ in range(count)]


def _params(out_ch=4, in_ch=3, k=3, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    mu = torch.randn(out_ch, in_ch, k, k, dtype=torch.float64, generator=g)
    rho = torch.rand(out_ch, in_ch, k, k, dtype=torch.float64, generator=g) * 6 - 3  # both sides of 0
    bias_mu = torch.randn(out_ch, dtype=torch.float64, generator=g)
    bias_rho = torch.rand(out_ch, dtype=torch.float64, generator=g) * 6 - 3
    return mu, rho, bias_mu, bias_rho


# 5x5 inputs: flipout's per-example weights (O*3*3 = 36 per channel) outgrow the input (25 per
# channel), so it runs two convolutions; 9x9: one grouped convolution with per-example weights.
@pytest.mark.parametrize("size", [5, 9])
@pytest.mark.parametrize("samples, x_sampled", [(None, False), (3, False), (3, True)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_the_eager_oracle(estimator, samples, x_sampled, size):
    assert _per_example(4 * 3 * 9, 3 * size * size) == (size == 9)
    torch.manual_seed(0)
    x = torch.randn(*((3,) if x_sampled else ()), 2, 3, size, size, dtype=torch.float64, requires_grad=True)
    params = [t.requires_grad_() for t in _params()]
    out = udn_kernels.gaussian_conv2d(x, *params, stride=2, padding=1, estimator=estimator, samples=samples,
                                      seed=123, input_has_samples=x_sampled, sigma_transform="softplus")
    mu, rho, bias_mu, bias_rho = params
    expected = oracle(x, mu, F.softplus(rho), bias_mu, F.softplus(bias_rho), 123, estimator, samples or 1,
                      x_sampled, 2, 1, 1)
    expected = expected if samples else expected[0]
    torch.testing.assert_close(out, expected, **NORMAL_TOL)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [x, *params], g), torch.autograd.grad(expected, [x, *params], g)):
        torch.testing.assert_close(got, want, **NORMAL_TOL)


@pytest.mark.parametrize("sigma_transform", [None, "softplus"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_float64(estimator, sigma_transform):
    torch.manual_seed(1)
    mu, rho, bias_mu, bias_rho = _params(out_ch=2, in_ch=2)
    if sigma_transform is None:
        rho, bias_rho = F.softplus(rho), F.softplus(bias_rho)  # positive standard deviations
    # flipout: two convolutions at 4x4 (per-example weights 2*3*3 = 18 per channel > 16), per-example weights at 5x5
    for size in (4, 5) if estimator == "flipout" else (4,):
        x = torch.randn(2, 2, size, size, dtype=torch.float64)
        tensors = [t.requires_grad_() for t in (x, mu, rho, bias_mu, bias_rho)]
        for samples in (None, 2):
            assert torch.autograd.gradcheck(
                lambda *t: udn_kernels.gaussian_conv2d(*t, padding=1, estimator=estimator, samples=samples, seed=11,
                                                       sigma_transform=sigma_transform), tensors)
        xs = torch.randn(2, 2, 2, size, size, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x_, r_: udn_kernels.gaussian_conv2d(x_, tensors[1], r_, stride=2, estimator=estimator, samples=2,
                                                       seed=3, input_has_samples=True, sigma_transform=sigma_transform),
            (xs, tensors[2]))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_output_moments_match_the_analytic_ones(estimator):
    # E = conv(x, mu) + b_mu, Var = conv(x^2, sigma^2) + b_sigma^2 for all three estimators: 4000 draws
    # in one call with a fixed seed; the bound is 5 standard errors of each estimate.
    mu, rho, bias_mu, bias_rho = _params(out_ch=2, in_ch=2, generator_seed=3)
    sigma, bias_sigma = F.softplus(rho), F.softplus(bias_rho)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    S = 4000
    out = udn_kernels.gaussian_conv2d(x, mu, sigma, bias_mu, bias_sigma, padding=1, estimator=estimator, samples=S,
                                      seed=2024)
    mean = F.conv2d(x, mu, bias_mu, padding=1)
    var = F.conv2d(x * x, sigma * sigma, bias_sigma * bias_sigma, padding=1)
    z_mean = (out.mean(0) - mean) / (var / S).sqrt()
    z_var = (out.var(0) - var) / (var * math.sqrt(2.0 / (S - 1)))  # standard error of a Gaussian's variance
    assert z_mean.abs().max() < 5.0, z_mean
    assert z_var.abs().max() < 5.0, z_var


def test_flipout_examples_get_different_perturbations():
    # One shared draw, per-example signs: two identical examples get different outputs, while
    # "sample" gives them the same one (the decorrelation flipout exists for).
    mu, rho, bias_mu, bias_rho = _params()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64).expand(2, -1, -1, -1)
    flip = udn_kernels.gaussian_conv2d(x, mu, rho, estimator="flipout", seed=5, sigma_transform="softplus")
    same = udn_kernels.gaussian_conv2d(x, mu, rho, estimator="sample", seed=5, sigma_transform="softplus")
    torch.testing.assert_close(same[0], same[1])
    assert (flip[0] - flip[1]).abs().max() > 0.1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_backward_saves_only_the_inputs_and_local_std(estimator):
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    params = [t.float().requires_grad_() for t in _params()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = udn_kernels.gaussian_conv2d(x, *params, padding=1, estimator=estimator, samples=2, seed=1,
                                          sigma_transform="softplus")
    inputs = {t.untyped_storage().data_ptr() for t in (x, *params)}
    others = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert others == ([(1, 2, 4, 9, 9)] if estimator == "local" else []), others  # local: std per input draw
    out.sum().backward()


def test_bad_input_names_the_argument():
    mu, rho, _, _ = _params()
    with pytest.raises(ValueError, match=r"x: expected shape \[3, N, 3, H, W\]"):
        udn_kernels.gaussian_conv2d(torch.randn(2, 2, 3, 5, 5, dtype=torch.float64), mu, rho, samples=3,
                                    input_has_samples=True)
    with pytest.raises(ValueError, match=r"x: expected shape \[3, H, W\]"):
        udn_kernels.gaussian_conv2d(torch.randn(2, 4, 5, 5, dtype=torch.float64), mu, rho)
    with pytest.raises(ValueError, match="estimator"):
        udn_kernels.gaussian_conv2d(torch.randn(2, 3, 5, 5, dtype=torch.float64), mu, rho, estimator="lrt")
    with pytest.raises(TypeError, match="padding"):
        udn_kernels.gaussian_conv2d(torch.randn(2, 3, 5, 5, dtype=torch.float64), mu, rho, padding="same")


def _conv_weights(layer: unn.GaussianConv2d, seed: int, samples: int):
    numel = layer.weight_mu.numel()
    eps = philox.normal(samples * numel, seed).view(samples, *layer.weight_mu.shape).double()
    beps = philox.normal(samples * layer.out_channels, seed, samples * numel).view(samples, -1).double()
    return (layer.weight_mu + F.softplus(layer.weight_rho) * eps,
            layer.bias_mu + F.softplus(layer.bias_rho) * beps)


def test_gaussian_conv_chain_matches_per_sample_convolutions():
    torch.manual_seed(5)
    first = unn.GaussianConv2d(2, 3, 3, padding=1, init_sigma=0.2).double()
    second = unn.GaussianConv2d(3, 2, 3, stride=2, init_sigma=0.2).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    S = 3
    seed1, seed2 = _next_seeds(9, 2)
    torch.manual_seed(9)
    with unn.sampling(S):
        out = second(torch.relu(first(x)))
    assert out.shape == (S, 2, 2, 2, 2)
    w1, b1 = _conv_weights(first, seed1, S)
    w2, b2 = _conv_weights(second, seed2, S)
    for s in range(S):
        h = torch.relu(F.conv2d(x, w1[s], b1[s], padding=1))
        torch.testing.assert_close(out[s], F.conv2d(h, w2[s], b2[s], stride=2), **NORMAL_TOL)
    assert first(x).shape == (2, 3, 6, 6)  # outside sampling(): one draw, no sample axis


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gaussian_conv_layer_kl_and_deterministic_mode(estimator):
    torch.manual_seed(2)
    layer = unn.GaussianConv2d(2, 3, 3, padding=1, prior_std=0.7, init_sigma=0.3, estimator=estimator).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    expected = 0.0
    for mu, rho in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)):
        sigma = F.softplus(rho)
        expected = expected + (math.log(0.7) - sigma.log() + (sigma ** 2 + mu ** 2) / (2 * 0.49) - 0.5).sum()
    torch.testing.assert_close(layer.kl(), expected)
    with unn.deterministic(layer):
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight_mu, layer.bias_mu, padding=1))
    assert layer(x).shape == (2, 3, 5, 5)


@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_conv_layout(mask):
    torch.manual_seed(6)
    layer = unn.BernoulliConv2d(2, 3, 3, padding=1, p=0.3, mask=mask).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    (seed,) = _next_seeds(12, 1)
    torch.manual_seed(12)
    with unn.sampling(2):
        out = layer(x)
    for s in range(2):
        if mask == "input":
            keep = (philox.uniform(2 * x.numel(), seed).view(2, *x.shape)[s] >= 0.3).double() / 0.7
            expected = F.conv2d(x * keep, layer.weight, layer.bias, padding=1)
        else:
            n = layer.weight.numel()
            if mask == "weight":
                noise = (philox.uniform(2 * n, seed) >= 0.3).double() / 0.7
            else:
                noise = philox.sign_at(torch.arange(2 * n), seed).double()
            weight = layer.weight * noise.view(2, *layer.weight.shape)[s]
            expected = F.conv2d(x, weight, layer.bias, padding=1)
        torch.testing.assert_close(out[s], expected)


@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_conv_moments(mask):
    # input / weight masks: E = conv(x, W) + b, Var = p / (1 - p) conv(x^2, W^2) (each input element and
    # each weight meets an output element once); symmetric: E = b, Var = conv(x^2, W^2). 4000 draws,
    # bound 5 standard errors (the variance's from its 4th moment, the noise not being Gaussian).
    torch.manual_seed(7)
    p, S = 0.3, 4000
    layer = unn.BernoulliConv2d(2, 2, 3, padding=1, p=p, mask=mask).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad(), unn.sampling(S):
        out = layer(x)
    scale = 1.0 if mask == "symmetric" else p / (1 - p)
    mean = F.conv2d(x, torch.zeros_like(layer.weight) if mask == "symmetric" else layer.weight, layer.bias, padding=1)
    var = scale * F.conv2d(x * x, layer.weight ** 2, padding=1)
    centred = out - out.mean(0)
    var_se = ((centred ** 4).mean(0) - out.var(0) ** 2).clamp_min(0).sqrt() / math.sqrt(S)
    assert ((out.mean(0) - mean) / (var / S).sqrt()).abs().max() < 5.0
    assert ((out.var(0) - var) / var_se).abs().max() < 5.0


@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_conv_gradcheck_float64(mask):
    layer = unn.BernoulliConv2d(2, 2, 3, padding=1, p=0.3, mask=mask).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)

    def run(x_, w_, b_):
        torch.manual_seed(3)  # the layer draws its seed from torch's generator: fix it per call
        return torch.func.functional_call(layer, {"weight": w_, "bias": b_}, (x_,))

    assert torch.autograd.gradcheck(run, (x, layer.weight, layer.bias))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_noise_comes_from_the_cpp_fills(estimator):
    # Strict cpu backend: the Philox fills must be the C++ kernels (a fallback to the emulated
    # reference raises FallbackError); the result matches the reference backend's.
    mu, rho, bias_mu, bias_rho = [t.float().requires_grad_() for t in _params()]
    x = torch.randn(2, 3, 9, 9)
    outs = []
    for backend, strict in (("cpu", True), ("reference", False)):
        with udn_kernels.backend(backend, strict=strict):
            out = udn_kernels.gaussian_conv2d(x, mu, rho, bias_mu, bias_rho, padding=1, estimator=estimator,
                                              samples=2, seed=77, sigma_transform="softplus")
            out.sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], **NORMAL_TOL)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gaussian_conv_layers_chain_under_sampling(estimator):
    # The second layer gets the first one's sample axis (input_has_samples) for every estimator.
    torch.manual_seed(8)
    model = torch.nn.Sequential(unn.GaussianConv2d(2, 3, 3, padding=1, estimator=estimator), torch.nn.ReLU(),
                                unn.GaussianConv2d(3, 2, 3, stride=2, estimator=estimator))
    mean, per_sample = unn.mc_predict(torch.nn.Sequential(model, torch.nn.Flatten(-3)), torch.randn(4, 2, 6, 6),
                                      samples=3, return_samples=True)
    assert per_sample.shape == (3, 4, 2 * 2 * 2)  # 2 channels of 2x2
    assert not torch.allclose(per_sample[0], per_sample[1])  # independent draws


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_runs_under_torch_compile(estimator):
    # The op is a compile boundary (run eagerly behind a graph break): same output and gradients.
    mu, rho, bias_mu, bias_rho = [t.float().requires_grad_() for t in _params()]
    x = torch.randn(2, 3, 6, 6)

    def loss(x_):
        out = udn_kernels.gaussian_conv2d(x_, mu, rho, bias_mu, bias_rho, padding=1, estimator=estimator, seed=9,
                                          sigma_transform="softplus")
        return torch.relu(out).square().sum()

    compiled, eager = torch.compile(loss)(x), loss(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, rho), torch.autograd.grad(eager, rho))
