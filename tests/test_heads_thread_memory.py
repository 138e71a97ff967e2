"""Peak memory of the heads kernels does not grow with the thread count: no task of the class-tiled
gradient pass keeps a partial ``d_weight`` (docs/heads.md, "Memory"). Measured as the peak extra RSS
(VmHWM, reset after a warm-up at the same thread count, above the RSS then) of one fused forward+backward of a
shared head, in fresh subprocesses at 1 and 8 threads (more threads than cores is fine: memory,
not time). ``python tests/test_heads_thread_memory.py L N D C threads...`` prints the figures."""
import json
import os
import subprocess
import sys

import pytest

import udn_kernels

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")]

CHILD = r'''
import json, sys
import torch
import udn_kernels

def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

L, N, D, C, threads = map(int, sys.argv[1:])
torch.set_num_threads(threads)
torch.manual_seed(0)

def inputs(L, N, D, C):
    return (torch.randn(L, N, D).requires_grad_(), torch.randn(C, D).mul_(D ** -0.5).requires_grad_(), None,
            torch.randint(0, C, (N,)), torch.log_softmax(torch.randn(L), 0))

def step(args, mode):
    with udn_kernels.backend("cpu"):
        udn_kernels.depth_mixture_nll(*args, mode=mode).backward()

for mode in ("expected", "mixture"):  # warm-up at this thread count: libraries, thread pool, kernels
    step(inputs(2, 300, 16, 700), mode)
args = inputs(L, N, D, C)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the peak from here on
baseline = status_kb("VmRSS")
step(args, "expected")
print(json.dumps({"threads": threads, "peak_extra_kb": status_kb("VmHWM") - baseline}))
'''


def peak_extra_kb(L, N, D, C, threads) -> int:
    """Peak extra RSS (KiB) of one expected-mode fused forward+backward (gradients included) above
    its inputs, in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, (L, N, D, C, threads))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_kb"]


def test_fused_heads_peak_memory_flat_in_threads():
    # a d_weight partial (C x D fp32 = 16 MB) is large next to the rest of the pass
    one, eight = (peak_extra_kb(2, 1024, 512, 8000, threads) for threads in (1, 8))
    assert eight <= 1.3 * one, f"peak extra RSS: {one} KiB at 1 thread, {eight} KiB at 8"


if __name__ == "__main__":
    L, N, D, C, *counts = map(int, sys.argv[1:])
    for threads in counts:
        print(f"L={L} N={N} D={D} C={C} threads={threads}: {peak_extra_kb(L, N, D, C, threads) / 1024:.0f} MB")
