"""Gradient in the forward pass (NLL with a mean/sum reduction): the fused kernels
``depth_loglik_fwd_bwd`` (expected mode) and ``depth_loglik_mixture_fwd_bwd`` (mixture mode) and the
``depth_loglik_dot`` op against the reference and against autograd through the reference forward;
the recompute path where the fused one does not apply."""
import math

import pytest
import torch

import udn_kernels
from udn_kernels import depth_mixture_nll
from udn_kernels.reference import heads as ref

from test_heads import (ALL_GRADS, IGNORE, KERNEL_OUTPUTS, assert_close_rel, assert_kernel_outputs_close,
                        make)

pytestmark = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"],
                                reason="C++ extension not built")

# (L, N, D, C). Rows >= 32 give at least two row blocks, so with two threads the class-tiled
# shapes run the fused kernel; (1, 7, 3, 1) and C <= 32 take its forward + recompute fallback.
# Sizes straddle the row (256) and class (512) tiles; C > 4096, D > 256.
SHAPES = [(1, 7, 3, 1), (3, 37, 19, 11), (2, 257, 9, 513), (4, 33, 17, 1100), (2, 3, 300, 4100),
          (3, 70, 260, 4500)]


def with_threads(threads, op, *args):
    """``op(*args)`` with ``threads`` intra-op threads, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return op(*args)
    finally:
        torch.set_num_threads(before)


def coefficients(L, N, dtype, seed=1):
    """A per-(depth, row) upstream gradient with a zero depth (weight exp(-inf) = 0)."""
    grad = torch.randn(L, N, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if L > 1:
        grad[1] = 0.0
    return grad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_fused_kernel_matches_reference_float64(shape, per_depth, likelihood, threads):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    inputs = make(L, N, D, C, per_depth=per_depth, bias="depth", likelihood=likelihood, ignore_every=3)
    grad = coefficients(L, N, torch.float64)
    got = with_threads(threads, torch.ops.udn_kernels_C.depth_loglik_fwd_bwd, *inputs, grad, gaussian, IGNORE,
                       ALL_GRADS)
    want = ref.KERNELS["depth_loglik_fwd_bwd"](*inputs, grad, gaussian, IGNORE, ALL_GRADS)
    assert_kernel_outputs_close(got, want, 1e-11)


def mixture_inputs(L, N, dtype):
    """Log-weights with a depth outside the support, and row scales with zeros on every third row
    (the tests ignore every fourth row: both must get no gradient)."""
    lw = torch.log_softmax(torch.randn(L, dtype=dtype, generator=torch.Generator().manual_seed(2)), 0)
    if L > 1:
        lw[1] = -math.inf
    scale = torch.full((N,), 1.0 / max(N, 1), dtype=dtype)
    scale[::3] = 0.0
    return lw, scale


# mixture mode on small C: chunks hold every depth of a row range; (40, 700, 3, 10) and
# (2, 27000, 2, 10) split the rows into several such chunks (L*N*C > 2^18)
MIXTURE_SHAPES = SHAPES + [(40, 700, 3, 10), (2, 27000, 2, 10)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", MIXTURE_SHAPES)
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_mixture_kernel_matches_reference_float64(shape, per_depth, likelihood, threads):
    L, N, D, C = shape
    gaussian = likelihood == "gaussian"
    inputs = make(L, N, D, C, per_depth=per_depth, bias="depth", likelihood=likelihood, ignore_every=4)
    lw, scale = mixture_inputs(L, N, torch.float64)
    got = with_threads(threads, torch.ops.udn_kernels_C.depth_loglik_mixture_fwd_bwd,
                       *inputs, lw, scale, gaussian, IGNORE, ALL_GRADS)
    want = ref.KERNELS["depth_loglik_mixture_fwd_bwd"](*inputs, lw, scale, gaussian, IGNORE, ALL_GRADS)
    assert_kernel_outputs_close(got, want, 1e-10)


@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("C", [10, 1100])
def test_mixture_kernel_matches_reference_float32(per_depth, C):
    L, N, D = 4, 300, 64
    inputs64 = make(L, N, D, C, per_depth=per_depth, bias="depth", ignore_every=4)
    inputs32 = [None if t is None else (t.float() if t.is_floating_point() else t) for t in inputs64]
    lw, scale = mixture_inputs(L, N, torch.float64)
    got = torch.ops.udn_kernels_C.depth_loglik_mixture_fwd_bwd(*inputs32, lw.float(), scale.float(), False, IGNORE,
                                                               ALL_GRADS)
    want = ref.KERNELS["depth_loglik_mixture_fwd_bwd"](*inputs64, lw, scale, False, IGNORE, ALL_GRADS)
    assert_kernel_outputs_close(got, want, 2e-5, dtype=torch.float32)


def test_mixture_kernel_checks_weights_and_scale():
    inputs = make(2, 40, 5, 10)
    lw, scale = mixture_inputs(2, 40, torch.float64)
    with pytest.raises(RuntimeError, match="log_weights"):
        torch.ops.udn_kernels_C.depth_loglik_mixture_fwd_bwd(*inputs, lw[:1], scale, False, IGNORE, ALL_GRADS)
    with pytest.raises(RuntimeError, match="row_scale"):
        torch.ops.udn_kernels_C.depth_loglik_mixture_fwd_bwd(*inputs, lw, scale.float(), False, IGNORE, ALL_GRADS)


@pytest.mark.parametrize("bias", ["none", "shared"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_fused_kernel_matches_reference_float32(bias, likelihood):
    L, N, D, C = 4, 300, 64, 1100
    gaussian = likelihood == "gaussian"
    inputs64 = make(L, N, D, C, bias=bias, likelihood=likelihood, ignore_every=4)
    inputs32 = [None if t is None else (t.float() if t.is_floating_point() else t) for t in inputs64]
    grad = coefficients(L, N, torch.float64)
    got = torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs32, grad.float(), gaussian, IGNORE, ALL_GRADS)
    want = ref.KERNELS["depth_loglik_fwd_bwd"](*inputs64, grad, gaussian, IGNORE, ALL_GRADS)
    assert_kernel_outputs_close(got, want, 2e-5, dtype=torch.float32)


def test_fused_kernel_bitwise_deterministic():
    inputs = make(4, 300, 32, 3000, bias="depth", dtype=torch.float32, ignore_every=5)
    grad = coefficients(4, 300, torch.float32)
    first = torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, grad, False, IGNORE, ALL_GRADS)
    second = torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, grad, False, IGNORE, ALL_GRADS)
    for name, a, b in zip(KERNEL_OUTPUTS, first, second):
        assert torch.equal(a, b), name


def test_fused_kernel_checks_grad_shape():
    inputs = make(2, 40, 5, 600)
    with pytest.raises(RuntimeError, match="grad_loglik"):
        torch.ops.udn_kernels_C.depth_loglik_fwd_bwd(*inputs, torch.zeros(2, 39, dtype=torch.float64),
                                                     False, IGNORE, ALL_GRADS)


# ------------------------------------------------------------------ public op: which path, values
def op_names(loss):
    """Names of every autograd node behind ``loss``."""
    seen, stack, names = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def uses_fused(loss):
    """The fused op's node: the custom op (compiled) or its eager call (``Eager_depth_loglik_dot``)."""
    return any("depth_loglik_dot" in n for n in op_names(loss))


def leaves_of(inputs, likelihood, log_weights):
    hidden, weight, bias, target, noise = [None if t is None else t.clone() for t in inputs]
    leaves = {"hidden": hidden, "weight": weight, "bias": bias, "log_weights": log_weights.clone()}
    if likelihood == "gaussian":
        leaves.update(noise_std=noise, target=target)
    leaves = {k: v.requires_grad_() for k, v in leaves.items() if v is not None}
    return leaves, target


def oracle(inputs, likelihood, reduction, log_weights, mode="expected"):
    """Loss and gradients by autograd through the reference forward and the eager combination."""
    leaves, target = leaves_of(inputs, likelihood, log_weights)
    gaussian = likelihood == "gaussian"
    loglik, _ = ref.depth_loglik_fwd(leaves["hidden"], leaves["weight"], leaves.get("bias"),
                                     leaves.get("target", target), leaves.get("noise_std"), gaussian, IGNORE)
    if mode == "expected":
        loss = -(torch.exp(leaves["log_weights"]) @ loglik)
    else:
        loss = -torch.logsumexp(leaves["log_weights"][:, None] + loglik, 0)
    valid = torch.ones_like(loss, dtype=torch.bool) if gaussian else target != IGNORE
    loss = torch.where(valid, loss, 0.0).sum()
    if reduction == "mean":
        loss = loss / valid.sum()
    return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def fused(inputs, likelihood, reduction, log_weights, backend="cpu", mode="expected"):
    leaves, target = leaves_of(inputs, likelihood, log_weights)
    with udn_kernels.backend(backend):
        loss = depth_mixture_nll(leaves["hidden"], leaves["weight"], leaves.get("bias"),
                                 leaves.get("target", target), leaves["log_weights"], mode=mode,
                                 likelihood=likelihood, noise_std=leaves.get("noise_std"),
                                 reduction=reduction, ignore_index=IGNORE)
    assert uses_fused(loss)
    return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def log_weights_with_gap(L):
    lw = torch.log_softmax(torch.randn(L, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), 0)
    if L > 1:
        lw[1] = -math.inf  # a depth outside the support
    return lw


@pytest.mark.parametrize("shape", [(3, 37, 19, 11), (2, 257, 9, 513), (3, 70, 260, 4500)])
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_public_fused_path_matches_autograd_oracle(shape, per_depth, likelihood, reduction, mode):
    L, N, D, C = shape
    inputs = make(L, N, D, C, per_depth=per_depth, bias="depth" if per_depth else "shared",
                  likelihood=likelihood, ignore_every=4)
    lw = log_weights_with_gap(L)
    loss, grads = fused(inputs, likelihood, reduction, lw, mode=mode)
    want_loss, want = oracle(inputs, likelihood, reduction, lw, mode)
    torch.testing.assert_close(loss, want_loss, rtol=1e-11, atol=1e-11)
    assert set(grads) == set(want)
    for name in want:  # Gaussian sums reach 1e3: 1e-11 of the gradient's largest entry, absolute
        assert_close_rel(grads[name], want[name], 1e-11, name)
    assert grads["log_weights"][1] == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_public_fused_path_on_reference_backend(reduction, mode):
    inputs = make(3, 40, 6, 700, bias="shared", ignore_every=3)
    lw = log_weights_with_gap(3)
    loss, grads = fused(inputs, "categorical", reduction, lw, backend="reference", mode=mode)
    want_loss, want = oracle(inputs, "categorical", reduction, lw, mode)
    torch.testing.assert_close(loss, want_loss)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("per_depth", [False, True])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
@pytest.mark.parametrize("C", [4, 40])  # small-C chunk kernel, class-tiled kernel
def test_gradcheck_fused_categorical(reduction, per_depth, mode, C):
    # N = 40 rows: two row blocks, so the fused kernel (not its fallback) runs on two threads
    hidden, weight, bias, target, _ = make(2, 20, 3, C, per_depth=per_depth, bias="depth", ignore_every=5)
    lw = torch.log_softmax(torch.randn(2, dtype=torch.float64), 0)
    args = [t.requires_grad_() for t in (hidden, weight, bias, lw)]

    def f(h, w, b, lw):
        loss = depth_mixture_nll(h, w, b, target, lw, mode=mode, reduction=reduction)
        assert uses_fused(loss)
        return loss

    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("mode", ["expected", "mixture"])
@pytest.mark.parametrize("C", [4, 40])
def test_gradcheck_fused_gaussian(mode, C):
    hidden, weight, bias, target, noise = make(2, 20, 3, C, bias="shared", likelihood="gaussian")
    lw = torch.log_softmax(torch.randn(2, dtype=torch.float64), 0)
    args = [t.requires_grad_() for t in (hidden, weight, bias, target, noise, lw)]

    def f(h, w, b, y, s, lw):
        loss = depth_mixture_nll(h, w, b, y, lw, mode=mode, likelihood="gaussian", noise_std=s, reduction="sum")
        assert uses_fused(loss)
        return loss

    with udn_kernels.backend("cpu"):
        assert torch.autograd.gradcheck(f, args)


# ------------------------------------------------------------------ when the fused path does not apply
@pytest.mark.parametrize("case", ["reduction none", "mixture none", "only log_weights", "no grad"])
def test_recompute_path_where_fused_does_not_apply(case):
    inputs = make(3, 37, 19, 600, bias="shared", ignore_every=4)
    hidden, weight, bias, target, _ = inputs
    lw = log_weights_with_gap(3).requires_grad_()
    needs = case != "only log_weights"
    h, w, b = [t.clone().requires_grad_(needs) for t in (hidden, weight, bias)]
    kw = dict(mode="mixture" if case == "mixture none" else "expected",
              reduction="none" if case.endswith("none") else "mean", ignore_index=IGNORE)
    with torch.set_grad_enabled(case != "no grad"), udn_kernels.backend("cpu"):
        loss = depth_mixture_nll(h, w, b, target, lw, **kw)
    want_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias, lw)]
    loglik, _ = ref.depth_loglik_fwd(*want_inputs[:3], target, None, False, IGNORE)
    if kw["mode"] == "expected":
        want = -(torch.exp(want_inputs[3]) @ loglik)
    else:
        want = -torch.logsumexp(want_inputs[3][:, None] + loglik, 0)
    want = torch.where(target != IGNORE, want, 0.0)
    if kw["reduction"] == "mean":
        want = want.sum() / (target != IGNORE).sum()
    torch.testing.assert_close(loss, want, rtol=1e-11, atol=1e-11)
    if case == "no grad":
        assert loss.grad_fn is None
        return
    assert not uses_fused(loss)
    upstream = torch.randn(loss.shape, dtype=loss.dtype)
    leaves = [h, w, b, lw] if needs else [lw]
    got = torch.autograd.grad(loss, leaves, upstream)
    expected = torch.autograd.grad(want, want_inputs if needs else want_inputs[3:], upstream)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-11)


# ------------------------------------------------------------------ autograd graph behaviour
def fused_loss():
    hidden, weight, bias, target, _ = make(3, 40, 6, 700, bias="shared", ignore_every=3)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias, log_weights_with_gap(3))]
    loss = depth_mixture_nll(*leaves[:3], target, leaves[3], ignore_index=IGNORE)
    assert uses_fused(loss)
    return loss, leaves


def test_backward_twice_with_retain_graph_and_without():
    loss, leaves = fused_loss()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    loss.backward()  # frees the saved gradients
    for a, leaf in zip(first, leaves):
        assert torch.equal(leaf.grad, a)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("C", [10, 700])  # small-C chunk kernel, class-tiled kernel
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_unscaled_saved_gradients_never_leak_into_a_retained_graph(C, mode):
    """``loss.backward()`` (upstream gradient 1) hands the saved gradients to autograd unscaled when
    the graph is freed. Under retain_graph they must stay intact: ``hidden`` is a view of a leaf,
    so its gradient (a view of the saved one) could otherwise become ``.grad`` and be accumulated
    into by the next backward."""
    hidden, weight, bias, target, _ = make(3, 40, 6, C, bias="depth", per_depth=True, ignore_every=3)
    leaves = [t.clone().requires_grad_() for t in (hidden.reshape(-1), weight, bias, log_weights_with_gap(3))]

    def loss_fn():
        loss = depth_mixture_nll(leaves[0].view(3, 40, 6), *leaves[1:3], target, leaves[3], mode=mode,
                                 ignore_index=IGNORE)
        assert uses_fused(loss)
        return loss

    loss = loss_fn()
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    for k in (1, 2, 3):  # .grad created (copied or taken over), then accumulated into
        loss.backward(retain_graph=k < 3)
        for leaf, g in zip(leaves, once):
            torch.testing.assert_close(leaf.grad, k * g, rtol=1e-14, atol=0)
    for leaf in leaves:  # a fresh graph freed by its only backward
        leaf.grad = None
    loss_fn().backward()
    for leaf, g in zip(leaves, once):
        assert torch.equal(leaf.grad, g)


def test_loss_used_twice_scales_gradients():
    loss, leaves = fused_loss()
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    twice = torch.autograd.grad(2.0 * loss + loss.exp(), leaves)
    factor = 2.0 + loss.exp().item()
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, factor * b, rtol=1e-12, atol=1e-14)


def test_double_backward_raises_clearly():
    loss, leaves = fused_loss()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, leaves[0], create_graph=True)


@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_all_rows_ignored_gives_nan_mean_and_zero_gradients(mode):
    hidden, weight, _, target, _ = make(2, 40, 3, 50)
    target[:] = IGNORE
    h, w, lw = [t.clone().requires_grad_() for t in (hidden, weight, torch.zeros(2, dtype=torch.float64))]
    loss = depth_mixture_nll(h, w, None, target, lw, mode=mode, ignore_index=IGNORE)
    assert uses_fused(loss) and torch.isnan(loss)
    for g in torch.autograd.grad(loss, [h, w, lw]):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_fused_path_under_torch_compile_fullgraph(likelihood, mode):
    torch._dynamo.reset()
    hidden, weight, bias, target, noise = make(3, 40, 8, 600, bias="shared", likelihood=likelihood,
                                               dtype=torch.float32, ignore_every=3)

    def step(h, w, b, lw, s):
        return depth_mixture_nll(h, w, b, target, lw, mode=mode, likelihood=likelihood, noise_std=s,
                                 ignore_index=IGNORE)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, torch.zeros(3))]
        s = noise.clone().requires_grad_() if likelihood == "gaussian" else None
        with udn_kernels.backend("cpu"):
            loss = fn(*leaves, s)
            loss.backward()
        return [loss] + [t.grad for t in leaves] + ([] if s is None else [s.grad])

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
