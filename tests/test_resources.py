"""Resources: no memory growth over 1,000 forward+backward calls of the fused heads op and of the
stochastic linear ops (RSS from /proc/self/status after a warm-up). The LeakSanitizer / valgrind run
of the extension is documented in docs/hardening.md (script: tests/leak_check_script.py)."""
import gc
import os

import pytest
import torch

import udn_kernels
from udn_kernels import bernoulli_linear, depth_mixture_nll, gaussian_linear

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]

CALLS, WARMUP = 1000, 200
# An honest bound: the allocator keeps freed blocks and thread arenas, so RSS wobbles by a few MB;
# a leak of even one 4 KiB buffer per call would add > 4 MB over 1,000 calls, a tensor-sized leak far more.
MAX_GROWTH_KB = 4096


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def heads_step(state):
    h, w, b, y, lw = state
    loss = depth_mixture_nll(h, w, b, y, lw, mode="mixture") + depth_mixture_nll(h, w[0], b[0], y, lw)
    loss.backward()


def gaussian_step(state):
    x, mu, sigma = state
    for estimator in ("sample", "local", "flipout"):
        gaussian_linear(x, mu, sigma, estimator=estimator, samples=2, seed=3).square().sum().backward()


def bernoulli_step(state):
    x, w = state
    for mask in ("input", "weight"):  # "symmetric" runs the same tile code as "weight"
        bernoulli_linear(x, w, p=0.2, mask=mask, samples=2, seed=3).square().sum().backward()


def make_state(name):
    gen = torch.Generator().manual_seed(0)
    if name == "heads":
        return [torch.randn(4, 64, 32, generator=gen, requires_grad=True),
                torch.randn(4, 50, 32, generator=gen, requires_grad=True),
                torch.randn(4, 50, generator=gen, requires_grad=True), torch.randint(0, 50, (64,), generator=gen),
                torch.log_softmax(torch.randn(4, generator=gen), 0).requires_grad_()]
    x = torch.randn(32, 48, generator=gen, requires_grad=True)
    w = torch.randn(40, 48, generator=gen, requires_grad=True)
    if name == "gaussian_linear":
        return [x, w, torch.rand(40, 48, generator=gen).requires_grad_()]
    return [x, w]


STEPS = {"heads": heads_step, "gaussian_linear": gaussian_step, "bernoulli_linear": bernoulli_step}


@pytest.mark.parametrize("name", sorted(STEPS))
def test_no_memory_growth(name):
    state, step = make_state(name), STEPS[name]
    for _ in range(WARMUP):
        step(state)
    gc.collect()
    before = rss_kb()
    for i in range(CALLS):
        step(state)
        if i % 100 == 0:
            for t in state:
                t.grad = None
    gc.collect()
    growth = rss_kb() - before
    assert growth < MAX_GROWTH_KB, f"{name}: RSS grew by {growth} KiB over {CALLS} calls"
