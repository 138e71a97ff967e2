"""Reproductions of the seed papers' claims, run with `udn experiment NAME`.

Each experiment module registers a function ``run(args) -> dict`` in ``EXPERIMENTS`` that prints
a table, saves a PNG and returns its headline numbers.
"""
from __future__ import annotations

from .._cli_support import CLIError
# Experiment modules register themselves into EXPERIMENTS on import.
from . import (bayesianize, depth_complexity, diffusion_resnet, early_exit_lm, mc_dropout, udn_vs_fixed,  # noqa: F401
               variance_network)
from ._common import EXPERIMENTS


def cmd_experiment(args) -> int:
    if args.name not in EXPERIMENTS:
        raise CLIError(f"experiment: expected one of {sorted(EXPERIMENTS)}, got {args.name!r}")
    import torch
    previous = torch.get_num_threads()
    # The models are small: one thread avoids OpenMP spin-waiting on a busy machine (10-100x faster).
    torch.set_num_threads(args.threads)
    try:
        EXPERIMENTS[args.name](args)
    finally:
        torch.set_num_threads(previous)
    return 0


def add_experiment_parser(sub) -> None:
    """Register the ``experiment`` subcommand."""
    parser = sub.add_parser("experiment", help="reproduce a seed paper's claim")
    parser.add_argument("name", help="one of: " + ", ".join(sorted(EXPERIMENTS)))
    parser.add_argument("--quick", action="store_true", help="tiny version (seconds)")
    parser.add_argument("--out", default=".", help="directory for the PNG and JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of data splits, init and noise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.set_defaults(run=cmd_experiment)
