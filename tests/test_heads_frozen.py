"""Frozen head inputs: every heads kernel computes only the gradients autograd asks for.

- Same numbers: with any subset of the inputs frozen (``requires_grad=False``), the gradients of
  the others equal those with everything trainable (float64, 1e-12), for ``depth_mixture_nll``
  (expected / mixture mode; mean reduction = the fused gradient-in-forward path, ``"none"`` =
  ``depth_loglik_fwd`` + ``depth_loglik_bwd``) and ``depth_mixture_predict``, shared and per-depth
  heads, categorical and Gaussian, on the cpu and reference backends here and on the triton
  backend in a TRITON_INTERPRET=1 subprocess (every single input frozen / alone trainable there:
  the interpreter is slow).
- Work skipped: the GEMMs the profiler sees (``aten::mm`` and friends, issued by the C++ kernels
  through ATen, recorded on the calling thread at one thread) drop by exactly the ``d_weight`` /
  ``d_hidden`` GEMMs of a frozen head / frozen hidden.
"""
import itertools
import math

import pytest
import torch
from triton_interpreter import interpreted, rerun_under_interpreter

import udn_kernels

if interpreted():
    BACKENDS, C_VALUES = ["triton"], (23,)
else:
    BACKENDS, C_VALUES = ["cpu", "reference"], (7, 600)  # C++: small-C path and 2 class tiles

    def test_triton_backend_under_interpreter():
        rerun_under_interpreter(__file__)

TOL = dict(rtol=1e-12, atol=1e-12)
L, N, D = 2, 13, 5


def _inputs(per_depth, gaussian, C):
    gen = torch.Generator().manual_seed(C + 2 * per_depth + gaussian)
    f64 = dict(dtype=torch.float64)
    tensors = {
        "hidden": torch.randn(L, N, D, generator=gen, **f64),
        "weight": torch.randn(*((L, C, D) if per_depth else (C, D)), generator=gen, **f64) / math.sqrt(D),
        "bias": torch.randn(*((L, C) if per_depth else (C,)), generator=gen, **f64),
        "log_weights": torch.log_softmax(torch.randn(L, generator=gen, **f64), 0),
    }
    if gaussian:
        tensors["target"] = torch.randn(N, C, generator=gen, **f64)
        tensors["noise_std"] = torch.rand(C, generator=gen, **f64) + 0.5
    else:
        target = torch.randint(0, C, (N,), generator=gen)
        target[::4] = -100
        tensors["target"] = target
    return tensors


def depth_nll(t, mode, reduction, likelihood):
    out = udn_kernels.depth_mixture_nll(t["hidden"], t["weight"], t["bias"], t["target"], t["log_weights"],
                                        mode=mode, likelihood=likelihood, noise_std=t.get("noise_std"),
                                        reduction=reduction)
    return out if out.dim() == 0 else (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype)).sum()


def predict(t, likelihood):
    out = udn_kernels.depth_mixture_predict(t["hidden"], t["weight"], t["bias"], t["log_weights"],
                                            likelihood=likelihood, noise_std=t.get("noise_std"))
    out = torch.cat(out, 1) if isinstance(out, tuple) else out
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum()


def _grads(fn, tensors, trainable, backend):
    leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in tensors.items()}
    with udn_kernels.backend(backend):
        loss = fn(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in trainable])
    return dict(zip(trainable, grads))


def _subsets(names):
    """Trainable subsets: all non-empty ones (cpu, reference), else each input frozen / alone."""
    if not interpreted():
        return [s for r in range(1, len(names)) for s in itertools.combinations(names, r)]
    return [tuple(n for n in names if n != frozen) for frozen in names] + [(n,) for n in names]


def _check_frozen_combinations(fn, tensors, names, backend):
    everything = _grads(fn, tensors, names, backend)
    for trainable in _subsets(names):
        got = _grads(fn, tensors, trainable, backend)
        for name in trainable:
            torch.testing.assert_close(got[name], everything[name], **TOL,
                                       msg=lambda m: f"d_{name} with only {trainable} trainable: {m}")


def _differentiable(tensors, likelihood):
    return [k for k in tensors if k != "target" or likelihood == "gaussian"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", C_VALUES)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("per_depth", [False, True], ids=["shared", "per_depth"])
@pytest.mark.parametrize("reduction", ["mean", "none"], ids=["fused", "separate"])
@pytest.mark.parametrize("mode", ["expected", "mixture"])
def test_nll_frozen_inputs_leave_other_gradients_unchanged(mode, reduction, per_depth, likelihood, C, backend):
    tensors = _inputs(per_depth, likelihood == "gaussian", C)
    _check_frozen_combinations(lambda t: depth_nll(t, mode, reduction, likelihood), tensors,
                               _differentiable(tensors, likelihood), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("per_depth", [False, True], ids=["shared", "per_depth"])
def test_predict_frozen_inputs_leave_other_gradients_unchanged(per_depth, likelihood, backend):
    tensors = _inputs(per_depth, likelihood == "gaussian", C_VALUES[-1])
    del tensors["target"]
    _check_frozen_combinations(lambda t: predict(t, likelihood), tensors, list(tensors), backend)


GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}


def _gemm_count(fn, tensors, trainable, backend):
    """GEMM calls of one forward + backward, as the profiler records them (one thread, so every
    ATen call of the kernels runs on the profiled thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autograd.profiler.profile() as prof:
            _grads(fn, tensors, trainable, backend)
    finally:
        torch.set_num_threads(previous)
    return sum(e.name in GEMMS for e in prof.function_events)


if not interpreted():
    # (path, backend) -> (d_weight GEMMs, d_hidden GEMMs) at L = 2, C = 600, N * L <= 256 rows. C++
    # class-tiled pass: one row group, 2 class tiles, one GEMM of each per tile (the
    # per-depth head: per depth); reference and predict's torch backward: one of each per depth.
    EXPECTED_SKIPS = {("nll", "cpu", False): (2, 2), ("nll", "cpu", True): (4, 4),
                      ("nll", "reference", False): (L, L), ("nll", "reference", True): (L, L),
                      ("predict", "cpu", False): (L, L), ("predict", "cpu", True): (L, L)}

    # predict's backward is the same torch code on every backend: counted once (cpu)
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared", "per_depth"])
    @pytest.mark.parametrize("backend, case", [(backend, case) for backend in ("cpu", "reference")
                                               for case in ("nll-mean-expected", "nll-mean-mixture",
                                                            "nll-none-expected", "predict")
                                               if backend == "cpu" or case != "predict"])
    def test_frozen_head_or_hidden_issues_no_gemm_for_it(backend, case, per_depth):
        tensors = _inputs(per_depth, False, 600)
        if case == "predict":
            del tensors["target"]
            fn, kind = (lambda t: predict(t, "categorical")), "predict"
        else:
            _, reduction, mode = case.split("-")
            fn, kind = (lambda t: depth_nll(t, mode, reduction, "categorical")), "nll"
        skip_weight, skip_hidden = EXPECTED_SKIPS[(kind, backend, per_depth)]
        everything = _gemm_count(fn, tensors, ("hidden", "weight", "bias", "log_weights"), backend)
        assert everything > skip_weight + skip_hidden
        frozen_head = _gemm_count(fn, tensors, ("hidden", "bias", "log_weights"), backend)
        frozen_hidden = _gemm_count(fn, tensors, ("weight", "bias", "log_weights"), backend)
        bias_only = _gemm_count(fn, tensors, ("bias", "log_weights"), backend)
        assert everything - frozen_head == skip_weight
        assert everything - frozen_hidden == skip_hidden
        assert everything - bias_only == skip_weight + skip_hidden
