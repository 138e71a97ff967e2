"""Depth-mixture heads: CPU kernel vs reference, reference vs hand-derived values and autograd,
gradchecks of the public ops, validation, determinism and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import depth_loglik, depth_mixture_nll, depth_mixture_predict
from udn_kernels.reference import heads as ref

pytestmark = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"],
                                reason="C++ extension not built")

IGNORE = -100
ALL_GRADS = [True] * 4  # grad_mask of the backward kernels: every gradient


def make(L, N, D, C, *, per_depth=False, bias="none", likelihood="categorical",
         dtype=torch.float64, seed=0, ignore_every=0):
    """Random head inputs; logits of order 1 whatever D."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, N, D, dtype=dtype, generator=gen)
    weight = torch.randn(*((L, C, D) if per_depth else (C, D)), dtype=dtype, generator=gen) / math.sqrt(D)
    b = {"none": None, "shared": torch.randn(C, dtype=dtype, generator=gen),
         "depth": torch.randn(L, C, dtype=dtype, generator=gen)}[bias]
    if likelihood == "categorical":
        target = torch.randint(0, C, (N,), generator=gen)
        if ignore_every:
            target[::ignore_every] = IGNORE
        noise = None
    else:
        target = torch.randn(N, C, dtype=dtype, generator=gen)
        noise = torch.rand(C, dtype=dtype, generator=gen) + 0.5
    return hidden, weight, b, target, noise


def kernel_outputs(backend, hidden, weight, bias, target, noise, gaussian, grad):
    """(loglik, aux, d_hidden, d_weight, d_bias, d_noise) of one backend's raw kernels."""
    kernels = udn_kernels._backend.kernels(backend)
    fwd, bwd = kernels.get("depth_loglik_fwd"), kernels.get("depth_loglik_bwd")
    loglik, aux = fwd(hidden, weight, bias, target, noise, gaussian, IGNORE)
    grads = bwd(grad, hidden, weight, bias, target, noise, aux, gaussian, IGNORE, ALL_GRADS)
    return (loglik, aux) + tuple(grads)


def assert_close_rel(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max(1, max|expected|) elementwise."""
    assert actual.shape == expected.shape, name
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


KERNEL_OUTPUTS = ("loglik", "aux", "d_hidden", "d_weight", "d_bias", "d_noise")


def assert_kernel_outputs_close(got, want, rtol, dtype=None):
    """Every output of a loglik fwd+bwd kernel against the reference's: the reference dtype (or
    ``dtype``, then compared in float64) and within ``rtol`` (:func:`assert_close_rel`)."""
    for name, a, b in zip(KERNEL_OUTPUTS, got, want):
        assert a.dtype == (dtype or b.dtype), name
        assert_close_rel(a.double() if dtype else a, b, rtol, name)


# (L, N, D, C): L=1, N=1, C=1, sizes off every tile (rows 256, classes 512), C > 4096, D > 256
SHAPES = [(1, 1, 1, 1), (1, 7, 3, 1), (3, 37, 19, 11), (2, 257, 9, 513), (4, 33, 17, 1100),
          (16, 20, 12, 10), (2, 3, 300, 4100)]


# every bias layout on small, tile-straddling and large-C shapes (the full product is slow)
SHAPE_BIAS = [(shape, bias) for shape in SHAPES for bias in ("none", "shared", "depth")
              if bias == "depth" or shape in SHAPES[1:5:2] or (bias == "none" and shape == SHAPES[0])]


@pytest.mark.parametrize("shape,bias", SHAPE_BIAS)
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_kernel_matches_reference_float64(shape, bias, per_depth, likelihood):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    inputs = make(L, N, D, C, per_depth=per_depth, bias=bias, likelihood=likelihood, ignore_every=3)
    grad = torch.randn(L, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = kernel_outputs("cpu", *inputs, gaussian, grad)
    want = kernel_outputs("reference", *inputs, gaussian, grad)
    assert_kernel_outputs_close(got, want, 1e-11)


# C <= 32 runs the batched class-major path in chunks of at most 2^18 logits: several depth groups
# (L*N*C above the chunk) and row ranges inside one depth (N*C above it)
@pytest.mark.parametrize("shape", [(40, 700, 3, 10), (2, 27000, 2, 10)])
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_small_c_chunks_match_reference(shape, per_depth, likelihood):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    inputs = make(L, N, D, C, per_depth=per_depth, bias="depth" if per_depth else "shared",
                  likelihood=likelihood, ignore_every=7)
    grad = torch.randn(L, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = kernel_outputs("cpu", *inputs, gaussian, grad)
    want = kernel_outputs("reference", *inputs, gaussian, grad)
    # the fused forward + backward keeps each chunk's logits (3 GEMMs) and must agree too
    fused = torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, grad, gaussian, IGNORE, ALL_GRADS)
    for name, a, b, c in zip(("loglik", "aux", "d_hidden", "d_weight", "d_bias", "d_noise"), got, want, fused):
        assert_close_rel(a, b, 1e-10, name)
        assert_close_rel(c, b, 1e-10, "fused " + name)


@pytest.mark.parametrize("C", [10, 600])  # small-C chunk path, class-tiled path
@pytest.mark.parametrize("per_depth", [False, True])
def test_outputs_fully_written_over_recycled_nan_memory(C, per_depth):
    """The kernels allocate their outputs uninitialised: every element must be written. Memory of
    the outputs' sizes is filled with NaN and freed just before each call, so the allocator is
    likely to hand it back; a skipped element would then show up as NaN."""
    L, N, D = 3, 37, 5
    inputs = make(L, N, D, C, per_depth=per_depth, bias="depth", ignore_every=4)
    grad = torch.randn(L, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = kernel_outputs("reference", *inputs, False, grad)
    sizes = [(L, N), (L, N), (L, N, D), inputs[1].shape, (L, C)]
    def after_poison(fn):
        poison = [torch.full(s, math.nan, dtype=torch.float64) for s in sizes]
        del poison
        return fn()

    for _ in range(3):
        got = after_poison(lambda: kernel_outputs("cpu", *inputs, False, grad))
        fused = after_poison(lambda: torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, grad, False, IGNORE,
                                                                                  ALL_GRADS))
        for name, a, b, c in zip(("loglik", "aux", "d_hidden", "d_weight", "d_bias"), got, want, fused):
            assert_close_rel(a, b, 1e-11, name)
            assert_close_rel(c, b, 1e-11, "fused " + name)


@pytest.mark.parametrize("C", [10, 600])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_no_rows_gives_zero_gradients(C, likelihood):
    gaussian = likelihood == "gaussian"
    inputs = make(2, 0, 4, C, bias="shared", likelihood=likelihood)
    grad = torch.zeros(2, 0, dtype=torch.float64)
    for got in (kernel_outputs("cpu", *inputs, gaussian, grad),
                torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, grad, gaussian, IGNORE, ALL_GRADS)):
        assert got[0].shape == (2, 0)
        for name, g in zip(("d_weight", "d_bias", "d_noise"), got[3:]):
            assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("shape", [(3, 37, 19, 11), (4, 300, 64, 1100), (2, 5, 300, 5000)])
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_kernel_matches_reference_float32(shape, per_depth, likelihood):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    inputs64 = make(L, N, D, C, per_depth=per_depth, bias="depth", likelihood=likelihood, ignore_every=4)
    inputs32 = [None if t is None else (t.float() if t.is_floating_point() else t) for t in inputs64]
    grad = torch.randn(L, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = kernel_outputs("cpu", *inputs32, gaussian, grad.float())
    want = kernel_outputs("reference", *inputs64, gaussian, grad)
    # Gaussian log-likelihoods sum C squared residuals: compare relative to the sum's scale.
    assert_kernel_outputs_close(got, want, 2e-5, dtype=torch.float32)


@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_reference_backward_matches_autograd(per_depth, likelihood):
    gaussian = likelihood == "gaussian"
    hidden, weight, bias, target, noise = make(3, 6, 5, 7, per_depth=per_depth, bias="depth",
                                               likelihood=likelihood, ignore_every=2)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, noise) if t is not None]
    loglik, aux = ref.depth_loglik_fwd(leaves[0], leaves[1], leaves[2], target,
                                       leaves[3] if gaussian else None, gaussian, IGNORE)
    grad = torch.randn_like(loglik)
    want = torch.autograd.grad(loglik, leaves, grad)
    got = ref.depth_loglik_bwd(grad, hidden, weight, bias, target, noise, aux, gaussian, IGNORE, ALL_GRADS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ public ops, every gradient
def public_loss_and_grads(backend, inputs, likelihood, mode, reduction, log_weights):
    hidden, weight, bias, target, noise = [None if t is None else t.clone() for t in inputs]
    leaves = {"hidden": hidden, "weight": weight, "bias": bias, "log_weights": log_weights.clone()}
    if likelihood == "gaussian":
        leaves.update(noise_std=noise, target=target)
    leaves = {k: v.requires_grad_() for k, v in leaves.items() if v is not None}
    with udn_kernels.backend(backend, strict=True):  # forward and backward on `backend`, no fallback
        loss = depth_mixture_nll(hidden, weight, bias, target, leaves["log_weights"], mode=mode,
                                 likelihood=likelihood, noise_std=noise, reduction=reduction,
                                 ignore_index=IGNORE)
        seed = torch.Generator().manual_seed(2)
        upstream = torch.randn(loss.shape, dtype=loss.dtype, generator=seed)
        grads = torch.autograd.grad(loss, list(leaves.values()), upstream)
    return loss, dict(zip(leaves, grads))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_depth", [False, True])
def test_public_op_cpu_matches_reference(likelihood, mode, reduction, per_depth):
    L = 5
    inputs = make(L, 29, 13, 600, per_depth=per_depth, bias="shared", likelihood=likelihood,
                  ignore_every=4)
    log_weights = torch.log_softmax(torch.randn(L, dtype=torch.float64), 0)
    log_weights[1] = -math.inf  # a depth outside the support
    loss_c, grads_c = public_loss_and_grads("cpu", inputs, likelihood, mode, reduction, log_weights)
    loss_r, grads_r = public_loss_and_grads("reference", inputs, likelihood, mode, reduction, log_weights)
    torch.testing.assert_close(loss_c, loss_r, rtol=1e-11, atol=1e-11)
    assert set(grads_c) == set(grads_r)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], rtol=1e-10, atol=1e-11, msg=name)
    assert grads_c["log_weights"][1] == 0.0
    if reduction == "none" and likelihood == "categorical":
        assert (loss_c[::4] == 0).all()  # ignored rows contribute 0


@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_gradcheck_categorical_cpu(per_depth, mode):
    hidden, weight, bias, target, _ = make(3, 6, 4, 9, per_depth=per_depth, bias="depth", ignore_every=5)
    log_weights = torch.log_softmax(torch.randn(3, dtype=torch.float64), 0)
    args = [t.requires_grad_() for t in (hidden, weight, bias, log_weights)]

    def f(h, w, b, lw):
        return depth_mixture_nll(h, w, b, target, lw, mode=mode, reduction="none")

    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_gradcheck_gaussian_cpu(mode):
    hidden, weight, bias, target, noise = make(2, 5, 3, 4, bias="shared", likelihood="gaussian")
    log_weights = torch.log_softmax(torch.randn(2, dtype=torch.float64), 0)
    args = [t.requires_grad_() for t in (hidden, weight, bias, target, noise, log_weights)]

    def f(h, w, b, y, s, lw):
        return depth_mixture_nll(h, w, b, y, lw, mode=mode, likelihood="gaussian", noise_std=s)

    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(f, args)


def test_gradcheck_depth_loglik_scalar_noise_and_predict():
    hidden, weight, bias, target, _ = make(2, 4, 3, 5, per_depth=True, likelihood="gaussian")
    log_weights = torch.randn(2, dtype=torch.float64)
    args = [t.requires_grad_() for t in (hidden, weight, log_weights)]
    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda h, w: depth_loglik(h, w, None, target, likelihood="gaussian", noise_std=0.7), args[:2])
        assert torch.autograd.gradcheck(lambda h, w, lw: depth_mixture_predict(h, w, None, lw), args)


# ------------------------------------------------------------------ depth_mixture_predict kernel
# one-tile path (C <= 32768; rows per block shrink with C: 20000 classes -> 26-row blocks) and the
# two-pass class-tiled path (C > 32768, not a multiple of the 512-class tile)
PREDICT_SHAPES = [(1, 1, 1, 1), (1, 5, 3, 7), (4, 1, 6, 10), (3, 130, 9, 513), (2, 9, 300, 4100),
                  (2, 40, 5, 20000), (2, 5, 3, 33000), (5, 0, 4, 3)]


def predict_outputs(backend, hidden, weight, bias, log_weights, gaussian, noise):
    return udn_kernels._backend.kernels(backend).get("depth_mixture_predict")(
        hidden, weight, bias, log_weights, gaussian, noise)


@pytest.mark.parametrize("shape", PREDICT_SHAPES)
@pytest.mark.parametrize("per_depth,bias", [(False, "none"), (False, "shared"), (True, "depth")])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predict_kernel_matches_reference(shape, per_depth, bias, likelihood, dtype):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    hidden, weight, b, _, noise = make(L, N, D, C, per_depth=per_depth, bias=bias, likelihood="gaussian")
    lw = torch.randn(L, dtype=torch.float64)
    if L > 2:
        lw[1] = -math.inf  # a depth outside the support
    noise = noise if gaussian else None
    want = predict_outputs("reference", hidden, weight, b, lw, gaussian, noise)
    cast = [None if t is None else t.to(dtype) for t in (hidden, weight, b, lw, noise)]
    got = predict_outputs("cpu", *cast[:4], gaussian, cast[4])
    assert got[0].shape == (N, C) and got[1].shape == ((N, C) if gaussian else (0,))
    for name, a, e in zip(("out1", "out2"), got, want):
        assert a.dtype == dtype, name
        assert_close_rel(a.double(), e, 1e-12 if dtype == torch.float64 else 2e-5, name)


def test_predict_kernel_nan_and_infinite_weights():
    assert udn_kernels._backend.resolve(torch.device("cpu"), "depth_mixture_predict") == "cpu"
    hidden, weight, bias, _, _ = make(3, 6, 4, 700, bias="shared")
    lw = torch.zeros(3, dtype=torch.float64)
    h = hidden.clone()
    h[1, 2, 0] = math.nan  # one depth's row: that output row is NaN, the others finite
    probs, _ = predict_outputs("cpu", h, weight, bias, lw, False, None)
    assert torch.isnan(probs[2]).all() and torch.isfinite(probs[[0, 1, 3, 4, 5]]).all()
    mean, var = predict_outputs("cpu", h, weight, bias, lw, True, None)
    assert torch.isnan(mean[2]).all() and torch.isnan(var[2]).all() and torch.isfinite(mean[:2]).all()
    for bad in (torch.full((3,), -math.inf), torch.tensor([0.0, math.nan, 0.0])):  # softmax weights NaN
        probs, _ = predict_outputs("cpu", hidden, weight, bias, bad.double(), False, None)
        assert torch.isnan(probs).all()
    all_masked = torch.full_like(bias, -math.inf)  # every logit -inf: softmax is NaN, as torch's
    probs, _ = predict_outputs("cpu", hidden, weight, all_masked, lw, False, None)
    want, _ = predict_outputs("reference", hidden, weight, all_masked, lw, False, None)
    assert torch.isnan(probs).all() and torch.isnan(want).all()


@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_gradcheck_predict_cpu(per_depth, likelihood):
    gaussian = likelihood == "gaussian"
    hidden, weight, bias, _, noise = make(3, 4, 3, 5, per_depth=per_depth, bias="depth" if per_depth else "shared",
                                          likelihood="gaussian")
    lw = torch.randn(3, dtype=torch.float64)
    args = [t.requires_grad_() for t in (hidden, weight, bias, lw, noise)]

    def f(h, w, b, lw, s):
        out = depth_mixture_predict(h, w, b, lw, likelihood=likelihood, noise_std=s if gaussian else None)
        return torch.cat([out[0], out[1]]) if gaussian else out

    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(f, args if gaussian else args[:4] + [None])


# ------------------------------------------------------------------ hand-derived values
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_single_depth_equals_cross_entropy(backend):
    hidden, weight, bias, target, _ = make(1, 40, 8, 700, bias="shared", ignore_every=3)
    logits = F.linear(hidden[0], weight, bias)
    with udn_kernels.backend(backend):
        ll = depth_loglik(hidden, weight, bias, target)
        nll = depth_mixture_nll(hidden, weight, bias, target, torch.zeros(1, dtype=torch.float64))
    want = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE)
    torch.testing.assert_close(-ll[0], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nll, F.cross_entropy(logits, target, ignore_index=IGNORE), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_uniform_logits_give_minus_log_c(backend):
    C = 1234
    hidden, _, _, target, _ = make(3, 9, 5, C)
    with udn_kernels.backend(backend):
        ll = depth_loglik(hidden, torch.zeros(C, 5, dtype=torch.float64), None, target)
        mix = depth_mixture_nll(hidden, torch.zeros(C, 5, dtype=torch.float64), None, target,
                                torch.full((3,), -math.log(3), dtype=torch.float64), mode="mixture")
    torch.testing.assert_close(ll, torch.full((3, 9), -math.log(C), dtype=torch.float64))
    torch.testing.assert_close(mix, torch.tensor(math.log(C), dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gaussian_equals_normal_log_prob(backend):
    hidden, weight, bias, target, noise = make(2, 6, 4, 3, per_depth=True, bias="depth", likelihood="gaussian")
    with udn_kernels.backend(backend):
        ll = depth_loglik(hidden, weight, bias, target, likelihood="gaussian", noise_std=noise)
    mean = torch.einsum("lnd,lcd->lnc", hidden, weight) + bias[:, None]
    want = torch.distributions.Normal(mean, noise).log_prob(target).sum(-1)
    torch.testing.assert_close(ll, want, rtol=1e-12, atol=1e-12)


def test_mixture_modes_by_hand():
    hidden, weight, bias, target, _ = make(3, 8, 4, 6)
    ll = depth_loglik(hidden, weight, bias, target)
    lw = torch.tensor([-math.inf, math.log(0.25), math.log(0.75)], dtype=torch.float64)
    expected = depth_mixture_nll(hidden, weight, bias, target, lw, reduction="none")
    mixture = depth_mixture_nll(hidden, weight, bias, target, lw, mode="mixture", reduction="none")
    torch.testing.assert_close(expected, -(0.25 * ll[1] + 0.75 * ll[2]))
    torch.testing.assert_close(mixture, -torch.log(0.25 * ll[1].exp() + 0.75 * ll[2].exp()))
    assert (mixture <= expected + 1e-12).all()  # Jensen: log E p >= E log p
    probs = depth_mixture_predict(hidden, weight, bias, lw)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(probs.gather(1, target[:, None])[:, 0].log(), -mixture)


def test_predict_gaussian_moments():
    hidden, weight, bias, _, noise = make(2, 5, 3, 4, bias="shared", likelihood="gaussian")
    lw = torch.log(torch.tensor([0.2, 0.8], dtype=torch.float64))
    mean, var = depth_mixture_predict(hidden, weight, bias, lw, likelihood="gaussian", noise_std=noise)
    mus = F.linear(hidden, weight, bias)
    want_mean = 0.2 * mus[0] + 0.8 * mus[1]
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, noise**2 + 0.2 * 0.8 * (mus[0] - mus[1]) ** 2)


def test_all_ignored_mean_is_nan_like_cross_entropy():
    hidden, weight, _, target, _ = make(2, 4, 3, 5)
    target[:] = IGNORE
    loss = depth_mixture_nll(hidden, weight, None, target, torch.zeros(2, dtype=torch.float64))
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(torch.zeros(4, 5), target))


# ------------------------------------------------------------------ validation
def _base():
    hidden, weight, bias, target, _ = make(2, 4, 3, 5, bias="shared")
    return dict(hidden=hidden, weight=weight, bias=bias, target=target,
                log_weights=torch.zeros(2, dtype=torch.float64))


BAD = [
    (dict(hidden=torch.zeros(4, 3, dtype=torch.float64)), ValueError, "hidden"),
    (dict(hidden=torch.zeros(2, 4, 3, dtype=torch.int64)), TypeError, "hidden"),
    (dict(weight=torch.zeros(5, 4, dtype=torch.float64)), ValueError, "weight"),
    (dict(weight=torch.zeros(3, 5, 3, dtype=torch.float64)), ValueError, "weight"),
    (dict(weight=torch.zeros(5, 3, dtype=torch.float32)), TypeError, "weight"),
    (dict(bias=torch.zeros(6, dtype=torch.float64)), ValueError, "bias"),
    (dict(bias=torch.zeros(3, 5, dtype=torch.float64)), ValueError, "bias"),
    (dict(target=torch.zeros(4, dtype=torch.int32)), TypeError, "target"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), ValueError, "target"),
    (dict(target=torch.tensor([0, 1, 5, 2])), IndexError, "target"),
    (dict(target=torch.tensor([0, 1, -1, 2])), IndexError, "target"),
    (dict(log_weights=torch.zeros(3, dtype=torch.float64)), ValueError, "log_weights"),
    (dict(log_weights=torch.zeros(2, dtype=torch.float32)), TypeError, "log_weights"),
    (dict(mode="average"), ValueError, "mode"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(likelihood="poisson"), ValueError, "likelihood"),
    (dict(noise_std=1.0), ValueError, "noise_std"),
    (dict(mode="mixture", log_weights=torch.full((2,), -math.inf, dtype=torch.float64)), ValueError,
     "log_weights"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("change,exc,name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_validation_names_argument(change, exc, name):
    args = _base()
    args.update(change)
    kwargs = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "bias", "target", "log_weights")}
    with pytest.raises(exc, match=name):
        depth_mixture_nll(args["hidden"], args["weight"], args["bias"], args["target"], args["log_weights"],
                          **kwargs)


@pytest.mark.parametrize("noise_std,exc", [(-1.0, ValueError), (0.0, ValueError), ("1", TypeError),
                                           (torch.zeros(5, dtype=torch.float64), ValueError),
                                           (torch.ones(4, dtype=torch.float64), ValueError),
                                           (torch.ones(5, dtype=torch.float32), TypeError)])
def test_noise_std_validation(noise_std, exc):
    hidden, weight, bias, target, _ = make(2, 4, 3, 5, likelihood="gaussian")
    with pytest.raises(exc, match="noise_std"):
        depth_loglik(hidden, weight, bias, target, likelihood="gaussian", noise_std=noise_std)


def test_gaussian_target_shape_validation():
    hidden, weight, _, _, _ = make(2, 4, 3, 5)
    with pytest.raises(ValueError, match="target"):
        depth_loglik(hidden, weight, None, torch.zeros(4, 4, dtype=torch.float64), likelihood="gaussian")


def test_kernel_bounds_checks_targets():
    hidden, weight, _, target, _ = make(1, 3, 2, 4)
    target[1] = 4
    with pytest.raises(IndexError):
        torch.ops.udn_kernels_C.depth_loglik_fwd(hidden, weight, None, target, None, False, IGNORE)


# ------------------------------------------------------------------ determinism, compile
@pytest.mark.parametrize("C", [10, 3000])  # row-split and class-split backward partitions
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_bitwise_deterministic(C, likelihood):
    inputs = make(4, 300, 32, C, bias="depth", likelihood=likelihood, dtype=torch.float32, ignore_every=5)
    grad = torch.randn(4, 300)
    first = kernel_outputs("cpu", *inputs, likelihood == "gaussian", grad)
    second = kernel_outputs("cpu", *inputs, likelihood == "gaussian", grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_torch_compile_fullgraph(likelihood):
    torch._dynamo.reset()
    inputs = make(3, 16, 8, 40, bias="shared", likelihood=likelihood, dtype=torch.float32, ignore_every=3)
    hidden, weight, bias, target, noise = inputs
    noise_arg = noise if likelihood == "gaussian" else None

    def step(h, w, b, lw, s):
        return depth_mixture_nll(h, w, b, target, lw, mode="mixture", likelihood=likelihood, noise_std=s)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, torch.zeros(3))]
        s = None if noise_arg is None else noise_arg.clone().requires_grad_()
        with udn_kernels.backend("cpu"):
            loss = fn(*leaves, s)
            loss.backward()  # the compiled graph's backward (AOTAutograd) when fn is compiled
        return [loss] + [t.grad for t in leaves] + ([] if s is None else [s.grad])

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
