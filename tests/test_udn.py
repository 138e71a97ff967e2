"""UDN: the ELBO against an independent eager computation, growth, save/load, prediction, spirals."""
import math

import pytest
import torch
from scipy import stats
from torch import nn
from torch.nn import functional as F

from udn_kernels import metrics
from udn_kernels.data import spirals
from udn_kernels.nn import UDN, GaussianLinear, StochasticLayer


def _set_rate(model: UDN, rate: float) -> None:
    with torch.no_grad():
        model.depth.raw_rate.fill_(math.log(math.expm1(rate)))


def _eager_elbo(model: UDN, x, y, n_data, prior_rate):
    """The ELBO of docs/design.md ("UDN model") written from scratch: a Python loop over depths, one head at a time."""
    nu = F.softplus(model.depth.raw_rate)
    L = max(int(stats.poisson.ppf(0.95, float(nu.detach()))), math.floor(float(nu.detach())) + 1) + 1
    k = torch.arange(L, dtype=x.dtype)
    unnorm = torch.exp(k * torch.log(nu) - torch.lgamma(k + 1))
    q = unnorm / unnorm.sum()
    s2 = model.weight_prior_std ** 2

    def log_prior(module):
        total = 0.0
        for m in module.modules():
            if isinstance(m, GaussianLinear):
                for mu, sigma in ((m.weight_mu, F.softplus(m.weight_rho)), (m.bias_mu, F.softplus(m.bias_rho))):
                    total = total - (math.log(m.prior_std) - sigma.log() + (sigma ** 2 + mu ** 2)
                                     / (2 * m.prior_std ** 2) - 0.5).sum()
            elif not isinstance(m, StochasticLayer):
                for p in m.parameters(recurse=False):
                    total = total - (p ** 2).sum() / (2 * s2)
        return total

    h = x if model.stem is None else model.stem(x)
    elbo = log_prior(model.stem) if model.stem is not None else 0.0
    cumulative = 0.0
    for l in range(L):
        h = model.blocks[l](h)
        feat = h if model.readout is None else h.mean(dim=(-2, -1))
        out = model.heads[l](feat)
        if model.likelihood == "categorical":
            loglik = -F.cross_entropy(out, y, reduction="sum")
        else:
            loglik = torch.distributions.Normal(out, model.log_noise_std.exp()).log_prob(y).sum()
        cumulative = cumulative + log_prior(model.blocks[l])
        log_mu = stats.poisson.logpmf(l, prior_rate)
        elbo = elbo + q[l] * (n_data / x.shape[0] * loglik + cumulative + log_prior(model.heads[l]) + log_mu)
    return elbo - (q * q.log()).sum()


def _compare_elbo_and_grads(model, x, y, n_data, prior_rate, seed=0):
    torch.manual_seed(seed)
    fused = model.elbo(x, y, n_data)
    grads = torch.autograd.grad(fused, list(model.parameters()), allow_unused=True)
    torch.manual_seed(seed)
    eager = _eager_elbo(model, x, y, n_data, prior_rate)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-9)
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads):
        if e is None:
            assert g is None or float(g.abs().max()) == 0.0, name
        else:
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10, msg=name)
    torch.manual_seed(seed)
    torch.testing.assert_close(model.loss(x, y, n_data), -eager / n_data, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("residual", [False, True])
def test_elbo_and_gradients_match_eager_mlp(residual):
    torch.manual_seed(0)
    model = UDN.mlp(3, 5, 4, init_rate=2.3, prior_rate=0.7, weight_prior_std=0.8, residual=residual,
                    depth_scale=4.0).double()
    x = torch.randn(11, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (11,))
    assert model.depth.max_depth == 6
    _compare_elbo_and_grads(model, x, y, n_data=100, prior_rate=0.7)


def test_elbo_matches_eager_gaussian_likelihood_and_gaussian_layers():
    torch.manual_seed(1)
    model = UDN.mlp(2, 4, 3, likelihood="gaussian", init_rate=1.0, layer="gaussian",
                    layer_kwargs={"init_sigma": 0.1}, noise_std=0.5).double()
    x = torch.randn(7, 2, dtype=torch.float64)
    y = torch.randn(7, 3, dtype=torch.float64)
    _compare_elbo_and_grads(model, x, y, n_data=50, prior_rate=0.5, seed=3)


def test_elbo_matches_eager_resnet():
    torch.manual_seed(2)
    model = UDN.resnet(1, 3, 2, init_rate=1.0, depth_scale=2.0).double()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    _compare_elbo_and_grads(model, x, y, n_data=40, prior_rate=0.5)


@pytest.mark.parametrize("residual", [False, True])
def test_relu_trunk_matches_the_module_path(residual):
    """UDN.mlp's one-node relu trunk (used when gradients are needed) against the blocks run one by
    one, which a forward hook forces: hidden states and the gradients of x and every parameter."""
    torch.manual_seed(8)
    model = UDN.mlp(3, 5, 4, init_rate=2.3, residual=residual, depth_scale=4.0).double()
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(model.depth.max_depth, 7, 5, dtype=torch.float64)
    inputs = [x, *model.blocks.parameters()]

    def run():
        hidden = model.hidden_states(x)
        return hidden, torch.autograd.grad((hidden * probe).sum(), inputs)

    fast, fast_grads = run()
    assert type(fast.grad_fn).__name__ == "_ReluTrunkBackward"
    calls = []
    model.blocks[1].branch[1].register_forward_hook(lambda *_: calls.append(1))
    slow, slow_grads = run()
    assert calls and type(slow.grad_fn).__name__ == "StackBackward0"
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_residual_branch_scaling():
    torch.manual_seed(0)
    model = UDN.mlp(2, 3, 2, residual=True, depth_scale=4.0)
    block = model.blocks[1]
    h = torch.randn(5, 3)
    linear = block.branch[0]
    torch.testing.assert_close(block(h), h + torch.relu(linear(h)) / 2.0)
    assert not model.blocks[0].residual  # input layer changes the width


def test_predict_is_the_depth_mixture():
    torch.manual_seed(3)
    model = UDN.mlp(2, 6, 3, init_rate=1.7).double()
    x = torch.randn(9, 2, dtype=torch.float64)
    q = model.depth.probs()
    h, expected = x, 0.0
    for l in range(model.depth.max_depth):
        h = model.blocks[l](h)
        expected = expected + q[l] * model.heads[l](h).softmax(-1)
    probs = model.predict(x)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(model(x), probs)

    reg = UDN.mlp(2, 6, 2, likelihood="gaussian", init_rate=1.7, noise_std=0.3).double()
    q = reg.depth.probs()
    means = []
    h = x
    for l in range(reg.depth.max_depth):
        h = reg.blocks[l](h)
        means.append(reg.heads[l](h))
    means = torch.stack(means)
    mix = (q[:, None, None] * means).sum(0)
    var = (q[:, None, None] * (means ** 2 + 0.09)).sum(0) - mix ** 2
    got_mean, got_var = reg.predict(x)
    torch.testing.assert_close(got_mean, mix)
    torch.testing.assert_close(got_var, var)


def test_mc_predict_with_stochastic_layers_one_pass():
    torch.manual_seed(4)
    model = UDN.mlp(2, 8, 3, layer="bernoulli", layer_kwargs={"p": 0.3}, init_rate=2.0)
    x = torch.randn(10, 2)
    probs, per_sample = model.predict(x, samples=6, return_samples=True)
    assert per_sample.shape == (6, 10, 3)
    torch.testing.assert_close(probs, per_sample.mean(0))
    torch.testing.assert_close(per_sample.sum(-1), torch.ones(6, 10))
    assert float(metrics.mutual_information(per_sample.detach())) > 0.0  # the draws differ
    reg = UDN.mlp(2, 8, 1, likelihood="gaussian", layer="gaussian", layer_kwargs={"init_sigma": 0.3})
    (mean, var), (means, variances) = reg.predict(x, samples=5, return_samples=True)
    torch.testing.assert_close(var, variances.mean(0) + means.var(0, unbiased=False))
    loss = model.loss(x, torch.randint(0, 3, (10,)), 100, samples=4)
    loss.backward()
    assert model.depth.raw_rate.grad is not None


def test_growth_registers_new_parameters_with_the_optimizer():
    torch.manual_seed(5)
    model = UDN.mlp(2, 4, 2, init_rate=1.0)
    assert model.built_depth == 4
    opt = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    x, y = spirals(32, 1.0, 0.05, seed=0)
    _set_rate(model, 5.0)
    loss = model.loss(x, y, 32)
    assert model.built_depth == 10
    in_opt = [p for group in opt.param_groups for p in group["params"]]
    assert len(in_opt) == len({id(p) for p in in_opt})
    assert {id(p) for p in in_opt} == {id(p) for p in model.parameters()}
    assert opt.param_groups[-1]["lr"] == 1e-2
    new_weight = model.blocks[9].branch[0].weight
    before = new_weight.detach().clone()
    loss.backward()
    opt.step()
    assert opt.state[new_weight]["step"] == 1
    assert not torch.equal(before, new_weight.detach())
    # Shrinking keeps the blocks; they just stop receiving gradient.
    _set_rate(model, 1.0)
    opt.zero_grad(set_to_none=True)
    model.loss(x, y, 32).backward()
    assert model.built_depth == 10 and model.depth.max_depth == 4
    assert model.blocks[9].branch[0].weight.grad is None
    # An optimizer attached after growth gets the missing parameters; SGD momentum starts lazily.
    sgd = torch.optim.SGD([model.depth.raw_rate], lr=0.1, momentum=0.9)
    model.attach_optimizer(sgd)
    assert sum(len(g["params"]) for g in sgd.param_groups) == len(list(model.parameters()))
    _set_rate(model, 9.0)
    model.loss(x, y, 32).backward()
    sgd.step()
    newest = model.heads[-1].weight
    assert model.built_depth > 10 and "momentum_buffer" in sgd.state[newest]


@pytest.mark.parametrize("layer", ["deterministic", "gaussian"])
def test_state_dict_of_grown_model_loads_into_fresh_model(layer):
    torch.manual_seed(6)
    kwargs = dict(init_rate=1.0, layer=layer)
    model = UDN.mlp(2, 5, 3, **kwargs)
    _set_rate(model, 6.0)
    model.grow(model.depth.max_depth + 2)
    fresh = UDN.mlp(2, 5, 3, **kwargs)
    assert fresh.built_depth < model.built_depth
    fresh.load_state_dict(model.state_dict())
    assert fresh.built_depth == model.built_depth
    x = torch.randn(8, 2)
    torch.manual_seed(1)
    expected = model.predict(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fresh.predict(x), expected, rtol=0, atol=0)
    outer = nn.ModuleDict({"udn": UDN.mlp(2, 5, 3, **kwargs)})  # nested: prefix handled
    outer.load_state_dict({f"udn.{k}": v for k, v in model.state_dict().items()})
    assert outer["udn"].built_depth == model.built_depth


def test_learned_depth_grows_with_spiral_winding():
    """Issue 5's property in miniature: a two-turn spiral ends at least 1.5 layers deeper in E_q[l]
    than two straight rays, both at >= 95% test accuracy. Same ingredients as the
    depth-vs-complexity experiment (inputs x3, cosine learning-rate decay), full-batch Adam."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: threading only adds overhead on a shared CPU
    try:
        depths, accuracies = {}, {}
        for phase in (0.0, 2.0):
            torch.manual_seed(0)
            x, y = spirals(256, phase, noise=0.03, seed=0)
            x_test, y_test = spirals(1024, phase, noise=0.03, seed=1)
            model = UDN.mlp(2, 32, 2, init_rate=1.0, prior_rate=0.5)
            opt = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=2e-2))
            steps = 200
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = 2e-2 * 0.5 * (1 + math.cos(math.pi * step / steps))
                opt.zero_grad()
                model.loss(3 * x, y, len(x)).backward()
                opt.step()
            with torch.no_grad():
                depths[phase] = float(model.depth.mean())
                accuracies[phase] = float(metrics.accuracy(model.predict(3 * x_test), y_test))
    finally:
        torch.set_num_threads(threads)
    assert min(accuracies.values()) >= 0.95, accuracies
    assert depths[2.0] >= depths[0.0] + 1.5, depths


def test_stochastic_resnet_trains_and_predicts_with_samples():
    torch.manual_seed(7)
    model = UDN.resnet(1, 3, 4, layer="bernoulli", layer_kwargs={"p": 0.2, "mask": "weight"}, init_rate=1.0)
    x = torch.randn(5, 1, 6, 6)
    y = torch.randint(0, 4, (5,))
    model.loss(x, y, 50, samples=2).backward()
    assert model.stem[0].weight.grad is not None and model.heads[0].weight.grad is not None
    probs, per_sample = model.predict(x, samples=3, return_samples=True)
    assert per_sample.shape == (3, 5, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert not torch.allclose(per_sample[0], per_sample[1])
