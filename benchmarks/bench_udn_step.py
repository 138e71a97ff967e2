"""udn-step (docs/design.md, "Benchmarks"): one UDN training step, fused heads vs an eager reference-style UDN.

Both sides train the same parameters with the same ELBO: ``UDN.mlp`` computes every depth's head
and the q-weighted likelihood in one ``depth_mixture_nll`` call; the eager side is written like the
reference implementation (Nazaret & Blei's code): a Python loop over depths, the ``nn.Linear``
head of each depth, ``F.cross_entropy`` per depth, per-depth prior terms. A step is
loss + backward + Adam update. Tiny shapes by default (so the suite never rots);
``UDN_BENCH_FULL=1`` selects the udn-step case's width 32, ~10 depths (rate 5 -> L = 10), batch 256
(``udn_kernels.bench.cases.UDN_STEP_SHAPE``).

Run: ``python -m pytest benchmarks/bench_udn_step.py --benchmark-enable`` (pytest-benchmark
table) or ``python benchmarks/bench_udn_step.py`` (medians and the speed-up, one process).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from udn_kernels.bench.cases import UDN_STEP_SHAPE, eager_udn_loss as eager_loss
from udn_kernels.data import spirals
from udn_kernels.nn import UDN

FULL = os.environ.get("UDN_BENCH_FULL") == "1"
BATCH, WIDTH, RATE = UDN_STEP_SHAPE if FULL else (64, 8, 2.0)
N_DATA = 4 * BATCH


def make_problem():
    """``(model, optimizer, x, y)`` with fixed seeds; 2-D spirals with three turns."""
    torch.manual_seed(0)
    x, y = spirals(BATCH, phase=3.0, noise=0.05, seed=0)
    model = UDN.mlp(2, WIDTH, 2, init_rate=RATE)
    optimizer = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
    return model, optimizer, x, y


def fused_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    model.loss(x, y, N_DATA).backward()
    optimizer.step()


def eager_step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    eager_loss(model, x, y, N_DATA).backward()
    optimizer.step()


def test_udn_step_losses_agree():
    model, _, x, y = make_problem()
    torch.testing.assert_close(model.loss(x, y, N_DATA), eager_loss(model, x, y, N_DATA),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["fused", "eager"])
def test_udn_step(benchmark, method):
    model, optimizer, x, y = make_problem()
    step = fused_step if method == "fused" else eager_step
    benchmark.group = "udn-step"
    benchmark.extra_info.update(depths=model.depth.max_depth, width=WIDTH, batch=BATCH)
    benchmark(step, model, optimizer, x, y)
    assert torch.isfinite(model.depth.raw_rate).all()


def compare(repeats: int = 300) -> dict[str, float]:
    """Median and best step time (ms) of both methods, steps interleaved so that load on a shared
    machine hits both alike; plus the speed-up of the medians."""
    problems = {"fused": (fused_step, make_problem()), "eager": (eager_step, make_problem())}
    times = {name: [] for name in problems}
    for i in range(repeats + 10):
        for name, (step, args) in problems.items():
            start = time.perf_counter()
            step(*args)
            if i >= 10:  # warm-up
                times[name].append((time.perf_counter() - start) * 1e3)
    result = {f"{name}_median_ms": statistics.median(t) for name, t in times.items()}
    result.update({f"{name}_min_ms": min(t) for name, t in times.items()})
    result["speedup"] = result["eager_median_ms"] / result["fused_median_ms"]
    return result


if __name__ == "__main__":
    model = make_problem()[0]
    print(f"udn-step: width {WIDTH}, {model.depth.max_depth} depths, batch {BATCH}, "
          f"torch threads {torch.get_num_threads()}")
    r = compare()
    print(f"fused UDN.mlp step  median {r['fused_median_ms']:8.3f} ms   best {r['fused_min_ms']:8.3f} ms\n"
          f"eager reference     median {r['eager_median_ms']:8.3f} ms   best {r['eager_min_ms']:8.3f} ms\n"
          f"speed-up (medians)  {r['speedup']:8.2f}x   (best: {r['eager_min_ms'] / r['fused_min_ms']:.2f}x)")
