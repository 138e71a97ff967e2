"""Mixed precision of the heads ops (docs/precision.md): 16-bit storage, float32 accumulation.

Accuracy contract (Cut Cross-Entropy's rule): for every heads op and every gradient, the error of a
16-bit result against a float64 reference (computed from the same, already rounded, 16-bit inputs)
is at most the error of eager PyTorch in that dtype -- ``F.linear`` materialising the logits, then
``F.cross_entropy`` / ``softmax`` -- plus ``TOL[dtype]``, the dtype's machine epsilon: two roundings
of half an ulp, since the gradient-in-forward path rounds its saved 16-bit gradients at forward and
again when the backward scales them by a non-unit upstream gradient. Errors are normalised:
max |x - ref| / max |ref|.
Both backends (reference, cpu); the CPU kernels under both 16-bit GEMM strategies (HalfGemm:
per-tile upcast to float32, native 16-bit GEMMs), forced through UDN_KERNELS_HALF_GEMM.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import depth_loglik, depth_mixture_nll, depth_mixture_predict

HALVES = (torch.bfloat16, torch.float16)
TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
IGNORE = -100


def _backends():
    yield pytest.param(("reference", None), id="reference")
    yield pytest.param(("cpu", "upcast"), id="cpu-upcast")
    yield pytest.param(("cpu", "native"), id="cpu-native")


@pytest.fixture(params=list(_backends()))
def backend(request, monkeypatch):
    name, strategy = request.param
    if strategy is not None:
        monkeypatch.setenv("UDN_KERNELS_HALF_GEMM", strategy)
    with udn_kernels.backend(name, strict=True):
        yield name


def _problem(dtype, *, L=3, N=48, D=32, C=600, per_depth=False, seed=0):
    """16-bit leaf inputs (hidden, weight, bias, log_weights float32) with logits of size ~3, and
    class targets with some ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, N, D, generator=g, dtype=torch.float64)
    wshape = (L, C, D) if per_depth else (C, D)
    weight = torch.randn(*wshape, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(D))
    bias = torch.randn(*wshape[:-1], generator=g, dtype=torch.float64) * 0.5
    target = torch.randint(0, C, (N,), generator=g)
    target[::7] = IGNORE
    log_weights = torch.log_softmax(torch.randn(L, generator=g, dtype=torch.float64), 0).float()
    leaves = [t.to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    return leaves + [log_weights.requires_grad_(), target]


def _eager_loglik(hidden, weight, bias, target):
    """``[L, N]`` log-likelihoods through materialised logits in the inputs' dtype."""
    rows = []
    for depth in range(hidden.shape[0]):
        w = weight if weight.dim() == 2 else weight[depth]
        b = bias if bias.dim() == 1 else bias[depth]
        logits = F.linear(hidden[depth], w, b)
        rows.append(-F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE))
    return torch.stack(rows)


def _eager_nll(hidden, weight, bias, target, log_weights, mode, reduction):
    loglik = _eager_loglik(hidden, weight, bias, target).to(log_weights.dtype)
    if mode == "expected":
        loss = -(torch.exp(log_weights) @ loglik)
    else:
        loss = -torch.logsumexp(log_weights[:, None] + loglik, dim=0)
    valid = target != IGNORE
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def _eager_predict(hidden, weight, bias, log_weights):
    w = torch.softmax(log_weights, 0).to(hidden.dtype)
    out = 0
    for depth in range(hidden.shape[0]):
        wd = weight if weight.dim() == 2 else weight[depth]
        b = bias if bias.dim() == 1 else bias[depth]
        out = out + w[depth] * torch.softmax(F.linear(hidden[depth], wd, b), -1)
    return out


def _run(fn, inputs, upstream):
    """``fn(*inputs)`` and the gradients of ``sum(out * upstream)`` for the trainable inputs."""
    leaves = [x for x in inputs if x.is_floating_point() and x.requires_grad]
    out = fn(*inputs)
    grads = torch.autograd.grad((out.double() * upstream).sum(), leaves, allow_unused=True)
    return [out.detach()] + [None if gr is None else gr.detach() for gr in grads]


def _as64(inputs):
    return [x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in inputs]


def _error(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check_contract(ours_fn, eager_fn, inputs, out_shape, dtype, names):
    upstream = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = _run(ours_fn, inputs, upstream)
    eager = _run(eager_fn, inputs, upstream)
    ref = _run(eager_fn, _as64(inputs), upstream)
    leaves = [x for x in inputs if x.is_floating_point() and x.requires_grad]
    for name, o, e, r, leaf in zip(names, ours, eager, ref, [None] + leaves):
        if leaf is not None:
            assert o.dtype == leaf.dtype, f"{name}: gradient dtype {o.dtype}, input {leaf.dtype}"
        assert torch.isfinite(o).all(), name
        err, err_eager = _error(o, r), _error(e, r)
        assert err <= err_eager + TOL[dtype], f"{name}: error {err:.3g} > eager {err_eager:.3g} + {TOL[dtype]:.3g}"


SHAPES = [pytest.param(dict(C=600), id="shared-C600"), pytest.param(dict(C=600, per_depth=True), id="per-depth-C600"),
          pytest.param(dict(C=10, per_depth=True), id="per-depth-C10"), pytest.param(dict(C=10), id="shared-C10")]
NAMES = ("out", "d_hidden", "d_weight", "d_bias", "d_log_weights")


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_depth_loglik_within_eager_error(backend, dtype, shape):
    hidden, weight, bias, _, target = _problem(dtype, **shape)
    L, N = hidden.shape[:2]
    out = depth_loglik(hidden, weight, bias, target)
    assert out.dtype == torch.float32
    _check_contract(lambda h, w, b, t: depth_loglik(h, w, b, t, ignore_index=IGNORE),
                    _eager_loglik, [hidden, weight, bias, target], (L, N), dtype, NAMES)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ("expected", "mixture"))
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_depth_mixture_nll_within_eager_error(backend, dtype, shape, mode, reduction):
    """mean / sum run the gradient-in-forward kernels, none the forward + recomputing backward."""
    hidden, weight, bias, log_weights, target = _problem(dtype, **shape)
    N = hidden.shape[1]

    def ours(h, w, b, lw, t):
        return depth_mixture_nll(h, w, b, t, lw, mode=mode, reduction=reduction, ignore_index=IGNORE)

    def eager(h, w, b, lw, t):
        return _eager_nll(h, w, b, t, lw, mode, reduction)

    assert ours(hidden, weight, bias, log_weights, target).dtype == torch.float32
    _check_contract(ours, eager, [hidden, weight, bias, log_weights, target], (N,) if reduction == "none" else (),
                    dtype, NAMES)


def _eager_nll_with_options(hidden, weight, bias, target, log_weights, mode, smoothing, zscale, softcap):
    """Mean NLL through materialised logits in the inputs' dtype, with the loss options: soft-capped
    logits, label smoothing, z-loss on the log-sum-exp."""
    rows = []
    for depth in range(hidden.shape[0]):
        w = weight if weight.dim() == 2 else weight[depth]
        b = bias if bias.dim() == 1 else bias[depth]
        logits = F.linear(hidden[depth], w, b)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        row = F.cross_entropy(logits, target, reduction="none", ignore_index=IGNORE, label_smoothing=smoothing)
        rows.append(row.to(log_weights.dtype) + zscale * torch.logsumexp(logits, -1).to(log_weights.dtype) ** 2)
    valid = target != IGNORE
    rows = torch.where(valid, torch.stack(rows), 0.0)
    loss = torch.exp(log_weights) @ rows if mode == "expected" else -torch.logsumexp(log_weights[:, None] - rows, 0)
    return torch.where(valid, loss, 0.0).sum() / valid.sum()


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("frozen", ("hidden", "weight"))
@pytest.mark.parametrize("options", [pytest.param((0.1, 1e-3, None), id="smoothing+z-loss"),
                                     pytest.param((0.0, 0.0, 5.0), id="softcap"),
                                     pytest.param((0.1, 1e-3, 5.0), id="all")])
@pytest.mark.parametrize("mode", ("expected", "mixture"))
@pytest.mark.parametrize("shape", [pytest.param(dict(C=600), id="shared-C600"),
                                   pytest.param(dict(C=600, per_depth=True), id="per-depth-C600")])
def test_frozen_input_with_loss_options_within_eager_error(backend, dtype, frozen, options, mode, shape):
    """A frozen hidden (a first layer's input) or a frozen head with the loss options: the kernels
    skip the unwanted gradient's GEMMs, and what they return meets the contract."""
    hidden, weight, bias, log_weights, target = _problem(dtype, **shape)
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    smoothing, zscale, softcap = options

    def ours(h, w, b, lw, t):
        return depth_mixture_nll(h, w, b, t, lw, mode=mode, ignore_index=IGNORE, label_smoothing=smoothing,
                                 lse_square_scale=zscale, softcap=softcap)

    def eager(h, w, b, lw, t):
        return _eager_nll_with_options(h, w, b, t, lw, mode, smoothing, zscale, softcap)

    names = ("out",) + tuple(n for n in NAMES[1:] if n != f"d_{frozen}")
    _check_contract(ours, eager, [hidden, weight, bias, log_weights, target], (), dtype, names)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("shape", [pytest.param(dict(C=600), id="shared-C600"),
                                   pytest.param(dict(C=10, per_depth=True), id="per-depth-C10")])
def test_depth_mixture_predict_within_eager_error(backend, dtype, shape):
    hidden, weight, bias, log_weights, _ = _problem(dtype, **shape)
    out = depth_mixture_predict(hidden, weight, bias, log_weights)
    assert out.dtype == dtype
    _check_contract(depth_mixture_predict, _eager_predict, [hidden, weight, bias, log_weights],
                    tuple(out.shape), dtype, NAMES)


def test_gaussian_likelihood_in_bfloat16(backend):
    """The Gaussian path: bf16 target and noise_std, float32 log-likelihoods, gradients in bf16."""
    hidden, weight, bias, log_weights, _ = _problem(torch.bfloat16, C=40)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(hidden.shape[1], 40, generator=g).to(torch.bfloat16).requires_grad_()
    noise = (torch.rand(40, generator=g) + 0.5).to(torch.bfloat16).requires_grad_()
    inputs = [hidden, weight, bias, target, noise]

    def ours(h, w, b, y, s):
        return depth_mixture_nll(h, w, b, y, log_weights.detach(), likelihood="gaussian", noise_std=s)

    def eager(h, w, b, y, s):
        mu = F.linear(h, w, b)
        ll = (-0.5 * ((y - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return -(torch.exp(log_weights.detach()).to(ll.dtype) @ ll).mean()

    assert ours(*inputs).dtype == torch.float32
    _check_contract(ours, eager, inputs, (), torch.bfloat16, ("out", "d_hidden", "d_weight", "d_bias",
                                                               "d_target", "d_noise_std"))


# ---------------------------------------------------------------- the mixed-precision rule


@pytest.mark.parametrize("dtype", HALVES, ids=str)
def test_float32_head_beside_16_bit_hidden_computes_in_16_bit(dtype):
    """float32 weight / bias / log_weights beside 16-bit hidden: the same result as a 16-bit head
    (the rule of _checks.compute_dtype), gradients in each input's own dtype."""
    hidden, weight, bias, log_weights, target = _problem(dtype)
    w32, b32 = (x.detach().float().requires_grad_() for x in (weight, bias))
    mixed = depth_mixture_nll(hidden, w32, b32, target, log_weights)
    mixed.backward()
    d_hidden_mixed = hidden.grad.clone()
    hidden.grad = None
    same = depth_mixture_nll(hidden, weight, bias, target, log_weights)
    same.backward()
    assert mixed.dtype == same.dtype == torch.float32
    assert torch.equal(mixed, same)
    assert w32.grad.dtype == b32.grad.dtype == torch.float32 and hidden.grad.dtype == dtype
    assert torch.equal(w32.grad, weight.grad.float()) and torch.equal(b32.grad, bias.grad.float())
    assert torch.equal(d_hidden_mixed, hidden.grad)


def test_autocast_computes_in_the_autocast_dtype_like_linear_then_cross_entropy():
    """Under torch.autocast float32 inputs are computed in bfloat16 (as F.linear would cast them),
    the loss is float32 (as F.cross_entropy under autocast) and the gradients float32; the result
    is the explicit bfloat16 call's."""
    hidden, weight, bias, log_weights, target = _problem(torch.bfloat16)
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (hidden, weight, bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = depth_mixture_nll(h32, w32, b32, target, log_weights, mode="mixture")
        eager_logits = F.linear(h32[0], w32, b32)
        eager_loss = F.cross_entropy(eager_logits, target)
    loss.backward()
    assert eager_logits.dtype == torch.bfloat16 and eager_loss.dtype == torch.float32
    assert loss.dtype == torch.float32 and h32.grad.dtype == w32.grad.dtype == torch.float32
    explicit = depth_mixture_nll(hidden, weight, bias, target, log_weights, mode="mixture")
    explicit.backward()
    assert torch.equal(loss, explicit)
    assert torch.equal(h32.grad, hidden.grad.float()) and torch.equal(w32.grad, weight.grad.float())


def test_compile_fullgraph_bfloat16_and_autocast_match_eager():
    hidden, weight, bias, log_weights, target = _problem(torch.bfloat16, C=40)

    def fn(h, w, b, lw):
        return depth_mixture_nll(h, w, b, target, lw)

    def autocast_fn(h, w, b, lw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return depth_mixture_nll(h, w.float(), b, target, lw)

    for f in (fn, autocast_fn):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(hidden, weight, bias, log_weights)
        d_got = torch.autograd.grad(got, (hidden, weight))
        want = f(hidden, weight, bias, log_weights)
        d_want = torch.autograd.grad(want, (hidden, weight))
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(d_got, d_want):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def _bad_cases():
    hidden, weight, bias, log_weights, target = (x.detach() for x in _problem(torch.bfloat16, C=40))
    cases = {
        "hidden int": (dict(hidden=hidden.long()), TypeError, "hidden: expected dtype in"),
        "hidden bool": (dict(hidden=hidden.bool()), TypeError, "hidden: expected dtype in"),
        "hidden complex": (dict(hidden=hidden.to(torch.complex64)), TypeError, "hidden: expected dtype in"),
        "weight int": (dict(weight=weight.int()), TypeError, "weight: expected dtype in"),
        "weight float16 beside bfloat16": (dict(weight=weight.half()), TypeError,
                                           "weight: expected dtype bfloat16 (as the other 16-bit inputs), got float16"),
        "bias float16 beside bfloat16": (dict(bias=bias.half()), TypeError, "bias: expected dtype bfloat16"),
        "target bfloat16": (dict(target=target.to(torch.bfloat16)), TypeError,
                            "target: expected dtype in (int64), got bfloat16"),
        "log_weights int": (dict(log_weights=log_weights.long()), TypeError, "log_weights: expected dtype in"),
        "weight on meta": (dict(weight=weight.to("meta")), ValueError,
                           "weight: expected device cpu (as hidden), got meta"),
        "log_weights on meta": (dict(log_weights=log_weights.to("meta")), ValueError,
                                "log_weights: expected device cpu (as hidden), got meta"),
    }
    base = dict(hidden=hidden, weight=weight, bias=bias, target=target, log_weights=log_weights)
    return [pytest.param({**base, **change}, err, msg, id=name) for name, (change, err, msg) in cases.items()]


@pytest.mark.parametrize("args,error,message", _bad_cases())
def test_bad_dtypes_and_devices_name_the_argument(args, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        depth_mixture_nll(args["hidden"], args["weight"], args["bias"], args["target"], args["log_weights"])
    if "log_weights" not in message:
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
            depth_loglik(args["hidden"], args["weight"], args["bias"], args["target"])


def test_float64_log_weights_beside_float32_heads_is_a_type_error():
    hidden, weight, bias, log_weights, target = (x.detach() for x in _problem(torch.bfloat16, C=40))
    with pytest.raises(TypeError, match=r"log_weights: expected dtype float32 \(as hidden\), got float64"):
        depth_mixture_nll(hidden.float(), weight.float(), bias.float(), target, log_weights.double())


@pytest.mark.parametrize("strategy", ("native", "upcast"))
def test_udn_info_reports_the_16_bit_gemm_strategy(monkeypatch, strategy):
    """`udn info` prints the strategy the CPU kernels use per 16-bit dtype (forced here; by default
    chosen from the CPU's features and oneDNN's ISA cap)."""
    from udn_kernels.cli import info_lines

    monkeypatch.setenv("UDN_KERNELS_HALF_GEMM", strategy)
    line = next(x for x in info_lines() if x.startswith("16-bit GEMM"))
    assert f"bfloat16:{strategy},float16:{strategy}" in line


@pytest.mark.parametrize("variable", ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"))
@pytest.mark.parametrize("cap", ("AVX2", "avx512_core", "AVX512_CORE_VNNI"))
def test_onednn_isa_cap_below_16_bit_makes_the_gemm_upcast(monkeypatch, variable, cap):
    """oneDNN emulates 16-bit GEMMs when its ISA cap excludes the 16-bit instructions, whatever the
    CPU has, so the kernels upcast then (on any machine)."""
    from udn_kernels.cli import info_lines

    monkeypatch.delenv("UDN_KERNELS_HALF_GEMM", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(variable, cap)
    line = next(x for x in info_lines() if x.startswith("16-bit GEMM"))
    assert "bfloat16:upcast,float16:upcast" in line


def test_onednn_isa_cap_that_allows_16_bit_keeps_the_cpu_choice(monkeypatch):
    """A cap at or above the 16-bit ISAs (or one oneDNN does not name) changes nothing."""
    from udn_kernels.cli import info_lines

    monkeypatch.delenv("UDN_KERNELS_HALF_GEMM", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    uncapped = next(x for x in info_lines() if x.startswith("16-bit GEMM"))
    for cap in ("AVX10_1_512_AMX_FP16", "ALL", "avx512_core_amx_fp16"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert next(x for x in info_lines() if x.startswith("16-bit GEMM")) == uncapped
