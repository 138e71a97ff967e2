"""bernoulli_linear: C++ kernels == reference, gradients, keep rates, seeding, validation, compile."""
import itertools
import math

import pytest
import torch

import udn_kernels
from udn_kernels import _backend
from udn_kernels.reference import stochastic_linear as ref

_backend.load_extension()  # registers torch.ops.udn_kernels_C.*
C = torch.ops.udn_kernels_C
MASKS = ("input", "weight", "symmetric")
# The masks are exact (uniforms and signs are bit-identical across backends); only the GEMM
# summation order differs: errors are bounded relative to the largest value.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    if expected.numel():
        err = (actual - expected).abs().max().item()
        assert err <= RTOL[dtype] * max(1.0, expected.abs().max().item()), f"{what}: {err}"


ALL_GRADS = [True] * 3


def _inputs(dtype, S, sampled, bias, B=5, K=37, N=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S if sampled else 1, B, K, dtype=dtype, generator=g)
    w = torch.randn(N, K, dtype=dtype, generator=g)
    b = torch.randn(N, dtype=dtype, generator=g) if bias else None
    return x, w, b


def test_cpu_backend_serves_the_kernels():
    for name in ("bernoulli_linear_fwd", "bernoulli_linear_bwd"):
        assert _backend.resolve(torch.device("cpu"), name) == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", MASKS)
def test_kernel_matches_reference(dtype, mask):
    for S, sampled, bias, p in itertools.product((1, 3), (False, True), (False, True), (0.0, 0.3)):
        if sampled and S == 1:
            continue
        x, w, b = _inputs(dtype, S, sampled, bias)
        args = (x, w, b, p, 2**62 + 99, mask, S, sampled)
        what = f"{mask} S={S} sampled={sampled} bias={bias} p={p}"
        out = C.bernoulli_linear_fwd(*args)
        _close(out, ref.bernoulli_linear_fwd(*args), dtype, what + " out")
        grad = torch.randn_like(out)
        for name, a, e in zip(("d_x", "d_weight", "d_bias"), C.bernoulli_linear_bwd(grad, *args, ALL_GRADS),
                              ref.bernoulli_linear_bwd(grad, *args, ALL_GRADS)):
            _close(a, e, dtype, f"{what} {name}")


@pytest.mark.parametrize("mask", MASKS)
def test_kernel_matches_reference_across_tiles(mask):
    # K=2000: 32-row weight tiles and 32-row input tiles, ragged last tiles.
    x, w, b = _inputs(torch.float32, 2, True, True, B=37, K=2000, N=70)
    args = (x, w, b, 0.5, 7, mask, 2, True)
    out = C.bernoulli_linear_fwd(*args)
    _close(out, ref.bernoulli_linear_fwd(*args), torch.float32, "out")
    grad = torch.randn_like(out)
    for a, e in zip(C.bernoulli_linear_bwd(grad, *args, ALL_GRADS), ref.bernoulli_linear_bwd(grad, *args, ALL_GRADS)):
        _close(a, e, torch.float32, "grad")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mask", MASKS)
def test_gradcheck_float64(backend, mask):
    x, w, b = _inputs(torch.float64, 1, False, True, B=3, K=4, N=3)
    tensors = [t.requires_grad_(True) for t in (x[0], w, b)]
    with udn_kernels.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: udn_kernels.bernoulli_linear(*t, p=0.4, mask=mask, samples=2, seed=11), tensors)
        xs = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x_, w_: udn_kernels.bernoulli_linear(x_, w_, mask=mask, samples=2, seed=3,
                                                        input_has_samples=True), (xs, tensors[1]))


def test_backward_saves_only_the_inputs():
    x, w, b = _inputs(torch.float32, 1, False, True, B=8, K=16, N=12)
    inputs = [x[0].requires_grad_(True), w.requires_grad_(True), b]
    for mask in MASKS:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = udn_kernels.bernoulli_linear(*inputs, mask=mask, samples=4, seed=1)
        input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        assert all(t.numel() == 1 or t.untyped_storage().data_ptr() in input_ptrs for t in saved)
        assert sum(t.numel() for t in saved) == sum(t.numel() for t in inputs) + 1  # + the seed
        out.sum().backward()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_input_keep_rate_and_scale(p):
    # With x = 1 and W = I each output is one masked unit: 0 or 1/(1-p), kept with rate 1-p.
    K, S = 64, 200
    out = udn_kernels.bernoulli_linear(torch.ones(4, K), torch.eye(K), p=p, samples=S, seed=17)
    assert torch.all((out == 0) | ((out - 1 / (1 - p)).abs() < 1e-6))
    kept = (out > 0).double().mean().item()
    n = out.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 standard errors
    assert abs(out.mean().item() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # unbiased: E = x


@pytest.mark.parametrize("mask", ["weight", "symmetric"])
def test_weight_masks_statistics(mask):
    # Single-weight outputs (x = e_k) expose each sampled weight; W = 1.
    K, S, p = 32, 400, 0.3
    out = udn_kernels.bernoulli_linear(torch.eye(K), torch.ones(3, K), p=p, mask=mask, samples=S, seed=5)
    n = out.numel()
    if mask == "weight":
        kept = (out > 0).double().mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        assert torch.all((out == 0) | ((out - 1 / (1 - p)).abs() < 1e-6))
    else:
        assert torch.all(out.abs() == 1.0)
        assert abs(out.mean().item()) < 5 / math.sqrt(n)  # Rademacher: mean 0, sd 1
    # one DropConnect mask per weight per draw: examples in one draw see the same weight, so
    # x = [e_k; e_k] gives identical rows
    twice = udn_kernels.bernoulli_linear(torch.eye(K).repeat(2, 1), torch.ones(3, K), p=p, mask=mask,
                                         samples=2, seed=5)
    assert torch.equal(twice[:, :K], twice[:, K:])


def test_input_mask_is_per_example_and_samples_are_uncorrelated():
    K, S = 16, 2000
    x = torch.ones(2, K, dtype=torch.float64)
    out = udn_kernels.bernoulli_linear(x, torch.ones(1, K, dtype=torch.float64), p=0.5, samples=S, seed=3)
    assert not torch.equal(out[:, 0], out[:, 1])
    z = (out - out.mean(0)) / out.std(0)
    for a, b in ((z[:-1], z[1:]), (z[:, 0], z[:, 1])):  # lag-1 in samples, and across examples
        corr = (a * b).mean(0)
        assert corr.abs().max() < 5.0 / math.sqrt(S), corr


def test_seeding():
    x, w, b = _inputs(torch.float32, 1, False, True)
    x = x[0]
    for mask in MASKS:
        run = lambda **kw: udn_kernels.bernoulli_linear(x, w, b, mask=mask, **kw)
        assert torch.equal(run(seed=5), run(seed=5))
        assert not torch.equal(run(seed=5), run(seed=6))
        torch.manual_seed(0)
        first = run()
        torch.manual_seed(0)
        assert torch.equal(first, run())
        with udn_kernels.backend("reference"):
            expected = run(seed=8)
        _close(run(seed=8), expected, torch.float32, mask)


def test_p_zero_is_plain_linear():
    x, w, b = _inputs(torch.float64, 1, False, True)
    out = udn_kernels.bernoulli_linear(x[0], w, b, p=0.0, mask="input", seed=1)
    assert torch.allclose(out, torch.nn.functional.linear(x[0], w, b))


@pytest.mark.parametrize("call, match", [
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, p=1.0), r"p: expected a float in \[0, 1\)"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, p=-0.1), r"p: expected a float in \[0, 1\)"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, p="a"), "p: expected a float"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, mask="unit"), "mask: expected one of"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, torch.zeros(5)), r"bias: expected shape \(3,\)"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w.double()), "weight: expected dtype"),
    (lambda x, w: udn_kernels.bernoulli_linear(x.long(), w), "x: expected dtype"),
    (lambda x, w: udn_kernels.bernoulli_linear(x[:, :2], w), r"x: expected shape \[\.\.\., 6\]"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w[None]), "weight: expected a 2-D"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, samples=-2), "samples: expected an int >= 1"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, seed=2**63), r"seed: expected an int in \[0, 2\^63\)"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, samples=2, input_has_samples=True), r"x: expected shape \[2,"),
    (lambda x, w: udn_kernels.bernoulli_linear(x, w, input_has_samples=1), "input_has_samples: expected a bool"),
])
def test_validation_errors_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call(torch.randn(4, 6), torch.randn(3, 6))


@pytest.mark.parametrize("mask", MASKS)
def test_torch_compile_fullgraph_matches_eager(mask):
    torch._dynamo.reset()  # the parametrized cases share one code object: start with a clean cache
    x, w, b = _inputs(torch.float32, 1, False, True)
    x = x[0]

    def layer(x, w, seed):
        return udn_kernels.bernoulli_linear(x, w, b, p=0.25, mask=mask, samples=2, seed=seed)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, 3), layer(x, w, 3))
    torch.manual_seed(1)
    got = compiled(x, w, None)
    torch.manual_seed(1)
    assert torch.equal(got, layer(x, w, None))
    leaf, ref_leaf = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    compiled(x, leaf, 3).sum().backward()
    layer(x, ref_leaf, 3).sum().backward()
    assert torch.allclose(leaf.grad, ref_leaf.grad)
