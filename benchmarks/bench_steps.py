"""The training steps users run (heads-frozen, first-layer, bnn-step, mcdropout-step, threads), at
the tiny shapes of ``udn_kernels.bench.cases`` so the suite never rots; the same case definitions
run at full size in ``udn bench --cases NAME`` and ``benchmarks/step_ratios.py``.

Agreement checks where methods compute the same thing: the frozen-input heads loss and its
remaining gradient (ours vs eager), the Bayesian MLP loss with sigma -> 0 (ours vs eager by
hand), the MC-dropout MLP's deterministic prediction (``BernoulliLinear`` vs ``nn.Dropout``).
bayesian-torch computes the same model only in distribution: its rows check that it runs and
gives finite losses, and are skipped when it is not installed.

Run: ``python -m pytest benchmarks/bench_steps.py --benchmark-enable``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import udn_kernels
from udn_kernels import nn as udn_nn
from udn_kernels.bench import cases, harness

SIZE = "tiny"
needs_cpp = pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built")


def _methods(case: str) -> dict[str, harness.Method]:
    return {m.name: m for m in cases.build(case, quick=False, size=SIZE)}


def _case_methods():
    """(case, method name, needs bayesian-torch) of every step case, built once to list them."""
    return [(case, m.name.split(" (")[0] if m.missing else m.name, m.missing is not None or "bayesian-torch" in m.name)
            for case in cases.SIZED_CASES for m in cases.build(case, quick=False, size=SIZE)]


@needs_cpp
@pytest.mark.parametrize("case, method, peer", _case_methods())
def test_step(benchmark, case, method, peer):
    if peer:
        pytest.importorskip("bayesian_torch", reason="bayesian-torch (udn_kernels[peers]) not installed")
    chosen = _methods(case)[method]
    benchmark.group = f"{case} {chosen.group}".strip()

    def step():
        leaves = harness.grad_leaves(chosen.forward()) if chosen.backward else []
        for leaf in leaves:
            leaf.grad = None
        harness.train_once(chosen)
        return leaves

    with udn_kernels.backend("cpu"), harness.num_threads(chosen.threads):
        leaves = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    if chosen.role != "floor":
        assert torch.isfinite(chosen.forward()).all()
        assert leaves and all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


@needs_cpp
@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_heads_frozen_ours_matches_eager_loss_and_gradient(frozen):
    methods = _methods("heads-frozen")
    ours, eager = methods[f"udn, {frozen} frozen"].forward(), methods[f"eager, {frozen} frozen"].forward()
    leaves = harness.grad_leaves(ours)
    assert len(leaves) == 1 and harness.grad_leaves(eager) == leaves  # the frozen tensor is no leaf
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, leaves), torch.autograd.grad(eager, leaves),
                               rtol=1e-5, atol=1e-6)


@needs_cpp
def test_first_layer_input_gets_no_gradient():
    for name, method in _methods("first-layer").items():
        if method.role != "floor":  # weight and bias (mu, rho) only: x is data
            assert len(harness.grad_leaves(method.forward())) == 2, name


def test_bayesian_mlp_loss_matches_eager_by_hand_as_sigma_vanishes():
    torch.manual_seed(0)
    widths = cases.STEP_SHAPES["bnn-step"][SIZE][1]
    ours, by_hand = cases.gaussian_mlps(widths)
    with torch.no_grad():  # sigma = softplus(-20) ~ 2e-9: every draw is the mean, the KL stays finite
        for model in (ours, by_hand):
            for name, p in model.named_parameters():
                if name.endswith("rho"):
                    p.fill_(-20.0)
    x, y = torch.randn(8, widths[0]), torch.randint(0, widths[-1], (8,))
    expected = F.cross_entropy(ours(x), y) + udn_nn.kl(ours) / cases.N_DATA
    torch.testing.assert_close(cases.eager_gaussian_mlp_loss(by_hand, x, y, cases.N_DATA), expected, rtol=1e-5, atol=1e-5)


def test_mcdropout_mlps_share_the_deterministic_prediction():
    torch.manual_seed(0)
    widths = cases.STEP_SHAPES["mcdropout-step"][SIZE][0]
    ours, eager = cases.mcdropout_mlps(widths)
    x = torch.randn(8, widths[0])
    with udn_nn.deterministic(ours):
        torch.testing.assert_close(ours(x), eager.eval()(x))


def test_missing_peer_is_reported_not_measured(monkeypatch):
    # udn bench prints the peer's row as not installed and measures the rest of the case.
    monkeypatch.setattr(cases, "bayesian_torch", lambda: None)
    monkeypatch.setitem(cases.CASES, "bnn-step-tiny", lambda quick: cases.SIZED_CASES["bnn-step"](SIZE))
    results = harness.run_cases(["bnn-step-tiny"], cases.build, quick=True, repeats=1, memory=False, progress=False)
    rows = {row[1]: row for row in harness.table_rows(results)}
    skipped = [name for name in rows if "not installed" in name]
    assert [name.split(" (")[0] for name in skipped] == [
        "bayesian-torch LinearReparameterization", "bayesian-torch LinearFlipout", "bayesian-torch dnn_to_bnn MLP"]
    assert all(set(rows[name][2:]) == {"-"} for name in skipped)
    assert float(rows["eager MLP by hand"][5]) > 0  # its ratio to ours, within the "mlp" group
