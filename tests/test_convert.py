"""Model conversion (udn_kernels.nn.convert): MOPED / fresh Gaussian layers, MC dropout, selection,
Monte-Carlo prediction through CNNs, the train()/eval() sampling rule of every layer, bad input."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from udn_kernels.nn import (BernoulliConv2d, BernoulliLinear, GaussianConv2d, GaussianLinear, SampleFold,
                            VariationalDropoutLinear, bayesianize, deterministic, kl, mc_predict, to_mc_dropout)
from udn_kernels.nn.convert import MIN_SIGMA

Z = 4.5  # two-sided z bound: P(|z| > 4.5) = 7e-6 per comparison, a few hundred comparisons per test


def mlp(p: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(p), nn.Linear(8, 8), nn.ReLU(),
                         nn.Dropout(p), nn.Linear(8, 3))


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3))


def snapshot(model: nn.Module):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before) -> None:
    text, state = before
    assert repr(model) == text
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_moped_copies_weights_and_scales_sigma(make):
    model = make()
    before = snapshot(model)
    converted = bayesianize(model, delta=0.2)
    assert_unchanged(model, before)  # a copy by default
    originals = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    layers = [m for m in converted.modules() if isinstance(m, (GaussianLinear, GaussianConv2d))]
    assert len(layers) == len(originals)
    for layer, original in zip(layers, originals):
        assert torch.equal(layer.weight_mu, original.weight) and torch.equal(layer.bias_mu, original.bias)
        torch.testing.assert_close(F.softplus(layer.weight_rho), 0.2 * original.weight.abs(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(F.softplus(layer.bias_rho), 0.2 * original.bias.abs(), rtol=1e-5, atol=1e-7)


def test_moped_floors_sigma_of_zero_weights():
    model = nn.Sequential(nn.Linear(3, 2))
    nn.init.zeros_(model[0].weight)
    layer = bayesianize(model)[0]
    assert torch.isfinite(layer.weight_rho).all()
    torch.testing.assert_close(F.softplus(layer.weight_rho), torch.full((2, 3), MIN_SIGMA), rtol=1e-4, atol=0)


def test_fresh_init_and_options():
    model = mlp()
    converted = bayesianize(model, init="fresh", init_sigma=0.05, estimator="flipout", prior_std=0.5)
    layer = converted[0]
    assert layer.estimator == "flipout" and layer.prior_std == 0.5
    torch.testing.assert_close(F.softplus(layer.weight_rho), torch.full_like(layer.weight_rho, 0.05))
    assert not torch.equal(layer.weight_mu, model[0].weight)  # not copied


def test_inplace_returns_the_model():
    model = mlp()
    assert bayesianize(model, inplace=True) is model and isinstance(model[0], GaussianLinear)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_deterministic_prediction_is_the_original_model(make):
    model = make().eval()
    x = torch.randn(5, 6) if make is mlp else torch.randn(5, 1, 8, 8)
    converted = bayesianize(model, delta=0.5)
    with torch.no_grad(), deterministic(converted):
        torch.testing.assert_close(converted(x), model(x))


def test_mc_predict_through_pooling_and_flatten_keeps_samples_apart():
    """With sigma ~ 0 every sample of one batched pass must be the original prediction of the same
    example: folding the sample axis into the batch (SampleFold) must not mix samples and examples."""
    model = cnn().eval()
    x = torch.randn(5, 1, 8, 8)
    converted = bayesianize(model, delta=1e-7)
    assert isinstance(converted[2], SampleFold) and isinstance(converted[6], SampleFold)
    with torch.no_grad():
        _, per_sample = mc_predict(converted, x, 6, return_samples=True)
        expected = model(x).softmax(-1)
    assert per_sample.shape == (6, 5, 3)
    torch.testing.assert_close(per_sample, expected.expand(6, 5, 3), rtol=0, atol=1e-5)
    with torch.no_grad():  # with real noise the samples differ
        _, per_sample = mc_predict(bayesianize(model, delta=0.5), x, 6, return_samples=True)
    assert (per_sample.std(0) > 1e-4).all()


def test_mc_predict_through_norm_and_channel_dropout_layers():
    """Group norm, channel dropout and adaptive pooling read fixed axes: folded too (sigma ~ 0 check)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Dropout2d(0.1),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    converted = bayesianize(model, delta=1e-7)
    assert [type(m) for m in converted if isinstance(m, SampleFold)] == [SampleFold] * 4
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        _, per_sample = mc_predict(converted, x, 4, return_samples=True)
        torch.testing.assert_close(per_sample, model(x).softmax(-1).expand(4, 3, 3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
def test_mc_moments_of_a_moped_layer(estimator):
    """Linear model: the output is N(x w^T + b, x^2 (delta w)^2 + (delta b)^2). The MC mean is
    z-tested and the MC variance held to 5 standard errors of its log (sqrt(2 / (S - 1)))."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4))
    w, b, delta, S = model[0].weight.detach(), model[0].bias.detach(), 0.3, 4000
    converted = bayesianize(model, delta=delta, estimator=estimator)
    x = torch.randn(3, 5)
    with torch.no_grad():
        _, out = mc_predict(converted, x, S, softmax=False, return_samples=True)
    mean, var = x @ w.t() + b, (x ** 2) @ (delta * w).t() ** 2 + (delta * b) ** 2
    z = (out.mean(0) - mean) / (var / S).sqrt()
    assert z.abs().max() < Z
    assert (out.var(0) / var).log().abs().max() < 5 * math.sqrt(2 / (S - 1))


def test_converted_model_trains_with_kl_over_n():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = bayesianize(mlp(), init="fresh")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss():
        return F.cross_entropy(model(x), y) + kl(model) / len(x)

    with torch.no_grad():
        first = float(loss())
    for _ in range(150):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((mc_predict(model, x, 20).argmax(-1) == y).float().mean())
    assert float(value.detach()) < first - 0.3 and accuracy > 0.8


def test_selection_by_type_name_predicate_and_last_layer():
    model = cnn()
    by_type = bayesianize(model, select=nn.Conv2d)
    assert isinstance(by_type[0], GaussianConv2d) and type(by_type[7]) is nn.Linear
    by_name = bayesianize(model, select=["7"])
    assert isinstance(by_name[7], GaussianLinear) and isinstance(by_name[9], nn.Linear)
    by_predicate = bayesianize(model, select=lambda name, m: isinstance(m, nn.Linear) and m.out_features == 3)
    assert isinstance(by_predicate[9], GaussianLinear) and type(by_predicate[7]) is nn.Linear
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    head = bayesianize(nested, select=lambda name, m: name.startswith("1"))  # the container is not asked
    assert [type(m) for m in (head[0], head[1][0], head[1][2])] == [nn.Linear, GaussianLinear, GaussianLinear]
    last = bayesianize(model, last_layer=True)
    assert [type(m) for m in last if isinstance(m, (GaussianLinear, GaussianConv2d))] == [GaussianLinear]
    assert isinstance(last[9], GaussianLinear)


# ---- MC dropout --------------------------------------------------------------------------------

def test_mc_dropout_conversion_structure_and_weight_scaling():
    model = mlp(p=0.3).eval()
    converted = to_mc_dropout(model)
    assert isinstance(converted[2], nn.Identity) and isinstance(converted[5], nn.Identity)
    for i in (3, 6):
        layer = converted[i]
        assert isinstance(layer, BernoulliLinear) and layer.p == 0.3 and layer.mask == "input"
        assert torch.equal(layer.weight, model[i].weight) and torch.equal(layer.bias, model[i].bias)
    assert type(converted[0]) is nn.Linear  # no dropout in front
    x = torch.randn(7, 6)
    converted.eval()
    with torch.no_grad():
        assert not torch.equal(converted(x), converted(x))  # dropout stays on in eval()
        with deterministic(converted):
            torch.testing.assert_close(converted(x), model(x))  # weight scaling = nn.Dropout's eval()


def test_mc_dropout_mean_is_unbiased():
    """Inverted dropout in front of a linear layer: E[out] = x W^T + b; the per-sample output is a
    sum of independent terms, so the MC mean is z-tested with its exact variance p/(1-p) (x^2)(W^2)^T."""
    torch.manual_seed(2)
    p, S = 0.4, 4000
    model = nn.Sequential(nn.Dropout(p), nn.Linear(6, 4))
    converted = to_mc_dropout(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        _, out = mc_predict(converted, x, S, softmax=False, return_samples=True)
        w, b = model[1].weight, model[1].bias
        mean, var = x @ w.t() + b, p / (1 - p) * (x ** 2) @ (w ** 2).t()
    assert ((out.mean(0) - mean) / (var / S).sqrt()).abs().max() < Z
    assert (out.var(0) / var).log().abs().max() < 0.25  # Bernoulli sums: heavier tails than a Gaussian


# ---- train()/eval(): every stochastic layer samples in both; deterministic() switches all off --

LAYERS = {
    **{f"gaussian-linear-{e}": (lambda e=e: GaussianLinear(6, 4, estimator=e, init_sigma=0.1), (5, 6))
       for e in ("sample", "local", "flipout")},
    **{f"bernoulli-linear-{m}": (lambda m=m: BernoulliLinear(6, 4, p=0.3, mask=m), (5, 6))
       for m in ("input", "weight", "symmetric")},
    "variational-dropout-linear": (lambda: VariationalDropoutLinear(6, 4, init_log_alpha=-1.0), (5, 6)),
    "gaussian-conv2d": (lambda: GaussianConv2d(2, 3, 3, init_sigma=0.1), (2, 2, 5, 5)),
    **{f"bernoulli-conv2d-{m}": (lambda m=m: BernoulliConv2d(2, 3, 3, p=0.3, mask=m), (2, 2, 5, 5))
       for m in ("input", "weight", "symmetric")},
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sampling_rule_is_the_same_in_train_and_eval(name, mode):
    make, shape = LAYERS[name]
    torch.manual_seed(3)
    layer, x = make(), torch.randn(shape)
    layer.train(mode == "train")
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))
        with deterministic(layer):
            first = layer(x)
            assert torch.equal(first, layer(x))
        layer.train(mode != "train")  # the mean-weight output does not depend on the mode either
        with deterministic(layer):
            assert torch.equal(first, layer(x))


# ---- bad input: clear errors, model unchanged --------------------------------------------------

BAD = [
    (dict(select=nn.LSTM), TypeError, "supported: nn.Linear, nn.Conv2d"),
    (dict(select=["1"]), TypeError, "'1' is a ReLU; supported: nn.Linear, nn.Conv2d"),
    (dict(select=["nope"]), ValueError, "no submodule named ['nope']"),
    (dict(select=lambda n, m: False), ValueError, "no module to convert"),
    (dict(select="0"), TypeError, "select: expected None, a module type"),
    (dict(delta=0.0), ValueError, "delta: expected a finite float > 0, got 0.0"),
    (dict(delta=-0.1), ValueError, "delta: expected a finite float > 0, got -0.1"),
    (dict(delta=float("nan")), ValueError, "delta: expected a finite float > 0"),
    (dict(prior_std=0), ValueError, "prior_std: expected a finite float > 0, got 0"),
    (dict(estimator="mc"), ValueError, "estimator: expected one of ('sample', 'local', 'flipout'), got 'mc'"),
    (dict(init="kaiming"), ValueError, "init: expected one of ('fresh', 'moped'), got 'kaiming'"),
    (dict(inplace=1), TypeError, "inplace: expected a bool, got int"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_arguments_leave_the_model_unchanged(kwargs, error, message):
    model = cnn()
    before = snapshot(model)
    with pytest.raises(error) as info:
        bayesianize(model, **{"inplace": True, **kwargs})
    assert message in str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("conv,message", [(nn.Conv2d(2, 4, 3, groups=2), "expected groups=1, got 2"),
                                          (nn.Conv2d(2, 4, 3, padding_mode="reflect"), "got 'reflect'")])
def test_unsupported_convolution_options(conv, message):
    model = nn.Sequential(nn.Linear(2, 2), conv)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        bayesianize(model, inplace=True)
    assert_unchanged(model, before)


def test_mc_dropout_without_a_dropout_linear_pair():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    before = snapshot(model)
    with pytest.raises(ValueError, match="nn.Dropout directly before nn.Linear, found none"):
        to_mc_dropout(model, inplace=True)
    assert_unchanged(model, before)


# ---- the convert-step benchmark case -----------------------------------------------------------

@pytest.mark.parametrize("installed", [True, False])
def test_convert_step_case_builds_and_skips_a_missing_peer(monkeypatch, installed):
    from udn_kernels.bench import cases
    if not installed:
        monkeypatch.setattr(cases, "bayesian_torch", lambda: None)
    elif cases.bayesian_torch() is None:
        pytest.skip("bayesian-torch not installed: the peer rows cannot be built")
    methods = {m.name: m for m in cases.build("convert-step", quick=False, size="tiny")}
    for kind in ("mlp", "cnn"):
        ours, peer = methods[f"udn bayesianize {kind}"], methods[f"bayesian-torch dnn_to_bnn {kind}"]
        assert ours.role == "ours" and ours.missing is None
        loss = ours.forward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        if installed:
            assert peer.missing is None and torch.isfinite(peer.forward())
        else:
            assert peer.forward is None and "bayesian-torch not installed" in peer.missing
