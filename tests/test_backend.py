"""Backend selection and the C++ extension itself."""
import os
import subprocess
import sys

import pytest
import torch

import udn_kernels
from udn_kernels import _backend


def test_extension_is_built_and_loaded():
    # CI must exercise the C++ kernels, not silently fall back to the reference.
    assert udn_kernels.available_backends() == {"reference": True, "cpu": True, "triton": True}
    info = dict(line.split("=", 1) for line in torch.ops.udn_kernels_C.build_info().splitlines())
    assert info["isa"] in ("avx2", "avx512", "generic") and info["philox"] in ("avx512", "avx2", "scalar")


def test_cpu_tensors_default_to_cpu_backend():
    assert _backend.resolve(torch.device("cpu")) == "cpu"


def test_backend_context_manager_forces_and_restores():
    with udn_kernels.backend("reference"):
        assert _backend.resolve(torch.device("cpu")) == "reference"
        with udn_kernels.backend("cpu"):
            assert _backend.resolve(torch.device("cpu")) == "cpu"
        assert _backend.resolve(torch.device("cpu")) == "reference"
    assert _backend.resolve(torch.device("cpu")) == "cpu"


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend: expected one of"):
        with udn_kernels.backend("cuda"):
            pass


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("UDN_KERNELS_BACKEND", "reference")
    assert _backend.resolve(torch.device("cpu")) == "reference"


@pytest.mark.skipif(_backend.triton_interpreted(), reason="this process runs the Triton interpreter")
def test_triton_on_cpu_tensors_needs_the_interpreter():
    with udn_kernels.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            _backend.resolve(torch.device("cpu"))


def _without_strict_mode() -> dict:
    return {k: v for k, v in os.environ.items() if k != "UDN_KERNELS_STRICT"}


def test_missing_kernel_falls_back_to_reference_with_one_warning():
    script = (
        "import warnings, torch, udn_kernels\n"
        "from udn_kernels import _backend, reference\n"
        "reference.KERNELS['_probe'] = lambda: 'ref'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = _backend.resolve(torch.device('cpu'), 'philox_normal', '_probe')\n"
        "    b = _backend.resolve(torch.device('cpu'), '_probe')\n"
        "print(a, b, _backend.kernel(a, '_probe')(), sum('no cpu kernel' in str(x.message) for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=_without_strict_mode())
    assert out.stdout.split() == ["reference", "reference", "ref", "1"]


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.delenv("UDN_KERNELS_STRICT", raising=False)
    device = torch.device("cpu")
    with udn_kernels.backend(strict=True):
        assert _backend.resolve(device, "philox_normal") == "cpu"  # nothing to fall back from
        with pytest.raises(_backend.FallbackError, match="no cpu kernel for '_missing'.*strict"):
            _backend.resolve(device, "_missing")
        with udn_kernels.backend("reference"):  # a nested block keeps strict mode
            assert _backend.strict()
    assert not _backend.strict()
    monkeypatch.setenv("UDN_KERNELS_STRICT", "1")
    with pytest.raises(_backend.FallbackError):
        _backend.resolve(device, "_missing")


def test_strict_mode_raises_without_the_extension():
    # A process where importing udn_kernels._C fails: one warning by default, an error in strict mode.
    script = (
        "import sys, warnings, torch\n"
        "sys.modules['udn_kernels._C'] = sys.modules['udn_kernels._C_avx2'] = None\n"
        "sys.modules['udn_kernels._C_avx512'] = None\n"
        "import udn_kernels\n"
        "x = torch.randn(3, 4)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    udn_kernels.bernoulli_linear(x, torch.randn(2, 4), seed=1)\n"
        "    udn_kernels.bernoulli_linear(x, torch.randn(2, 4), seed=1)\n"
        "print(sum('not built' in str(m.message) for m in w))\n"
        "try:\n"
        "    with udn_kernels.backend(strict=True):\n"
        "        udn_kernels.bernoulli_linear(x, torch.randn(2, 4), seed=1)\n"
        "except udn_kernels.FallbackError as exc:\n"
        "    print('raised', 'strict mode' in str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=_without_strict_mode())
    assert out.stdout.split() == ["1", "raised", "True"]


def test_cuda_without_triton_warns_once():
    script = (
        "import sys, warnings, torch\n"
        "sys.modules['triton'] = None\n"
        "from udn_kernels import _backend\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    names = [_backend.resolve(torch.device('cuda'), 'philox_normal') for _ in range(3)]\n"
        "print(*names, sum('Triton is not installed' in str(m.message) for m in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=_without_strict_mode())
    assert out.stdout.split() == ["reference"] * 3 + ["1"]


def _kernel_ops_in(profile) -> set[str]:
    return {e.name for e in profile.function_events if e.name.startswith(("udn_kernels_C::", "udn_kernels_triton::"))}


def _public_calls():
    """One loss per op family (heads: separate and fused paths, predict; gaussian; bernoulli)."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 5, requires_grad=True)
    weight = torch.randn(4, 5, requires_grad=True)
    target = torch.randint(0, 4, (9,))
    log_weights = torch.log_softmax(torch.randn(3), 0).requires_grad_()
    x = torch.randn(6, 5, requires_grad=True)
    mu, sigma = torch.randn(4, 5, requires_grad=True), torch.rand(4, 5).requires_grad_()
    return {
        "heads-none": lambda: udn_kernels.depth_mixture_nll(hidden, weight, None, target, log_weights,
                                                            reduction="none").sum(),
        "heads-fused": lambda: udn_kernels.depth_mixture_nll(hidden, weight, None, target, log_weights,
                                                             mode="mixture"),
        "predict": lambda: udn_kernels.depth_mixture_predict(hidden, weight, None, log_weights).square().sum(),
        "gaussian": lambda: udn_kernels.gaussian_linear(x, mu, sigma, seed=3).sum(),
        "bernoulli": lambda: udn_kernels.bernoulli_linear(x, weight, seed=3).sum(),
    }


@pytest.mark.parametrize("case", list(_public_calls()))
def test_backward_runs_on_the_backend_the_forward_chose(case):
    loss_of = _public_calls()[case]
    with torch.autograd.profiler.profile() as cpu_run:
        loss_of().backward()
    assert _kernel_ops_in(cpu_run), "the default CPU run should call the C++ kernels"
    with udn_kernels.backend("reference"):
        loss = loss_of()
    with torch.autograd.profiler.profile() as backward_outside:
        loss.backward()  # outside the block: must still be the reference backward
    assert _kernel_ops_in(backward_outside) == set()
    with torch.autograd.profiler.profile() as forward_inside:
        with udn_kernels.backend("reference"):
            loss = loss_of()
    assert _kernel_ops_in(forward_inside) == set()
    if case not in ("heads-fused", "predict"):  # these two have no backward kernel (fused / torch recompute)
        loss = loss_of()  # the other way round: a C++ forward keeps its C++ backward
        with udn_kernels.backend("reference"), torch.autograd.profiler.profile() as backward_in_block:
            loss.backward()
        assert _kernel_ops_in(backward_in_block)
