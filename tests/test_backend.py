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
    assert torch.ops.udn_kernels_C.build_info() in ("avx2", "avx512", "generic")


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


def test_missing_kernel_falls_back_to_reference_with_one_warning():
    script = (
        "import warnings, torch, udn_kernels\n"
        "from udn_kernels import _backend, reference\n"
        "reference.KERNELS['_probe'] = lambda: 'ref'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = _backend.get_kernel('_probe', torch.device('cpu'))()\n"
        "    b = _backend.get_kernel('_probe', torch.device('cpu'))()\n"
        "print(a, b, sum('no cpu kernel' in str(x.message) for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ref", "ref", "1"]
