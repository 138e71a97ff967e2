"""bfloat16 / float16 in the stochastic-weight ops, the KL terms and the rng fills (docs/precision.md).

The accuracy contract: with the same seed (so the same float32 noise), a 16-bit result's error
against a float64 computation of the same formula is at most the error of eager PyTorch written in
that 16-bit dtype (``mu + softplus(rho) * eps`` then the product, with the same eps) plus one ulp of
the result's largest value (``TOL``). Errors are max-abs, relative to the float64 result's largest
value. Checked for the output and every gradient, on the reference and cpu backends.
"""
import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import nn as unn
from udn_kernels import rng
from udn_kernels._backend import available_backends
from udn_kernels.reference import kl as ref_kl

HALVES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: torch.finfo(torch.float16).eps}
# The cpu backend under both 16-bit GEMM strategies (docs/precision.md): 16-bit tiles multiplied
# natively, or widened to float32; "cpu:<strategy>" forces one through UDN_KERNELS_HALF_GEMM.
BACKENDS = ["reference"] + [pytest.param(f"cpu:{strategy}", marks=pytest.mark.skipif(
    not available_backends()["cpu"], reason="C++ extension not built")) for strategy in ("native", "upcast")]


@pytest.fixture(autouse=True)
def _gemm_strategy(request, monkeypatch):
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend", "") if params else ""
    if isinstance(backend, str) and ":" in backend:
        monkeypatch.setenv("UDN_KERNELS_HALF_GEMM", backend.split(":")[1])


def _backend(name):
    return udn_kernels.backend(name.split(":")[0])
SEED = 1234
B, K, N = 12, 40, 24


def normals(count, offset, dtype):
    return rng.normal(count, SEED, offset).to(dtype)


def signs(count, offset, dtype):
    return torch.where(rng.random_uint32(count, SEED, offset) >= 2**31, 1.0, -1.0).to(dtype)


def keep_scaled(count, p, dtype):
    return (rng.uniform(count, SEED, 0) >= p).to(dtype) / (1 - p)


def eager_gaussian(x, mu, sig, bmu, bsig, estimator, S, softplus):
    """Eager PyTorch in x's dtype, the noise of docs/rng.md: ``[S, B, N]`` from ``x [Sx, B, K]``."""
    dt = x.dtype
    sd = F.softplus(sig) if softplus else sig
    bsd = None if bsig is None else (F.softplus(bsig) if softplus else bsig)
    n, k = sd.shape
    b = x.shape[1]
    if estimator == "local":
        var = (x * x) @ (sd * sd).t()
        if bsd is not None:
            var = var + bsd * bsd
        out = var.sqrt() * normals(S * b * n, 0, dt).view(S, b, n)
        out = out + (0 if mu is None else x @ mu.t())
        return out if bmu is None else out + bmu
    eps = normals(S * n * k, 0, dt).view(S, n, k)
    if estimator == "sample":
        weight = sd * eps if mu is None else mu + sd * eps
        out = x @ weight.transpose(1, 2)
    else:  # flipout
        base = S * n * k + S * n
        sign_in = signs(S * b * k, base, dt).view(S, b, k)
        sign_out = signs(S * b * n, base + S * b * k, dt).view(S, b, n)
        out = ((x * sign_in) @ (sd * eps).transpose(1, 2)) * sign_out
        out = out if mu is None else out + x @ mu.t()
    bias = bmu if bmu is not None else 0
    if bsd is not None:
        bias = bias + bsd * normals(S * n, S * n * k, dt).view(S, n)
        bias = bias.unsqueeze(1)
    return out + bias


def eager_bernoulli(x, weight, bias, p, mask, S):
    dt = x.dtype
    n, k = weight.shape
    b = x.shape[1]
    if mask == "input":
        out = (x * keep_scaled(S * b * k, p, dt).view(S, b, k)) @ weight.t()
    elif mask == "weight":
        out = x @ (weight * keep_scaled(S * n * k, p, dt).view(S, n, k)).transpose(1, 2)
    else:
        out = x @ (weight * signs(S * n * k, 0, dt).view(S, n, k)).transpose(1, 2)
    return out if bias is None else out + bias


def rel_error(value, exact):
    return ((value.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def run(fn, tensors, upstream):
    """fn's output and the gradients of <output, upstream> for every tensor (None stays None)."""
    out = fn(*tensors)
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(out, present, upstream.to(out.dtype)))
    return out, [None if t is None else next(grads) for t in tensors]


def assert_contract(dtype, ours, eager, exact, names):
    """ours / eager / exact: (output, grads) of the op, eager PyTorch in dtype, eager float64."""
    for name, o, e, x in zip(["out"] + names, [ours[0]] + ours[1], [eager[0]] + eager[1], [exact[0]] + exact[1]):
        if x is None:
            continue
        assert o.dtype == e.dtype, (name, o.dtype, e.dtype)
        err_ours, err_eager = rel_error(o, x), rel_error(e, x)
        assert err_ours <= err_eager + TOL[dtype], (name, err_ours, err_eager)


GAUSSIAN_CASES = [
    # estimator, samples, input_has_samples, softplus, zero_mean, bias
    ("sample", None, False, False, False, True),
    ("sample", None, False, True, False, True),
    ("sample", None, False, True, True, False),
    ("sample", 3, False, True, False, True),
    ("local", None, False, True, False, True),
    ("local", None, False, False, True, False),
    ("local", 3, True, True, False, True),
    ("flipout", None, False, True, False, True),
    ("flipout", 3, True, False, False, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("case", GAUSSIAN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gaussian_linear_16_bit_is_as_accurate_as_eager(backend, dtype, case):
    estimator, samples, x_sampled, softplus, zero_mean, with_bias = case
    S = samples or 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S if x_sampled else 1, B, K, generator=g, dtype=torch.float64)
    mu = None if zero_mean else 0.3 * torch.randn(N, K, generator=g, dtype=torch.float64)
    sig = (-3 + 0.5 * torch.randn(N, K, generator=g, dtype=torch.float64)) if softplus else \
        0.05 * torch.rand(N, K, generator=g, dtype=torch.float64)
    bmu = 0.1 * torch.randn(N, generator=g, dtype=torch.float64) if with_bias else None
    bsig = (sig[:, 0] if with_bias else None)
    upstream = torch.randn(S, B, N, generator=g, dtype=torch.float64)
    tensors = [x, mu, sig, bmu, None if bsig is None else bsig.clone()]
    # The inputs are 16-bit values: every computation below starts from the same numbers.
    tensors = [None if t is None else t.to(dtype).double() for t in tensors]
    upstream = upstream.to(dtype).double()

    def ours(x, *params):
        xin = x if x_sampled else x[0]
        with _backend(backend):
            out = udn_kernels.gaussian_linear(xin, *params, estimator=estimator, samples=samples, seed=SEED,
                                              input_has_samples=x_sampled,
                                              sigma_transform="softplus" if softplus else None)
        return out.reshape(S, B, N)

    def eager(*ts):
        return eager_gaussian(*ts, estimator, S, softplus)

    exact = run(eager, leaves(tensors, torch.float64), upstream)
    ours_result = run(ours, leaves(tensors, dtype), upstream)
    eager_result = run(eager, leaves(tensors, dtype), upstream)
    assert ours_result[0].dtype == dtype
    assert all(gr is None or gr.dtype == dtype for gr in ours_result[1])
    assert_contract(dtype, ours_result, eager_result, exact, ["d_x", "d_mu", "d_sigma", "d_bias_mu", "d_bias_sigma"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("mask,samples,x_sampled", [("input", None, False), ("input", 3, True),
                                                    ("weight", None, False), ("weight", 3, False),
                                                    ("symmetric", None, False), ("symmetric", 3, True)])
def test_bernoulli_linear_16_bit_is_as_accurate_as_eager(backend, dtype, mask, samples, x_sampled):
    S, p = samples or 1, 0.3
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(S if x_sampled else 1, B, K, generator=g, dtype=torch.float64),
               0.3 * torch.randn(N, K, generator=g, dtype=torch.float64),
               0.1 * torch.randn(N, generator=g, dtype=torch.float64)]
    tensors = [t.to(dtype).double() for t in tensors]
    upstream = torch.randn(S, B, N, generator=g, dtype=torch.float64).to(dtype).double()

    def ours(x, weight, bias):
        with _backend(backend):
            out = udn_kernels.bernoulli_linear(x if x_sampled else x[0], weight, bias, p=p, mask=mask,
                                               samples=samples, seed=SEED, input_has_samples=x_sampled)
        return out.reshape(S, B, N)

    def eager(x, weight, bias):
        return eager_bernoulli(x, weight, bias, p, mask, S)

    exact = run(eager, leaves(tensors, torch.float64), upstream)
    ours_result = run(ours, leaves(tensors, dtype), upstream)
    eager_result = run(eager, leaves(tensors, dtype), upstream)
    assert all(t.dtype == dtype for t in [ours_result[0], *ours_result[1]])
    assert_contract(dtype, ours_result, eager_result, exact, ["d_x", "d_weight", "d_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("kind", ["gaussian-rho", "gaussian-sigma-prior-tensor", "log-uniform-clamped"])
def test_kl_16_bit_returns_float32_and_is_as_accurate_as_eager(backend, dtype, kind):
    g = torch.Generator().manual_seed(2)
    n = 3 * 2**14 + 5  # several of the C++ kernels' 2^14-element chunks, and a ragged end
    mu = (0.3 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).double()
    if kind == "log-uniform-clamped":
        la = (4 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype).double()

        def ours(la):
            with _backend(backend):
                return udn_kernels.log_uniform_kl(la, clamp=(-3.0, 3.0))

        def eager(la):
            return ref_kl.log_uniform_kl(la.clamp(-3.0, 3.0))
        tensors, names = [la], ["d_log_alpha"]
    else:
        softplus = kind == "gaussian-rho"
        sig = (-2 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) if softplus else \
            0.05 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
        prior = 0.5 if softplus else (0.2 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype).double()
        tensors = [mu, sig.to(dtype).double()] + ([] if softplus else [prior])
        names = ["d_mu", "d_sigma"] + ([] if softplus else ["d_prior_std"])

        def ours(mu, sig, *prior_t):
            with _backend(backend):
                return udn_kernels.gaussian_kl(mu, sig, prior_t[0] if prior_t else prior,
                                               sigma_transform="softplus" if softplus else None)

        def eager(mu, sig, *prior_t):
            return ref_kl.gaussian_kl(mu, F.softplus(sig) if softplus else sig, prior_t[0] if prior_t else prior)
    upstream = torch.tensor(0.25, dtype=torch.float64)
    exact = run(eager, leaves(tensors, torch.float64), upstream)
    ours_result = run(ours, leaves(tensors, dtype), upstream)
    eager_result = run(eager, leaves(tensors, dtype), upstream)
    assert ours_result[0].dtype == torch.float32  # the KL of 16-bit parameters is float32
    assert all(gr.dtype == dtype for gr in ours_result[1])
    # The float32 sum beats eager's 16-bit one by far: hold it to float32 accuracy.
    assert rel_error(ours_result[0], exact[0]) < 1e-4
    eager_result = (eager_result[0].float(), eager_result[1])
    ours_result = (ours_result[0], ours_result[1])
    for name, o, e, x in zip(names, ours_result[1], eager_result[1], exact[1]):
        assert rel_error(o, x) <= rel_error(e, x) + TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float64] + HALVES)
def test_rng_fills_in_a_dtype_are_the_float32_stream_rounded(dtype):
    n, offset = 4099, 7
    assert torch.equal(rng.normal(n, SEED, offset, dtype=dtype), rng.normal(n, SEED, offset).to(dtype))
    u = rng.uniform(1 << 16, SEED, dtype=dtype)
    assert u.dtype == dtype and float(u.min()) >= 0 and float(u.max()) < 1
    exact = rng.uniform(1 << 16, SEED).to(dtype)
    below_one = exact < 1
    assert torch.equal(u[below_one], exact[below_one])
    assert (~below_one).any() or dtype == torch.float64  # 16-bit rounding does reach 1.0 here


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_rng_rejects_a_non_float_dtype(dtype):
    with pytest.raises(TypeError, match=r"^dtype: expected one of \(float32, float64, bfloat16, float16\)"):
        rng.normal(4, SEED, dtype=dtype)


def test_mixed_dtypes_compute_in_the_16_bit_dtype_and_return_each_gradient_in_its_own():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, K, generator=g).to(torch.bfloat16).requires_grad_()
    mu = torch.randn(N, K, generator=g).requires_grad_()
    rho = (-3 + torch.randn(N, K, generator=g)).requires_grad_()
    out = udn_kernels.gaussian_linear(x, mu, rho, seed=SEED, sigma_transform="softplus")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert (x.grad.dtype, mu.grad.dtype, rho.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    # The rule: fp32 weights beside a bf16 x are used as their bf16 roundings.
    same = udn_kernels.gaussian_linear(x, mu.bfloat16(), rho.bfloat16(), seed=SEED, sigma_transform="softplus")
    assert torch.equal(out, same)
    with pytest.raises(TypeError, match=r"^weight: expected dtype bfloat16 \(as the other 16-bit inputs\), got float16"):
        udn_kernels.bernoulli_linear(x, mu.half(), seed=SEED)


def autocast_case():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, K, generator=g, requires_grad=True)
    mu = torch.randn(N, K, generator=g, requires_grad=True)
    rho = (-3 + torch.randn(N, K, generator=g)).requires_grad_()
    return x, mu, rho


def test_autocast_outputs_like_f_linear_and_matches_the_op_on_cast_inputs():
    x, mu, rho = autocast_case()
    seed = torch.tensor(SEED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = udn_kernels.gaussian_linear(x, mu, rho, seed=seed, sigma_transform="softplus")
        bern = udn_kernels.bernoulli_linear(x, mu, seed=seed)
        assert out.dtype == bern.dtype == F.linear(x, mu).dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == mu.grad.dtype == rho.grad.dtype == torch.float32
    cast = udn_kernels.gaussian_linear(x.bfloat16(), mu.bfloat16(), rho.bfloat16(), seed=seed,
                                       sigma_transform="softplus")
    assert torch.equal(out, cast)


def test_autocast_under_torch_compile_fullgraph_matches_eager():
    x, mu, rho = autocast_case()
    seed = torch.tensor(SEED)

    def step(x, mu, rho):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = udn_kernels.gaussian_linear(x, mu, rho, seed=seed, sigma_transform="softplus")
            return out, udn_kernels.gaussian_kl(mu, rho, 1.0, sigma_transform="softplus")

    torch._dynamo.reset()
    compiled_out, compiled_kl = torch.compile(step, fullgraph=True, backend="aot_eager")(x, mu, rho)
    eager_out, eager_kl = step(x, mu, rho)
    assert compiled_out.dtype == torch.bfloat16 and compiled_kl.dtype == torch.float32
    assert torch.equal(compiled_out, eager_out) and torch.equal(compiled_kl, eager_kl)
    compiled_out.float().sum().backward()
    assert mu.grad.dtype == torch.float32 and torch.isfinite(mu.grad).all()


@pytest.mark.parametrize("layer", [lambda: unn.GaussianLinear(K, N), lambda: unn.BernoulliLinear(K, N),
                                   lambda: unn.VariationalDropoutLinear(K, N)],
                         ids=["gaussian", "bernoulli", "variational-dropout"])
def test_layers_moved_to_bfloat16_train(layer):
    torch.manual_seed(5)
    model = layer().to(torch.bfloat16)
    x = torch.randn(B, K, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    (out.float().square().mean() + unn.kl(model) / 100).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(param.grad.float()).all(), name
    assert unn.kl(model).dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("argument,make,error,message", [
    ("x", lambda t: dict(x=t["x"].long()), TypeError, r"^x: expected dtype in \(float32, float64, bfloat16, float16\), got int64"),
    ("weight_mu", lambda t: dict(weight_mu=t["mu"].bool()), TypeError, r"^weight_mu: expected dtype in .*got bool"),
    ("weight_sigma", lambda t: dict(weight_sigma=t["sig"].to(torch.complex64)), TypeError,
     r"^weight_sigma: expected dtype in .*got complex64"),
    ("bias_mu", lambda t: dict(bias_mu=torch.zeros(N, device="meta")), ValueError,
     r"^bias_mu: expected device cpu \(as x\), got meta"),
])
def test_gaussian_linear_bad_input_names_the_argument(argument, make, error, message):
    t = dict(x=torch.randn(B, K), mu=torch.randn(N, K), sig=torch.rand(N, K))
    args = dict(x=t["x"], weight_mu=t["mu"], weight_sigma=t["sig"])
    args.update(make(t))
    with pytest.raises(error, match=message):
        udn_kernels.gaussian_linear(**args, seed=SEED)


@pytest.mark.parametrize("call,error,message", [
    (lambda: udn_kernels.bernoulli_linear(torch.randn(B, K), torch.ones(N, K, dtype=torch.int32)), TypeError,
     r"^weight: expected dtype in .*got int32"),
    (lambda: udn_kernels.bernoulli_linear(torch.randn(B, K), torch.randn(N, K), torch.zeros(N, device="meta")),
     ValueError, r"^bias: expected device cpu \(as x\), got meta"),
    (lambda: udn_kernels.gaussian_kl(torch.zeros(4, dtype=torch.complex64), torch.ones(4), 1.0), TypeError,
     r"^mu: expected dtype in .*got complex64"),
    (lambda: udn_kernels.gaussian_kl(torch.zeros(4, device="meta"), torch.ones(4), 1.0), ValueError,
     r"^mu: expected device cpu \(as sigma\), got meta"),
    (lambda: udn_kernels.log_uniform_kl(torch.zeros(4, dtype=torch.bool)), TypeError,
     r"^log_alpha: expected dtype in .*got bool"),
])
def test_other_ops_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALVES)
def test_kl_16_bit_prior_gradient_with_a_frozen_mean(backend, dtype):
    # d prior_std depends on mu even when mu itself needs no gradient.
    g = torch.Generator().manual_seed(6)
    n = 2**14 + 3  # two of the C++ kernel's chunks; the summed gradient (~1e4) fits float16
    mu = (0.3 * torch.randn(n, generator=g)).to(dtype)
    rho = (-2 + torch.randn(n, generator=g)).to(dtype)
    prior = torch.tensor([0.75], dtype=dtype, requires_grad=True)
    with _backend(backend):
        udn_kernels.gaussian_kl(mu, rho, prior, sigma_transform="softplus").backward()
    prior64 = prior.detach().double().requires_grad_()
    ref_kl.gaussian_kl(mu.double(), F.softplus(rho.double()), prior64).backward()
    assert prior.grad.dtype == dtype
    assert rel_error(prior.grad, prior64.grad) <= TOL[dtype]


def _bf16_custom_op_cases(backend):
    from udn_kernels.ops import gaussian_linear as gauss_ops
    from udn_kernels.ops import kl as kl_ops
    g = torch.Generator().manual_seed(7)
    bf = torch.bfloat16
    x = torch.randn(1, 6, 5, generator=g).to(bf).requires_grad_()
    mu = torch.randn(4, 5, generator=g).to(bf).requires_grad_()
    sigma = torch.rand(4, 5, generator=g).add_(0.1).to(bf).requires_grad_()
    seed = torch.tensor(11)
    cases = {f"gaussian_fwd-{e}": (gauss_ops._fwd, (x, mu, sigma, None, None, seed, e, 2, False, True, backend))
             for e in ("sample", "local")}
    prior = torch.tensor(0.8, dtype=bf)
    cases["gaussian_kl_fwd"] = (kl_ops._gauss_fwd, (mu, sigma, prior, True, backend))
    # the upstream gradient of a 16-bit KL is float32, like the KL
    cases["gaussian_kl_bwd"] = (kl_ops._gauss_bwd, (torch.tensor(0.3), mu.detach(), sigma.detach(), prior, True,
                                                    [True, True, False], backend))
    cases["log_uniform_kl_fwd"] = (kl_ops._lu_fwd, (mu, -1.0, 1.0, backend))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_bf16_custom_op_cases("reference")))
def test_bf16_custom_ops_pass_opcheck(backend, name):
    # The fake kernels' dtypes (float32 KL of bf16 parameters) match the real kernels'.
    op, args = _bf16_custom_op_cases(backend.split(":")[0])[name]
    torch.library.opcheck(op, args)


# K = 4100, N = 70: the upcast GEMMs of local's and flipout's mean part, bernoulli's input mask and
# their gradients split into several float32 column tiles, the last one partial (gemm_strategy.h).
TILED = {"B": 3, "K": 4100, "N": 70}


@pytest.mark.skipif(not available_backends()["cpu"], reason="C++ extension not built")
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("case", [c for c in GAUSSIAN_CASES if c[0] != "sample"], ids=lambda c: "-".join(map(str, c)))
def test_gaussian_upcast_column_tiles_are_as_accurate_as_eager(monkeypatch, dtype, case):
    monkeypatch.setenv("UDN_KERNELS_HALF_GEMM", "upcast")
    for name, value in TILED.items():
        monkeypatch.setitem(globals(), name, value)
    test_gaussian_linear_16_bit_is_as_accurate_as_eager("cpu", dtype, case)


@pytest.mark.skipif(not available_backends()["cpu"], reason="C++ extension not built")
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("samples,x_sampled", [(None, False), (3, True)])
def test_bernoulli_input_upcast_column_tiles_are_as_accurate_as_eager(monkeypatch, dtype, samples, x_sampled):
    monkeypatch.setenv("UDN_KERNELS_HALF_GEMM", "upcast")
    for name, value in TILED.items():
        monkeypatch.setitem(globals(), name, value)
    test_bernoulli_linear_16_bit_is_as_accurate_as_eager("cpu", dtype, "input", samples, x_sampled)
