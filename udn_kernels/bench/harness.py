"""Timing, memory measurement and the results table shared by `udn bench` and benchmarks/.

A benchmark case is a list of :class:`Method` s built on the same inputs. Times are medians over
repeats after warm-up, measured in one process so ratios compare like with like. Before each
timed forward+backward the leaves' ``.grad`` are reset to None, untimed, as a training step's
``optimizer.zero_grad()`` does: backward assigns the gradients instead of adding them to the
previous repeat's (work no training step does, and the GEMM floors do not include). A method
with a ``step`` (an optimizer update) runs it after backward, inside the timed total. Peak extra
memory is measured in a fresh subprocess per method (Linux VmHWM reset through
``/proc/self/clear_refs``), which sees ATen's CPU allocations, unlike Python-level tracers.
Ratios (to ours, to the floor) are taken within a method's ``group``, so one case can hold
several configurations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Method:
    """One way of computing a case: ``forward()`` returns a tensor; ``backward`` says whether
    ``forward().sum().backward()`` is part of the measured work, ``step`` (an optimizer update)
    runs after it; ``threads`` is the torch thread count to measure with (None: the current one);
    ``missing`` says why the method cannot run here (an optional peer not installed): it is
    reported, not measured."""

    name: str
    forward: Callable[[], torch.Tensor | tuple] | None
    backward: bool = True
    role: str = "peer"  # "ours", "peer" or "floor"
    group: str = ""
    step: Callable[[], object] | None = None
    threads: int | None = None
    missing: str | None = None


@dataclasses.dataclass
class Timing:
    method: str
    role: str
    forward_ms: float | None
    backward_ms: float | None
    total_ms: float | None
    peak_mb: float | None = None
    group: str = ""


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _sync() -> None:
    # CUDA launches are asynchronous: wait for them so wall time covers the kernels.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def grad_leaves(out) -> list[torch.Tensor]:
    """The leaf tensors that would receive gradients from ``out`` (its graph's AccumulateGrad nodes)."""
    found, seen = [], set()
    stack = [_first_tensor(out).grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node.variable)
        stack.extend(child for child, _ in node.next_functions)
    return found


@contextlib.contextmanager
def num_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_once(method: Method) -> None:
    """One forward, backward (when the method has one) and update (when it has one)."""
    out = _first_tensor(method.forward())
    if method.backward:
        out.sum().backward()
    if method.step is not None:
        method.step()


def _clear_grads(leaves: list[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def _median_ms(fn: Callable[[], None], repeats: int, min_time: float,
               setup: Callable[[], None] = lambda: None) -> float:
    samples = []
    started = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - started < min_time and len(samples) < 100):
        setup()
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_method(method: Method, *, warmup: int = 2, repeats: int = 5, min_time: float = 0.2) -> Timing:
    """Median forward, backward and forward+backward(+step) wall time of ``method`` in ms."""
    with num_threads(method.threads):
        return _time_method(method, warmup, repeats, min_time)


def _time_method(method: Method, warmup: int, repeats: int, min_time: float) -> Timing:
    def forward_only():
        with torch.no_grad():
            method.forward()

    for _ in range(warmup):
        train_once(method)
    leaves = grad_leaves(method.forward()) if method.backward else []
    fwd = _median_ms(forward_only, repeats, min_time)
    total = _median_ms(lambda: train_once(method), repeats, min_time, setup=lambda: _clear_grads(leaves))
    if not method.backward:
        return Timing(method.name, method.role, fwd, None, total, group=method.group)
    # backward alone: forward untimed, then time the backward.
    samples = []
    for _ in range(repeats):
        _clear_grads(leaves)
        out = _first_tensor(method.forward()).sum()
        _sync()
        t0 = time.perf_counter()
        out.backward()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(method.name, method.role, fwd, statistics.median(samples), total, group=method.group)


def interleaved_ms(methods: list[Method], rounds: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Each method's times (ms) over ``rounds`` rounds that each run every method once
    (forward, backward, step), in turn, so load on a shared machine hits them all alike; after
    one warm-up round, with the leaves' gradients reset before each call (untimed)."""
    leaves = {m.name: grad_leaves(m.forward()) if m.backward else [] for m in methods}
    times = {m.name: [] for m in methods}
    for round_index in range(rounds + 1):
        for m in methods:
            _clear_grads(leaves[m.name])
            _sync()
            t0 = clock()
            train_once(m)
            _sync()
            if round_index:
                times[m.name].append((clock() - t0) * 1e3)
    return times


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_in_this_process(method: Method) -> float:
    """Peak resident memory (MB) added by one forward+backward(+step) of ``method`` beyond its
    inputs, at the method's thread count."""
    with num_threads(method.threads):
        train_once(method)  # warm caches, the allocator, the thread pool and optimizer state first
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        train_once(method)
        return (_rss_kib("VmHWM") - before) / 1024.0


def measure_peak_cuda(method: Method) -> float:
    """Peak CUDA memory (MB) allocated by one forward+backward(+step) of ``method`` beyond its inputs."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_once(method)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_peak(case: str, method: str, quick: bool, device: str = "cpu", size: str | None = None) -> float | None:
    """Peak extra memory of one method of a case (``size`` as in ``cases.build``), measured in a
    fresh interpreter: resident memory on CPU (:func:`measure_peak_in_this_process`), the caching
    allocator's peak on CUDA."""
    probe = "measure_peak_cuda" if device.startswith("cuda") else "measure_peak_in_this_process"
    code = ("import sys; from udn_kernels.bench import cases, harness; "
            f"m = cases.method_by_name({case!r}, {method!r}, quick={quick}, device={device!r}, size={size!r}); "
            f"print(harness.{probe}(m))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return float(result.stdout.strip().splitlines()[-1])


def _first_of_group(timings: list[Timing], timing: Timing, role: str) -> Timing | None:
    """The first measured method of ``role`` in ``timing``'s group."""
    return next((t for t in timings if t.role == role and t.group == timing.group and t.total_ms is not None), None)


def speedups(timings: list[Timing]) -> dict[str, float]:
    """Total-time ratio of every other measured method to the first "ours" method of its group
    (>1: ours is faster)."""
    ratios = {}
    for t in timings:
        ours = _first_of_group(timings, t, "ours")
        if ours is not None and t is not ours and t.total_ms is not None:
            ratios[t.method] = t.total_ms / ours.total_ms
    return ratios


def run_cases(names: list[str], build: Callable[[str, bool, str], list[Method]], *, quick: bool,
              device: str = "cpu", repeats: int = 5, memory: bool = True,
              progress: bool = True) -> dict[str, list[Timing]]:
    """Time (and, with ``memory``, probe the peak memory of) every method of the named cases,
    ``build(name, quick, device)`` giving a case's methods (``bench.cases.build``).

    A run takes minutes, so with ``progress`` a line per case and per measured method goes to
    stderr as it happens.
    """

    def report(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    results = {}
    for case_index, name in enumerate(names, 1):
        methods = build(name, quick, device)
        report(f"[{case_index}/{len(names)}] {name}: {len(methods)} methods")
        timings = []
        for method_index, method in enumerate(methods, 1):
            if method.missing:
                timings.append(Timing(f"{method.name} ({method.missing})", method.role, None, None, None,
                                      group=method.group))
                report(f"[{case_index}/{len(names)}] {name} {method_index}/{len(methods)} {method.name}: "
                       f"skipped, {method.missing}")
                continue
            timing = time_method(method, repeats=repeats)
            if memory:
                timing.peak_mb = measure_peak(name, method.name, quick, device)
            timings.append(timing)
            peak = f", peak {timing.peak_mb:.1f} MB" if timing.peak_mb is not None else ""
            report(f"[{case_index}/{len(names)}] {name} {method_index}/{len(methods)} {method.name}: "
                   f"total {timing.total_ms:.2f} ms{peak}")
        results[name] = timings
    return results


TABLE_HEADER = ("case", "method", "fwd ms", "bwd ms", "total ms", "ours x", "/floor", "peak MB")


def table_rows(results: dict[str, list[Timing]]) -> list[tuple[str, ...]]:
    """One tuple of cells per method, in ``TABLE_HEADER`` order ("-" where a value does not apply)."""

    def cell(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = []
    for name, timings in results.items():
        ratios = speedups(timings)
        for t in timings:
            floor = _first_of_group(timings, t, "floor")
            vs_floor = t.total_ms / floor.total_ms if floor and t.role != "floor" and t.total_ms else None
            rows.append((name, t.method, cell(t.forward_ms), cell(t.backward_ms), cell(t.total_ms),
                         cell(ratios.get(t.method)), cell(vs_floor), cell(t.peak_mb, 1)))
    return rows


def format_table(results: dict[str, list[Timing]], *, memory: bool = True) -> str:
    """The results as a text table whose column widths come from the content, so a long case or
    method name never runs into its neighbour; without ``memory`` the peak MB column is left out."""
    columns = len(TABLE_HEADER) if memory else len(TABLE_HEADER) - 1
    lines = [TABLE_HEADER[:columns], *(row[:columns] for row in table_rows(results))]
    widths = [max(len(line[i]) for line in lines) for i in range(columns)]

    def render(cells) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    header = render(lines[0])
    return "\n".join([header, "-" * len(header), *(render(line) for line in lines[1:])])


def to_json(results: dict[str, list[Timing]], path: str, meta: dict) -> None:
    """Write results as JSON: {"meta": ..., "cases": {case: [timing dicts]}}."""
    payload = {"meta": meta, "cases": {c: [dataclasses.asdict(t) for t in ts] for c, ts in results.items()}}
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2)
