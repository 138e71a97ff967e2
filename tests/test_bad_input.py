"""Bad-input catalogue of every public op and nn module (docs/hardening.md).

Each bad argument must raise ValueError / TypeError / IndexError whose message names the argument;
non-contiguous, expanded (zero-stride) and empty inputs must give the result of contiguous copies;
NaN / Inf inputs must give non-finite outputs, never a crash or a finite wrong number.
Known bugs of code owned elsewhere are strict xfails whose reason names the file and function.
"""
import math
import signal

import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import (bernoulli_linear, depth_loglik, depth_mixture_nll, depth_mixture_predict,
                         gaussian_kl, gaussian_linear, log_uniform_kl, rng)
from udn_kernels import nn as unn

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

L, N, D, C, K, OUT = 3, 5, 4, 6, 4, 6
NAN, INF = float("nan"), float("inf")


def heads_inputs(dtype=torch.float32, seed=0, C=C):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, N, D, generator=gen, dtype=dtype)
    weight = torch.randn(L, C, D, generator=gen, dtype=dtype) / 2
    bias = torch.randn(C, generator=gen, dtype=dtype)
    target = torch.randint(0, C, (N,), generator=gen)
    log_w = torch.log_softmax(torch.randn(L, generator=gen, dtype=dtype), 0)
    return hidden, weight, bias, target, log_w


def linear_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, K, generator=gen, dtype=dtype)
    mu = torch.randn(OUT, K, generator=gen, dtype=dtype)
    sigma = torch.rand(OUT, K, generator=gen, dtype=dtype) + 0.1
    b_mu = torch.randn(OUT, generator=gen, dtype=dtype)
    b_sigma = torch.rand(OUT, generator=gen, dtype=dtype) + 0.1
    return x, mu, sigma, b_mu, b_sigma


H, W, B, Y, LW = heads_inputs()
YG = torch.randn(N, C)
X, MU, SIG, BMU, BSIG = linear_inputs()
META = "meta"


def _gl(**kw):
    args = dict(x=X, weight_mu=MU, weight_sigma=SIG, bias_mu=BMU, bias_sigma=BSIG)
    opts = dict(seed=1)
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    return lambda: gaussian_linear(args["x"], args["weight_mu"], args["weight_sigma"], args["bias_mu"],
                                   args["bias_sigma"], **opts)


def _bl(**kw):
    args = dict(x=X, weight=MU, bias=BMU)
    opts = dict(seed=1)
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    return lambda: bernoulli_linear(args["x"], args["weight"], args["bias"], **opts)


def _heads(op="loglik", **kw):
    args = dict(hidden=H, weight=W, bias=B, target=Y, log_weights=LW)
    opts = {}
    for k, v in kw.items():
        (args if k in args else opts)[k] = v
    if op == "loglik":
        return lambda: depth_loglik(args["hidden"], args["weight"], args["bias"], args["target"], **opts)
    if op == "nll":
        return lambda: depth_mixture_nll(args["hidden"], args["weight"], args["bias"], args["target"],
                                         args["log_weights"], **opts)
    return lambda: depth_mixture_predict(args["hidden"], args["weight"], args["bias"], args["log_weights"],
                                         **opts)


# (id, call, exception, match): `match` must name the offending argument.
CASES = [
    # ---- heads: ranks, shapes, L/N/C/D mismatches
    ("hidden 2-D", _heads(hidden=H[0]), ValueError, "hidden"),
    ("hidden 4-D", _heads(hidden=H[None]), ValueError, "hidden"),
    ("weight 1-D", _heads(weight=W[0, 0]), ValueError, "weight"),
    ("weight D mismatch", _heads(weight=W[..., :2]), ValueError, "weight"),
    ("weight L mismatch", _heads(weight=W[:2]), ValueError, "weight"),
    ("bias C mismatch", _heads(bias=B[:2]), ValueError, "bias"),
    ("bias L mismatch", _heads(bias=torch.zeros(L + 1, C)), ValueError, "bias"),
    ("bias 3-D", _heads(bias=torch.zeros(1, L, C)), ValueError, "bias"),
    ("target N mismatch", _heads(target=Y[:2]), ValueError, "target"),
    ("target 2-D categorical", _heads(target=Y[:, None]), ValueError, "target"),
    ("gaussian target shape", _heads(target=YG[:, :2], likelihood="gaussian"), ValueError, "target"),
    ("log_weights L mismatch", _heads("nll", log_weights=LW[:2]), ValueError, "log_weights"),
    ("log_weights 2-D", _heads("nll", log_weights=LW[None]), ValueError, "log_weights"),
    ("predict log_weights L", _heads("predict", log_weights=LW[:1]), ValueError, "log_weights"),
    ("noise_std shape", _heads(target=YG, likelihood="gaussian", noise_std=torch.ones(C + 1)), ValueError,
     "noise_std"),
    ("noise_std with categorical", _heads(noise_std=1.0), ValueError, "noise_std"),
    # ---- heads: dtypes
    ("hidden int", _heads(hidden=H.long()), TypeError, "hidden"),
    ("hidden complex", _heads(hidden=H.to(torch.complex64)), TypeError, "hidden"),
    ("weight float64 vs float32", _heads(weight=W.double()), TypeError, "weight"),
    ("weight int", _heads(weight=W.int()), TypeError, "weight"),
    ("bias float64", _heads(bias=B.double()), TypeError, "bias"),
    ("target float (categorical)", _heads(target=Y.float()), TypeError, "target"),
    ("target int32", _heads(target=Y.int()), TypeError, "target"),
    ("gaussian target int", _heads(target=YG.long(), likelihood="gaussian"), TypeError, "target"),
    ("gaussian target float64", _heads(target=YG.double(), likelihood="gaussian"), TypeError, "target"),
    ("log_weights int", _heads("nll", log_weights=torch.zeros(L, dtype=torch.long)), TypeError, "log_weights"),
    ("log_weights float64", _heads("nll", log_weights=LW.double()), TypeError, "log_weights"),
    ("noise_std float64", _heads(target=YG, likelihood="gaussian", noise_std=torch.ones(C).double()),
     TypeError, "noise_std"),
    ("target list", _heads(target=Y.tolist()), TypeError, "target"),
    ("hidden ndarray", _heads(hidden=H.numpy()), TypeError, "hidden"),
    # ---- heads: devices (meta is the second device)
    ("weight on meta", _heads(weight=W.to(META)), ValueError, "weight"),
    ("bias on meta", _heads(bias=B.to(META)), ValueError, "bias"),
    ("target on meta", _heads(target=Y.to(META)), ValueError, "target"),
    ("hidden on meta", _heads(hidden=H.to(META)), ValueError, "weight"),
    ("log_weights on meta", _heads("nll", log_weights=LW.to(META)), ValueError, "log_weights"),
    ("noise_std on meta", _heads(target=YG, likelihood="gaussian", noise_std=torch.ones(C, device=META)),
     ValueError, "noise_std"),
    # ---- heads: values and options
    ("target negative", _heads(target=torch.tensor([0, 1, -1, 2, 3])), IndexError, "target"),
    ("target == C", _heads(target=torch.tensor([0, 1, C, 2, 3])), IndexError, "target"),
    ("target huge", _heads("nll", target=torch.tensor([0, 1, 2**40, 2, 3])), IndexError, "target"),
    ("target -100 with other ignore_index", _heads(target=torch.tensor([0, -100, 1, 2, 3]), ignore_index=-1),
     IndexError, "target"),
    ("ignore_index float", _heads(ignore_index=-1.0), TypeError, "ignore_index"),
    ("likelihood unknown", _heads(likelihood="poisson"), ValueError, "likelihood"),
    ("mode unknown", _heads("nll", mode="sampled"), ValueError, "mode"),
    ("reduction unknown", _heads("nll", reduction="avg"), ValueError, "reduction"),
    ("log_weights all -inf (mixture)", _heads("nll", log_weights=torch.full((L,), -INF), mode="mixture"),
     ValueError, "log_weights"),
    ("noise_std 0", _heads(target=YG, likelihood="gaussian", noise_std=0.0), ValueError, "noise_std"),
    ("noise_std negative", _heads(target=YG, likelihood="gaussian", noise_std=-1.0), ValueError, "noise_std"),
    ("noise_std nan", _heads(target=YG, likelihood="gaussian", noise_std=NAN), ValueError, "noise_std"),
    ("noise_std inf", _heads(target=YG, likelihood="gaussian", noise_std=INF), ValueError, "noise_std"),
    ("noise_std tensor <= 0", _heads(target=YG, likelihood="gaussian", noise_std=torch.zeros(C)), ValueError,
     "noise_std"),
    ("noise_std str", _heads(target=YG, likelihood="gaussian", noise_std="1"), TypeError, "noise_std"),
    ("predict noise_std 0", _heads("predict", likelihood="gaussian", noise_std=0.0), ValueError, "noise_std"),
    # ---- gaussian_linear
    ("gl x 0-d", _gl(x=torch.tensor(1.0)), ValueError, "x"),
    ("gl x K mismatch", _gl(x=X[:, :2]), ValueError, "x"),
    ("gl weight_sigma 1-D", _gl(weight_sigma=SIG[0]), ValueError, "weight_sigma"),
    ("gl weight_sigma 3-D", _gl(weight_sigma=SIG[None]), ValueError, "weight_sigma"),
    ("gl weight_mu shape", _gl(weight_mu=MU[:2]), ValueError, "weight_mu"),
    ("gl bias_mu shape", _gl(bias_mu=BMU[:2]), ValueError, "bias_mu"),
    ("gl bias_sigma shape", _gl(bias_sigma=BSIG[:2]), ValueError, "bias_sigma"),
    ("gl x int", _gl(x=X.long()), TypeError, "x"),
    ("gl weight_sigma int", _gl(weight_sigma=SIG.int()), TypeError, "weight_sigma"),
    ("gl weight_mu float64", _gl(weight_mu=MU.double()), TypeError, "weight_mu"),
    ("gl bias_sigma float64", _gl(bias_sigma=BSIG.double()), TypeError, "bias_sigma"),
    ("gl x list", _gl(x=X.tolist()), TypeError, "x"),
    ("gl weight_mu on meta", _gl(weight_mu=MU.to(META)), ValueError, "weight_mu"),
    ("gl bias_mu on meta", _gl(bias_mu=BMU.to(META)), ValueError, "bias_mu"),
    ("gl x on meta", _gl(x=X.to(META)), ValueError, "weight_mu"),
    ("gl estimator", _gl(estimator="reparam"), ValueError, "estimator"),
    ("gl samples 0", _gl(samples=0), ValueError, "samples"),
    ("gl samples -2", _gl(samples=-2), ValueError, "samples"),
    ("gl samples float", _gl(samples=2.0), TypeError, "samples"),
    ("gl samples bool", _gl(samples=True), TypeError, "samples"),
    ("gl input_has_samples without samples", _gl(input_has_samples=True), ValueError, "input_has_samples"),
    ("gl input_has_samples wrong S", _gl(samples=3, input_has_samples=True), ValueError, "x"),
    ("gl input_has_samples not bool", _gl(samples=N, input_has_samples=1), TypeError, "input_has_samples"),
    ("gl seed negative", _gl(seed=-1), ValueError, "seed"),
    ("gl seed 2^63", _gl(seed=2**63), ValueError, "seed"),
    ("gl seed 2^64", _gl(seed=2**64), ValueError, "seed"),
    ("gl seed float", _gl(seed=1.0), TypeError, "seed"),
    ("gl seed str", _gl(seed="1"), TypeError, "seed"),
    ("gl seed bool", _gl(seed=True), TypeError, "seed"),
    ("gl seed int32 tensor", _gl(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed"),
    ("gl seed 2-element tensor", _gl(seed=torch.tensor([1, 2])), TypeError, "seed"),
    # ---- bernoulli_linear
    ("bl x K mismatch", _bl(x=X[:, :3]), ValueError, "x"),
    ("bl weight 3-D", _bl(weight=MU[None]), ValueError, "weight"),
    ("bl bias shape", _bl(bias=BMU[:3]), ValueError, "bias"),
    ("bl x int", _bl(x=X.int()), TypeError, "x"),
    ("bl bias float64", _bl(bias=BMU.double()), TypeError, "bias"),
    ("bl weight on meta", _bl(weight=MU.to(META)), ValueError, "weight"),
    ("bl bias on meta", _bl(bias=BMU.to(META)), ValueError, "bias"),
    ("bl p 1", _bl(p=1.0), ValueError, "p"),
    ("bl p negative", _bl(p=-0.1), ValueError, "p"),
    ("bl p nan", _bl(p=NAN), ValueError, "p"),
    ("bl p tensor", _bl(p=torch.tensor(0.5)), TypeError, "p"),
    ("bl p str", _bl(p="0.5"), TypeError, "p"),
    ("bl mask", _bl(mask="dropout"), ValueError, "mask"),
    ("bl samples 0", _bl(samples=0), ValueError, "samples"),
    ("bl seed negative", _bl(seed=-3), ValueError, "seed"),
    ("bl seed 2^63", _bl(seed=2**63), ValueError, "seed"),
    ("bl seed float", _bl(seed=0.5), TypeError, "seed"),
    # ---- KL terms
    ("gaussian_kl sigma int", lambda: gaussian_kl(None, SIG.long(), 1.0), TypeError, "sigma"),
    ("gaussian_kl mu shape", lambda: gaussian_kl(MU[:2], SIG, 1.0), ValueError, "mu"),
    ("gaussian_kl mu float64", lambda: gaussian_kl(MU.double(), SIG, 1.0), TypeError, "mu"),
    ("gaussian_kl mu on meta", lambda: gaussian_kl(MU.to(META), SIG, 1.0), ValueError, "mu"),
    ("gaussian_kl prior 0", lambda: gaussian_kl(MU, SIG, 0.0), ValueError, "prior_std"),
    ("gaussian_kl prior negative", lambda: gaussian_kl(MU, SIG, -1.0), ValueError, "prior_std"),
    ("gaussian_kl prior nan", lambda: gaussian_kl(MU, SIG, NAN), ValueError, "prior_std"),
    ("gaussian_kl prior str", lambda: gaussian_kl(MU, SIG, "1"), TypeError, "prior_std"),
    ("gaussian_kl prior shape", lambda: gaussian_kl(MU, SIG, torch.ones(3)), ValueError, "prior_std"),
    ("gaussian_kl prior on meta", lambda: gaussian_kl(MU, SIG, torch.ones((), device=META)), ValueError,
     "prior_std"),
    ("log_uniform_kl int", lambda: log_uniform_kl(torch.zeros(3, dtype=torch.long)), TypeError, "log_alpha"),
    ("log_uniform_kl list", lambda: log_uniform_kl([0.0]), TypeError, "log_alpha"),
    # ---- udn_kernels.rng
    ("rng n negative", lambda: rng.uniform(-1, seed=1), ValueError, "n"),
    ("rng n float", lambda: rng.normal(2.0, seed=1), TypeError, "n"),
    ("rng offset negative", lambda: rng.random_uint32(2, seed=1, offset=-1), ValueError, "offset"),
    ("rng offset 2^63", lambda: rng.uniform(2, seed=1, offset=2**63), ValueError, "offset"),
    ("rng offset + n > 2^63", lambda: rng.uniform(2, seed=1, offset=2**63 - 1), ValueError, "offset"),
    ("rng offset float", lambda: rng.uniform(2, seed=1, offset=1.0), TypeError, "offset"),
    ("rng seed negative", lambda: rng.normal(2, seed=-1), ValueError, "seed"),
    ("rng seed 2^63", lambda: rng.normal(2, seed=2**63), ValueError, "seed"),
    ("rng seed float", lambda: rng.normal(2, seed=3.5), TypeError, "seed"),
    ("rng bernoulli p > 1", lambda: rng.bernoulli(2, 1.5, seed=1), ValueError, "p"),
    ("rng bernoulli p negative", lambda: rng.bernoulli(2, -0.5, seed=1), ValueError, "p"),
    # ---- nn modules
    ("GaussianLinear estimator", lambda: unn.GaussianLinear(3, 4, estimator="x"), ValueError, "estimator"),
    ("GaussianLinear x features", lambda: unn.GaussianLinear(3, 4)(torch.randn(2, 5)), ValueError, "x"),
    ("GaussianLinear x int", lambda: unn.GaussianLinear(3, 4)(torch.ones(2, 3, dtype=torch.long)), TypeError, "x"),
    ("GaussianLinear x float64", lambda: unn.GaussianLinear(3, 4)(torch.ones(2, 3, dtype=torch.float64)),
     TypeError, "weight_mu"),
    ("BernoulliLinear p 1", lambda: unn.BernoulliLinear(3, 4, p=1.0), ValueError, "p"),
    ("BernoulliLinear mask", lambda: unn.BernoulliLinear(3, 4, mask="m"), ValueError, "mask"),
    ("BernoulliLinear x features", lambda: unn.BernoulliLinear(3, 4)(torch.randn(2, 5)), ValueError, "x"),
    ("VariationalDropoutLinear x features", lambda: unn.VariationalDropoutLinear(3, 4)(torch.randn(2, 5)),
     ValueError, "x"),
    ("sampling 0", lambda: unn.sampling(0).__enter__(), ValueError, "samples"),
    ("sampling float", lambda: unn.sampling(1.5).__enter__(), TypeError, "samples"),
    ("mc_predict samples None", lambda: unn.mc_predict(unn.GaussianLinear(3, 4), torch.randn(2, 3), None),
     ValueError, "samples"),
    ("TruncatedPoisson rate 0", lambda: unn.TruncatedPoisson(0.0), ValueError, "init_rate"),
    ("TruncatedPoisson rate nan", lambda: unn.TruncatedPoisson(NAN), ValueError, "init_rate"),
    ("TruncatedPoisson quantile 1", lambda: unn.TruncatedPoisson(1.0, quantile=1.0), ValueError, "quantile"),
    ("TruncatedPoisson quantile 0", lambda: unn.TruncatedPoisson(1.0, quantile=0.0), ValueError, "quantile"),
    ("PositivePoisson rate 0", lambda: unn.PositivePoisson(0.0), ValueError, "rate"),
    ("UDN layer", lambda: unn.UDN.mlp(2, 8, 3, layer="foo"), ValueError, "layer"),
    ("UDN likelihood", lambda: unn.UDN.mlp(2, 8, 3, likelihood="foo"), ValueError, "likelihood"),
    ("UDN init_rate 0", lambda: unn.UDN.mlp(2, 8, 3, init_rate=0.0), ValueError, "init_rate"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_raises_naming_it(call, exc, match):
    with pytest.raises(exc, match=rf"^{match}\b"):
        call()


@pytest.fixture(scope="module")
def udn():
    torch.manual_seed(0)
    return unn.UDN.mlp(2, 8, 3)


@pytest.fixture(scope="module")
def udn_gauss():
    torch.manual_seed(0)
    return unn.UDN.mlp(2, 8, 3, likelihood="gaussian")


def test_udn_bad_targets(udn, udn_gauss):
    x = torch.randn(4, 2)
    for y, exc in ((torch.rand(4), TypeError), (torch.tensor([0, 1, 2], dtype=torch.int32), TypeError),
                   (torch.tensor([0, 1, 2, 3]), IndexError), (torch.tensor([0, 1, 2, -1]), IndexError),
                   (torch.tensor([0, 1, 2]), ValueError)):
        with pytest.raises(exc, match="^target"):
            udn.loss(x, y, 100)
    with pytest.raises(TypeError, match="^target"):
        udn_gauss.loss(x, torch.zeros(4, 3, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="^target"):
        udn_gauss.loss(x, torch.zeros(4, 2), 10)
    with pytest.raises(ValueError, match="^n_data"):
        udn(x, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="^samples"):
        udn.loss(x, torch.tensor([0, 1, 2, 1]), 10, samples=0)


def test_udn_rejects_bad_n_data(udn):
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    for n_data in (0, -5, 2.5):
        with pytest.raises((ValueError, TypeError), match="^n_data"):
            udn.loss(x, y, n_data)


def test_udn_empty_batch_loss_is_defined(udn):
    loss = udn.loss(torch.randn(0, 2), torch.zeros(0, dtype=torch.long), 10)
    assert loss.shape == ()


@pytest.mark.parametrize("x", [torch.randn(4, 5), torch.randn(4, 2, dtype=torch.float64),
                               torch.randn(4, 2, device=META)], ids=["features", "float64", "meta"])
def test_udn_rejects_bad_x(udn, x):
    with pytest.raises((ValueError, TypeError), match="^x"):
        udn.loss(x, torch.tensor([0, 1, 2, 1]), 10)


def test_truncated_poisson_negative_max_depth():
    with pytest.raises(ValueError, match="max_depth"):
        unn.TruncatedPoisson(1.0).log_probs(-1)


def test_udn_noise_std_zero_names_argument():
    with pytest.raises(ValueError, match="noise_std"):
        unn.UDN.mlp(2, 8, 3, likelihood="gaussian", noise_std=0.0)


class _Timeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _Timeout


@pytest.mark.parametrize("rate", [NAN, INF])
def test_truncated_poisson_nonfinite_rate_does_not_hang(rate):
    q = unn.TruncatedPoisson(1.0)
    with torch.no_grad():
        q.raw_rate.fill_(rate)
    # the loop is pure Python, so a SIGALRM handler can interrupt it
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(ValueError, match="rate"):
            q.max_depth
    except _Timeout:
        pytest.fail("TruncatedPoisson.max_depth did not return within 2 s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- value bugs (finite wrong numbers)

def test_negative_seed_tensor_rejected():
    with pytest.raises(ValueError, match="^seed"):
        gaussian_linear(X, MU, SIG, seed=torch.tensor(-5))


def test_gaussian_kl_negative_prior_tensor():
    with pytest.raises(ValueError, match="^prior_std"):
        gaussian_kl(MU, SIG, torch.tensor(-1.0))


def test_nonpositive_sigma_behaviour():
    """Negative standard deviations are rejected (eager); sigma = 0 is a point mass; the KL of a
    non-positive sigma is non-finite (never a finite wrong number)."""
    with pytest.raises(ValueError, match="^weight_sigma: expected standard deviations >= 0"):
        gaussian_linear(X, MU, -SIG, BMU, BSIG, estimator="local", seed=3)
    with pytest.raises(ValueError, match="^bias_sigma: expected standard deviations >= 0"):
        gaussian_linear(X, MU, SIG, BMU, -BSIG, seed=3)
    zero = gaussian_linear(X, MU, torch.zeros_like(SIG), BMU, None, seed=3)
    torch.testing.assert_close(zero, F.linear(X, MU, BMU), rtol=1e-6, atol=1e-6)
    assert torch.isnan(gaussian_kl(MU, -SIG, 1.0))
    assert torch.isinf(gaussian_kl(MU, torch.zeros_like(SIG), 1.0))


# ---------------------------------------------------------------- strides: never wrong

def _strided_variants(t):
    """(name, view) pairs equal in value to ``t`` but not contiguous (transposed / sliced / expanded)."""
    out = []
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)))
    padded = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] if t.dim() else 1, dtype=t.dtype)
    if t.dim():
        padded[..., ::2] = t
        out.append(("sliced", padded[..., ::2]))
    return out


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    if isinstance(out, tuple):
        out = out[0] + out[1]
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    floats = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), floats, allow_unused=True)
    return out.detach(), grads


HEAD_OPS = {
    "loglik": lambda h, w, b, y, lw: depth_loglik(h, w, b, y),
    "nll_mixture": lambda h, w, b, y, lw: depth_mixture_nll(h, w, b, y, lw, mode="mixture", reduction="none"),
    "predict": lambda h, w, b, y, lw: depth_mixture_predict(h, w, b, lw),
}


@pytest.mark.parametrize("op", sorted(HEAD_OPS))
@pytest.mark.parametrize("C_", [C, 40], ids=["C6", "C40"])
def test_heads_noncontiguous_inputs_match_contiguous(op, C_):
    inputs = list(heads_inputs(C=C_, seed=1))
    expected, expected_grads = _grads(HEAD_OPS[op], inputs)
    for i, t in enumerate(inputs):
        for name, view in _strided_variants(t):
            assert not view.is_contiguous()
            args = inputs[:i] + [view] + inputs[i + 1:]
            out, grads = _grads(HEAD_OPS[op], args)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=f"arg {i} {name}")
            for g, e in zip(grads, expected_grads):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"grad, arg {i} {name}")


def test_heads_expanded_inputs():
    """Zero-stride (broadcast) hidden, weight, bias and log_weights."""
    h, w, b, y, lw = heads_inputs(seed=2)
    h_exp, w_exp = h[:1].expand(L, N, D), w[:1].expand(L, C, D)
    lw_exp = torch.full((1,), -math.log(L)).expand(L)  # uniform weights
    b_exp = b[:1].expand(C)
    got = depth_mixture_nll(h_exp, w_exp, b_exp, y, lw_exp, mode="mixture", reduction="none")
    want = depth_mixture_nll(h_exp.contiguous(), w_exp.contiguous(), b_exp.contiguous(), y,
                             lw_exp.contiguous(), mode="mixture", reduction="none")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # every depth is the same head: the mixture equals the single-head cross entropy
    ce = F.cross_entropy(h[0] @ w[0].t() + b[0], y, reduction="none")
    torch.testing.assert_close(got, ce, rtol=1e-5, atol=1e-5)


LINEAR_OPS = {
    "gl_sample": lambda x, mu, s, bm, bs: gaussian_linear(x, mu, s, bm, bs, seed=7, samples=2),
    "gl_local": lambda x, mu, s, bm, bs: gaussian_linear(x, mu, s, bm, bs, seed=7, estimator="local"),
    "gl_flipout": lambda x, mu, s, bm, bs: gaussian_linear(x, mu, s, bm, bs, seed=7, estimator="flipout"),
    "bl_input": lambda x, mu, s, bm, bs: bernoulli_linear(x, mu, bm, p=0.3, seed=7, samples=2),
    "bl_weight": lambda x, mu, s, bm, bs: bernoulli_linear(x, mu, bm, p=0.3, seed=7, mask="weight"),
    "bl_symmetric": lambda x, mu, s, bm, bs: bernoulli_linear(x, mu, bm, seed=7, mask="symmetric"),
    "gaussian_kl": lambda x, mu, s, bm, bs: gaussian_kl(mu, s, 0.5),
    "log_uniform_kl": lambda x, mu, s, bm, bs: log_uniform_kl(mu),
}


@pytest.mark.parametrize("op", sorted(LINEAR_OPS))
def test_linear_noncontiguous_and_expanded_inputs(op):
    inputs = list(linear_inputs(seed=3))
    expected, expected_grads = _grads(LINEAR_OPS[op], inputs)
    variants = []
    for i, t in enumerate(inputs):
        variants += [(i, name, v) for name, v in _strided_variants(t)]
    row = inputs[0][:1].expand(N, K)  # zero-stride batch
    variants.append((0, "expanded", row))
    for i, name, view in variants:
        args = inputs[:i] + [view] + inputs[i + 1:]
        base = inputs[:i] + [view.contiguous()] + inputs[i + 1:]
        want, want_grads = (expected, expected_grads) if name != "expanded" else _grads(LINEAR_OPS[op], base)
        out, grads = _grads(LINEAR_OPS[op], args)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=f"arg {i} {name}")
        for g, e in zip(grads, want_grads):
            if e is None:
                assert g is None
            else:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"grad, arg {i} {name}")


# ---------------------------------------------------------------- empty batches

def test_heads_empty_batch():
    h, w, b, y, lw = heads_inputs()
    h0, y0 = h[:, :0].requires_grad_(), y[:0]
    assert depth_loglik(h0, w, b, y0).shape == (L, 0)
    assert depth_mixture_nll(h0, w, b, y0, lw, reduction="none").shape == (0,)
    assert depth_mixture_predict(h0, w, b, lw).shape == (0, C)
    for mode in ("expected", "mixture"):
        total = depth_mixture_nll(h0, w, b, y0, lw, mode=mode, reduction="sum")
        assert total.item() == 0.0
        # "mean" over no rows is NaN, as F.cross_entropy(reduction="mean") on an empty batch
        assert math.isnan(depth_mixture_nll(h0, w, b, y0, lw, mode=mode).item())
        assert math.isnan(F.cross_entropy(torch.zeros(0, C), y0).item())
        (grad,) = torch.autograd.grad(total, h0)
        assert grad.shape == h0.shape
    mean, var = depth_mixture_predict(h0, w, b, lw, likelihood="gaussian")
    assert mean.shape == var.shape == (0, C)
    assert depth_mixture_nll(h0, w, b, torch.zeros(0, C), lw, likelihood="gaussian", reduction="sum").item() == 0


def test_heads_all_rows_ignored():
    h, w, b, _, lw = heads_inputs()
    y = torch.full((N,), -100)
    assert depth_loglik(h, w, b, y).abs().sum().item() == 0
    assert depth_mixture_nll(h, w, b, y, lw, reduction="sum").item() == 0


@pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
def test_gaussian_linear_empty_batch(estimator):
    x = torch.zeros(0, K, requires_grad=True)
    mu = MU.clone().requires_grad_()
    out = gaussian_linear(x, mu, SIG, BMU, BSIG, estimator=estimator, seed=1, samples=2)
    assert out.shape == (2, 0, OUT)
    gx, gmu = torch.autograd.grad(out.sum(), (x, mu))
    assert gx.shape == x.shape and gmu.abs().sum().item() == 0


@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_linear_empty_batch(mask):
    x = torch.zeros(3, 0, K, requires_grad=True)
    w = MU.clone().requires_grad_()
    out = bernoulli_linear(x, w, BMU, mask=mask, seed=1)
    assert out.shape == (3, 0, OUT)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert gx.shape == x.shape and gw.abs().sum().item() == 0


def test_rng_empty_and_nn_empty():
    for fn in (rng.uniform, rng.normal, rng.random_uint32):
        assert fn(0, seed=1).shape == (0,)
    assert unn.GaussianLinear(3, 4)(torch.randn(0, 3)).shape == (0, 4)
    torch.manual_seed(0)
    assert unn.UDN.mlp(2, 8, 3).predict(torch.randn(0, 2)).shape == (0, 3)


def test_log_weights_all_minus_inf_outside_mixture():
    """mode='expected' with every weight 0 is a zero loss; predict normalises by softmax -> NaN."""
    h, w, b, y, _ = heads_inputs()
    ninf = torch.full((L,), -INF)
    assert depth_mixture_nll(h, w, b, y, ninf, reduction="sum").item() == 0
    assert torch.isnan(depth_mixture_predict(h, w, b, ninf)).all()


# ---------------------------------------------------------------- NaN / Inf propagate

def _nonfinite_rows_only(out, bad_rows):
    """Rows (last-but-one index of a [..., N] / [N, C] result) in ``bad_rows`` are non-finite, others finite."""
    finite = torch.isfinite(out)
    for r in range(out.shape[0]):
        if r in bad_rows:
            assert not finite[r].all(), f"row {r} should be non-finite: {out[r]}"
        else:
            assert finite[r].all(), f"row {r} should be finite: {out[r]}"


@pytest.mark.parametrize("backend, C_", [
    ("reference", C), ("reference", 40), ("reference", 600), ("cpu", C),
    ("cpu", 40), ("cpu", 600)])
def test_heads_nan_in_inputs_poisons_outputs(backend, C_):
    h, w, b, y, lw = heads_inputs(C=C_)
    with udn_kernels.backend(backend):
        hb = h.clone()
        hb[1, 2, 0] = NAN  # one (depth, row): the row's mixture is NaN, the others finite
        _nonfinite_rows_only(depth_mixture_nll(hb, w, b, y, lw, mode="mixture", reduction="none"), {2})
        _nonfinite_rows_only(depth_mixture_predict(hb, w, b, lw), {2})
        wb = w.clone()
        wb[0, 1, 1] = NAN  # one class of the depth-1 head: every row of that depth
        assert torch.isnan(depth_loglik(h, wb, b, y)[0]).all()
        bb = b.clone()
        bb[0] = NAN
        assert torch.isnan(depth_mixture_nll(h, w, bb, y, lw)).all()
        lwb = lw.clone()
        lwb[0] = NAN
        for mode in ("expected", "mixture"):
            assert torch.isnan(depth_mixture_nll(h, w, b, y, lwb, mode=mode))
        yg = torch.randn(N, C_)
        yg[3, 0] = NAN
        _nonfinite_rows_only(depth_mixture_nll(h, w, b, yg, lw, likelihood="gaussian", reduction="none"), {3})
        assert torch.isnan(depth_mixture_nll(h, w, b, yg, lw, likelihood="gaussian"))


def test_heads_nan_gradients():
    h, w, b, y, lw = heads_inputs()
    h = h.clone()
    h[0, 1, 0] = NAN
    h.requires_grad_()
    (g,) = torch.autograd.grad(depth_mixture_nll(h, w, b, y, lw), h)
    assert torch.isnan(g[:, 1]).any()  # the poisoned row's gradient is NaN ...
    assert torch.isfinite(g[:, [0, 2, 3, 4]]).all()  # ... the others are untouched


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_heads_inf_in_inputs_is_nonfinite(backend):
    """An infinite logit gives a non-finite log-likelihood (-inf or NaN), never a finite number."""
    for C_ in (C, 600):
        h, w, b, y, lw = heads_inputs(C=C_)
        with udn_kernels.backend(backend):
            hb = h.clone()
            hb[0, 0, 0] = INF
            assert not torch.isfinite(depth_loglik(hb, w, b, y)[0, 0])
            bb = b.clone()
            bb[(y[0] + 1) % C_] = INF
            assert not torch.isfinite(depth_loglik(h, w, bb, y)).any()
            bb = b.clone()
            bb[y[0]] = -INF  # the target class is impossible: log p = -inf for rows with that target
            ll = depth_loglik(h, w, bb, y)
            assert (ll[:, y == y[0]] == -INF).all() and torch.isfinite(ll[:, y != y[0]]).all()


@pytest.mark.parametrize("case", ["nan_hidden", "all_minus_inf_logits"])
def test_heads_cpu_class_tiled_nan_is_nan(case):
    h, w, b, y, lw = heads_inputs(C=40)
    if case == "nan_hidden":
        h = h.clone()
        h[0, 1, 2] = NAN
        out = depth_loglik(h, w, b, y)[0, 1]
    else:
        out = depth_loglik(h, w, torch.full_like(b, -INF), y)
    assert torch.isnan(out).all(), out


def test_reference_local_nan_sigma():
    s = SIG.clone()
    s[0, 0] = NAN
    with udn_kernels.backend("reference"):
        out = gaussian_linear(X, MU, s, estimator="local", seed=1)
    assert torch.isnan(out[:, 0]).all()


@pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
def test_gaussian_linear_nan_propagates(estimator):
    x = X.clone()
    x[2, 1] = NAN
    out = gaussian_linear(x, MU, SIG, BMU, BSIG, estimator=estimator, seed=5)
    _nonfinite_rows_only(out, {2})
    s = SIG.clone()
    s[3, 0] = NAN  # output feature 3 of every row
    out = gaussian_linear(X, MU, s, BMU, BSIG, estimator=estimator, seed=5)
    assert torch.isnan(out[:, 3]).all()
    _nonfinite_rows_only(out.t(), {3})
    s[3, 0] = INF
    out = gaussian_linear(X, MU, s, BMU, BSIG, estimator=estimator, seed=5)
    _nonfinite_rows_only(out.t(), {3})


@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_linear_nan_propagates(mask):
    x = X.clone()
    x[1, :] = NAN  # a whole row: whatever the mask drops, the row stays NaN
    out = bernoulli_linear(x, MU, BMU, p=0.3, mask=mask, seed=5)
    _nonfinite_rows_only(out, {1})
    w = MU.clone()
    w[2, :] = NAN
    out = bernoulli_linear(X, w, BMU, p=0.3, mask=mask, seed=5)
    _nonfinite_rows_only(out.t(), {2})


def test_kl_nan_propagates():
    assert torch.isnan(gaussian_kl(torch.tensor([NAN, 0.0]), torch.ones(2), 1.0))
    assert torch.isnan(gaussian_kl(None, torch.tensor([NAN, 1.0]), 1.0))
    assert torch.isnan(log_uniform_kl(torch.tensor([NAN, 0.0])))


def test_udn_nan_input_gives_nan():
    torch.manual_seed(0)
    model = unn.UDN.mlp(2, 8, 3)
    x = torch.randn(4, 2)
    x[1] = NAN
    pred = model.predict(x)
    _nonfinite_rows_only(pred, {1})
    assert torch.isnan(model.loss(x, torch.tensor([0, 1, 2, 1]), 10))
