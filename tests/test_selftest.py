"""`udn selftest`: the CPU fast run passes and writes JSON; a broken kernel makes it fail."""
import json
import math
import subprocess
import sys

import pytest
import torch

from udn_kernels import _backend, _checks, selftest


def test_selftest_cpu_fast_passes_and_writes_json(tmp_path):
    path = tmp_path / "selftest.json"
    out = subprocess.run([sys.executable, "-m", "udn_kernels", "selftest", "--device", "cpu", "--json", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(path.read_text())
    assert data["passed"] and data["meta"]["mode"] == "fast"
    names = [c["name"] for c in data["checks"]]
    for op in ("philox normal", "depth_loglik", "depth_mixture_nll", "depth_mixture_predict", "gaussian_linear",
               "bernoulli_linear", "gaussian_kl", "log_uniform_kl", "compile(aot_eager) depth_mixture_nll"):
        assert any(name.startswith(op) for name in names), op
    assert all(c["passed"] and c["error"] <= c["tolerance"] for c in data["checks"])
    assert f"{len(names)}/{len(names)} checks passed" in out.stdout


def test_selftest_fails_on_a_broken_kernel(monkeypatch):
    kernel_of = _backend.kernel

    def broken(backend, name):
        kernel = kernel_of(backend, name)
        if backend == "reference" or name not in ("depth_loglik_fwd", "philox_uniform"):
            return kernel

        def off_by_a_little(*args):
            out = kernel(*args)
            return (out[0] * 1.001, *out[1:]) if isinstance(out, tuple) else torch.nextafter(out, out + 1)
        return off_by_a_little

    monkeypatch.setattr(_backend, "kernel", broken)
    case = next(c for c in selftest.op_cases() if c.op == "depth_loglik")
    heads = selftest.check_op(case, torch.float32, torch.device("cpu"))
    assert f"{case.op} {case.variant} float32 forward" in {c.name for c in heads if not c.passed}
    philox = [c for c in selftest.check_philox(torch.device("cpu")) if "uniform" in c.name]
    assert philox and not any(c.passed for c in philox)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_checks_follow_the_accuracy_contract(dtype, monkeypatch):
    """A 16-bit result may be off the float64 reference by eager PyTorch's error in that dtype plus
    EAGER_SLACK (8 units of roundoff): a kernel 2 units off eager passes, one 32 units off fails.
    The "kernel" here is the reference kernel in the 16-bit dtype with its log-likelihoods scaled
    by ``1 + delta`` in float64 (so the only difference from eager is ``delta`` and one rounding);
    the ops are opened to 16-bit CPU tensors as the CPU bf16/fp16 work will open them."""
    monkeypatch.setattr(_checks, "CPU_FLOAT_DTYPES", _checks.CPU_FLOAT_DTYPES + _checks.HALF_DTYPES)
    kernel_of = _backend.kernel
    unit = selftest.EAGER_SLACK[dtype] / 8
    case = next(c for c in selftest.op_cases() if c.op == "depth_loglik")

    def run(delta):
        def kernel(backend, name):
            reference = kernel_of("reference", name)
            if backend == "reference" or name != "depth_loglik_fwd":
                return reference

            def scaled(*args):
                loglik, aux = reference(*args)
                return (loglik.double() * (1 + delta)).to(loglik.dtype), aux
            return scaled
        monkeypatch.setattr(_backend, "kernel", kernel)
        return {c.name: c for c in selftest.check_op(case, dtype, torch.device("cpu"))}

    exact = run(0.0)
    assert len(exact) == 5 and all(c.passed for c in exact.values())  # forward, 4 gradients (one unused)
    for check in exact.values():  # got == eager: the tolerance is its error plus the slack
        assert check.tolerance == pytest.approx(check.error + selftest.EAGER_SLACK[dtype], rel=1e-12)
    forward = f"{case.op} {case.variant} {str(dtype).replace('torch.', '')} forward"
    assert run(2 * unit)[forward].passed
    assert not run(32 * unit)[forward].passed


def test_eager_tolerance_without_a_finite_eager_error():
    assert selftest.eager_tolerance(math.inf, torch.float16) == selftest.EAGER_SLACK[torch.float16]
    assert selftest.eager_tolerance(1e-3, torch.bfloat16) == 1e-3 + selftest.EAGER_SLACK[torch.bfloat16]
