"""The ``udn`` command: info, bench, selftest, train (also ``python -m udn_kernels``)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

import udn_kernels
from ._cli_support import CLIError, check_writable, pyplot


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
        f"16-bit GEMM   {ext.get('half_gemm', 'extension not built')} (heads and stochastic tiles, docs/precision.md)",
        f"torch CPU ISA {torch.backends.cpu.get_cpu_capability()}",
        f"threads       {torch.get_num_threads()}",
        f"CUDA device   {cuda}",
    ]


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def cmd_bench(args) -> int:
    from .bench import cases, harness
    check_writable(args.json, "--json")
    check_writable(args.plot, "--plot")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device: {args.device!r} requested but no CUDA device is available")
    names = args.cases or list(cases.CASES)
    for name in names:
        if name not in cases.CASES:
            raise CLIError(f"--cases: unknown case {name!r}; expected some of {', '.join(cases.CASES)}")
    results = harness.run_cases(names, cases.build, quick=args.quick, device=args.device,
                                repeats=args.repeats, memory=args.memory)
    print(harness.format_table(results, memory=args.memory))
    print("ours x: total time of that method / total time of ours (>1: ours is faster). "
          "/floor: total time / the GEMM floor's.")
    # which 16-bit regime the table is from (docs/precision.md, "Which strategy runs")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    print(next(line for line in info_lines() if line.startswith("16-bit GEMM"))
          + (f"; oneDNN ISA cap {cap}" if cap else ""))
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
    from .bench import harness
    plt = pyplot()
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
    _add_selftest_parser(sub)
    from .train import add_train_parser
    add_train_parser(sub)
    from .experiments import add_experiment_parser
    add_experiment_parser(sub)
    return parser


def cmd_selftest(args) -> int:
    from . import selftest
    check_writable(args.json, "--json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device: {args.device!r} requested but no CUDA device is available")
    mode = args.mode or ("fast" if args.device == "cpu" else "full")
    print(f"{'check':<84}{'max error':>11}{'tol':>10}  result")
    checks = selftest.run(args.device, fast=mode == "fast",
                          progress=lambda check: print(selftest.format_row(check), flush=True))
    failed = [c for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed on {args.device} ({mode} mode)")
    bench = selftest.run_bench(args.device) if args.bench else None
    if args.json:
        selftest.to_json(checks, args.json, {"device": args.device, "mode": mode, "info": info_lines()}, bench)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def _add_selftest_parser(sub) -> None:
    """The ``udn selftest`` subcommand."""
    parser = sub.add_parser("selftest", help="check every op on a device against the reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to check (default: cuda when available, else cpu)")
    parser.add_argument("--mode", choices=("fast", "full"),
                        help="fast: compile one call per op with aot_eager; full: every call with "
                             "inductor (default: fast on cpu, full on cuda)")
    parser.add_argument("--bench", action="store_true", help="then run the quick benchmark")
    parser.add_argument("--json", help="write the checks (and bench results) as JSON")
    parser.set_defaults(run=cmd_selftest)


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
