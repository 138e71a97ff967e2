"""The training steps users run: interleaved medians and ratios in one process (heads-frozen,
first-layer, bnn-step, mcdropout-step, bnn-conv, convert-step, hf-early-exit-step, the bfloat16
heads-lm and gauss-linear against eager bfloat16, threads).

Every round runs each method of a case once, in turn (forward, backward and, for the step
cases, the Adam update), so machine load hits all of them alike; the report is each method's
median and, per group (one configuration of a case), the median over rounds of each peer's time
/ ours and of ours / the GEMM floor. The leaves' ``.grad`` are reset to None before each call
(untimed), as ``optimizer.zero_grad()`` does. With ``--threads 1`` the clock is the thread's CPU
time; with more threads it is wall time. The threads case reports the peak extra memory of one
forward+backward at each thread count, each in a fresh process (oversubscribed threads are fine
for memory). Cases, shapes and baselines are those of ``udn_kernels.bench.cases`` (``--size full``:
``udn bench``'s full shapes; ``tiny``: the test suite's). A row whose peer is not installed says so.

Run: ``python benchmarks/step_ratios.py [--threads 2] [--rounds 11] [--cases ...]
[--thread-counts 1 2 8 16] [--size full|quick|tiny]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import udn_kernels
from udn_kernels.bench import cases, harness

TIMED_CASES = ("heads-frozen", "first-layer", "bnn-step", "mcdropout-step", "bnn-conv", "convert-step",
               "hf-early-exit-step", "heads-lm-bf16", "gauss-linear-bf16")
FAMILIES = ("heads", "heads bf16", "gaussian sample")  # the threads case's groups, per thread count


def time_case(name: str, size: str, rounds: int, clock) -> dict[tuple[str, str], float]:
    """Prints the medians and per-group ratios of one case; returns the ratios."""
    methods = cases.build(name, quick=False, size=size)
    for m in methods:
        if m.missing:
            print(f"{name:15s} {m.name:48s}  {m.missing}")
    measured = [m for m in methods if not m.missing]
    times = harness.interleaved_ms(measured, rounds, clock)
    for m in measured:
        print(f"{name:15s} {m.name:48s} {statistics.median(times[m.name]):10.2f} ms")
    ratios = {}
    for group in dict.fromkeys(m.group for m in measured):
        members = [m for m in measured if m.group == group]
        ours = next(m for m in members if m.role == "ours")
        pairs = [(m, ours) for m in members if m.role == "peer"]
        pairs += [(ours, m) for m in members if m.role == "floor"]
        for a, b in pairs:
            ratios[a.name, b.name] = statistics.median(p / q for p, q in zip(times[a.name], times[b.name]))
            print(f"{name:15s} {a.name:>48s} / {b.name:<40s} {ratios[a.name, b.name]:6.3f}")
    return ratios


def thread_memory(size: str, thread_counts) -> dict[str, list[float | None]]:
    """Peak extra MB of each threads-case method at each thread count (a fresh process each)."""
    peaks = {}
    for family in FAMILIES:
        for who in ("udn", "eager"):
            row = [harness.measure_peak("threads", f"{who} {family}, {t} threads", quick=False, size=size)
                   for t in thread_counts]
            peaks[f"{who} {family}"] = row
            cells = " ".join("   failed" if mb is None else f"{mb:9.1f}" for mb in row)
            growth = f"{row[-1] / row[0]:6.2f}" if None not in (row[0], row[-1]) and row[0] > 0 else "     -"
            print(f"threads         {who + ' ' + family:48s} {cells}   x{growth} (last / first)")
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--size", choices=("tiny", "quick", "full"), default="full")
    parser.add_argument("--cases", nargs="+", choices=(*TIMED_CASES, "threads"), default=[*TIMED_CASES, "threads"])
    parser.add_argument("--thread-counts", type=int, nargs="+", default=list(cases.THREAD_COUNTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    print(f"size {args.size}, fp32 unless named, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time, "
          f"median of {args.rounds} interleaved rounds; ratios > 1: ours is faster (peer / ours)")
    with udn_kernels.backend("cpu"):
        for name in args.cases:
            if name != "threads":
                time_case(name, args.size, args.rounds, clock)
    if "threads" in args.cases:
        print(f"peak extra MB of one forward+backward at {' / '.join(map(str, args.thread_counts))} threads")
        thread_memory(args.size, args.thread_counts)


if __name__ == "__main__":
    main()
