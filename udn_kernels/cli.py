"""The ``udn`` command: info, bench, selftest, train (also ``python -m udn_kernels``)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

import udn_kernels


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise CLIError(f"{module} is needed for this command: pip install 'udn_kernels[{extra}]'") from exc


def _check_writable(path: str | None, what: str) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise CLIError(f"{what}: cannot write {path!r} (directory {directory!r} missing or not writable)")


def info_lines() -> list[str]:
    """What `udn info` prints: versions, platform, backends, the C++ variant loaded and its build
    flags, threads, the GPU."""
    backends = udn_kernels.available_backends()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    from ._extension import extension_info
    ext = extension_info()
    if torch.cuda.is_available():
        cuda = "{} (sm_{}{})".format(torch.cuda.get_device_name(0), *torch.cuda.get_device_capability(0))
    else:
        cuda = "none"
    return [
        f"udn_kernels   {udn_kernels.__version__}",
        f"torch         {torch.__version__}",
        f"triton        {triton_version}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"platform      {platform.platform()}",
        f"backends      " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in backends.items()),
        f"C++ module    {ext['module'] or 'extension not built'}",
        f"C++ ISA       {ext['isa']} (Philox fills: {ext['philox']})",
        f"build flags   {ext['flags']}",
        f"torch CPU ISA {torch.backends.cpu.get_cpu_capability()}",
        f"threads       {torch.get_num_threads()}",
        f"CUDA device   {cuda}",
    ]


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def _fmt(value, spec="8.2f"):
    return format(value, spec) if value is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def cmd_bench(args) -> int:
    from .bench import cases, harness
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device: {args.device!r} requested but no CUDA device is available")
    names = args.cases or list(cases.CASES)
    for name in names:
        if name not in cases.CASES:
            raise CLIError(f"--cases: unknown case {name!r}; expected some of {', '.join(cases.CASES)}")
    results = {}
    header = f"{'case':<13}{'method':<26}{'fwd ms':>9}{'bwd ms':>9}{'total ms':>10}{'ours x':>8}{'/floor':>8}{'peak MB':>9}"
    print(header)
    print("-" * len(header))
    for name in names:
        methods = cases.build(name, args.quick, args.device)
        timings = [harness.time_method(m, repeats=args.repeats) for m in methods]
        if args.memory:
            for t in timings:
                t.peak_mb = harness.measure_peak(name, t.method, args.quick, args.device)
        results[name] = timings
        ratios = harness.speedups(timings)
        floor = next((t for t in timings if t.role == "floor"), None)
        for t in timings:
            vs_floor = t.total_ms / floor.total_ms if floor and t.role != "floor" else None
            print(f"{name:<13}{t.method:<26}{_fmt(t.forward_ms, '9.2f')}{_fmt(t.backward_ms, '9.2f')}"
                  f"{_fmt(t.total_ms, '10.2f')}{_fmt(ratios.get(t.method), '8.2f')}"
                  f"{_fmt(vs_floor, '8.2f')}{_fmt(t.peak_mb, '9.1f')}")
        sys.stdout.flush()
    print("ours x: total time of that method / total time of ours (>1: ours is faster). "
          "/floor: total time / the GEMM floor's.")
    meta = {"quick": args.quick, "device": args.device, "info": info_lines()}
    if args.json:
        harness.to_json(results, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_bench(results: dict, path: str) -> None:
    """Bar chart: for every case, each peer's total time divided by ours (log scale)."""
    _require("matplotlib", "experiments")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .bench import harness
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), squeeze=False)
    for ax, (name, timings) in zip(axes[0], results.items()):
        ratios = harness.speedups(timings)
        ax.bar(range(len(ratios)), list(ratios.values()), color="tab:blue")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(ratios)), list(ratios), rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_ylabel("time / udn_kernels time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``udn`` command."""
    parser = argparse.ArgumentParser(prog="udn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, backends, CPU ISA, threads").set_defaults(run=cmd_info)
    bench = sub.add_parser("bench", help="benchmark the fused ops against eager PyTorch")
    bench.add_argument("--quick", action="store_true", help="smaller shapes; a few minutes on 2 cores")
    bench.add_argument("--cases", nargs="+", help="subset of cases (default: all)")
    bench.add_argument("--json", help="write results as JSON")
    bench.add_argument("--plot", help="write a PNG chart of speed-ups")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per method")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device of the inputs (default: cuda when available, which runs the "
                            "Triton kernels; else cpu, which runs the C++ kernels)")
    bench.add_argument("--no-memory", dest="memory", action="store_false",
                       help="skip the per-method peak-memory subprocesses")
    bench.set_defaults(run=cmd_bench)
    from .selftest import add_selftest_parser
    add_selftest_parser(sub)
    from .train import add_train_parser
    add_train_parser(sub)
    from .experiments import add_experiment_parser
    add_experiment_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``udn`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CLIError as exc:
        print(f"udn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
