"""Run a Triton test module in the CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and other modules of the same
pytest process may already have imported it in compiled mode; so a Triton test module without the
variable holds a single test that re-runs the module in a fresh interpreter subprocess.
"""
import os
import subprocess
import sys


def interpreted() -> bool:
    """True inside the interpreter subprocess (or a run started with TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def rerun_under_interpreter(path: str, timeout: float = 600) -> None:
    """Run the pytest module at ``path`` with TRITON_INTERPRET=1; fail with its output if it fails."""
    env = dict(os.environ, TRITON_INTERPRET="1", UDN_KERNELS_BACKEND="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "-W", "ignore::UserWarning", path],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
