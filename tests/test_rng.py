"""The Philox stream (docs/rng.md): C++ and Triton backends against the reference, statistics, API."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import udn_kernels
from udn_kernels import rng
from udn_kernels.reference import philox as ref

SEEDS = [0, 1, 2**32 + 5, 2**63 - 1]
OFFSETS = [0, 12345, 2**32 - 3, 2**40]  # 2^32 - 3: the counter's low word wraps inside the output
NORMAL_TOL = 4e-6
N = 1000  # spans many 8/16-lane blocks plus a ragged tail

needs_cpp = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built")


def _reference(kind, n, seed, offset):
    if kind == "bernoulli":
        return ref.bernoulli(n, 0.3, seed, offset)
    return {"uint32": ref.random_uint32, "uniform": ref.uniform, "normal": ref.normal}[kind](n, seed, offset)


def _public(kind, n, seed, offset):
    if kind == "bernoulli":
        return rng.bernoulli(n, 0.3, seed, offset)
    return {"uint32": rng.random_uint32, "uniform": rng.uniform, "normal": rng.normal}[kind](n, seed, offset)


def _assert_stream_equal(kind, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if kind == "normal":
        torch.testing.assert_close(got, want, rtol=0, atol=NORMAL_TOL)
    else:
        assert torch.equal(got, want)


@needs_cpp
@pytest.mark.parametrize("kind", ["uint32", "uniform", "normal", "bernoulli"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_matches_reference(kind, seed, offset):
    with udn_kernels.backend("cpu"):
        got = _public(kind, N, seed, offset)
    _assert_stream_equal(kind, got, _reference(kind, N, seed, offset))


@needs_cpp
@pytest.mark.parametrize("start", [0, 5, 2**32 - 70001, 2**33 - 12])
def test_cpp_parallel_chunks_and_misaligned_starts(start):
    # Large enough for several parallel chunks; unaligned starts exercise every tail path.
    n = 70000 + 7
    for kind in ("uint32", "uniform", "normal"):
        with udn_kernels.backend("cpu"):
            got = _public(kind, n, 2**32 + 5, start)
        _assert_stream_equal(kind, got, _reference(kind, n, 2**32 + 5, start))


@needs_cpp
@pytest.mark.parametrize("start", [0, 1, 2, 3, 2**32 * 4 - 66, 2**63 - 130])
def test_cpp_normal_fills_of_any_alignment_and_length(start):
    # Normals come four per Philox counter, 64 per vector block: fills that start or end inside a
    # counter or a block (and the last blocks before a low-word wrap and 2^63) are computed whole
    # and clipped.
    for n in [*range(1, 10), 63, 64, 65, 127, 129]:
        with udn_kernels.backend("cpu"):
            got = rng.normal(n, 9, start)
        _assert_stream_equal("normal", got, ref.normal(n, 9, start))


@needs_cpp
def test_cpp_near_end_of_offset_space():
    offset = 2**63 - 100
    with udn_kernels.backend("cpu"):
        got = rng.random_uint32(100, 7, offset)
    assert torch.equal(got, ref.random_uint32(100, 7, offset))


_ISA_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from udn_kernels import rng
    out = {}
    for kind in ("uint32", "uniform", "normal"):
        fn = {"uint32": rng.random_uint32, "uniform": rng.uniform, "normal": rng.normal}[kind]
        out[kind] = [fn(5000 + 3, 2**32 + 5, start).tolist() for start in (0, 7, 2**32 - 2500)]
    json.dump(out, sys.stdout)
""")


@needs_cpp
def test_cpp_avx2_and_avx512_words_agree():
    # On AVX-512 machines the Philox words come from the AVX-512 path; UDN_KERNELS_NO_AVX512=1
    # forces the AVX2 one. Both must give the same stream (starts straddling chunks and the wrap).
    runs = []
    for flag in ("0", "1"):
        env = {**os.environ, "UDN_KERNELS_NO_AVX512": "1"} if flag == "1" else {
            k: v for k, v in os.environ.items() if k != "UDN_KERNELS_NO_AVX512"}
        result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout))
    for kind in ("uint32", "uniform", "normal"):
        for got, want, start in zip(runs[0][kind], runs[1][kind], (0, 7, 2**32 - 2500)):
            got, want = torch.tensor(got), torch.tensor(want)
            # Same Box-Muller code on both paths: normals are bit-identical too.
            assert torch.equal(got, want), (kind, start)
            _assert_stream_equal(kind, got.to(torch.int64 if kind == "uint32" else torch.float32),
                                 _reference(kind, 5003, 2**32 + 5, start))


_TRITON_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton / udn_kernels.triton are imported
    import torch
    import udn_kernels
    from udn_kernels import rng
    seeds, offsets, n = json.loads(sys.argv[1])
    results = {}
    with udn_kernels.backend("triton"):
        assert udn_kernels._backend.resolve(torch.device("cpu"), "philox_normal") == "triton"
        for seed in seeds:
            for offset in offsets:
                results[f"uint32/{seed}/{offset}"] = rng.random_uint32(n, seed, offset)
                results[f"uniform/{seed}/{offset}"] = rng.uniform(n, seed, offset)
                results[f"normal/{seed}/{offset}"] = rng.normal(n, seed, offset)
                results[f"bernoulli/{seed}/{offset}"] = rng.bernoulli(n, 0.3, seed, offset)
    torch.save(results, sys.argv[2])
""")


@pytest.fixture(scope="module")
def triton_streams(tmp_path_factory):
    """Triton's streams under TRITON_INTERPRET=1, computed in a fresh interpreter process."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton") / "streams.pt"
    n = 300
    env = {k: v for k, v in os.environ.items() if k != "UDN_KERNELS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, json.dumps([SEEDS, OFFSETS, n]), str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return n, torch.load(path)


@pytest.mark.parametrize("kind", ["uint32", "uniform", "normal", "bernoulli"])
def test_triton_matches_reference_and_cpp(triton_streams, kind):
    n, streams = triton_streams
    for seed in SEEDS:
        for offset in OFFSETS:
            got = streams[f"{kind}/{seed}/{offset}"]
            _assert_stream_equal(kind, got, _reference(kind, n, seed, offset))
            if udn_kernels.available_backends()["cpu"]:
                with udn_kernels.backend("cpu"):
                    _assert_stream_equal(kind, got, _public(kind, n, seed, offset))


@pytest.mark.parametrize("seed", [3, 2**40 + 17])
def test_uniform_and_normal_pass_ks(seed):
    stats = pytest.importorskip("scipy.stats")
    n = 2**18
    u = rng.uniform(n, seed, 1000).double().numpy()
    z = rng.normal(n, seed, 2**33).double().numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert stats.kstest(z, "norm").pvalue > 1e-3


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_bernoulli_rate_within_five_sigma(p):
    n = 2**18
    draws = rng.bernoulli(n, p, 11, 2**32 - 1000)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(draws.double().mean().item() - p) <= 5 * sigma + 1e-12


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(1234)
    a = rng.normal(64)
    b = rng.normal(64)
    torch.manual_seed(1234)
    assert torch.equal(rng.normal(64), a)
    assert not torch.equal(a, b)  # each call draws a fresh seed


def test_explicit_seed_is_deterministic_and_backend_independent():
    a = rng.uniform(100, 5, 17)
    with udn_kernels.backend("reference"):
        b = rng.uniform(100, 5, 17)
    assert torch.equal(a, b)
    assert torch.equal(rng.uniform(100, torch.tensor(5), 17), a)


def test_offset_shifts_the_stream():
    full = rng.random_uint32(64, 9, 2**32 - 32)
    assert torch.equal(rng.random_uint32(32, 9, 2**32), full[32:])


def test_empty_and_dtypes():
    assert rng.normal(0, 1).shape == (0,)
    assert rng.random_uint32(4, 1).dtype == torch.int64
    assert rng.uniform(4, 1).dtype == rng.normal(4, 1).dtype == rng.bernoulli(4, 0.5, 1).dtype == torch.float32
    words = rng.random_uint32(4096, 2)
    assert words.min() >= 0 and words.max() < 2**32


@pytest.mark.parametrize("call, error, match", [
    (lambda: rng.normal(-1, 0), ValueError, "n: expected an int >= 0"),
    (lambda: rng.normal(2.0, 0), TypeError, "n: expected an int"),
    (lambda: rng.normal(4, -1), ValueError, "seed"),
    (lambda: rng.normal(4, 2**63), ValueError, "seed"),
    (lambda: rng.normal(4, 1.5), TypeError, "seed"),
    (lambda: rng.uniform(4, 0, -1), ValueError, "offset"),
    (lambda: rng.uniform(4, 0, 2**63), ValueError, "offset"),
    (lambda: rng.uniform(4, 0, 2**63 - 2), ValueError, "offset \\+ n"),
    (lambda: rng.uniform(4, 0, 1.0), TypeError, "offset"),
    (lambda: rng.bernoulli(4, 1.5, 0), ValueError, "p: expected"),
    (lambda: rng.bernoulli(4, "0.5", 0), TypeError, "p: expected"),
])
def test_validation_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@needs_cpp
def test_cpp_kernel_rejects_bad_arguments():
    ops = torch.ops.udn_kernels_C
    with pytest.raises(RuntimeError, match="n must be >= 0"):
        ops.philox_normal(-1, 0, 0)
    with pytest.raises(RuntimeError, match="offset"):
        ops.philox_uniform(4, 0, -5)
