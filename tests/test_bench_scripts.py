"""Benchmark scripts that pytest does not collect, run tiny so they cannot rot."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("phases", [False, True])
def test_stochastic_linear_ratios_runs_small(phases):
    out = subprocess.run([sys.executable, str(SCRIPTS / "stochastic_linear_ratios.py"), "--rounds", "1",
                          "--shape", "8", "16", "12", *(["--phases"] if phases else [])],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ratios = [float(line.split()[-1]) for line in out.stdout.splitlines() if " / " in line]
    assert len(ratios) == (7 if phases else 16)
    assert all(math.isfinite(r) and r > 0 for r in ratios)
