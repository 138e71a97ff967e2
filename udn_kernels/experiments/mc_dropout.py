"""mc-dropout (Gal & Ghahramani 2016): Monte-Carlo averaging vs the weight-scaling rule.

An MLP of :class:`~udn_kernels.nn.BernoulliLinear` layers (MC dropout of each layer's inputs) is
trained on scikit-learn's digits with cross-entropy plus the layers' weight-decay KL / n. On the
test split it predicts (a) with the weight-scaling rule (``udn_kernels.nn.deterministic``) and
(b) by averaging the softmax of ``T`` dropout samples (``udn_kernels.nn.mc_predict``, one batched
pass of 100 draws whose first ``T`` are averaged). Claim: the MC predictive's NLL falls with ``T``
and reaches or beats weight scaling; accuracy is on par.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .._cli_support import pyplot
from ._common import Timer, finish, fit, register, sklearn_dataset, table

FULL = dict(hidden=128, p_input=0.1, p_hidden=0.5, epochs=40, lr=2e-3, batch_size=64,
            ts=[1, 2, 3, 5, 10, 20, 50, 100])
QUICK = dict(hidden=32, p_input=0.1, p_hidden=0.5, epochs=4, lr=5e-3, batch_size=64, ts=[1, 2, 5, 10])


def dropout_mlp(in_features: int, hidden: int, out_features: int, p_input: float, p_hidden: float) -> nn.Module:
    """``in -> hidden -> hidden -> out`` with MC dropout on every layer's input."""
    from ..nn import BernoulliLinear
    return nn.Sequential(BernoulliLinear(in_features, hidden, p=p_input), nn.ReLU(),
                         BernoulliLinear(hidden, hidden, p=p_hidden), nn.ReLU(),
                         BernoulliLinear(hidden, out_features, p=p_hidden))


def running_predictives(sample_probs: torch.Tensor, ts: list[int]) -> dict[int, torch.Tensor]:
    """``{T: mean of the first T per-sample probabilities}`` from ``[S, N, C]``."""
    cumulative = sample_probs.cumsum(0)
    return {t: cumulative[t - 1] / t for t in ts}


@register("mc-dropout")
def run(args) -> dict:
    """NLL and accuracy of MC dropout vs T, against weight scaling, on digits."""
    from .. import metrics
    from ..nn import deterministic, kl, mc_predict
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    torch.manual_seed(args.seed)
    x, y, x_test, y_test, _ = sklearn_dataset("digits", seed=args.seed)
    model = dropout_mlp(x.shape[1], cfg["hidden"], 10, cfg["p_input"], cfg["p_hidden"])
    n = len(x)
    fit(model, lambda m, xb, yb: F.cross_entropy(m(xb), yb) + kl(m) / n, x, y, epochs=cfg["epochs"],
        lr=cfg["lr"], batch_size=cfg["batch_size"], seed=args.seed)
    with torch.no_grad():
        with deterministic(model):
            scaled = model(x_test).softmax(-1)
        _, samples = mc_predict(model, x_test, max(cfg["ts"]), return_samples=True)
    mc = running_predictives(samples, cfg["ts"])
    ws = {"nll": float(metrics.nll(scaled, y_test)), "accuracy": float(metrics.accuracy(scaled, y_test)),
          "ece": float(metrics.ece(scaled, y_test))}
    curve = {t: {"nll": float(metrics.nll(p, y_test)), "accuracy": float(metrics.accuracy(p, y_test)),
                 "ece": float(metrics.ece(p, y_test))} for t, p in mc.items()}
    print(f"mc-dropout: digits, BernoulliLinear MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, "
          f"p = {cfg['p_input']}/{cfg['p_hidden']}, {cfg['epochs']} epochs; {len(y_test)} test points")
    rows = [["weight scaling", ws["nll"], ws["accuracy"], ws["ece"]]]
    rows += [[f"MC T={t}", c["nll"], c["accuracy"], c["ece"]] for t, c in curve.items()]
    text = table(["prediction", "NLL", "accuracy", "ECE"], rows, [16, 10, 10, 10])

    plt = pyplot()
    fig, (ax_nll, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    ts = list(curve)
    for ax, key in ((ax_nll, "nll"), (ax_acc, "accuracy")):
        ax.plot(ts, [curve[t][key] for t in ts], "o-", label="MC dropout (mean of T softmaxes)")
        ax.axhline(ws[key], color="tab:red", ls="--", label="weight scaling")
        ax.set_xscale("log")
        ax.set_xlabel("T (MC samples)")
        ax.set_ylabel(f"test {key}")
        ax.legend(fontsize=8)
    ax_nll.set_title("digits: NLL vs T")
    ax_acc.set_title("digits: accuracy vs T")
    print(f"time {timer():.1f} s")
    return finish(args, "mc-dropout", {"config": cfg, "weight_scaling": ws,
                                       "mc": {str(t): c for t, c in curve.items()},
                                       "table": text, "seconds": timer()}, fig)
