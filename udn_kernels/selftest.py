"""`udn selftest`: every op on one device against the reference backend (docs/building.md).

Each check runs an op on the device's own backend (C++ on CPU, Triton on CUDA) and again on the
reference backend in float64 (forward and backward both inside ``backend("reference")``), and
compares the output and the gradient of every floating input: float32 / float64 within a fixed
tolerance, bfloat16 / float16 by the accuracy contract (no worse than eager PyTorch in the same
dtype plus a few units of roundoff, ``EAGER_SLACK``). The depth-mixture NLL runs with
every reduction, since "mean"/"sum" take the fused gradient-in-forward path and "none" the
separate one. The Philox stream is compared bit for bit (normals within the 4e-6 contract).
Each op is also run under ``torch.compile(fullgraph=True)``: with the default backend in full
mode, with ``aot_eager`` in fast mode (it traces the same whole graph through the ops' fake
kernels, without the minutes of C++ code generation inductor takes on a small CPU).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import torch

import udn_kernels
from . import rng
from ._checks import float_dtypes_for
from .reference import philox as ref_philox

L, N, D, C = 3, 17, 12, 10  # heads: depths, rows, hidden width, classes (N odd: ragged tiles)
B, K, OUT, S = 6, 9, 7, 2   # stochastic linear: batch, in, out features, samples
SEED = 1234
NORMAL_TOL = 4e-6  # the stream contract for normals (docs/rng.md)
# Errors are max |got - want| / max(1, max |want|) against the reference backend in float64.
# float32 / float64 inputs: a fixed tolerance. Noise is drawn in float32 on every path, so float64
# outputs of the Gaussian layers carry the normals' 4e-6 contract: float64 gets 1e-5, not machine
# precision.
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}
# 16-bit inputs: the accuracy contract (Cut Cross-Entropy's rule). The error may be at most that of
# eager PyTorch in the same dtype (the reference backend run on the same 16-bit inputs) plus 8 units
# of roundoff of the dtype: the kernels accumulate in float32 and round their outputs, eager rounds
# its intermediates too, so a kernel usually beats eager; the slack absorbs a few differently
# rounded steps (e.g. ``d_logits`` rounded to the input dtype before the gradient GEMMs).
EAGER_SLACK = {torch.bfloat16: 8 * 2.0**-8, torch.float16: 8 * 2.0**-11}


@dataclasses.dataclass
class Check:
    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclasses.dataclass
class OpCase:
    """One op call: ``call(**tensors)`` on the named tensors ``make(dtype, device)`` returns;
    every floating tensor is differentiated."""
    op: str
    variant: str
    make: Callable[[torch.dtype, torch.device], dict[str, torch.Tensor]]
    call: Callable[..., torch.Tensor | tuple]


def _randn(*shape, dtype, device, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


def _heads_inputs(gaussian: bool, per_depth: bool):
    def make(dtype, device):
        g = torch.Generator().manual_seed(SEED)
        hidden = _randn(L, N, D, dtype=dtype, device=device, generator=g)
        weight = _randn(*((L, C, D) if per_depth else (C, D)), dtype=dtype, device=device, generator=g) * 0.5
        bias = _randn(C, dtype=dtype, device=device, generator=g)
        log_weights = torch.log_softmax(_randn(L, dtype=torch.float64, device="cpu", generator=g), 0)
        log_weights = log_weights.to(device=device, dtype=dtype)
        if gaussian:
            target = _randn(N, C, dtype=dtype, device=device, generator=g)
            noise_std = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
        else:
            target = torch.randint(0, C, (N,), generator=g).to(device)
            target[3] = -100  # an ignored row
            noise_std = None
        return {"hidden": hidden, "weight": weight, "bias": bias, "target": target, "log_weights": log_weights,
                "noise_std": noise_std}
    return make


def _heads_cases() -> list[OpCase]:
    cases = []
    for gaussian in (False, True):
        kind = "gaussian" if gaussian else "categorical"
        for per_depth in (False, True):
            cases.append(OpCase("depth_loglik", f"{kind} {'per-depth' if per_depth else 'shared'} head",
                                _heads_inputs(gaussian, per_depth),
                                lambda hidden, weight, bias, target, log_weights, noise_std, _kind=kind:
                                udn_kernels.depth_loglik(hidden, weight, bias, target, likelihood=_kind,
                                                         noise_std=noise_std)))
        for mode in ("expected", "mixture"):
            for reduction in ("mean", "sum", "none"):
                cases.append(OpCase("depth_mixture_nll", f"{kind} {mode} {reduction}",
                                    _heads_inputs(gaussian, per_depth=False),
                                    lambda hidden, weight, bias, target, log_weights, noise_std, _kind=kind,
                                    _mode=mode, _reduction=reduction: udn_kernels.depth_mixture_nll(
                                        hidden, weight, bias, target, log_weights, mode=_mode,
                                        reduction=_reduction, likelihood=_kind, noise_std=noise_std)))
        cases.append(OpCase("depth_mixture_predict", kind, _heads_inputs(gaussian, per_depth=False),
                            lambda hidden, weight, bias, target, log_weights, noise_std, _kind=kind:
                            udn_kernels.depth_mixture_predict(hidden, weight, bias, log_weights,
                                                              likelihood=_kind, noise_std=noise_std)))
    return cases


def _linear_inputs(with_sigma: bool):
    def make(dtype, device):
        g = torch.Generator().manual_seed(SEED)
        x = _randn(B, K, dtype=dtype, device=device, generator=g)
        weight = _randn(OUT, K, dtype=dtype, device=device, generator=g) * 0.3
        bias = _randn(OUT, dtype=dtype, device=device, generator=g)
        if not with_sigma:
            return {"x": x, "weight": weight, "bias": bias}
        # Positive standard deviations; with sigma_transform="softplus" they are read as rho.
        sigma = (torch.rand(OUT, K, generator=g, dtype=torch.float64) * 0.2 + 0.05).to(device=device, dtype=dtype)
        bias_sigma = (torch.rand(OUT, generator=g, dtype=torch.float64) * 0.2 + 0.05).to(device=device, dtype=dtype)
        return {"x": x, "weight_mu": weight, "weight_sigma": sigma, "bias_mu": bias, "bias_sigma": bias_sigma}
    return make


def _linear_cases() -> list[OpCase]:
    cases = []
    for estimator in ("sample", "local", "flipout"):
        for samples in (None, S):
            for transform in (None, "softplus"):
                cases.append(OpCase(
                    "gaussian_linear", f"{estimator} samples={samples} sigma_transform={transform}",
                    _linear_inputs(with_sigma=True),
                    lambda x, weight_mu, weight_sigma, bias_mu, bias_sigma, _e=estimator, _s=samples, _t=transform:
                    udn_kernels.gaussian_linear(x, weight_mu, weight_sigma, bias_mu, bias_sigma, estimator=_e,
                                                samples=_s, seed=SEED, sigma_transform=_t)))
    for mask in ("input", "weight", "symmetric"):
        for samples in (None, S):
            cases.append(OpCase(
                "bernoulli_linear", f"{mask} samples={samples}", _linear_inputs(with_sigma=False),
                lambda x, weight, bias, _m=mask, _s=samples:
                udn_kernels.bernoulli_linear(x, weight, bias, p=0.3, mask=_m, samples=_s, seed=SEED)))
    return cases


def _kl_cases() -> list[OpCase]:
    def make(dtype, device):
        g = torch.Generator().manual_seed(SEED)
        mu = _randn(OUT, K, dtype=dtype, device=device, generator=g)
        sigma = (torch.rand(OUT, K, generator=g, dtype=torch.float64) + 0.1).to(device=device, dtype=dtype)
        return {"mu": mu, "sigma": sigma}
    return [OpCase("gaussian_kl", "mu", make, lambda mu, sigma: udn_kernels.gaussian_kl(mu, sigma, 0.7)),
            OpCase("gaussian_kl", "mu=None", lambda dtype, device: {"sigma": make(dtype, device)["sigma"]},
                   lambda sigma: udn_kernels.gaussian_kl(None, sigma, 0.7)),
            OpCase("log_uniform_kl", "", lambda dtype, device: {"log_alpha": make(dtype, device)["mu"]},
                   lambda log_alpha: udn_kernels.log_uniform_kl(log_alpha))]


def op_cases() -> list[OpCase]:
    """Every op call the selftest checks."""
    return _heads_cases() + _linear_cases() + _kl_cases()


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(t.is_floating_point())


def _forward_backward(tensors: dict[str, torch.Tensor | None], call: Callable):
    """Outputs and the gradients of every floating input (by name), for a fixed pseudo-random
    cotangent."""
    leaves = {name: _leaf(t) for name, t in tensors.items()}
    outputs = _as_tuple(call(**leaves))
    g = torch.Generator().manual_seed(SEED + 1)
    loss = sum((out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum() for out in outputs)
    differentiable = {name: t for name, t in leaves.items() if t is not None and t.requires_grad}
    grads = torch.autograd.grad(loss, list(differentiable.values()), allow_unused=True)
    grads = {name: torch.zeros_like(t) if d is None else d for (name, t), d in zip(differentiable.items(), grads)}
    return [o.detach() for o in outputs], grads


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def _errors(got, want) -> list[tuple[str, float]]:
    """``(name, error)`` of each output and gradient of ``got`` against ``want``: (outputs,
    {input name: gradient}) pairs."""
    (outputs, grads), (want_outputs, want_grads) = got, want
    names = ["forward" + (f"[{i}]" if len(outputs) > 1 else "") for i in range(len(outputs))]
    pairs = list(zip(outputs, want_outputs)) + [(grads[name], want_grads[name]) for name in grads]
    names += [f"grad {name}" for name in grads]
    return [(name, _error(a, b)) for name, (a, b) in zip(names, pairs)]


def _compare(label: str, tolerance: float, got, want) -> list[Check]:
    return [Check(f"{label} {name}", error, tolerance) for name, error in _errors(got, want)]


def eager_tolerance(eager_error: float, dtype: torch.dtype) -> float:
    """A 16-bit result's tolerance: eager PyTorch's error in ``dtype`` plus ``EAGER_SLACK``
    (the slack alone where eager overflows)."""
    return (eager_error if math.isfinite(eager_error) else 0.0) + EAGER_SLACK[dtype]


def check_op(case: OpCase, dtype: torch.dtype, device: torch.device) -> list[Check]:
    """Forward and every gradient of ``case`` on ``device`` against float64 reference; 16-bit
    dtypes by the accuracy contract (``EAGER_SLACK``)."""
    tensors = case.make(dtype, device)
    got = _forward_backward(tensors, case.call)
    with udn_kernels.backend("reference"):
        want = _forward_backward({name: t.double() if t is not None and t.is_floating_point() else t
                                  for name, t in tensors.items()}, case.call)
        eager = _forward_backward(tensors, case.call) if dtype in EAGER_SLACK else None
    label = f"{case.op} {case.variant} {str(dtype).replace('torch.', '')}".replace("  ", " ")
    if eager is None:
        return _compare(label, TOLERANCE[dtype], got, want)
    eager_errors = dict(_errors(eager, want))
    return [Check(f"{label} {name}", error, eager_tolerance(eager_errors[name], dtype))
            for name, error in _errors(got, want)]


def check_compiled(case: OpCase, device: torch.device, compile_backend: str) -> list[Check]:
    """``torch.compile(fullgraph=True)`` of ``case`` (float32) against the eager call."""
    tensors = case.make(torch.float32, device)
    torch._dynamo.reset()
    compiled = torch.compile(case.call, fullgraph=True, backend=compile_backend)
    label = f"compile({compile_backend}) {case.op} {case.variant}".strip()
    return _compare(label, TOLERANCE[torch.float32], _forward_backward(tensors, compiled),
                    _forward_backward(tensors, case.call))


def check_philox(device: torch.device) -> list[Check]:
    """The device's Philox fills against the reference stream: words, uniforms and Bernoulli
    draws bit for bit (error 0 or 1), normals within 4e-6."""
    n, checks = 1000, []
    for seed, offset in ((0, 0), (2**32 + 5, 2**32 - 3), (2**63 - 1, 2**40 + 7)):  # 2^32 - 3: low-word wrap
        streams = (("uint32", rng.random_uint32, ref_philox.random_uint32, 0.0),
                   ("uniform", rng.uniform, ref_philox.uniform, 0.0),
                   ("normal", rng.normal, ref_philox.normal, NORMAL_TOL))
        for kind, fill, reference, tolerance in streams:
            got, want = fill(n, seed, offset, device=device).cpu(), reference(n, seed, offset)
            error = _error(got, want) if tolerance else float(not torch.equal(got, want))
            checks.append(Check(f"philox {kind} seed={seed} offset={offset}", error, tolerance))
        got = rng.bernoulli(n, 0.3, seed, offset, device=device).cpu()
        checks.append(Check(f"philox bernoulli seed={seed} offset={offset}",
                            float(not torch.equal(got, ref_philox.bernoulli(n, 0.3, seed, offset))), 0.0))
    return checks


def run(device: str = "cpu", fast: bool = True, progress: Callable[[Check], None] = lambda check: None) -> list[Check]:
    """All checks on ``device``. ``fast`` compiles one call per op with ``aot_eager``; the full
    run compiles every call with the default backend."""
    device = torch.device(device)
    checks: list[Check] = []

    def record(new: list[Check]):
        for check in new:
            progress(check)
        checks.extend(new)

    record(check_philox(device))
    cases = op_cases()
    for case in cases:
        for dtype in float_dtypes_for(device):
            record(check_op(case, dtype, device))
    compile_backend = "aot_eager" if fast else "inductor"
    first_of_each_op = list({case.op: case for case in reversed(cases)}.values())[::-1]
    for case in first_of_each_op if fast else cases:
        record(check_compiled(case, device, compile_backend))
    return checks


def format_row(check: Check) -> str:
    return f"{check.name:<84}{check.error:>11.2e}{check.tolerance:>10.1e}  {'ok' if check.passed else 'FAIL'}"


def to_json(checks: list[Check], path: str, meta: dict, bench: list[dict] | None = None) -> None:
    payload = {"meta": meta, "passed": all(c.passed for c in checks),
               "checks": [{**dataclasses.asdict(c), "passed": c.passed} for c in checks], "bench": bench}
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)


def _device_ms(method, device: torch.device, repeats: int) -> float:
    """Forward + backward time of a bench method in ms: CUDA events around ``repeats`` steps on
    CUDA, the harness's synchronised median on CPU."""
    from .bench import harness
    if device.type != "cuda":
        return harness.time_method(method, repeats=repeats).total_ms
    leaves = harness._leaves(method.forward()) if method.backward else []

    def step():
        harness._clear_grads(leaves)
        out = harness._first_tensor(method.forward())
        if method.backward:
            out.sum().backward()

    for _ in range(2):  # warm-up: compilation and autotuning
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def run_bench(device: str, repeats: int = 5) -> list[dict]:
    """The quick benchmark (every case of ``udn_kernels.bench``): device time of each method and,
    on CUDA, its peak device memory beyond the inputs (``torch.cuda.max_memory_allocated``)."""
    from .bench import cases, harness
    device = torch.device(device)
    rows = []
    for name in cases.CASES:
        for method in cases.build(name, quick=True, device=str(device)):
            peak = harness.measure_peak_cuda(method) if device.type == "cuda" else None
            rows.append({"case": name, "method": method.name, "role": method.role,
                         "total_ms": _device_ms(method, device, repeats), "peak_mb": peak})
            print(f"{name:<14}{method.name:<28}{rows[-1]['total_ms']:>10.3f} ms"
                  + (f"{peak:>10.1f} MB" if peak is not None else ""), flush=True)
    return rows
