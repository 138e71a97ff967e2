"""Scale: 64-bit stream offsets. The RNG at offsets near 2^63 and across 2^32 boundaries equals the
reference and an independent pure-Python Philox (words and the four-per-counter normals); a fused
op whose noise offsets pass 2^31 (and so would wrap in int32 index arithmetic) draws exactly the
stream elements docs/rng.md assigns."""
import math

import numpy as np
import pytest
import torch

import udn_kernels
from udn_kernels import bernoulli_linear, rng

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

M32 = 0xFFFFFFFF


def philox_words(seed: int, counter: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Triton's tl.randint4x), Python ints: an oracle independent of torch."""
    k0, k1 = seed & M32, seed >> 32
    c0, c1, c2, c3 = counter & M32, counter >> 32, 0, 0
    for _ in range(10):
        pb, pa = 0xCD9E8D57 * c2, 0xD2511F53 * c0
        c0, c1, c2, c3 = ((pb >> 32) ^ c1 ^ k0) & M32, pb & M32, ((pa >> 32) ^ c3 ^ k1) & M32, pa & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def philox_word0(seed: int, e: int) -> int:
    """uint32 element e: word 0 of counter e (tl.randint)."""
    return philox_words(seed, e)[0]


def python_normal(seed: int, e: int) -> float:
    """Normal element e (docs/rng.md): tl.randn4x(seed, e >> 2)[e & 3] from the words above, with the
    uniforms and the angle rounded to float32 as Triton does and the rest in float64."""
    words = philox_words(seed, e >> 2)
    a, b = words[2:] if e & 2 else words[:2]

    def uniform(w):
        x = w - 2**32 if w >= 2**31 else w
        return np.float32(~x if x < 0 else x) * np.float32(4.6566127342e-10)
    u1 = max(np.float32(1e-7), uniform(a))
    theta = float(np.float32(6.283185307179586) * uniform(b))
    radius = math.sqrt(-2.0 * math.log(float(u1)))
    return radius * (math.sin(theta) if e & 1 else math.cos(theta))


OFFSETS = [2**63 - 37, 2**63 - 4096, 2**32 - 13, 2**33 - 5, 5 * 2**32 - 9, 2**62 + 2**32 - 3, 2**31 - 7]
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 0x123456789ABCDEF]


@pytest.mark.parametrize("offset", OFFSETS)
def test_rng_large_offsets_match_reference_and_python(offset):
    n = min(37, 2**63 - offset)
    for seed in SEEDS:
        words = rng.random_uint32(n, seed, offset)
        assert words.tolist() == [philox_word0(seed, offset + i) for i in range(n)]
        with udn_kernels.backend("reference"):
            ref = [rng.uniform(n, seed, offset), rng.normal(n, seed, offset), rng.bernoulli(n, 0.4, seed, offset)]
        cpu = [rng.uniform(n, seed, offset), rng.normal(n, seed, offset), rng.bernoulli(n, 0.4, seed, offset)]
        assert torch.equal(cpu[0], ref[0]) and torch.equal(cpu[2], ref[2])
        torch.testing.assert_close(cpu[1], ref[1], rtol=0, atol=4e-6)
        python = torch.tensor([python_normal(seed, offset + i) for i in range(n)], dtype=torch.float32)
        torch.testing.assert_close(cpu[1], python, rtol=0, atol=4e-6)
        torch.testing.assert_close(ref[1], python, rtol=0, atol=4e-6)


def test_rng_last_element_and_vector_blocks_straddling_2_32():
    """Vectorised fills of 8/16 lanes must not carry across the low counter word (2^32 boundary)."""
    seed = 77
    for start in (2**32 - 20, 3 * 2**32 - 1, 2**63 - 1000):
        n = min(1000, 2**63 - start)
        words = rng.random_uint32(n, seed, start)
        with udn_kernels.backend("reference"):
            assert torch.equal(words, rng.random_uint32(n, seed, start))
        assert [int(w) for w in words[::97]] == [philox_word0(seed, start + i) for i in range(0, n, 97)]
    assert rng.random_uint32(1, seed, 2**63 - 1).item() == philox_word0(seed, 2**63 - 1)


def test_stochastic_linear_noise_offsets_past_2_31():
    """S*N*K > 2^31: the last draw's weight noise starts at offset (S-1)*N*K > 2^31 - 1.

    Only [S, 1, N] outputs are stored (the weights are generated tile by tile), so memory stays
    small; the oracle rebuilds the last draw from udn_kernels.rng at the documented offsets.
    (gaussian_linear shares noisy_weight_forward and its s*N*K offsets with the "weight" mask.)"""
    N, K = 2, 2**20
    S = 2**31 // (N * K) + 2  # 1026 draws, 2^31 + 4 Mi weights in total
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, K, generator=gen)
    mu = torch.randn(N, K, generator=gen)
    seed = 2**40 + 3
    out = bernoulli_linear(x, mu, p=0.5, mask="weight", samples=S, seed=seed)
    last = (S - 1) * N * K
    assert last > 2**31
    keep = (rng.uniform(N * K, seed, last) >= 0.5).float().view(N, K) * 2.0
    torch.testing.assert_close(out[-1, 0], x[0] @ (mu * keep).t(), rtol=1e-4, atol=1e-3)


def test_cpp_sources_use_int64_index_arithmetic():
    """Static check: the C++ kernels never hold element offsets or sizes in 32-bit ints."""
    import pathlib
    import re

    root = pathlib.Path(udn_kernels.__file__).resolve().parent.parent / "csrc"
    assert root.is_dir(), f"the C++ sources must sit beside the package (editable install): {root}"
    for path in sorted(root.glob("*.cpp")) + sorted(root.glob("*.h")):
        text = re.sub(r"//.*", "", path.read_text())
        bad = re.findall(r"\b(?:int|unsigned|long|int32_t|size_t)\s+\w+\s*=\s*[^;]*(?:size|numel|stride|offset)\b",
                         text)
        assert not bad, f"{path.name}: 32-bit or unsigned index variables {bad}"
        assert not re.search(r"\bfor\s*\(\s*int\s+\w+\s*=", text) or path.name == "philox.h", \
            f"{path.name}: loop with a 32-bit int counter"
