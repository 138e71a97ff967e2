"""`udn selftest`: the CPU fast run passes and writes JSON; a broken kernel makes it fail."""
import json
import subprocess
import sys

import torch

from udn_kernels import _backend, selftest


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
