"""Run a Triton test module in the CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and other modules of the same
pytest process may already have imported it in compiled mode; so a Triton test module without the
variable holds a single test that re-runs the module in a fresh interpreter subprocess.
"""
import contextlib
import functools
import inspect
import os
import subprocess
import sys
import types


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


@contextlib.contextmanager
def only_programs(keep):
    """Run only the programs ``keep(kernel_name, program_id, grid)`` selects (interpreter only).

    Lets a test launch a kernel over a tensor of more than 2^31 elements and execute just the
    programs whose indices pass 2^31, so the other programs never touch (or page in) the
    untouched memory. CPU storages are shared with the interpreter, so the copy-back of every
    argument (which would page in the whole tensor) is skipped too.
    """
    from triton.runtime import interpreter

    init, restore = interpreter.GridExecutor.__init__, interpreter.GridExecutor._restore_args_dev
    builder = interpreter.interpreter_builder

    def gated_init(self, fn, *args, **kwargs):  # a GridExecutor is made per kernel launch
        def gated(**kernel_args):
            if keep(fn.__name__, builder.grid_idx, builder.grid_dim):
                fn(**kernel_args)
        # The interpreter patches triton.language as found in the function's globals: the kernel's.
        gated = types.FunctionType(gated.__code__, fn.__globals__, fn.__name__, None, gated.__closure__)
        functools.update_wrapper(gated, fn)  # name, constexpr annotations
        gated.__signature__ = inspect.signature(fn)
        init(self, gated, *args, **kwargs)

    interpreter.GridExecutor.__init__ = gated_init
    interpreter.GridExecutor._restore_args_dev = lambda *args: None
    try:
        yield
    finally:
        interpreter.GridExecutor.__init__, interpreter.GridExecutor._restore_args_dev = init, restore


@contextlib.contextmanager
def record_kernels(kernels: dict):
    """Within the block, every entry of the kernel table ``kernels`` (a backend's ``KERNELS``) adds
    its name to the yielded set when called: which kernels a public op ran."""
    names = set()
    saved = dict(kernels)

    def recording(name, kernel):
        def run(*args, **kwargs):
            names.add(name)
            return kernel(*args, **kwargs)
        return run

    kernels.update({name: recording(name, kernel) for name, kernel in saved.items()})
    try:
        yield names
    finally:
        kernels.update(saved)
