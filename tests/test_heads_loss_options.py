"""Loss options of the depth heads (label_smoothing, lse_square_scale, softcap, return_stats):
every backend against an eager oracle on materialised logits.

The oracle: per depth, logits ``z = H W^T + b``, soft-capped ``t = c tanh(z / c)``, the row loss
``F.cross_entropy(t, y, label_smoothing=eps, ignore_index=..., reduction="none") + zs lse(t)^2``
(the z-loss on non-ignored rows only), combined over depths by the mode and reduced. Loss and
gradients (hidden, weight, bias, log_weights) must match it, on both the gradient-in-forward path
(mean / sum with head gradients) and the recomputing path (reduction "none", then a weighted sum),
for the small-C class-major CPU path (C = 11) and the class-tiled one (C = 600: two class tiles,
so the online logsumexp, smoothing sum and argmax cross a tile boundary).

Tolerances: float64 inputs 1e-10 relative to max(1, |value|) (the oracle is float64 too);
float32 inputs against the float64 oracle on the same (upcast) values 2e-4 (fp32 accumulation of
C-term sums; the soft-cap's tanh costs about c ulps of a logit). Accuracy must match exactly.

The Triton kernels run in the interpreter (a subprocess with TRITON_INTERPRET=1, as
tests/test_triton_heads.py) at small shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted, rerun_under_interpreter

import udn_kernels
from udn_kernels import DepthStats, depth_loglik, depth_mixture_nll

IGNORE = -100
# (label_smoothing, lse_square_scale, softcap): none, each alone, all together
OPTIONS = [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 1e-2, None), (0.0, 0.0, 2.0), (0.2, 1e-2, 3.0)]
OPTION_IDS = ["plain", "smoothing", "zloss", "softcap", "all"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def make(L, N, D, C, *, per_depth, dtype, seed=0, ignore_index=IGNORE):
    """Head inputs (logits of order 3, so soft-caps at 2-3 bite) with every 4th row ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, N, D, dtype=torch.float64, generator=gen)
    weight = 3 * torch.randn(*((L, C, D) if per_depth else (C, D)), dtype=torch.float64, generator=gen) / math.sqrt(D)
    bias = torch.randn(*((L, C) if per_depth else (C,)), dtype=torch.float64, generator=gen)
    target = torch.randint(0, C, (N,), generator=gen)
    target[::4] = ignore_index
    log_weights = torch.log_softmax(torch.randn(L, dtype=torch.float64, generator=gen), 0)
    return [t.to(dtype) for t in (hidden, weight, bias)] + [target, log_weights.to(dtype)]


def eager_row_losses(hidden, weight, bias, target, smoothing, zscale, softcap, ignore_index=IGNORE):
    """``[L, N]`` row losses and capped logits ``[L, N, C]`` of the oracle (in the inputs' dtype)."""
    L = hidden.shape[0]
    logits = torch.stack([F.linear(hidden[l], weight[l] if weight.dim() == 3 else weight,
                                   bias[l] if bias.dim() == 2 else bias) for l in range(L)])
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = target != ignore_index
    rows = torch.stack([F.cross_entropy(logits[l], target, label_smoothing=smoothing, ignore_index=ignore_index,
                                        reduction="none") for l in range(L)])
    rows = rows + zscale * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    return rows, logits


def eager_nll(hidden, weight, bias, target, log_weights, mode, reduction, options, ignore_index=IGNORE):
    rows, _ = eager_row_losses(hidden, weight, bias, target, *options, ignore_index=ignore_index)
    valid = target != ignore_index
    if mode == "expected":
        loss = torch.exp(log_weights) @ rows
    else:
        loss = torch.where(valid, -torch.logsumexp(log_weights[:, None] - rows, 0), 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / (valid.sum() if reduction == "mean" else 1)


def assert_close(actual, expected, tol, name):
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def check_against_eager(backend, dtype, options, mode, reduction, per_depth, C, L=3, N=24, D=8,
                        ignore_index=IGNORE):
    """Loss and the four gradients of ``depth_mixture_nll`` on ``backend`` vs the oracle."""
    inputs = make(L, N, D, C, per_depth=per_depth, dtype=dtype, ignore_index=ignore_index)
    leaves = [t.clone().requires_grad_() for t in inputs[:3]] + [inputs[3], inputs[4].clone().requires_grad_()]
    smoothing, zscale, softcap = options
    with udn_kernels.backend(backend):
        loss = depth_mixture_nll(*leaves, mode=mode, reduction=reduction, ignore_index=ignore_index,
                                 label_smoothing=smoothing, lse_square_scale=zscale, softcap=softcap)
    oracle_leaves = [t.detach().double().requires_grad_() for t in inputs[:3]] + \
        [inputs[3], inputs[4].detach().double().requires_grad_()]
    want = eager_nll(*oracle_leaves, mode, reduction, options, ignore_index=ignore_index)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tol = TOL[dtype]
    assert loss.dtype == dtype
    assert_close(loss.detach(), want.detach(), tol, "loss")
    got_grads = torch.autograd.grad(loss, [leaves[i] for i in (0, 1, 2, 4)], upstream.to(dtype))
    want_grads = torch.autograd.grad(want, [oracle_leaves[i] for i in (0, 1, 2, 4)], upstream)
    for name, got, ref in zip(("hidden", "weight", "bias", "log_weights"), got_grads, want_grads):
        assert_close(got, ref, tol, name)


def check_stats(backend, dtype, mode, per_depth, C, options, with_grad, L=3, N=24, D=8):
    """``return_stats`` against the per-depth oracle: F.cross_entropy (+ z-loss) mean and argmax accuracy."""
    hidden, weight, bias, target, log_weights = make(L, N, D, C, per_depth=per_depth, dtype=dtype)
    hidden.requires_grad_(with_grad)
    smoothing, zscale, softcap = options
    with udn_kernels.backend(backend):
        loss, stats = depth_mixture_nll(hidden, weight, bias, target, log_weights, mode=mode,
                                        label_smoothing=smoothing, lse_square_scale=zscale, softcap=softcap,
                                        return_stats=True)
        plain = depth_mixture_nll(hidden, weight, bias, target, log_weights, mode=mode, label_smoothing=smoothing,
                                  lse_square_scale=zscale, softcap=softcap)
    assert isinstance(stats, DepthStats)
    assert torch.equal(loss.detach(), plain.detach())  # return_stats does not change the loss
    valid = target != IGNORE
    rows, logits = eager_row_losses(hidden.detach().double(), weight.double(), bias.double(), target, *options)
    assert stats.count.dtype == torch.int64 and stats.count.dim() == 0 and stats.count.item() == valid.sum().item()
    assert stats.nll.dtype == stats.accuracy.dtype == torch.float32
    assert stats.nll.shape == stats.accuracy.shape == (L,)
    assert not stats.nll.requires_grad and not stats.accuracy.requires_grad
    for depth in range(L):
        per_depth_ce = F.cross_entropy(logits[depth], target, label_smoothing=smoothing, ignore_index=IGNORE)
        z_term = zscale * (torch.logsumexp(logits[depth], -1) ** 2)[valid].mean()
        # nll is float32 whatever the inputs: 1e-6 covers its rounding
        assert_close(stats.nll[depth], per_depth_ce + z_term, max(TOL[dtype], 1e-6), f"nll[{depth}]")
    # the oracle's argmax on the kernels' own dtype (an fp32 argmax may differ from the fp64 one on near-ties)
    own_logits = eager_row_losses(hidden.detach(), weight, bias, target, *options)[1]
    hits = (own_logits.argmax(-1) == target) & valid
    assert torch.equal(stats.accuracy, hits.sum(1).float() / valid.sum())


if not interpreted():
    pytestmark = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"],
                                    reason="C++ extension not built")

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("per_depth, C", [(True, 11), (False, 600)], ids=["small-C-per-depth", "tiled-shared"])
    def test_loss_and_gradients_match_eager(backend, dtype, options, mode, reduction, per_depth, C):
        check_against_eager(backend, dtype, options, mode, reduction, per_depth, C)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    @pytest.mark.parametrize("per_depth, C", [(False, 11), (True, 40)], ids=["small-C-shared", "tiled-per-depth"])
    def test_other_head_layouts(backend, per_depth, C):
        for mode in ("expected", "mixture"):
            for reduction in ("mean", "none"):
                check_against_eager(backend, torch.float64, OPTIONS[-1], mode, reduction, per_depth, C)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    def test_ignore_index_that_is_a_class(backend):
        # ignore_index = 2 is a valid class: its rows must get no loss, no z-loss and no gradient
        for C in (11, 600):
            check_against_eager(backend, torch.float64, OPTIONS[-1], "expected", "mean", False, C, ignore_index=2)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    @pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
    def test_depth_loglik_is_minus_the_row_loss(backend, options):
        # depth_loglik's rows are -loss terms, so expected mode is their weighted sum
        hidden, weight, bias, target, log_weights = make(3, 24, 8, 600, per_depth=False, dtype=torch.float64)
        smoothing, zscale, softcap = options
        kwargs = dict(label_smoothing=smoothing, lse_square_scale=zscale, softcap=softcap)
        with udn_kernels.backend(backend):
            loglik = depth_loglik(hidden, weight, bias, target, **kwargs)
            nll = depth_mixture_nll(hidden, weight, bias, target, log_weights, reduction="none", **kwargs)
        rows, _ = eager_row_losses(hidden, weight, bias, target, *options)
        assert_close(loglik, -rows, 1e-10, "loglik")
        assert_close(nll, -(torch.exp(log_weights) @ loglik), 1e-10, "expected-mode nll")

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    @pytest.mark.parametrize("per_depth, C", [(True, 11), (False, 600)], ids=["small-C-per-depth", "tiled-shared"])
    @pytest.mark.parametrize("with_grad", [False, True], ids=["no-grad", "grad-in-forward"])
    def test_stats_match_eager(backend, dtype, mode, per_depth, C, with_grad):
        check_stats(backend, dtype, mode, per_depth, C, OPTIONS[-1], with_grad)
        check_stats(backend, dtype, mode, per_depth, C, OPTIONS[0], with_grad)

    def test_stats_argmax_takes_the_first_maximum():
        # tied maxima (a zero head: every logit equals the bias) in the second class tile of a
        # tiled head and in a small head: the first tied class counts, as torch.argmax
        for C in (11, 600):
            hidden = torch.randn(2, 4, 3, dtype=torch.float64)
            weight = torch.zeros(C, 3, dtype=torch.float64)
            bias = torch.zeros(C, dtype=torch.float64)
            bias[C - 5:] = 1.0
            target = torch.tensor([C - 5, C - 4, C - 1, IGNORE])
            for backend in ("reference", "cpu"):
                with udn_kernels.backend(backend):
                    _, stats = depth_mixture_nll(hidden, weight, bias, target, torch.zeros(2, dtype=torch.float64),
                                                 return_stats=True)
                assert torch.equal(stats.accuracy, torch.full((2,), 1 / 3)), (backend, C)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_gradcheck(backend, mode, reduction):
        hidden, weight, bias, target, log_weights = make(2, 5, 3, 7, per_depth=False, dtype=torch.float64)
        leaves = [t.requires_grad_() for t in (hidden, weight, bias, log_weights)]

        def fn(hidden, weight, bias, log_weights):
            with udn_kernels.backend(backend):
                return depth_mixture_nll(hidden, weight, bias, target, log_weights, mode=mode, reduction=reduction,
                                         label_smoothing=0.2, lse_square_scale=0.05, softcap=1.5)
        assert torch.autograd.gradcheck(fn, leaves)

    @pytest.mark.parametrize("kwargs, match", [
        (dict(label_smoothing=-0.1), "label_smoothing: expected a float in \\[0, 1\\], got -0.1"),
        (dict(label_smoothing=1.5), "label_smoothing: expected a float in \\[0, 1\\], got 1.5"),
        (dict(softcap=0.0), "softcap: expected None or a positive finite float, got 0.0"),
        (dict(softcap=-2.0), "softcap: expected None or a positive finite float, got -2.0"),
        (dict(softcap=math.inf), "softcap: expected None or a positive finite float, got inf"),
        (dict(lse_square_scale=-1e-4), "lse_square_scale: expected a finite float >= 0, got -0.0001"),
    ])
    @pytest.mark.parametrize("op", ["depth_loglik", "depth_mixture_nll"])
    def test_bad_options(kwargs, match, op):
        hidden, weight, bias, target, log_weights = make(2, 5, 3, 7, per_depth=False, dtype=torch.float64)
        with pytest.raises(ValueError, match=match):
            if op == "depth_loglik":
                depth_loglik(hidden, weight, bias, target, **kwargs)
            else:
                depth_mixture_nll(hidden, weight, bias, target, log_weights, **kwargs)

    @pytest.mark.parametrize("kwargs", [dict(label_smoothing=0.1), dict(lse_square_scale=1e-4), dict(softcap=30.0),
                                        dict(return_stats=True)], ids=lambda k: next(iter(k)))
    def test_options_rejected_with_gaussian_likelihood(kwargs):
        hidden, weight, bias, _, log_weights = make(2, 5, 3, 7, per_depth=False, dtype=torch.float64)
        target = torch.randn(5, 7, dtype=torch.float64)
        with pytest.raises(ValueError, match="only used with likelihood='categorical'"):
            depth_mixture_nll(hidden, weight, bias, target, log_weights, likelihood="gaussian", **kwargs)
        if "return_stats" not in kwargs:
            with pytest.raises(ValueError, match="only used with likelihood='categorical'"):
                depth_loglik(hidden, weight, bias, target, likelihood="gaussian", **kwargs)

    def test_cpu_kernel_checks_options():
        # direct kernel calls (no op-level validation) still refuse bad options, naming them
        hidden, weight, bias, target, _ = make(2, 5, 3, 7, per_depth=False, dtype=torch.float64)
        fwd = torch.ops.udn_kernels_C.depth_loglik_fwd
        with pytest.raises(ValueError, match="label_smoothing: expected a float in \\[0, 1\\], got 2"):
            fwd(hidden, weight, bias, target, None, False, IGNORE, 2.0, 0.0, 0.0, False)
        with pytest.raises(ValueError, match="softcap: expected 0 \\(none\\) or a positive finite float, got -1"):
            fwd(hidden, weight, bias, target, None, False, IGNORE, 0.0, 0.0, -1.0, False)

    @pytest.mark.parametrize("backend", ["reference", "cpu"])
    def test_compiled_matches_eager(backend):
        # torch.compile traces the custom ops with the options and stats (fake kernels, aux [2, L, N])
        hidden, weight, bias, target, log_weights = make(2, 9, 4, 40, per_depth=False, dtype=torch.float64)
        options = dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=3.0)

        def fn(hidden, weight):
            loss, stats = depth_mixture_nll(hidden, weight, bias, target, log_weights, mode="mixture",
                                            return_stats=True, **options)
            return loss, stats.nll, stats.accuracy, depth_loglik(hidden, weight, bias, target, **options)

        leaves = [hidden.requires_grad_(), weight.requires_grad_()]
        with udn_kernels.backend(backend):
            eager = fn(*leaves)
            eager_grads = torch.autograd.grad(eager[0], leaves)
            compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(*leaves)
            compiled_grads = torch.autograd.grad(compiled[0], leaves)
        for name, got, want in zip(("loss", "nll", "accuracy", "loglik", "d_hidden", "d_weight"),
                                   compiled + compiled_grads, eager + eager_grads):
            assert_close(got.detach(), want.detach(), 1e-12, name)

    def test_triton_loss_options_under_interpreter():
        rerun_under_interpreter(__file__)

else:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
    @pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_triton_loss_and_gradients_match_eager(dtype, options, mode):
        # fused path (mean) and recomputing path (none); C = 70 spans two 64-class tiles of the
        # shipped float configs
        for reduction, per_depth, C in (("mean", False, 70), ("none", True, 70), ("sum", True, 11)):
            check_against_eager("triton", dtype, options, mode, reduction, per_depth, C, L=2, N=12, D=5)

    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    @pytest.mark.parametrize("with_grad", [False, True], ids=["no-grad", "grad-in-forward"])
    def test_triton_stats_match_eager(mode, with_grad):
        check_stats("triton", torch.float32, mode, False, 70, OPTIONS[-1], with_grad, L=2, N=12, D=5)
