"""from_bayesian_torch: bayesian-torch layers carried over (mu, rho, prior) give the same output
distribution, checked statistically over a fixed list of seeds; unsupported priors and layers refuse."""
import math

import pytest
import torch
from torch import nn

from udn_kernels.nn import GaussianConv2d, GaussianLinear, deterministic, from_bayesian_torch, kl, mc_predict

bt_layers = pytest.importorskip("bayesian_torch.layers", reason="bayesian-torch not installed (pip install bayesian-torch)")
dnn_to_bnn = pytest.importorskip("bayesian_torch.models.dnn_to_bnn").dnn_to_bnn

SEEDS = [0, 1, 2, 3, 4]
S = 2000  # draws per side
Z = 4.5  # per-comparison two-sided bound, P = 7e-6; ~1000 comparisons in all
# log of the ratio of two independent sample variances of Gaussian outputs: sd sqrt(2 * 2 / (S - 1))
LOG_VAR_BOUND = 5 * math.sqrt(4 / (S - 1))


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny calls: OpenMP spin-waiting on a shared machine would make them 15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(name: str):
    """A bayesian-torch layer with a non-default prior std and a wide posterior, and its input."""
    layer_type = getattr(bt_layers, name)
    common = dict(prior_variance=0.7, posterior_rho_init=-1.5)
    if name.startswith("Linear"):
        return layer_type(5, 4, **common), torch.randn(3, 5)
    return layer_type(2, 3, 3, padding=1, **common), torch.randn(2, 2, 4, 4)


def bt_draws(layer, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([layer(x)[0] for _ in range(S)])


@pytest.mark.parametrize("name", ["LinearReparameterization", "LinearFlipout", "Conv2dReparameterization",
                                  "Conv2dFlipout"])
def test_output_mean_and_variance_agree(name):
    for seed in SEEDS:
        torch.manual_seed(seed)
        layer, x = make(name)
        ours = from_bayesian_torch(nn.Sequential(layer))
        assert ours[0].prior_std == pytest.approx(0.7)
        theirs = bt_draws(layer, x)
        with torch.no_grad():
            _, mine = mc_predict(ours, x, S, softmax=False, return_samples=True)
        z = (mine.mean(0) - theirs.mean(0)) / ((mine.var(0) + theirs.var(0)) / S).sqrt()
        assert z.abs().max() < Z, (seed, float(z.abs().max()))
        log_ratio = (mine.var(0) / theirs.var(0)).log()
        assert log_ratio.abs().max() < LOG_VAR_BOUND, (seed, float(log_ratio.abs().max()))


def test_kl_is_the_summed_form_of_theirs():
    """bayesian-torch averages each KL over its tensor's elements; ours sums (the ELBO's form)."""
    torch.manual_seed(0)
    layers = [make(n)[0].double() for n in ("LinearReparameterization", "Conv2dFlipout")]
    ours = from_bayesian_torch(nn.Sequential(*layers), estimator="sample")
    expected = 0.0
    for layer in layers:
        mu_w, rho_w = (layer.mu_weight, layer.rho_weight) if hasattr(layer, "mu_weight") else (layer.mu_kernel, layer.rho_kernel)
        for mu, rho, pm, ps in ((mu_w, rho_w, layer.prior_weight_mu, layer.prior_weight_sigma),
                                (layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma)):
            expected += float(layer.kl_div(mu, torch.log1p(torch.exp(rho)), pm, ps).detach()) * mu.numel()
    assert float(kl(ours).detach()) == pytest.approx(expected, rel=1e-9)


def test_dnn_to_bnn_cnn_converts_whole():
    """A dnn_to_bnn CNN (pooling and flatten between the layers): with rho -> -inf bayesian-torch's
    forward is its mean network, which must equal our deterministic prediction; mc_predict runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))
    dnn_to_bnn(model, {"prior_mu": 0.0, "prior_sigma": 0.5, "posterior_mu_init": 0.0, "posterior_rho_init": -3.0,
                       "type": "Flipout", "moped_enable": True, "moped_delta": 0.1})
    ours = from_bayesian_torch(model, estimator="sample")
    assert isinstance(ours[0], GaussianConv2d) and isinstance(ours[4], GaussianLinear)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rho" in name:
                param.fill_(-100.0)  # softplus(-100) = 0: bayesian-torch draws the mean weights
        with deterministic(ours):
            torch.testing.assert_close(ours(x), model(x))
        assert mc_predict(ours, x, 4).shape == (5, 3)


def snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    text, state = before
    assert repr(model) == text and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_non_zero_prior_mean_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(bt_layers.LinearReparameterization(3, 2, prior_mean=0.1))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module '0': our KL is against N\(0, prior_std\^2\); expected prior mean 0, got"):
        from_bayesian_torch(model, inplace=True)
    assert_unchanged(model, before)


def test_per_weight_prior_std_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(bt_layers.LinearReparameterization(3, 2), bt_layers.LinearFlipout(2, 2))
    model[1].prior_weight_sigma[0, 0] = 2.0
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module '1': expected one prior std > 0 for every weight and bias, got values in \[1.0, 2.0\]"):
        from_bayesian_torch(model, inplace=True)
    assert_unchanged(model, before)  # the first layer, valid, was not replaced either


def test_unsupported_bayesian_torch_layer_is_refused():
    model = nn.Sequential(bt_layers.LinearReparameterization(3, 2), bt_layers.Conv1dReparameterization(1, 1, 1))
    before = snapshot(model)
    with pytest.raises(TypeError, match="'1' is a Conv1dReparameterization; supported: LinearReparameterization, "
                                        "LinearFlipout, Conv2dReparameterization, Conv2dFlipout"):
        from_bayesian_torch(model, inplace=True)
    assert_unchanged(model, before)


def test_model_without_bayesian_torch_layers_and_bad_estimator():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no bayesian-torch layer to convert"):
        from_bayesian_torch(model)
    with pytest.raises(ValueError, match="estimator: expected one of"):
        from_bayesian_torch(nn.Sequential(bt_layers.LinearFlipout(2, 2)), estimator="reparam")


