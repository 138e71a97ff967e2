"""Frozen inputs of gaussian_linear / bernoulli_linear: the backward kernels compute only the
gradients autograd asks for (their ``grad_mask``, from ``ctx.needs_input_grad``).

- Every combination of frozen inputs (``requires_grad=False``) gives the remaining gradients of the
  all-trainable call, on the cpu and reference backends and, re-run in the Triton CPU interpreter,
  on triton: to 1e-12 (float64) / 1e-5 (float32) of the gradient's largest entry. They are not
  bit-identical in general: with a frozen sigma, "sample"'s d_mu is one GEMM over the summed draws
  instead of the sum of the per-draw products of d_sigma.
- The skipped work is skipped: the C++ backward issues exactly the GEMMs of the gradients asked
  for (counted with the autograd profiler on one thread), and the mask reaches every backend's kernel.
- The backward's extra memory does not grow with the thread count (fresh subprocesses).
"""
import itertools
import json
import os
import subprocess
import sys

import pytest
from triton_interpreter import interpreted, rerun_under_interpreter

import torch

import udn_kernels
from udn_kernels import _backend, bernoulli_linear, gaussian_linear

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
GAUSSIAN_INPUTS = ("x", "weight_mu", "weight_sigma", "bias_mu", "bias_sigma")
BERNOULLI_INPUTS = ("x", "weight", "bias")
# (samples, input_has_samples)
SAMPLE_CONFIGS = [(None, False), (3, False), (3, True)]


def _gaussian_values(dtype, samples, input_has_samples, with_mu, B=5, K=19, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((samples,) if input_has_samples else ()), B, K, dtype=dtype, generator=g)
    mu = torch.randn(N, K, dtype=dtype, generator=g) if with_mu else None
    return [x, mu, torch.rand(N, K, dtype=dtype, generator=g) + 0.1, torch.randn(N, dtype=dtype, generator=g),
            torch.rand(N, dtype=dtype, generator=g) + 0.1]


def _bernoulli_values(dtype, samples, input_has_samples, B=5, K=19, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((samples,) if input_has_samples else ()), B, K, dtype=dtype, generator=g)
    return [x, torch.randn(N, K, dtype=dtype, generator=g), torch.randn(N, dtype=dtype, generator=g)]


def _grads(call, values, trainable, backend):
    """Gradients of a fixed weighting of ``call(*leaves)`` w.r.t. the leaves whose index is in ``trainable``."""
    leaves = [None if v is None else v.clone().requires_grad_(i in trainable) for i, v in enumerate(values)]
    with udn_kernels.backend(backend, strict=True):
        out = call(*leaves)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [leaves[i] for i in sorted(trainable)])
    return dict(zip(sorted(trainable), grads))


def _trainable_subsets(present, exhaustive):
    """Every proper non-empty subset of ``present``, or, not exhaustive (the reference's Python
    Philox and the Triton interpreter are slow), those with one input trainable or one frozen."""
    if exhaustive:
        return [s for r in range(1, len(present)) for s in itertools.combinations(present, r)]
    return sorted({(i,) for i in present} | {tuple(j for j in present if j != i) for i in present})


def _check_every_frozen_subset(call, values, names, backend, what):
    present = [i for i, v in enumerate(values) if v is not None]
    full = _grads(call, values, set(present), backend)
    for trainable in _trainable_subsets(present, exhaustive=backend == "cpu"):
        got = _grads(call, values, set(trainable), backend)
        for i in trainable:
            tol = TOL[values[i].dtype] * max(1.0, full[i].abs().max().item())
            err = (got[i] - full[i]).abs().max().item()
            assert err <= tol, f"{what}, trainable {[names[j] for j in trainable]}: d_{names[i]} off by {err}"


def _gaussian_call(estimator, samples, input_has_samples, sigma_transform):
    return lambda *t: gaussian_linear(*t, estimator=estimator, samples=samples, seed=11,
                                      input_has_samples=input_has_samples, sigma_transform=sigma_transform)


def _bernoulli_call(mask, samples, input_has_samples):
    return lambda *t: bernoulli_linear(*t, p=0.3, mask=mask, samples=samples, seed=11,
                                       input_has_samples=input_has_samples)


BACKENDS = ["triton"] if interpreted() else [b for b in ("cpu", "reference") if _backend.available_backends()[b]]
# The Triton kernels compute in float32: float64 inputs would test nothing more.
BACKEND_DTYPES = [(b, dtype) for b in BACKENDS for dtype in (torch.float64, torch.float32)
                  if not (b == "triton" and dtype == torch.float64)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
def test_gaussian_frozen_inputs_leave_the_other_gradients_unchanged(backend, dtype, estimator):
    configs = SAMPLE_CONFIGS if backend != "triton" else [(None, False), (3, True)]
    for (samples, sampled), with_mu, transform in itertools.product(configs, (True, False), (None, "softplus")):
        values = _gaussian_values(dtype, samples, sampled, with_mu)
        _check_every_frozen_subset(_gaussian_call(estimator, samples, sampled, transform), values, GAUSSIAN_INPUTS,
                                   backend, f"{estimator} samples={samples} sampled={sampled} mu={with_mu} "
                                            f"{transform}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
def test_bernoulli_frozen_inputs_leave_the_other_gradients_unchanged(backend, dtype, mask):
    for samples, sampled in SAMPLE_CONFIGS:
        values = _bernoulli_values(dtype, samples, sampled)
        _check_every_frozen_subset(_bernoulli_call(mask, samples, sampled), values, BERNOULLI_INPUTS, backend,
                                   f"{mask} samples={samples} sampled={sampled}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_mask_reaches_the_kernel(backend, monkeypatch):
    """The backward kernel is called with grad_mask = which inputs require grad, and returns empty
    tensors for the others."""
    kernels = _backend.kernels(backend)
    seen = []

    def recording(name):
        kernel = kernels.get(name)

        def record(*args):
            grads = kernel(*args)
            seen.append((list(args[-1]), [g.numel() > 0 for g in grads]))
            return grads
        return record

    for name in ("gaussian_linear_bwd", "bernoulli_linear_bwd"):
        monkeypatch.setitem(kernels, name, recording(name))
    gaussian = _gaussian_values(torch.float32, None, False, True)
    bernoulli = _bernoulli_values(torch.float32, None, False)
    for call, values in ((_gaussian_call("sample", None, False, None), gaussian),
                         (_gaussian_call("local", None, False, None), gaussian),
                         (_bernoulli_call("weight", None, False), bernoulli)):
        for trainable in ({0}, {1}, set(range(1, len(values)))):
            seen.clear()
            _grads(call, values, trainable, backend)
            mask = [i in trainable for i in range(len(values))]
            assert seen == [(mask, mask)]


if not interpreted():
    def test_triton_under_interpreter():
        pytest.importorskip("triton")
        rerun_under_interpreter(__file__)

    GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}

    def _backward_gemms(call, values, trainable):
        """GEMM calls of the backward alone, on one thread (the kernels' GEMMs then run on the
        calling thread, which the profiler records)."""
        leaves = [None if v is None else v.clone().requires_grad_(i in trainable) for i, v in enumerate(values)]
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with udn_kernels.backend("cpu", strict=True):
                loss = call(*leaves).sum()
                with torch.autograd.profiler.profile() as prof:
                    loss.backward()
        finally:
            torch.set_num_threads(previous)
        return sum(event.name in GEMMS for event in prof.function_events)

    @pytest.mark.skipif(not _backend.available_backends()["cpu"], reason="C++ extension not built")
    @pytest.mark.parametrize("case,expected", [
        # One weight block (N, K <= 256): per draw, G = g^T x (d_mu / d_sigma) and d_x = g W.
        (("sample", None), {"all": 2, "x frozen": 1, "weights frozen": 1, "sigma frozen": 2, "only bias": 0}),
        # sigma frozen: d_mu is the mean part's one GEMM, not one G per draw
        (("sample", 3), {"all": 6, "x frozen": 3, "weights frozen": 3, "sigma frozen": 4, "only bias": 0}),
        # local: var part (d_x, d_sigma) + mean part (d_x, d_mu)
        (("local", None), {"all": 4, "x frozen": 2, "weights frozen": 2, "sigma frozen": 3, "only bias": 0}),
        # flipout: noise part (G for d_sigma, d_x) + mean part (d_x, d_mu)
        (("flipout", None), {"all": 4, "x frozen": 2, "weights frozen": 2, "sigma frozen": 3, "only bias": 0}),
        (("input", None), {"all": 2, "x frozen": 1, "weights frozen": 1, "only bias": 0}),
        (("weight", 2), {"all": 4, "x frozen": 2, "weights frozen": 2, "only bias": 0}),
    ])
    def test_skipped_gradients_issue_no_gemm(case, expected):
        option, samples = case
        if option in ("sample", "local", "flipout"):
            values = _gaussian_values(torch.float32, samples, False, True, B=8, K=32, N=16)
            call = _gaussian_call(option, samples, False, None)
            groups = {"all": {0, 1, 2, 3, 4}, "x frozen": {1, 2, 3, 4}, "weights frozen": {0, 3, 4},
                      "sigma frozen": {0, 1, 3, 4}, "only bias": {3, 4}}
        else:
            values = _bernoulli_values(torch.float32, samples, False, B=8, K=32, N=16)
            call = _bernoulli_call(option, samples, False)
            groups = {"all": {0, 1, 2}, "x frozen": {1, 2}, "weights frozen": {0, 2}, "only bias": {2}}
        counts = {name: _backward_gemms(call, values, groups[name]) for name in expected}
        assert counts == expected

    PEAK_SCRIPT = r'''
import json, sys, torch
from udn_kernels import gaussian_linear
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 1024, generator=g, requires_grad=True)
mu = (torch.randn(1024, 1024, generator=g) / 32).requires_grad_()
sigma = (torch.rand(1024, 1024, generator=g) / 32).requires_grad_()

def step():
    x.grad = mu.grad = sigma.grad = None
    out = gaussian_linear(x, mu, sigma, seed=1).sum()
    return out

def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

step().backward()  # warm caches, MKL's buffers and the allocator
loss = step()
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # VmHWM := VmRSS
before = rss("VmRSS")
loss.backward()
print(json.dumps((rss("VmHWM") - before) / 1024))
'''

    def backward_peak_mb(threads: int) -> float:
        """Peak resident memory (MB) one gaussian_linear sample backward (B=256, K=N=1024, float32) adds, in
        a fresh process. glibc's mmap threshold is pinned at 128 KiB so every buffer of that size or more
        (gradients, scratch) is mapped on use and unmapped when freed: reuse of memory freed by the warm-up
        call cannot hide it."""
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(threads)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    @pytest.mark.skipif(not _backend.available_backends()["cpu"], reason="C++ extension not built")
    @pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs /proc/self/clear_refs (Linux)")
    def test_backward_peak_memory_does_not_grow_with_threads():
        one, eight = backward_peak_mb(1), backward_peak_mb(8)
        # The gradients alone are 9 MB (d_x 1 MB, d_mu and d_sigma 4 MB each).
        assert one >= 9
        assert eight <= 1.3 * one, f"1 thread: {one:.1f} MB, 8 threads: {eight:.1f} MB"


if __name__ == "__main__":
    for threads in (1, 2, 8, 16):
        print(f"{threads:2d} threads: {backward_peak_mb(threads):.1f} MB")
