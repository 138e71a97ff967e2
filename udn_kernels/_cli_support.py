"""What the ``udn`` subcommands share: the user-facing error, optional dependencies, output paths.

Below ``cli`` and the modules it dispatches to (``train``, ``experiments``, ``bench``), so they
never import ``cli``.
"""
from __future__ import annotations

import importlib
import os


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def import_optional(module: str, extra: str):
    """``module``, or a CLIError naming the ``udn_kernels[extra]`` install that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"{module} is needed for this command: pip install 'udn_kernels[{extra}]'") from exc


def check_writable(path: str | None, what: str) -> None:
    """CLIError unless ``path`` (the value of option ``what``; None: not given) can be written."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise CLIError(f"{what}: cannot write {path!r} (directory {directory!r} missing or not writable)")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (CLIError if matplotlib is missing)."""
    matplotlib = import_optional("matplotlib", "experiments")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
