"""The ``udn`` command: info, bench, train (also ``python -m udn_kernels``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

import udn_kernels
from ._cli_support import CLIError, check_writable, pyplot


def info_lines() -> list[str]:
    """What `udn info` prints: versions, backends, CPU ISA of the build, threads."""
    backends = udn_kernels.available_backends()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    isa = torch.ops.udn_kernels_C.build_info() if backends["cpu"] else "extension not built"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"udn_kernels   {udn_kernels.__version__}",
        f"torch         {torch.__version__}",
        f"triton        {triton_version}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"backends      " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in backends.items()),
        f"C++ ISA       {isa}",
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
    results = harness.run_cases(names, quick=args.quick, device=args.device, repeats=args.repeats,
                                memory=args.memory)
    print(harness.format_table(results, memory=args.memory))
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
