"""Build flags per target (udn_kernels/_build_targets.py), the aarch64 cross-compile of csrc/, and
the portable x86-64 module against the AVX2 and AVX-512 ones (docs/building.md)."""
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from udn_kernels import _build_targets as bt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS_CXX = "aarch64-linux-gnu-g++"
X86_ONLY = ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2")
AVX512_ONLY = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512")


def names_and_flags(variants):
    return {v.name: v.compile_args for v in variants}


def test_x86_64_builds_a_portable_an_avx2_and_an_avx512_module():
    variants = names_and_flags(bt.extension_variants(bt.Target("x86_64", "linux")))
    assert set(variants) == {"udn_kernels._C", "udn_kernels._C_avx2", "udn_kernels._C_avx512"}
    assert not set(X86_ONLY + AVX512_ONLY) & set(variants["udn_kernels._C"])
    assert set(X86_ONLY) <= set(variants["udn_kernels._C_avx2"])
    assert not set(AVX512_ONLY) & set(variants["udn_kernels._C_avx2"])
    assert set(AVX512_ONLY) <= set(variants["udn_kernels._C_avx512"])
    assert all("-fopenmp" in flags for flags in variants.values())


@pytest.mark.parametrize("target", [bt.Target("aarch64", "linux"), bt.Target("arm64", "darwin")])
def test_arm_builds_one_portable_module_without_x86_flags(target):
    (variant,) = bt.extension_variants(target)
    assert variant.name == "udn_kernels._C"
    assert not set(X86_ONLY + AVX512_ONLY) & set(variant.compile_args)
    assert not any(flag.startswith(("-m", "-march")) for flag in variant.compile_args)


def test_macos_uses_openmp_only_when_a_runtime_is_found(tmp_path):
    mac = bt.Target("arm64", "darwin")
    (without,) = bt.extension_variants(mac, macos_openmp_prefix=None)
    assert not any("openmp" in flag for flag in without.compile_args + without.link_args)
    (tmp_path / "include").mkdir()
    (tmp_path / "lib").mkdir()
    assert bt.find_macos_openmp([str(tmp_path)]) is None
    (tmp_path / "include" / "omp.h").write_text("")
    (tmp_path / "lib" / "libomp.dylib").write_text("")
    prefix = bt.find_macos_openmp([str(tmp_path)])
    assert prefix == str(tmp_path)
    (found,) = bt.extension_variants(mac, macos_openmp_prefix=prefix)
    assert found.compile_args[found.compile_args.index("-Xpreprocessor") + 1] == "-fopenmp"
    assert "-fopenmp" not in found.link_args and "-lomp" in found.link_args


def test_native_builds_one_module_for_the_host():
    (x86,) = bt.extension_variants(bt.Target("x86_64", "linux"), native=True, host_avx2=True)
    assert x86.name == "udn_kernels._C_avx2" and "-march=native" in x86.compile_args
    (old_x86,) = bt.extension_variants(bt.Target("x86_64", "linux"), native=True, host_avx2=False)
    assert old_x86.name == "udn_kernels._C" and "-DCPU_CAPABILITY_AVX2" not in old_x86.compile_args
    (arm,) = bt.extension_variants(bt.Target("aarch64", "linux"), native=True)
    assert arm.name == "udn_kernels._C" and "-mcpu=native" in arm.compile_args


# CI installs the cross compiler (README's test command), so there a missing one is a failure.
@pytest.mark.skipif(shutil.which(CROSS_CXX) is None and os.environ.get("CI") != "true",
                    reason=f"{CROSS_CXX} not installed (apt-get install -y g++-aarch64-linux-gnu)")
def test_csrc_cross_compiles_for_aarch64_with_the_flags_setup_py_chooses():
    target = bt.target_of(CROSS_CXX)
    assert target == bt.Target("aarch64", "linux")
    (variant,) = bt.extension_variants(target)
    # What torch's BuildExtension adds to every compile (setup.py adds UDN_BUILD_FLAGS).
    torch_defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                     f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                     "-DUDN_BUILD_FLAGS=" + json.dumps(" ".join(variant.compile_args))]
    includes = [f"-I{path}" for path in [*include_paths(), sysconfig.get_paths()["include"],
                                         os.path.join(ROOT, "csrc")]]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    assert sources
    for source in sources:
        result = subprocess.run([CROSS_CXX, *variant.compile_args, *torch_defines, *includes,
                                 "-fsyntax-only", "-w", source], capture_output=True, text=True)
        assert result.returncode == 0, f"{os.path.basename(source)}:\n{result.stderr[-4000:]}"


# Run in a subprocess per variant: both modules register torch.ops.udn_kernels_C, so one process
# can load only one of them.
NUMBERS_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import udn_kernels
    from udn_kernels import rng, selftest
    from udn_kernels._extension import extension_info

    failed = [c.name for c in selftest.check_philox(torch.device("cpu")) if not c.passed]
    for case in selftest.op_cases():
        if case.variant in ("categorical expected mean", "gaussian mixture none",
                            "local samples=2 sigma_transform=softplus", "weight samples=2"):
            failed += [c.name for c in selftest.check_op(case, torch.float32, torch.device("cpu"))
                       if not c.passed]
    numbers = {"uint32": rng.random_uint32(4099, 7, 2**32 - 5), "uniform": rng.uniform(4099, 7, 11),
               "normal": rng.normal(4099, 7, 13), "bernoulli": rng.bernoulli(4099, 0.3, 7, 3)}
    for case in selftest.op_cases():
        if case.variant in ("categorical expected mean", "local samples=2 sigma_transform=None",
                            "weight samples=2"):
            outputs, grads = selftest._forward_backward(case.make(torch.float32, "cpu"), case.call)
            numbers[case.op] = [*outputs, *grads.values()]
    torch.save({"module": extension_info()["module"], "failed": failed, "numbers": numbers}, sys.argv[1])
""")


def run_variant(tmp_path, no_avx2: bool, no_avx512: bool = True) -> dict:
    path = tmp_path / f"no_avx2_{int(no_avx2)}_no_avx512_{int(no_avx512)}.pt"
    env = {**os.environ, "UDN_KERNELS_NO_AVX2": "1" if no_avx2 else "0",
           "UDN_KERNELS_NO_AVX512": "1" if no_avx512 else "0"}
    result = subprocess.run([sys.executable, "-c", NUMBERS_SCRIPT, str(path)], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(path)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 module is x86-64 only")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="this CPU has no AVX2: only the portable module can run here")
def test_portable_x86_module_matches_reference_and_avx2_numbers(tmp_path):
    portable, avx2 = run_variant(tmp_path, no_avx2=True), run_variant(tmp_path, no_avx2=False)
    assert portable["module"] == "udn_kernels._C" and avx2["module"] == "udn_kernels._C_avx2"
    assert_same_numbers(portable, avx2)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX-512 module is x86-64 only")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="this CPU has no AVX-512: the AVX-512 module cannot run here")
def test_avx512_module_matches_reference_and_avx2_numbers(tmp_path):
    avx2, avx512 = run_variant(tmp_path, no_avx2=False), run_variant(tmp_path, no_avx2=False, no_avx512=False)
    assert avx2["module"] == "udn_kernels._C_avx2" and avx512["module"] == "udn_kernels._C_avx512"
    assert_same_numbers(avx2, avx512)


def assert_same_numbers(a, b):
    """Both modules pass the selftest cases and give the same rng stream and op results."""
    assert a["failed"] == [] and b["failed"] == []
    for kind in ("uint32", "uniform", "bernoulli"):  # the stream contract: bit for bit
        assert torch.equal(a["numbers"][kind], b["numbers"][kind]), kind
    torch.testing.assert_close(a["numbers"]["normal"], b["numbers"]["normal"], rtol=0, atol=4e-6)
    for op in ("depth_mixture_nll", "gaussian_linear", "bernoulli_linear"):
        for got, want in zip(a["numbers"][op], b["numbers"][op], strict=True):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=op)
