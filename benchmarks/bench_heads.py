"""heads-small / heads-lm (docs/design.md, "Benchmarks"): the fused depth-mixture loss vs what users write.

Methods (all compute the expected-mode loss ``sum_l w_l CE(head_l(h_l), y)`` and its gradients):
``fused`` (``udn_kernels.depth_mixture_nll`` on the C++ backend), ``eager`` (a loop of
``nn.Linear`` heads + ``F.cross_entropy``), ``compiled`` (``torch.compile`` of that loop),
``linear_ce`` (``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, looping depths) and
``floor`` (the same three matrix products alone: logits, dH, dW). Passes: ``forward``,
``backward``, ``fwd+bwd``. Mixture mode (``-log sum_l w_l p_l``) is benchmarked too, with
``recompute`` (forward + recomputing backward) in place of ``linear_ce``. Tiny shapes by default (so
the suite never rots); ``UDN_BENCH_FULL=1`` selects the full sizes of ``udn bench``. The baselines,
floors and full shapes are those of ``udn_kernels.bench.cases``.

Run: ``python -m pytest benchmarks/bench_heads.py --benchmark-enable`` (pytest-benchmark table),
``python benchmarks/bench_heads.py [--threads N] [--cases a,b] [--methods a,b]`` (medians and
ratios to ``fused`` measured in one process) or
``python benchmarks/bench_heads.py --predict`` (``depth_mixture_predict``: fused vs the eager loop
vs the L logits GEMMs alone, interleaved) or
``python benchmarks/bench_heads.py --interleaved [--mode mixture] [--cases a,b] [--rounds R]
[--block B]`` (fwd+bwd of fused / the recompute path / eager / compiled, interleaved round by
round, B consecutive calls each, medians) or
``python benchmarks/bench_heads.py --memory`` (peak extra RSS of the fused fwd+bwd at L=8,
N=4096, D=512, C=32000 in a fresh subprocess).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch
import udn_kernels
from udn_kernels.bench import cases as bench_cases

FULL = os.environ.get("UDN_BENCH_FULL") == "1"
CASES = {
    # name: (L, N, D, C, head per depth)
    "heads-small": bench_cases.HEADS_SHAPES["heads-small"] if FULL else (4, 32, 16, 10, True),
    "heads-lm": bench_cases.HEADS_SHAPES["heads-lm"] if FULL else (2, 64, 32, 1000, False),
}
METHODS = ("fused", "eager", "compiled", "linear_ce", "floor")
# mixture mode has no F.linear_cross_entropy peer; "recompute" is its previous 4-GEMM path
MODE_METHODS = {"expected": METHODS, "mixture": ("fused", "recompute", "eager", "compiled", "floor")}
PASSES = ("forward", "backward", "fwd+bwd")


class Problem:
    """Inputs of one case: hidden states, the heads (``[L, C, D]`` + bias per depth, or one shared
    bias-free ``[C, D]``), targets, log-weights and the logits gradients of the GEMM floor."""

    def __init__(self, L, N, D, C, per_depth, seed=0, mode="expected"):
        torch.manual_seed(seed)
        self.L, self.N, self.D, self.C, self.per_depth, self.mode = L, N, D, C, per_depth, mode
        self.hidden = torch.randn(L, N, D).requires_grad_()
        self.target = torch.randint(0, C, (N,))
        self.log_weights = torch.log_softmax(torch.randn(L), 0).requires_grad_()
        self.weight = (torch.randn(*((L, C, D) if per_depth else (C, D))) / D ** 0.5).requires_grad_()
        self.bias = torch.zeros(L, C, requires_grad=True) if per_depth else None
        self.grad_logits = torch.randn(L, N, C) if per_depth else torch.randn(L * N, C)
        self._compiled = None

    # ---- the methods: each returns the scalar loss
    def fused(self):
        with udn_kernels.backend("cpu"):
            return udn_kernels.depth_mixture_nll(self.hidden, self.weight, self.bias, self.target,
                                                 self.log_weights, mode=self.mode)

    def recompute(self):
        """The same loss through forward + recomputing backward kernels (reduction none)."""
        with udn_kernels.backend("cpu"):
            return udn_kernels.depth_mixture_nll(self.hidden, self.weight, self.bias, self.target,
                                                 self.log_weights, mode=self.mode, reduction="none").mean()

    def eager(self):
        return bench_cases.eager_heads_loss(self.hidden, self.weight, self.bias, self.target,
                                            self.log_weights, self.mode)

    def compiled(self):
        if self._compiled is None:
            self._compiled = torch.compile(self.eager)
        return self._compiled()

    def linear_ce(self):
        return bench_cases.linear_ce_heads_loss(self.hidden, self.weight, self.bias, self.target,
                                                self.log_weights)

    def floor_forward(self):
        return bench_cases.heads_floor_forward(self.hidden, self.weight)

    def floor_backward(self):
        return bench_cases.heads_floor_backward(self.hidden, self.weight, self.grad_logits)

    def zero_grad(self):
        for t in (self.hidden, self.log_weights, self.weight, self.bias):
            if t is not None:
                t.grad = None


def runner(problem: Problem, method: str, pass_: str):
    """``(setup, run)``: ``run`` times one pass; ``setup`` prepares it (the forward, for backward)."""
    if method == "floor":
        fn = {"forward": problem.floor_forward, "backward": problem.floor_backward,
              "fwd+bwd": lambda: (problem.floor_forward(), problem.floor_backward())}[pass_]
        return (lambda: None), (lambda _: fn())
    loss_fn = getattr(problem, method)
    if pass_ == "forward":
        return (lambda: None), (lambda _: loss_fn())
    if pass_ == "backward":
        def setup():
            problem.zero_grad()
            return loss_fn()
        return setup, (lambda loss: loss.backward())

    def both(_):
        problem.zero_grad()
        loss_fn().backward()
    return (lambda: None), both


def measure(problem, method, pass_, repeats=5):
    """Median wall time (s) of ``repeats`` runs after one warm-up."""
    setup, run = runner(problem, method, pass_)
    times = []
    for i in range(repeats + 1):
        state = setup()
        t0 = time.perf_counter()
        run(state)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------ pytest-benchmark suite
_problems: dict[tuple[str, str], Problem] = {}


def _problem(case, mode="expected"):
    if (case, mode) not in _problems:
        _problems[case, mode] = Problem(*CASES[case], mode=mode)
    return _problems[case, mode]


@pytest.mark.parametrize("mode", list(MODE_METHODS))
@pytest.mark.parametrize("case", list(CASES))
def test_heads_methods_agree(case, mode):
    """Every benchmarked method computes the same loss and hidden gradient as the fused op."""
    problem = _problem(case, mode)
    results = {}
    for method in MODE_METHODS[mode][:-1]:
        problem.zero_grad()
        loss = getattr(problem, method)()
        loss.backward()
        results[method] = (loss.detach(), problem.hidden.grad.clone())
    for method, (loss, grad) in results.items():
        torch.testing.assert_close(loss, results["fused"][0], rtol=1e-4, atol=1e-5, msg=method)
        torch.testing.assert_close(grad, results["fused"][1], rtol=1e-3, atol=1e-6, msg=method)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("mode,method", [(mode, m) for mode, ms in MODE_METHODS.items() for m in ms])
@pytest.mark.parametrize("case", list(CASES))
def test_heads(benchmark, case, mode, method, pass_):
    benchmark.group = f"{case} {mode} {pass_}"
    setup, run = runner(_problem(case, mode), method, pass_)
    benchmark.pedantic(run, setup=lambda: ((setup(),), {}), rounds=3 if FULL else 5, warmup_rounds=1)


# ------------------------------------------------------------------ depth_mixture_predict (no backward)
PREDICT_CASES = {
    # name: (L, N, D, C, head per depth)
    "predict-small": bench_cases.HEADS_SHAPES["heads-small"] if FULL else (4, 32, 16, 10, True),
    "predict-lm": bench_cases.PREDICT_SHAPE if FULL else (2, 64, 32, 1000, False),
}
PREDICT_METHODS = ("fused", "eager", "floor")


def predict_methods(L, N, D, C, per_depth, seed=0):
    """``{method: fn}``: fused op, the eager loop over depths, the L logits GEMMs alone."""
    torch.manual_seed(seed)
    hidden = torch.randn(L, N, D)
    weight = torch.randn(*((L, C, D) if per_depth else (C, D))) / D ** 0.5
    bias = torch.randn(L, C) if per_depth else None
    log_weights = torch.log_softmax(torch.randn(L), 0)

    def fused():
        with udn_kernels.backend("cpu"):
            return udn_kernels.depth_mixture_predict(hidden, weight, bias, log_weights)

    return {"fused": fused, "eager": lambda: bench_cases.eager_predict(hidden, weight, bias, log_weights),
            "floor": lambda: bench_cases.predict_floor(hidden, weight)}


@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict_methods_agree(case):
    methods = predict_methods(*PREDICT_CASES[case])
    torch.testing.assert_close(methods["fused"](), methods["eager"](), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", PREDICT_METHODS)
@pytest.mark.parametrize("case", list(PREDICT_CASES))
def test_predict(benchmark, case, method):
    benchmark.group = case
    benchmark.pedantic(predict_methods(*PREDICT_CASES[case])[method], rounds=3 if FULL else 5, warmup_rounds=1)


def predict_ratios(rounds=7):
    """Median ms per method, the methods interleaved round by round."""
    for case, shape in PREDICT_CASES.items():
        methods = predict_methods(*shape)
        times = {m: [] for m in methods}
        for _ in range(rounds + 1):
            for m, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
        med = {m: statistics.median(v[1:]) for m, v in times.items()}
        print(f"\n{case} {shape}")
        for m, t in med.items():
            print(f"{m:<8}{t * 1e3:>10.2f}ms   eager / {m}: {med['eager'] / t:6.2f}x", flush=True)


def interleaved_ratios(cases, mode, rounds, block):
    """fwd+bwd medians of fused / recompute / eager / compiled, interleaved round by round (in a
    rotating order) with ``block`` consecutive calls per method."""
    methods = ("fused", "recompute", "eager", "compiled")
    for case in cases:
        problem = Problem(*CASES[case], mode=mode)
        runs = {m: runner(problem, m, "fwd+bwd")[1] for m in methods}
        times = {m: [] for m in methods}
        for r in range(rounds + 1):
            # the order rotates: the method after another one finds the shared inputs in cache
            for m in methods[r % 4:] + methods[:r % 4]:
                t0 = time.perf_counter()
                for _ in range(block):
                    runs[m](None)
                if r:  # round 0 warms up (and compiles)
                    times[m].append((time.perf_counter() - t0) / block)
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"\n{case} {CASES[case]} mode={mode} rounds={rounds} block={block}")
        for m, t in med.items():
            print(f"{m:<10}{t * 1e3:>10.3f}ms   {m} / fused: {t / med['fused']:6.2f}x", flush=True)


# ------------------------------------------------------------------ peak memory (fresh subprocess)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(method, L, N, D, C):
    """Runs in the subprocess: one fwd+bwd of ``method``, prints the peak RSS above the baseline."""
    torch.manual_seed(0)
    hidden = torch.randn(L, N, D).requires_grad_()
    weight = torch.randn(C, D).mul_(D ** -0.5).requires_grad_()
    target = torch.randint(0, C, (N,))
    log_weights = torch.log_softmax(torch.randn(L), 0).requires_grad_()
    warm = Problem(2, 8, 4, 16, False)  # load libraries and the kernels before the baseline
    warm.fused().backward()
    warm.eager().backward()
    baseline = _rss_bytes()
    if method == "fused":
        with udn_kernels.backend("cpu"):
            loss = udn_kernels.depth_mixture_nll(hidden, weight, None, target, log_weights)
    else:  # the eager loop; materialises L [N, C] logits (and their softmax for backward)
        loss = bench_cases.eager_heads_loss(hidden, weight, None, target, log_weights)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "peak_extra_bytes": peak - baseline}))


def peak_extra_memory(method="fused", L=8, N=4096, D=512, C=32000) -> int:
    """Peak extra RSS (bytes) of one fwd+bwd with a shared head, measured in a fresh subprocess
    (sees every ATen CPU allocation; gradients of hidden and weight are included)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_heads; bench_heads._memory_child({method!r}, {L}, {N}, {D}, {C})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def main():
    if "--memory" in sys.argv:
        extra = peak_extra_memory()
        print(f"fused fwd+bwd L=8 N=4096 D=512 C=32000: peak extra RSS {extra / 2**30:.3f} GiB "
              f"(eager logits alone: {8 * 4096 * 32000 * 4 / 2**30:.1f} GiB)")
        return
    if "--threads" in sys.argv:
        torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]))
    print(f"threads={torch.get_num_threads()} full={FULL}")
    if "--predict" in sys.argv:
        predict_ratios()
        return
    if "--interleaved" in sys.argv:
        interleaved_ratios(_option("--cases", list(CASES)), _option("--mode", ["expected"])[0],
                           int(_option("--rounds", ["30"])[0]), int(_option("--block", ["1"])[0]))
        return
    cases = _option("--cases", list(CASES))
    methods = ["fused"] + [m for m in _option("--methods", list(METHODS)) if m != "fused"]
    for case in cases:
        problem = _problem(case)
        print(f"\n{case} {CASES[case]}")
        print(f"{'method':<10}" + "".join(f"{p:>12}" for p in PASSES) + "   fwd+bwd / fused")
        fused = None
        for m in methods:
            row = {p: measure(problem, m, p, repeats=3 if FULL else 7) for p in PASSES}
            fused = fused or row["fwd+bwd"]
            print(f"{m:<10}" + "".join(f"{row[p] * 1e3:>10.2f}ms" for p in PASSES) +
                  f"   {row['fwd+bwd'] / fused:6.2f}x", flush=True)


def _option(flag, default):
    """Comma-separated values after ``flag`` on the command line, else ``default``."""
    return sys.argv[sys.argv.index(flag) + 1].split(",") if flag in sys.argv else default


if __name__ == "__main__":
    main()
