"""Benchmark scripts that pytest does not collect, run tiny so they cannot rot."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("phases", [False, True])
def test_stochastic_linear_ratios_runs_small(phases):
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent)}  # this checkout's udn_kernels
    out = subprocess.run([sys.executable, str(SCRIPTS / "stochastic_linear_ratios.py"), "--rounds", "1",
                          "--shape", "8", "16", "12", *(["--phases"] if phases else [])],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    ratios = [float(line.split()[-1]) for line in out.stdout.splitlines() if " / " in line]
    assert len(ratios) == (7 if phases else 16)
    assert all(math.isfinite(r) and r > 0 for r in ratios)


def test_step_ratios_runs_small():
    # PYTHONPATH: the script imports the udn_kernels of this checkout, as its subprocesses do.
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent)}
    out = subprocess.run([sys.executable, str(SCRIPTS / "step_ratios.py"), "--size", "tiny", "--rounds", "1",
                          "--thread-counts", "1", "2"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    timed = ("heads-frozen ", "first-layer ", "bnn-step ", "mcdropout-step ")
    ratios = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith(timed) and " / " in line]
    peer_rows = 4 if importlib.util.find_spec("bayesian_torch") else 1  # eager MLP by hand only
    # per group a peer / ours and an ours / floor: heads-frozen 2x2, first-layer 2x2, bnn-step, mcdropout 1
    assert len(ratios) == 8 + peer_rows + 1
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    # bfloat16: eager bf16, ours fp32 and eager fp32 / ours; gauss: local, flipout, eager / ours and
    # ours / floor in bf16, eager / ours and ours / floor in fp32
    half = [float(line.split()[-1]) for line in out.stdout.splitlines()
            if line.startswith(("heads-lm-bf16 ", "gauss-linear-bf16 ")) and " / " in line]
    assert len(half) == 3 + 6 and all(math.isfinite(r) and r > 0 for r in half)
    peaks = [line for line in out.stdout.splitlines() if line.startswith("threads ")]
    assert len(peaks) == 6 and not any("failed" in line for line in peaks)
