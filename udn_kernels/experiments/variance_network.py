"""variance-network (Neklyudov et al. 2019): networks whose weights have zero mean still learn.

MLPs ``64 -> H -> H -> 10`` on scikit-learn's digits whose two hidden layers are zero-mean
variance layers — Gaussian (``GaussianLinear(zero_mean=True)``, local reparameterisation,
``w ~ N(0, sigma^2)``) or symmetric Bernoulli (``BernoulliLinear(mask="symmetric")``,
``w = phi * (+-1)``) — and a deterministic output layer, against the same MLP with MC dropout.
All information sits in the variances, so the mean-weight prediction (``deterministic``) is the
output of a network whose hidden weights are 0: a constant, at chance level, while the 20-sample
Monte-Carlo ensemble is close to the dropout network.

Objective: the expected log-likelihood only. Under the log-uniform prior of the paper a zero-mean
layer has ``alpha = inf`` and a constant KL, so the ELBO of a variance network is its data term;
the dropout net gets the same objective for a like-for-like comparison.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ._common import Timer, finish, fit, pyplot, register, sklearn_dataset, table

# Variance networks learn slowly from scratch (all signal sits in noise magnitudes): they get more
# epochs and a larger step than the dropout net, which has converged by 30 epochs.
FULL = dict(hidden=128, batch_size=64, samples=20,
            epochs={"dropout": 30, "gaussian": 100, "bernoulli": 100},
            lr={"dropout": 3e-3, "gaussian": 1e-2, "bernoulli": 1e-2})
QUICK = dict(hidden=32, batch_size=64, samples=8, epochs={"dropout": 3, "gaussian": 3, "bernoulli": 3},
             lr={"dropout": 1e-2, "gaussian": 1e-2, "bernoulli": 1e-2})
MODELS = {"dropout": "MC dropout p=0.2/0.5", "gaussian": "Gaussian variance layers",
          "bernoulli": "symmetric Bernoulli variance layers"}


def variance_mlp(kind: str, in_features: int, hidden: int, out_features: int) -> nn.Module:
    """``in -> hidden -> hidden -> out``; the two hidden layers stochastic as ``kind`` says."""
    from ..nn import BernoulliLinear, GaussianLinear
    if kind == "dropout":
        first, second = BernoulliLinear(in_features, hidden, p=0.2), BernoulliLinear(hidden, hidden, p=0.5)
    elif kind == "gaussian":
        first = GaussianLinear(in_features, hidden, zero_mean=True, estimator="local")
        second = GaussianLinear(hidden, hidden, zero_mean=True, estimator="local")
    elif kind == "bernoulli":
        first = BernoulliLinear(in_features, hidden, mask="symmetric")
        second = BernoulliLinear(hidden, hidden, mask="symmetric")
    else:
        raise ValueError(f"kind: expected one of {list(MODELS)}, got {kind!r}")
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(hidden, out_features))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int) -> dict:
    """Accuracy and NLL of the mean-weight, single-sample and ``samples``-sample MC predictions."""
    from .. import metrics
    from ..nn import deterministic, mc_predict
    with torch.no_grad():
        with deterministic(model):
            mean_weights = model(x).softmax(-1)
        mc, per_sample = mc_predict(model, x, samples, return_samples=True)
    out = {}
    for name, probs in (("deterministic", mean_weights), ("1 sample", per_sample[0]), (f"MC {samples}", mc)):
        out[name] = {"accuracy": float(metrics.accuracy(probs, y)), "nll": float(metrics.nll(probs, y))}
    return out


@register("variance-network")
def run(args) -> dict:
    """Mean-weight vs MC accuracy of Gaussian / Bernoulli variance networks and a dropout net."""
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    x, y, x_test, y_test, _ = sklearn_dataset("digits", seed=args.seed)
    results = {}
    for kind in MODELS:
        torch.manual_seed(args.seed)
        model = variance_mlp(kind, x.shape[1], cfg["hidden"], 10)
        fit(model, lambda m, xb, yb: F.cross_entropy(m(xb), yb), x, y, epochs=cfg["epochs"][kind],
            lr=cfg["lr"][kind], batch_size=cfg["batch_size"], seed=args.seed)
        results[kind] = evaluate(model, x_test, y_test, cfg["samples"])
        print(f"  trained {kind} [{timer():.0f} s]", flush=True)
    columns = list(results["dropout"])
    print(f"variance-network: digits, MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, epochs {cfg['epochs']}; "
          f"test accuracy (NLL); chance = 0.1")
    rows = [[MODELS[k]] + [f"{r[c]['accuracy']:.3f} ({r[c]['nll']:.2f})" for c in columns]
            for k, r in results.items()]
    text = table(["model"] + columns, rows, [38, 16, 16, 16])

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        ax.bar([k + i * width for k in range(len(results))], [r[column]["accuracy"] for r in results.values()],
               width, label=column)
    ax.axhline(0.1, color="k", ls=":", label="chance")
    ax.set_xticks([k + width for k in range(len(results))], list(MODELS.values()), fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_title("digits: zero-mean variance networks vs MC dropout")
    ax.legend(fontsize=8)
    print(f"time {timer():.1f} s")
    return finish(args, "variance-network", {"config": cfg, "results": results, "table": text,
                                             "seconds": timer()}, fig)
