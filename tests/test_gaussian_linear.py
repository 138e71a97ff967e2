"""gaussian_linear: C++ kernels == reference, gradients, moments, seeding, validation, compile."""
import itertools
import math

import pytest
import torch

import udn_kernels
from udn_kernels import _backend
from udn_kernels.reference import stochastic_linear as ref

_backend.load_extension()  # registers torch.ops.udn_kernels_C.*
C = torch.ops.udn_kernels_C
ESTIMATORS = ("sample", "local", "flipout")
# Both dtypes draw the noise in float32; C++ and reference normals agree within 4e-6 (docs/rng.md)
# and the GEMMs sum in different orders: errors are bounded relative to the largest value.
RTOL = 2e-5


def _close(actual, expected, what):
    assert actual.shape == expected.shape, what
    if expected.numel():
        err = (actual - expected).abs().max().item()
        assert err <= RTOL * max(1.0, expected.abs().max().item()), f"{what}: {err}"


ALL_GRADS = [True] * 5


def _with_std(args, std):
    """The backward kernels' arguments: the forward's inputs with its std output after bias_sigma,
    asking for every gradient."""
    return (*args[:5], std, *args[5:], ALL_GRADS)


def _check_kernel_against_reference(args, what, grad=None):
    """C++ forward (out and local's std) and backward, fed its own std, == the reference's."""
    out, std = C.gaussian_linear_fwd(*args)
    want_out, want_std = ref.gaussian_linear_fwd(*args)
    _close(out, want_out, what + " out")
    _close(std, want_std, what + " std")
    grad = torch.randn_like(out) if grad is None else grad
    names = ("d_x", "d_mu", "d_sigma", "d_bias_mu", "d_bias_sigma")
    for name, a, b in zip(names, C.gaussian_linear_bwd(grad, *_with_std(args, std)),
                          ref.gaussian_linear_bwd(grad, *_with_std(args, want_std))):
        _close(a, b, f"{what} {name}")
        assert torch.isfinite(a).all(), f"{what} {name}"


def _inputs(dtype, S, sampled, with_mu, bias, B=5, K=37, N=23, seed=0, rho=False):
    """Kernel inputs; with ``rho`` the sigma arguments are softplus parameters spread over
    [-30, 25] (both sides of 0 and of F.softplus's threshold 20)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S if sampled else 1, B, K, dtype=dtype, generator=g)
    mu = torch.randn(N, K, dtype=dtype, generator=g) if with_mu else None
    spread = (lambda t: t * 55 - 30) if rho else (lambda t: t)
    sigma = spread(torch.rand(N, K, dtype=dtype, generator=g)) + 0.1
    bias_mu = torch.randn(N, dtype=dtype, generator=g) if bias in ("mu", "both") else None
    bias_sigma = spread(torch.rand(N, dtype=dtype, generator=g)) if bias in ("sigma", "both") else None
    return x, mu, sigma, bias_mu, bias_sigma


def test_cpu_backend_serves_the_kernels():
    for name in ("gaussian_linear_fwd", "gaussian_linear_bwd"):
        assert _backend.resolve(torch.device("cpu"), name) == "cpu"


@pytest.mark.parametrize("sigma_softplus", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kernel_matches_reference(dtype, estimator, sigma_softplus):
    cases = [(S, sampled, with_mu, bias)
             for S, sampled, with_mu, bias in itertools.product((1, 3), (False, True), (True, False),
                                                                 ("none", "mu", "sigma", "both"))
             if not (sampled and S == 1)]
    for S, sampled, with_mu, bias in cases:
        x, mu, sigma, bmu, bsig = _inputs(dtype, S, sampled, with_mu, bias, rho=sigma_softplus)
        args = (x, mu, sigma, bmu, bsig, 2**62 + 12345, estimator, S, sampled, sigma_softplus)
        _check_kernel_against_reference(args, f"{estimator} S={S} sampled={sampled} mu={with_mu} bias={bias}")


def _identity_layer_sigmas(rho, samples, sigma_softplus):
    """The per-weight standard deviations times eps a kernel uses, read off through x = I (one
    product per output, no sum), with their gradients for an all-ones upstream gradient."""
    N, K = rho.shape
    x = torch.eye(K, dtype=rho.dtype)[None]
    args = (x, None, rho, None, None, 17, "sample", samples, False, sigma_softplus)
    out, std = C.gaussian_linear_fwd(*args)
    grads = C.gaussian_linear_bwd(torch.ones_like(out), *_with_std(args, std))
    return out.transpose(1, 2), grads[2]


@pytest.mark.parametrize("samples", [1, 2])
def test_in_kernel_softplus_and_its_derivative_match_torch(samples):
    # One draw computes softplus in the noise pass (an exp_u20 + polynomial log1p), several take
    # torch's softplus once: against F.softplus / torch.sigmoid element by element, the same noise
    # on both sides. Bound: 4e-6 relative (exp_u20's ~20 ulp; measured 2.5e-6) down to rho = -80,
    # where sigma is 2e-35 (below -87.3, sigma flushes to 0).
    rho = torch.linspace(-80, 30, 120 * 250).view(120, 250)
    got, d_rho = _identity_layer_sigmas(rho, samples, True)
    want, d_sigma = _identity_layer_sigmas(torch.nn.functional.softplus(rho), samples, False)
    nonzero = want != 0
    assert nonzero.float().mean() > 0.99
    torch.testing.assert_close(got[nonzero] / want[nonzero], torch.ones(int(nonzero.sum())), rtol=0, atol=4e-6)
    # d rho / d sigma = sigmoid(rho); above -60 so no product goes subnormal
    ok = (d_sigma != 0) & (rho > -60)
    torch.testing.assert_close(d_rho[ok] / d_sigma[ok], torch.sigmoid(rho)[ok], rtol=4e-6, atol=0)


def test_in_kernel_softplus_float64_is_accurate():
    rho = torch.linspace(-80, 30, 40 * 50, dtype=torch.float64).view(40, 50)
    got, d_rho = _identity_layer_sigmas(rho, 1, True)
    want, d_sigma = _identity_layer_sigmas(torch.nn.functional.softplus(rho), 1, False)
    # F.softplus returns rho itself beyond 20; the kernel adds log1p(exp(-rho)) < 2.1e-9 there
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(d_rho, d_sigma * torch.sigmoid(rho), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma_softplus", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("S, sampled, with_mu", [(2, False, True), (3, True, True), (3, False, False), (1, False, True)])
def test_kernel_matches_reference_across_weight_tiles(estimator, S, sampled, with_mu, sigma_softplus):
    # K=2000 gives 32-row weight tiles: several tiles per draw, a ragged last one, so backward's
    # per-thread d_x partials, first-draw direct writes and later-draw accumulation all run.
    x, mu, sigma, bmu, bsig = _inputs(torch.float32, S, sampled, with_mu, "both", B=7, K=2000, N=70,
                                      rho=sigma_softplus)
    _check_kernel_against_reference((x, mu, sigma, bmu, bsig, 7, estimator, S, sampled, sigma_softplus), "tiles")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("B, K, N", [(0, 4, 3), (2, 0, 3), (2, 4, 0)])
@pytest.mark.parametrize("S, sampled", [(1, False), (2, False), (2, True)])
def test_kernel_matches_reference_on_empty_dimensions(estimator, B, K, N, S, sampled):
    # K = 0 or N = 0 leaves matrices with a zero dimension, where a reshape to (-1, 0) is ambiguous.
    x, mu, sigma, bmu, bsig = _inputs(torch.float32, S, sampled, True, "both", B=B, K=K, N=N)
    _check_kernel_against_reference((x, mu, sigma, bmu, bsig, 5, estimator, S, sampled, False), "empty")


def test_local_zero_variance_rows_have_finite_gradients():
    x, mu, sigma, _, _ = _inputs(torch.float64, 2, True, True, "none")
    x[0, 1] = 0.0
    _check_kernel_against_reference((x, mu, sigma, None, None, 5, "local", 2, True, False), "zero variance")


@pytest.mark.parametrize("S, sampled", [(1, False), (3, False), (3, True)])
def test_local_std_output_is_the_output_std(S, sampled):
    # The forward's second output is sqrt(x^2 (sigma^2)^T + bias_sigma^2) per input draw [Sx, B, N]
    # (not per weight draw), and empty for the weight-noise estimators.
    x, mu, sigma, bmu, bsig = _inputs(torch.float64, S, sampled, True, "both")
    for estimator in ESTIMATORS:
        _, std = C.gaussian_linear_fwd(x, mu, sigma, bmu, bsig, 3, estimator, S, sampled)
        if estimator == "local":
            torch.testing.assert_close(std, ((x * x) @ (sigma * sigma).t() + bsig * bsig).sqrt(),
                                       rtol=1e-12, atol=0)
        else:
            assert std.shape == (0,)


def test_local_reference_backward_equals_autograd_of_its_forward():
    # The reference's closed-form local backward (from std, no variance recompute) == autograd.
    x, mu, sigma, bmu, bsig = _inputs(torch.float64, 3, True, True, "both")
    x[1, 2], bsig[4] = 0.0, 0.0  # std[1, 2, 4] is exactly 0: zero gradient through it
    leaves = [t.clone().requires_grad_() for t in (x, mu, sigma, bmu, bsig)]
    out, std = ref.gaussian_linear_fwd(*leaves, 9, "local", 3, True)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, grad)
    got = ref.gaussian_linear_bwd(grad, x, mu, sigma, bmu, bsig, std.detach(), 9, "local", 3, True, False,
                                  ALL_GRADS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_local_backward_rejects_a_wrong_std():
    x, mu, sigma, _, _ = _inputs(torch.float32, 2, False, True, "none")
    grad = torch.randn(2, x.shape[1], sigma.shape[0])
    with pytest.raises(RuntimeError, match="std: expected"):
        C.gaussian_linear_bwd(grad, x, mu, sigma, None, None, torch.ones(2, x.shape[1], sigma.shape[0]), 1,
                              "local", 2, False, False, ALL_GRADS)


@pytest.mark.parametrize("sigma_transform", [None, "softplus"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradcheck_float64(backend, estimator, sigma_transform):
    x, mu, sigma, bmu, bsig = _inputs(torch.float64, 1, False, True, "both", B=3, K=4, N=3)
    x = x[0]
    if sigma_transform:
        sigma, bsig = sigma * 6 - 3, bsig * 6 - 3  # rho on both sides of 0
    tensors = [t.requires_grad_(True) for t in (x, mu, sigma, bmu, bsig)]
    with udn_kernels.backend(backend):
        for samples in (None, 2):  # one draw: softplus inside the noise pass; several: once up front
            assert torch.autograd.gradcheck(
                lambda *t: udn_kernels.gaussian_linear(*t, estimator=estimator, samples=samples, seed=11,
                                                       sigma_transform=sigma_transform), tensors)
        xs = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x_, s_: udn_kernels.gaussian_linear(x_, None, s_, estimator=estimator, samples=2,
                                                       seed=3, input_has_samples=True,
                                                       sigma_transform=sigma_transform), (xs, tensors[2]))


@pytest.mark.parametrize("sigma_transform", [None, "softplus"])
@pytest.mark.parametrize("samples", [1, 4])
def test_backward_saves_only_the_inputs_and_local_std(samples, sigma_transform):
    x, mu, sigma, bmu, bsig = _inputs(torch.float32, 1, False, True, "both", B=8, K=16, N=12)
    x = x[0].requires_grad_(True)
    inputs = [x, mu.requires_grad_(True), sigma.requires_grad_(True), bmu, bsig]
    for estimator in ESTIMATORS:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = udn_kernels.gaussian_linear(*inputs, estimator=estimator, samples=samples, seed=1,
                                              sigma_transform=sigma_transform)
        # x, mu, sigma, bias_mu, bias_sigma (same storage as the caller's), the forward's std (local:
        # output-sized [Sx=1, B, N], one per input draw; else empty) and the 0-d seed.
        input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        others = [tuple(t.shape) for t in saved if t.numel() > 1 and t.untyped_storage().data_ptr() not in input_ptrs]
        std_shape = [(1, 8, 12)] if estimator == "local" else []
        assert others == std_shape, others
        assert sum(t.numel() for t in saved) == sum(t.numel() for t in inputs) + 1 + 8 * 12 * len(std_shape)
        out.sum().backward()


def test_output_shapes():
    x = torch.randn(2, 3, 5)
    sigma = torch.rand(4, 5)
    assert udn_kernels.gaussian_linear(x, None, sigma, seed=0).shape == (2, 3, 4)
    assert udn_kernels.gaussian_linear(x, None, sigma, samples=6, seed=0).shape == (6, 2, 3, 4)
    assert udn_kernels.gaussian_linear(torch.randn(5), None, sigma, seed=0).shape == (4,)
    xs = torch.randn(6, 2, 3, 5)
    assert udn_kernels.gaussian_linear(xs, None, sigma, samples=6, seed=0, input_has_samples=True).shape == (6, 2, 3, 4)
    assert udn_kernels.gaussian_linear(torch.randn(0, 5), None, sigma, seed=0).shape == (0, 4)


def _moments_case():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g)
    mu = torch.randn(3, 6, dtype=torch.float64, generator=g)
    sigma = torch.rand(3, 6, dtype=torch.float64, generator=g) + 0.2
    bmu = torch.randn(3, dtype=torch.float64, generator=g)
    bsig = torch.rand(3, dtype=torch.float64, generator=g)
    return x, mu, sigma, bmu, bsig


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_output_moments_match_the_analytic_ones(estimator):
    # E = x mu^T + b_mu, Var = x^2 sigma^2T + b_sigma^2 for all three estimators. 4000 draws in one
    # call (samples axis) with a fixed seed; the tolerance is 5 standard errors of each estimate.
    x, mu, sigma, bmu, bsig = _moments_case()
    S = 4000
    out = udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, estimator=estimator, samples=S, seed=2024)
    mean, var = x @ mu.t() + bmu, (x * x) @ (sigma * sigma).t() + bsig * bsig
    z_mean = (out.mean(0) - mean) / (var / S).sqrt()
    # the sample variance of a Gaussian has standard error var * sqrt(2 / (S - 1))
    z_var = (out.var(0) - var) / (var * math.sqrt(2.0 / (S - 1)))
    assert z_mean.abs().max() < 5.0, z_mean
    assert z_var.abs().max() < 5.0, z_var


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_consecutive_samples_are_uncorrelated(estimator):
    x, mu, sigma, bmu, bsig = _moments_case()
    S = 4000
    out = udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, estimator=estimator, samples=S, seed=99)
    z = (out - out.mean(0)) / out.std(0)
    corr = (z[:-1] * z[1:]).mean(0)  # lag-1 correlation of each output; sd ~ 1/sqrt(S)
    assert corr.abs().max() < 5.0 / math.sqrt(S), corr


def test_estimators_differ_in_per_example_correlation():
    # "sample" shares one weight draw across the batch: identical rows give identical outputs;
    # "local" draws independent pre-activations per example.
    x = torch.ones(2, 6, dtype=torch.float64)
    _, mu, sigma, _, _ = _moments_case()
    out = udn_kernels.gaussian_linear(x, mu, sigma, estimator="sample", samples=3, seed=4)
    assert torch.equal(out[:, 0], out[:, 1])
    out = udn_kernels.gaussian_linear(x, mu, sigma, estimator="local", samples=3, seed=4)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_seeding():
    x, mu, sigma, bmu, bsig = _moments_case()
    run = lambda **kw: udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, **kw)
    assert torch.equal(run(seed=5), run(seed=5))
    assert not torch.allclose(run(seed=5), run(seed=6))
    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    assert torch.equal(first, run())
    assert not torch.allclose(first, run())
    # the same explicit seed gives the same noise on the reference backend
    with udn_kernels.backend("reference"):
        assert torch.allclose(run(seed=5, estimator="flipout"), run(seed=5, estimator="flipout"))
    with udn_kernels.backend("reference"):
        expected = run(seed=8)
    assert torch.allclose(run(seed=8), expected, atol=1e-5)


def test_samples_one_equals_a_single_draw():
    x, mu, sigma, bmu, bsig = _moments_case()
    for estimator in ESTIMATORS:
        one = udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, estimator=estimator, seed=3)
        stacked = udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, estimator=estimator, samples=1, seed=3)
        assert torch.equal(stacked[0], one)


@pytest.mark.parametrize("call, match", [
    (lambda x, m, s: udn_kernels.gaussian_linear(x.int(), m, s), "x: expected dtype"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s.double()), "weight_sigma: expected dtype"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x[:, :3], m, s), r"x: expected shape \[\.\.\., 6\]"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m[:2], s), r"weight_mu: expected shape \(3, 6\)"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, torch.zeros(4)), "bias_mu: expected shape"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, bias_sigma=torch.zeros(2)), "bias_sigma: expected shape"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s[0]), "weight_sigma: expected a 2-D"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, estimator="lrt"), "estimator: expected one of"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, samples=0), "samples: expected an int >= 1"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, samples=2.0), "samples: expected an int"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, seed=-1), r"seed: expected an int in \[0, 2\^63\)"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, seed=1.5), "seed: expected an int"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, input_has_samples=True), "input_has_samples"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, samples=3, input_has_samples=True), r"x: expected shape \[3, \.\.\., 6\]"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m.double(), s), "weight_mu: expected dtype"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, "s"), "weight_sigma: expected a torch.Tensor"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, -s), "weight_sigma: expected standard deviations >= 0"),
    (lambda x, m, s: udn_kernels.gaussian_linear(x, m, s, sigma_transform="exp"), "sigma_transform: expected one of"),
])
def test_validation_errors_name_the_argument(call, match):
    x, mu, sigma = torch.randn(4, 6), torch.randn(3, 6), torch.rand(3, 6)
    with pytest.raises((TypeError, ValueError), match=match):
        call(x, mu, sigma)


@pytest.mark.parametrize("sigma_transform", [None, "softplus"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_compile_fullgraph_matches_eager(estimator, sigma_transform):
    torch._dynamo.reset()  # the parametrized cases share one code object: start with a clean cache
    x, mu, sigma, bmu, bsig = (t.float() for t in _moments_case())

    def layer(x, mu, sigma, seed):
        return udn_kernels.gaussian_linear(x, mu, sigma, bmu, bsig, estimator=estimator, samples=2, seed=seed,
                                           sigma_transform=sigma_transform)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, mu, sigma, 3), layer(x, mu, sigma, 3))
    # seed=None draws from torch's generator inside the graph
    torch.manual_seed(1)
    got = compiled(x, mu, sigma, None)
    torch.manual_seed(1)
    assert torch.equal(got, layer(x, mu, sigma, None))
    # gradients flow through the compiled graph
    leaf = mu.clone().requires_grad_(True)
    compiled(x, leaf, sigma, 3).sum().backward()
    ref_leaf = mu.clone().requires_grad_(True)
    layer(x, ref_leaf, sigma, 3).sum().backward()
    assert torch.allclose(leaf.grad, ref_leaf.grad)
