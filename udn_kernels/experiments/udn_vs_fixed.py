"""udn-vs-fixed (Nazaret & Blei 2022): a UDN matches the best fixed depth without choosing it.

For every data set and seed a UDN is trained by maximising its ELBO, and fixed-depth networks of
depths ``d`` are trained by MAP on exactly the same architecture truncated at depth ``d`` (the
UDN's own blocks ``1..d`` and head ``d``, the same Gaussian weight prior, optimiser and epochs).
Data: scikit-learn's digits (classification, accuracy and NLL) and diabetes (regression, RMSE and
Gaussian NLL on standardised targets), 80/20 splits that change with the seed; and the 8x8 digit
images with ``UDN.resnet`` against fixed-depth residual conv nets. Selection protocol, the same for
every model: ``val`` of the training split is held out and each model is scored at the epoch of
its best validation NLL.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .._cli_support import pyplot
from ._common import Timer, finish, fit, mean_std, pm, register, sklearn_dataset, table

# Every model holds out ``val`` of its training split and is scored at its best-validation-NLL
# epoch: trained to convergence, all of them overfit diabetes's 353 points (docs/experiments.md).
_DEPTHS = [1, 2, 3, 4, 5, 6, 7, 8]
FULL = dict(
    digits=dict(seeds=3, depths=_DEPTHS, width=32, epochs=40, lr=1e-2, init_rate=1.0, prior_std=1.0, val=0.2),
    diabetes=dict(seeds=5, depths=_DEPTHS, width=32, epochs=150, lr=3e-3, init_rate=1.0, prior_std=1.0,
                  val=0.2),
    # The conv UDN starts deeper: q(l) grows slowly (from init_rate=1: E[l] = 2.4 after 12
    # epochs; from 3: 4.6 after 24), short of the depths the images need (docs/experiments.md).
    resnet=dict(seeds=3, depths=[1, 2, 4, 6, 8], channels=16, epochs=24, lr=5e-3, init_rate=5.0,
                prior_std=1.0, val=0.2))
QUICK = dict(
    digits=dict(seeds=1, depths=[1, 3], width=16, epochs=3, lr=1e-2, init_rate=1.0, prior_std=1.0, val=0.2),
    diabetes=dict(seeds=2, depths=[1, 3], width=16, epochs=5, lr=3e-3, init_rate=1.0, prior_std=1.0,
                  val=0.2),
    resnet=dict(seeds=1, depths=[1], channels=4, epochs=1, lr=5e-3, init_rate=1.0, prior_std=1.0, val=0.2))
BATCH = 128


def fixed_depth_loss(model, depth: int, x: torch.Tensor, y: torch.Tensor, n_data: int) -> torch.Tensor:
    """``-log p(theta_{<=d}, y) / n`` of the UDN truncated at ``depth`` (MAP of a fixed-depth net)."""
    out = model.heads[depth - 1](model.hidden_states(x, depth)[-1])
    if model.likelihood == "categorical":
        nll = F.cross_entropy(out, y, reduction="sum")
    else:
        std = model.noise_std
        nll = (torch.log(std) + 0.5 * math.log(2 * math.pi) + 0.5 * ((y - out) / std) ** 2).sum()
    parts = list(model.blocks[:depth]) + [model.heads[depth - 1]] + ([model.stem] if model.stem is not None else [])
    log_prior = sum(model.log_prior(p) for p in parts)
    return (nll * n_data / len(x) - log_prior) / n_data


def predict(model, depth: int | None, x: torch.Tensor):
    """Predictive of the UDN (``depth=None``) or of its fixed-depth truncation."""
    with torch.no_grad():
        if depth is None:
            return model.predict(x)
        out = model.heads[depth - 1](model.hidden_states(x, depth)[-1])
        if model.likelihood == "categorical":
            return out.softmax(-1)
        return out, model.noise_std.pow(2).expand_as(out)


def scores(pred, y: torch.Tensor, likelihood: str) -> dict:
    """accuracy/NLL (categorical) or RMSE/NLL (gaussian) of a predictive on test data."""
    from .. import metrics
    if likelihood == "categorical":
        return {"accuracy": float(metrics.accuracy(pred, y)), "nll": float(metrics.nll(pred, y))}
    mean, var = pred
    return {"rmse": float(((mean - y) ** 2).mean().sqrt()),
            "nll": float(metrics.gaussian_nll(mean, var, y))}


def build(kind: str, x: torch.Tensor, y: torch.Tensor, likelihood: str, cfg: dict):
    """A fresh ``UDN.mlp`` (``kind="mlp"``) or ``UDN.resnet`` for the data ``(x, y)``."""
    from ..nn import UDN
    out = int(y.max()) + 1 if likelihood == "categorical" else y.shape[1]
    common = dict(likelihood=likelihood, init_rate=cfg["init_rate"], weight_prior_std=cfg["prior_std"])
    if kind == "resnet":
        return UDN.resnet(1, cfg["channels"], out, **common)
    return UDN.mlp(x.shape[1], cfg["width"], out, **common)


def split_validation(data, fraction: float, seed: int):
    """``(fit, validation)``: the training split of ``data`` cut again, ``fraction`` held out."""
    x, y, x_test, y_test, likelihood = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))
    cut = int(round(fraction * len(x)))
    held, kept = order[:cut], order[cut:]
    return (x[kept], y[kept], x_test, y_test, likelihood), (x[held], y[held])


def train_and_score(kind: str, data, cfg: dict, depth: int | None, seed: int) -> dict:
    """Train a UDN (``depth=None``) or a fixed-depth net on ``data``; test scores (+ E_q[l], epoch)
    of the epoch with the best validation NLL (the same selection rule for every model)."""
    (x, y, x_test, y_test, likelihood), (x_val, y_val) = split_validation(data, cfg["val"], seed)
    torch.manual_seed(seed)
    model = build(kind, x, y, likelihood, cfg)
    n = len(x)
    optimizer = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    if depth is None:
        loss = lambda m, xb, yb: m.loss(xb, yb, n_data=n)  # noqa: E731
    else:
        model.grow(depth)
        loss = lambda m, xb, yb: fixed_depth_loss(m, depth, xb, yb, n)  # noqa: E731
    best: dict = {"val_nll": math.inf}

    def checkpoint(epoch: int, _loss: float) -> None:
        # Scoring the test split whenever validation improves = restoring the best checkpoint.
        val_nll = scores(predict(model, depth, x_val), y_val, likelihood)["nll"]
        if val_nll < best["val_nll"]:
            best.update(scores(predict(model, depth, x_test), y_test, likelihood), val_nll=val_nll,
                        epoch=epoch + 1)
            if depth is None:
                best["E[l]"] = float(model.depth.mean().detach())

    fit(model, loss, x, y, epochs=cfg["epochs"], lr=cfg["lr"], batch_size=BATCH, seed=seed,
        optimizer=optimizer, on_epoch=checkpoint)
    return best


def _images(data):
    """The digits split reshaped to ``[N, 1, 8, 8]`` images."""
    x, y, x_test, y_test, likelihood = data
    return x.view(-1, 1, 8, 8), y, x_test.view(-1, 1, 8, 8), y_test, likelihood


def compare(kind: str, dataset: str, cfg: dict, base_seed: int) -> dict:
    """``{"udn": [scores per seed], "d=1": [...], ...}`` on one data set."""
    depths = cfg["depths"]
    results: dict = {"udn": []} | {f"d={d}": [] for d in depths}
    for s in range(cfg["seeds"]):
        data = sklearn_dataset(dataset, seed=base_seed + s)
        if kind == "resnet":
            data = _images(data)
        results["udn"].append(train_and_score(kind, data, cfg, None, base_seed + s))
        for d in depths:
            results[f"d={d}"].append(train_and_score(kind, data, cfg, d, base_seed + s))
    return results


def _summarise(name: str, results: dict, metric_names: list[str]) -> tuple[str, dict]:
    rows, summary = [], {}
    for method, runs in results.items():
        summary[method] = {m: mean_std([r[m] for r in runs]) for m in metric_names}
        extra = pm([r["E[l]"] for r in runs], ".2f") if method == "udn" else "-"
        rows.append([method] + [pm([r[m] for r in runs]) for m in metric_names] + [extra])
    print(f"\n{name}")
    return table(["model"] + metric_names + ["E_q[l]"], rows, [8] + [18] * len(metric_names) + [14]), summary


def _best_fixed(summary: dict, metric: str, larger_is_better: bool) -> tuple[str, float]:
    fixed = {k: v[metric][0] for k, v in summary.items() if k != "udn"}
    best = max(fixed, key=fixed.get) if larger_is_better else min(fixed, key=fixed.get)
    return best, fixed[best]


@register("udn-vs-fixed")
def run(args) -> dict:
    """UDN vs fixed depths 1..8 on digits, diabetes and (residual conv) digit images."""
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    tasks = [("digits (MLP)", "mlp", "digits", cfg["digits"], ["accuracy", "nll"]),
             ("diabetes (MLP)", "mlp", "diabetes", cfg["diabetes"], ["rmse", "nll"]),
             ("digits 8x8 (ResNet)", "resnet", "digits", cfg["resnet"], ["accuracy", "nll"])]
    out, tables, verdicts = {}, {}, {}
    for title, kind, dataset, task_cfg, metric_names in tasks:
        results = compare(kind, dataset, task_cfg, args.seed)
        tables[title], summary = _summarise(f"{title}: {task_cfg}", results, metric_names + ["epoch"])
        out[title] = {"runs": results, "summary": summary}
        verdicts[title] = {}
        for metric in metric_names:
            best, value = _best_fixed(summary, metric, metric == "accuracy")
            # Seeds share data splits and inits across models: the paired difference is the sharp test.
            paired = [u[metric] - f[metric] for u, f in zip(results["udn"], results[best])]
            sign = -1.0 if metric == "accuracy" else 1.0  # rank by "smaller is better"
            rank = 1 + sum(sign * v[metric][0] < sign * summary["udn"][metric][0] for v in summary.values())
            verdicts[title][metric] = {"udn": summary["udn"][metric][0], "best fixed": best,
                                       "best fixed value": value, "udn minus best (paired)": mean_std(paired),
                                       "udn rank": f"{rank} of {len(summary)}"}
            print(f"{metric}: UDN {summary['udn'][metric][0]:.4f} vs best fixed ({best}) {value:.4f}; "
                  f"paired UDN - best {mean_std(paired)[0]:+.4f} ± {mean_std(paired)[1]:.4f}; UDN ranks {rank} of {len(summary)}")
        print(f"[{timer():.0f} s]", flush=True)

    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, (title, *_rest, metric_names) in zip(axes[0], tasks):
        summary = out[title]["summary"]
        metric = metric_names[0]
        fixed = [(int(k[2:]), v[metric]) for k, v in summary.items() if k != "udn"]
        ax.errorbar([d for d, _ in fixed], [m for _, (m, _s) in fixed], yerr=[s for _, (_m, s) in fixed],
                    fmt="o-", label="fixed depth")
        udn_mean, udn_std = summary["udn"][metric]
        ax.axhline(udn_mean, color="tab:red", label=f"UDN (E[l]={mean_std([r['E[l]'] for r in out[title]['runs']['udn']])[0]:.1f})")
        ax.axhspan(udn_mean - udn_std, udn_mean + udn_std, color="tab:red", alpha=0.15)
        ax.set_xlabel("fixed depth d")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(title)
        ax.legend(fontsize=8)
    print(f"time {timer():.1f} s")
    return finish(args, "udn-vs-fixed", {"config": cfg, "results": out, "verdicts": verdicts,
                                         "tables": tables, "seconds": timer()}, fig)
