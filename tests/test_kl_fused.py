"""The fused KL ops (ops/kl.py) against the eager formulas of reference/kl.py, on each CPU-side backend.

Values and every gradient agree with autograd through the eager formula: float64 to rounding
(rtol 1e-10), float32 to its precision (the kernels' softplus is a polynomial within 2.3e-7 of
F.softplus; sums in double). The C++ sum does not depend on the thread count.
"""
import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import nn as unn
from udn_kernels.ops import kl as kl_ops
from udn_kernels.reference import kl as ref_kl

BACKENDS = ["reference"] + (["cpu"] if udn_kernels.available_backends()["cpu"] else [])
# float32: a prior gradient sums ~1e3 float32 terms (worst-case relative rounding n * eps ~ 1e-4).
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-10}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}
# Not a multiple of the C++ chunk (2^14), its blocks (256), any vector width, or the Triton block.
RAGGED = (37, 1111)


def _params(shape, dtype, seed=0, softplus=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    sigma = torch.randn(shape, generator=g, dtype=dtype) - 3.0 if softplus else torch.rand(shape, generator=g, dtype=dtype) + 0.05
    return mu.requires_grad_(), sigma.requires_grad_()


def _eager_gaussian(mu, sigma, prior_std, softplus):
    return ref_kl.gaussian_kl(mu, F.softplus(sigma) if softplus else sigma, prior_std)


def _grads(value, inputs):
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(value, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("has_mu", [True, False])
@pytest.mark.parametrize("prior", ["float", "scalar-tensor", "per-row", "full"])
def test_gaussian_kl_value_and_gradients_match_the_eager_formula(backend, dtype, softplus, has_mu, prior):
    mu, sigma = _params(RAGGED, dtype, softplus=softplus)
    mu = mu if has_mu else None
    prior_std = {"float": 0.7,
                 "scalar-tensor": torch.tensor(0.7, dtype=dtype),
                 "per-row": torch.rand(RAGGED[0], 1, dtype=dtype) + 0.5,
                 "full": torch.rand(RAGGED, dtype=dtype) + 0.5}[prior]
    if isinstance(prior_std, torch.Tensor):
        prior_std.requires_grad_()
    upstream = 0.37  # the loss scale (e.g. 1 / n) reaches the gradients
    with udn_kernels.backend(backend, strict=True):
        got = kl_ops.gaussian_kl(mu, sigma, prior_std, sigma_transform="softplus" if softplus else None)
        got_grads = _grads(got * upstream, (mu, sigma, prior_std))
    want = _eager_gaussian(mu, sigma, prior_std, softplus)
    want_grads = _grads(want * upstream, (mu, sigma, prior_std))
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert got.dtype == dtype and got.shape == ()
    for g, w in zip(got_grads, want_grads):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softplus", [False, True])
def test_gaussian_kl_gradcheck(backend, softplus):
    mu, sigma = _params((3, 5), torch.float64, softplus=softplus)
    prior = (torch.rand(3, 1, dtype=torch.float64) + 0.5).requires_grad_()
    transform = "softplus" if softplus else None
    with udn_kernels.backend(backend, strict=True):
        assert torch.autograd.gradcheck(lambda m, s, p: kl_ops.gaussian_kl(m, s, p, sigma_transform=transform),
                                        (mu, sigma, prior))
        assert torch.autograd.gradcheck(lambda s: kl_ops.gaussian_kl(None, s, 1.3, sigma_transform=transform),
                                        (sigma,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clamp", [None, (-1.0, 0.5)])
def test_log_uniform_kl_value_and_gradient_match_the_eager_formula(backend, dtype, clamp):
    g = torch.Generator().manual_seed(3)
    log_alpha = (4 * torch.randn(RAGGED, generator=g, dtype=dtype)).requires_grad_()
    with torch.no_grad():
        log_alpha[0, :3] = torch.tensor([-1.0, 0.5, 0.0])  # on the clamp bounds: torch.clamp passes the gradient
    with udn_kernels.backend(backend, strict=True):
        got = kl_ops.log_uniform_kl(log_alpha, clamp=clamp)
        (got_grad,) = torch.autograd.grad(got * 0.37, log_alpha)
    want = ref_kl.log_uniform_kl(log_alpha if clamp is None else log_alpha.clamp(*clamp))
    (want_grad,) = torch.autograd.grad(want * 0.37, log_alpha)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])
    if clamp is not None:
        assert (got_grad[(log_alpha < clamp[0]) | (log_alpha > clamp[1])] == 0).all()
        assert (got_grad[0, :3] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_uniform_kl_gradcheck(backend):
    log_alpha = torch.linspace(-6, 6, 11, dtype=torch.float64).requires_grad_()
    with udn_kernels.backend(backend, strict=True):
        assert torch.autograd.gradcheck(lambda la: kl_ops.log_uniform_kl(la, clamp=(-4.5, 4.5)), (log_alpha,))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="C++ extension not built")
def test_cpp_sums_do_not_depend_on_the_thread_count_and_handle_large_tensors():
    mu, rho = _params((1 << 20) + 12345, torch.float32, seed=5, softplus=True)
    log_alpha = torch.randn(mu.shape)
    threads = torch.get_num_threads()
    values = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with udn_kernels.backend("cpu", strict=True):
                values.append((kl_ops.gaussian_kl(mu, rho, 0.5, sigma_transform="softplus").item(),
                               kl_ops.log_uniform_kl(log_alpha).item()))
    finally:
        torch.set_num_threads(threads)
    assert values[0] == values[1] == values[2]
    want = _eager_gaussian(mu.double(), rho.double(), 0.5, True).item()
    assert values[0][0] == pytest.approx(want, rel=1e-6)
    assert values[0][1] == pytest.approx(ref_kl.log_uniform_kl(log_alpha.double()).item(), rel=1e-6)


def test_frozen_inputs_get_no_gradient_and_the_rest_are_unchanged():
    mu, sigma = _params((4, 6), torch.float64)
    mu.requires_grad_(False)
    (d_sigma,) = torch.autograd.grad(kl_ops.gaussian_kl(mu, sigma, 0.9), sigma)
    (want,) = torch.autograd.grad(ref_kl.gaussian_kl(mu, sigma, 0.9), sigma)
    torch.testing.assert_close(d_sigma, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", ["gaussian", "gaussian-zero-mean", "gaussian-no-bias", "conv", "vd"])
def test_layer_kl_equals_the_eager_formula(layer):
    torch.manual_seed(0)
    module = {"gaussian": lambda: unn.GaussianLinear(9, 7, prior_std=0.8),
              "gaussian-zero-mean": lambda: unn.GaussianLinear(9, 7, zero_mean=True),
              "gaussian-no-bias": lambda: unn.GaussianLinear(9, 7, bias=False),
              "conv": lambda: unn.GaussianConv2d(3, 4, 3, prior_std=0.5),
              "vd": lambda: unn.VariationalDropoutLinear(9, 7)}[layer]().double()
    with torch.no_grad():  # spread the parameters so the clamp and the softplus tails matter
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 6)
    got = module.kl()
    params = dict(module.named_parameters())
    if layer == "vd":
        want = ref_kl.log_uniform_kl(module.log_alpha.clamp(-10.0, 8.0))
    else:
        want = ref_kl.gaussian_kl(params.get("weight_mu"), F.softplus(module.weight_rho), module.prior_std)
        if module.bias_rho is not None:
            want = want + ref_kl.gaussian_kl(module.bias_mu, F.softplus(module.bias_rho), module.prior_std)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad(got, list(params.values()), allow_unused=True)
    want_grads = torch.autograd.grad(want, list(params.values()), allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_elbo_loss_with_kl_over_n_has_the_eager_gradients():
    torch.manual_seed(1)
    model = torch.nn.Sequential(unn.GaussianLinear(6, 5), torch.nn.ReLU(), unn.VariationalDropoutLinear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    first, last = model[0], model[2]

    def eager_kl():
        return (ref_kl.gaussian_kl(first.weight_mu, F.softplus(first.weight_rho), first.prior_std)
                + ref_kl.gaussian_kl(first.bias_mu, F.softplus(first.bias_rho), first.prior_std)
                + ref_kl.log_uniform_kl(last.log_alpha.clamp(-10.0, 8.0)))

    grads = []
    for kl_term in (lambda: unn.kl(model), eager_kl):
        torch.manual_seed(2)  # the same weight noise both times
        loss = F.cross_entropy(model(x), y) + kl_term() / 1000
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_kl_compiles_fullgraph(backend):
    torch._dynamo.reset()
    mu, rho = _params((5, 7), torch.float32, softplus=True)

    def loss(mu, rho):
        return kl_ops.gaussian_kl(mu, rho, 0.6, sigma_transform="softplus") / 10 + kl_ops.log_uniform_kl(
            rho, clamp=(-10.0, 8.0))

    with udn_kernels.backend(backend, strict=True):
        compiled = torch.compile(loss, fullgraph=True, backend="inductor")
        got = compiled(mu, rho)
        got_grads = torch.autograd.grad(got, (mu, rho))
        want = loss(mu, rho)
        want_grads = torch.autograd.grad(want, (mu, rho))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
