"""variance-network (Neklyudov et al. 2019): networks whose weights have zero mean still learn.

MLPs ``64 -> H -> H -> 10`` on scikit-learn's digits whose two hidden layers are zero-mean
variance layers — Gaussian (``GaussianLinear(zero_mean=True)``, local reparameterisation,
``w ~ N(0, sigma^2)``) or symmetric Bernoulli (``BernoulliLinear(mask="symmetric")``,
``w = phi * (+-1)``) — and a deterministic output layer, against the same MLP with MC dropout.
All information sits in the variances, so the mean-weight prediction (``deterministic``) is the
output of a network whose hidden weights are 0: a constant, at chance level, while the 20-sample
Monte-Carlo ensemble is close to the dropout network.

Objective: the expected log-likelihood only, estimated with ``draws`` weight samples per step.
Under the log-uniform prior of the paper a zero-mean layer has ``alpha = inf`` and a constant KL,
so the ELBO of a variance network is its data term; the dropout net gets the same objective.

What makes the variance networks train (measured, docs/experiments.md): pixel intensities in
[0, 1] rather than standardised pixels (a variance layer sees its input only through ``x^2``, and a
standardised pixel loses its sign there); a larger step for the Gaussian sigmas (they are
``softplus(rho)``, so Adam moves them by a fixed *fraction* per step); several weight draws per
step; width 512; and, as in the paper's code, batch norm after each Gaussian variance layer (the
Bernoulli layer draws one mask per batch, so its batch statistics would not match the running
ones used at test time: it keeps its bias instead).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._cli_support import pyplot
from ._common import Timer, finish, fit, register, sklearn_dataset, table

FULL = dict(hidden=512, samples=20,
            train={"dropout": dict(epochs=30, lr=3e-3, draws=1, batch_size=64),
                   "gaussian": dict(epochs=90, lr=3e-2, draws=4, batch_size=64),
                   "bernoulli": dict(epochs=60, lr=3e-3, draws=8, batch_size=32)})
QUICK = dict(hidden=128, samples=8,
             train={"dropout": dict(epochs=3, lr=1e-2, draws=1, batch_size=64),
                    "gaussian": dict(epochs=6, lr=3e-2, draws=2, batch_size=64),
                    "bernoulli": dict(epochs=3, lr=3e-3, draws=2, batch_size=64)})
MODELS = {"dropout": "MC dropout p=0.2/0.5", "gaussian": "Gaussian variance layers",
          "bernoulli": "symmetric Bernoulli variance layers"}


class FeatureBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the last dim of ``[..., C]`` (statistics pooled over MC samples and rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def variance_mlp(kind: str, in_features: int, hidden: int, out_features: int) -> nn.Module:
    """``in -> hidden -> hidden -> out``; the two hidden layers stochastic as ``kind`` says."""
    from ..nn import BernoulliLinear, GaussianLinear

    def hidden_layer(i: int, o: int, p: float) -> nn.Module:
        if kind == "dropout":
            return BernoulliLinear(i, o, p=p)
        if kind == "gaussian":
            return nn.Sequential(GaussianLinear(i, o, zero_mean=True, estimator="local", bias=False),
                                 FeatureBatchNorm(o))
        if kind == "bernoulli":
            return BernoulliLinear(i, o, mask="symmetric")
        raise ValueError(f"kind: expected one of {list(MODELS)}, got {kind!r}")

    return nn.Sequential(hidden_layer(in_features, hidden, 0.2), nn.ReLU(), hidden_layer(hidden, hidden, 0.5),
                         nn.ReLU(), nn.Linear(hidden, out_features))


def expected_nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """Cross-entropy averaged over ``draws`` weight samples (one batched pass)."""
    from ..nn import sampling
    if draws == 1:
        return F.cross_entropy(model(x), y)
    with sampling(draws):
        logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(draws))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int) -> dict:
    """Accuracy and NLL of the mean-weight, single-sample and ``samples``-sample MC predictions."""
    from .. import metrics
    from ..nn import deterministic, mc_predict
    model.eval()  # batch norm: running statistics (the weights stay stochastic)
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
    x, y, x_test, y_test, _ = sklearn_dataset("digits", seed=args.seed, standardise=False)
    x, x_test = x / 16.0, x_test / 16.0  # pixel intensities 0..16 -> [0, 1]
    results = {}
    for kind in MODELS:
        train = cfg["train"][kind]
        torch.manual_seed(args.seed)
        model = variance_mlp(kind, x.shape[1], cfg["hidden"], 10)
        fit(model, lambda m, xb, yb: expected_nll(m, xb, yb, train["draws"]), x, y, epochs=train["epochs"],
            lr=train["lr"], batch_size=train["batch_size"], seed=args.seed)
        results[kind] = evaluate(model, x_test, y_test, cfg["samples"])
        print(f"  trained {kind} [{timer():.0f} s]", flush=True)
    columns = list(results["dropout"])
    print(f"variance-network: digits, MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, training {cfg['train']}; "
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
