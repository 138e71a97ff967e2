"""depth-vs-complexity (Nazaret & Blei 2022): the learned depth grows with the difficulty of the data.

A UDN (``UDN.mlp``, MAP weights, truncated-Poisson ``q(l)``) is fitted by maximising the ELBO on
2-D spirals of increasing winding (``udn_kernels.data.spirals``, ``phase`` = number of extra turns).
Every phase gets the same data size, architecture, optimiser and number of epochs; the claim is
that the posterior mean depth ``E_q[l]`` increases with the winding.

Choices that make the hard windings learnable in a CPU budget (measured, see docs/experiments.md):
coordinates scaled by 3 (ReLU nets at default init fit high-frequency targets faster), spiral
noise 0.02, small batches (more Adam steps), ``init_rate=3`` so the first layers get trained
before ``q(l)`` can collapse onto depth 1-2 while the data term is still flat, and a cosine
learning-rate decay to 1% over 400 epochs (a constant rate stalls phases 4-5 below 90%).
"""
from __future__ import annotations

import math

import torch

from .._cli_support import pyplot
from ._common import Timer, finish, fit, mean_std, register, table

FULL = dict(phases=[0, 1, 2, 3, 4, 5, 6], seeds=1, n_train=1024, width=64, epochs=400, lr=3e-3,
            final_lr=0.01, batch_size=64, init_rate=3.0, input_scale=3.0, noise=0.02)
QUICK = dict(phases=[0, 3], seeds=1, n_train=256, width=16, epochs=12, lr=1e-2, final_lr=0.01,
             batch_size=64, init_rate=3.0, input_scale=3.0, noise=0.02)


def cosine_lr(optimizer, cfg: dict):
    """``on_epoch`` callback: cosine decay from ``lr`` to ``final_lr * lr`` over the epochs, applied
    to every param group (growth adds groups, which an LR scheduler would not see)."""
    def on_epoch(epoch: int, loss: float) -> None:
        floor = cfg["final_lr"]
        scale = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (epoch + 1) / cfg["epochs"]))
        for group in optimizer.param_groups:
            group["lr"] = cfg["lr"] * scale
    return on_epoch


def fit_phase(phase: float, cfg: dict, seed: int) -> dict:
    """Train one UDN on spirals of ``phase``; its ``E_q[l]``, ``q(l)`` and test accuracy."""
    from .. import metrics
    from ..data import spirals
    from ..nn import UDN
    torch.manual_seed(seed)
    x, y = spirals(cfg["n_train"], phase=phase, noise=cfg["noise"], seed=seed)
    x_test, y_test = spirals(2048, phase=phase, noise=cfg["noise"], seed=seed + 10_000)
    x, x_test = x * cfg["input_scale"], x_test * cfg["input_scale"]
    model = UDN.mlp(2, cfg["width"], 2, init_rate=cfg["init_rate"])
    optimizer = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    n = len(x)
    fit(model, lambda m, xb, yb: m.loss(xb, yb, n_data=n), x, y, epochs=cfg["epochs"], lr=cfg["lr"],
        batch_size=cfg["batch_size"], seed=seed, optimizer=optimizer, on_epoch=cosine_lr(optimizer, cfg))
    with torch.no_grad():
        probs = model.predict(x_test)
        return {"phase": phase, "seed": seed, "E[l]": float(model.depth.mean()),
                "rate": float(model.depth.rate), "q": model.depth.probs().tolist(),
                "accuracy": float(metrics.accuracy(probs, y_test)), "nll": float(metrics.nll(probs, y_test))}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (no ties expected)."""
    ranks = [torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@register("depth-vs-complexity")
def run(args) -> dict:
    """Fit a UDN per spiral winding; table and plot of ``q(l)`` and ``E_q[l]`` per phase."""
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    runs = [fit_phase(float(p), cfg, args.seed + s) for p in cfg["phases"] for s in range(cfg["seeds"])]
    by_phase = {p: [r for r in runs if r["phase"] == p] for p in cfg["phases"]}
    rows = []
    for phase, group in by_phase.items():
        depth_mean, depth_std = mean_std([r["E[l]"] for r in group])
        acc, _ = mean_std([r["accuracy"] for r in group])
        rows.append([phase, depth_mean, depth_std, len(group[0]["q"]), acc])
    print(f"depth-vs-complexity: UDN.mlp width {cfg['width']}, {cfg['n_train']} training points, "
          f"{cfg['epochs']} epochs, {cfg['seeds']} seed(s) per phase")
    text = table(["phase", "E_q[l]", "std", "support L", "test acc"], rows, [7, 10, 8, 11, 10])

    plt = pyplot()
    fig, (ax_q, ax_d) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.cm.viridis(torch.linspace(0, 0.9, len(by_phase)).numpy())
    for colour, (phase, group) in zip(colours, by_phase.items()):
        q = group[0]["q"]
        ax_q.plot(range(1, len(q) + 1), q, "o-", color=colour, label=f"phase {phase:g}")
    ax_q.set_xlabel("depth l")
    ax_q.set_ylabel("q(l)")
    ax_q.set_title("posterior over depth (first seed)")
    ax_q.legend(fontsize=8)
    phases = list(by_phase)
    ax_d.errorbar(phases, [r[1] for r in rows], yerr=[r[2] for r in rows], fmt="o-", label="E_q[l]")
    ax_d.set_xlabel("spiral phase (turns)")
    ax_d.set_ylabel("posterior mean depth E_q[l]")
    ax_acc = ax_d.twinx()
    ax_acc.plot(phases, [r[4] for r in rows], "s--", color="tab:red", label="test accuracy")
    ax_acc.set_ylabel("test accuracy", color="tab:red")
    ax_acc.set_ylim(0.4, 1.02)
    ax_d.set_title("learned depth vs winding")
    depths = [r[1] for r in rows]
    print(f"Spearman(phase, E_q[l]) = {spearman(phases, depths):.3f}; time {timer():.1f} s")
    return finish(args, "depth-vs-complexity", {
        "config": cfg, "phases": phases, "E[l]": depths, "runs": runs, "table": text,
        "spearman_phase_depth": spearman(phases, depths),
        "seconds": timer()}, fig)
