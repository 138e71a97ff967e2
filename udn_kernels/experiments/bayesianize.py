"""bayesianize: make a trained CNN Bayesian after the fact (MOPED) and compare it with MC dropout.

A small CNN with dropout is trained on scikit-learn's digits (8x8) as usual. Three predictors of
the same trained weights are then scored on the test split and on out-of-distribution inputs (the
test digits with their 64 pixels shuffled, a fresh permutation per image):

- deterministic: the CNN in ``eval()``;
- MC dropout: ``to_mc_dropout`` (``nn.Dropout`` + ``nn.Linear`` -> ``BernoulliLinear``), ``S`` masks
  in one batched ``mc_predict`` pass, no retraining;
- converted: ``bayesianize`` (every conv and linear layer Gaussian, MOPED ``mu = w``,
  ``sigma = delta |w|``), ``S`` weight draws, as converted and after fine-tuning on
  ``cross-entropy + kl(model) / n``.

Reported: accuracy, NLL, ECE, predictive entropy in and out of distribution, and a reliability
diagram per predictor. Claim looked for: the two Bayesian predictors keep the accuracy, improve
NLL / ECE and give higher entropy to the shuffled digits than the deterministic net.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._cli_support import pyplot
from ._common import Timer, finish, fit, register, sklearn_dataset, table

FULL = dict(channels=(16, 32), hidden=64, p=0.25, epochs=40, lr=2e-3, batch_size=64, delta=0.05,
            prior_std=0.1, finetune_epochs=3, finetune_lr=5e-4, samples=50)
QUICK = dict(channels=(4, 8), hidden=16, p=0.25, epochs=3, lr=5e-3, batch_size=64, delta=0.05,
             prior_std=0.1, finetune_epochs=1, finetune_lr=5e-4, samples=8)
BINS = 10  # reliability diagram bins


def digits_cnn(channels: tuple[int, int], hidden: int, p: float) -> nn.Sequential:
    """Flat 64-pixel digits -> 1x8x8 -> two conv+pool blocks -> dropout MLP head -> 10 logits."""
    c1, c2 = channels
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                         nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(p), nn.Linear(c2 * 4, hidden), nn.ReLU(),
                         nn.Dropout(p), nn.Linear(hidden, 10))


def shuffled_pixels(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Every row's features permuted by its own random permutation (same pixel values, no digit)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(x.shape, generator=generator).argsort(1)
    return x.gather(1, order)


def reliability(probs: torch.Tensor, target: torch.Tensor, bins: int = BINS) -> dict:
    """Per confidence bin (equal width on [0, 1]): mean confidence, accuracy and count."""
    confidence, predicted = probs.max(1)
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    per_bin = lambda v: (torch.zeros(bins, dtype=torch.float64).index_add_(0, index, v.double()) / count.clamp_min(1))
    return {"confidence": per_bin(confidence).tolist(), "accuracy": per_bin((predicted == target).float()).tolist(),
            "count": count.long().tolist()}


def scores(probs: torch.Tensor, target: torch.Tensor, ood_probs: torch.Tensor) -> dict:
    from .. import metrics
    return {"accuracy": float(metrics.accuracy(probs, target)), "nll": float(metrics.nll(probs, target)),
            "ece": float(metrics.ece(probs, target)), "entropy": float(metrics.predictive_entropy(probs)),
            "ood_entropy": float(metrics.predictive_entropy(ood_probs)),
            "reliability": reliability(probs, target)}


@register("bayesianize")
def run(args) -> dict:
    """Deterministic CNN vs its MC-dropout and MOPED-converted versions on digits (+ shuffled digits)."""
    from ..nn import bayesianize, kl, mc_predict, to_mc_dropout
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    torch.manual_seed(args.seed)
    x, y, x_test, y_test, _ = sklearn_dataset("digits", seed=args.seed)
    x_ood, n = shuffled_pixels(x_test, args.seed), len(x)
    model = digits_cnn(cfg["channels"], cfg["hidden"], cfg["p"])
    fit(model, lambda m, xb, yb: F.cross_entropy(m(xb), yb), x, y, epochs=cfg["epochs"], lr=cfg["lr"],
        batch_size=cfg["batch_size"], seed=args.seed)
    model.eval()
    dropout = to_mc_dropout(model)
    moped = bayesianize(model, init="moped", delta=cfg["delta"], prior_std=cfg["prior_std"])
    converted = bayesianize(model, init="moped", delta=cfg["delta"], prior_std=cfg["prior_std"])
    fit(converted, lambda m, xb, yb: F.cross_entropy(m(xb), yb) + kl(m) / n, x, y,
        epochs=cfg["finetune_epochs"], lr=cfg["finetune_lr"], batch_size=cfg["batch_size"], seed=args.seed + 1)
    converted.eval()  # its nn.Dropout modules were for fine-tuning; its Gaussian layers sample in eval too
    samples = cfg["samples"]
    with torch.no_grad():
        predictors = {
            "deterministic": lambda inputs: model(inputs).softmax(-1),
            f"MC dropout (S={samples})": lambda inputs: mc_predict(dropout, inputs, samples),
            f"MOPED, no fine-tuning (S={samples})": lambda inputs: mc_predict(moped, inputs, samples),
            f"MOPED + fine-tuning (S={samples})": lambda inputs: mc_predict(converted, inputs, samples),
        }
        results = {name: scores(predict(x_test), y_test, predict(x_ood)) for name, predict in predictors.items()}
    print(f"bayesianize: digits CNN {cfg['channels']} + MLP {cfg['hidden']}, dropout p={cfg['p']}, "
          f"{cfg['epochs']} epochs; MOPED delta={cfg['delta']}, prior_std={cfg['prior_std']}, "
          f"{cfg['finetune_epochs']} fine-tuning epochs; {len(y_test)} test points, OOD = shuffled pixels")
    rows = [[name, r["accuracy"], r["nll"], r["ece"], r["entropy"], r["ood_entropy"]] for name, r in results.items()]
    text = table(["predictor", "accuracy", "NLL", "ECE", "H(test)", "H(OOD)"], rows, [30, 10, 10, 10, 10, 10])

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.8), sharey=True)
    edges = torch.linspace(0, 1, BINS + 1)
    for ax, (name, r) in zip(axes, results.items()):
        curve = r["reliability"]
        ax.bar(edges[:-1], curve["accuracy"], width=1 / BINS, align="edge", edgecolor="k", alpha=0.7,
               label="accuracy per bin")
        for left, acc, count in zip(edges[:-1].tolist(), curve["accuracy"], curve["count"]):
            if count:  # most bins near 1 hold a handful of points: show how many
                ax.text(left + 0.5 / BINS, acc + 0.01, str(count), ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="tab:red", label="perfect calibration")
        ax.set_title(f"{name}\nECE {r['ece']:.3f}, NLL {r['nll']:.3f}", fontsize=9)
        ax.set_xlabel("confidence (bar labels: test points per bin)")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_ylim(0, 1.12)
    axes[0].set_ylabel("accuracy")
    print(f"time {timer():.1f} s")
    return finish(args, "bayesianize", {"config": cfg, "results": results, "table": text, "seconds": timer()}, fig)
