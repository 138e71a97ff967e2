"""`udn train`: fit a UDN on a bundled or generated data set, with progress, checkpoint and plot."""
from __future__ import annotations

import argparse
import csv
import math
import os

import torch

from ._cli_support import CLIError, check_writable, import_optional, pyplot


def load_dataset(name: str, *, phase: int = 3, target: str | None = None, seed: int = 0,
                 standardise: bool = True):
    """(x_train, y_train, x_test, y_test, likelihood) for spirals, digits, diabetes or a CSV path.

    Features are standardised with training statistics (unless ``standardise=False``); regression
    targets too.
    """
    if name == "spirals":
        from .data import spirals
        x_tr, y_tr = spirals(2048, phase=phase, seed=seed)
        x_te, y_te = spirals(1024, phase=phase, seed=seed + 1)
        return x_tr, y_tr, x_te, y_te, "categorical"
    if name in ("digits", "diabetes"):
        import_optional("sklearn", "experiments")
        from sklearn import datasets
        data = datasets.load_digits() if name == "digits" else datasets.load_diabetes()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target)
        likelihood = "categorical" if name == "digits" else "gaussian"
    elif name.endswith(".csv"):
        x, y, likelihood = _load_csv(name, target)
    else:
        raise CLIError(f"dataset: expected spirals, digits, diabetes or a .csv path, got {name!r}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    cut = int(0.8 * len(x))
    tr, te = order[:cut], order[cut:]
    if standardise:
        x = (x - x[tr].mean(0)) / x[tr].std(0).clamp_min(1e-6)
    if likelihood == "categorical":
        y = y.long()
    else:
        y = y.to(torch.float32).reshape(len(y), -1)
        y = (y - y[tr].mean(0)) / y[tr].std(0).clamp_min(1e-6)
    return x[tr], y[tr], x[te], y[te], likelihood


def _load_csv(path: str, target: str | None):
    if not os.path.isfile(path):
        raise CLIError(f"dataset: no such file {path!r}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise CLIError(f"dataset: {path!r} has no data rows")
    columns = list(rows[0])
    target = target or columns[-1]
    if target not in columns:
        raise CLIError(f"--target: column {target!r} not in {columns}")
    features = [c for c in columns if c != target]
    try:
        x = torch.tensor([[float(r[c]) for c in features] for r in rows], dtype=torch.float32)
    except ValueError as exc:
        raise CLIError(f"dataset: non-numeric feature in {path!r}: {exc}") from exc
    labels = [r[target] for r in rows]
    try:
        values = [float(v) for v in labels]
    except ValueError:
        values = None
    if values is not None and not all(v.is_integer() for v in values):
        return x, torch.tensor(values), "gaussian"
    classes = sorted(set(labels))
    if values is not None and len(classes) > 20:
        return x, torch.tensor(values), "gaussian"
    index = {c: i for i, c in enumerate(classes)}
    return x, torch.tensor([index[v] for v in labels]), "categorical"


def evaluate(model, x, y, likelihood: str, samples: int | None) -> dict:
    """Test metrics of a trained UDN: accuracy/NLL/ECE or RMSE/NLL, plus the learned depth."""
    from . import metrics
    with torch.no_grad():
        pred = model.predict(x, samples=samples)
    out = {"E[depth]": model.depth.mean().item(), "max depth": int(model.depth.max_depth)}
    if likelihood == "categorical":
        out.update(accuracy=float(metrics.accuracy(pred, y)), nll=float(metrics.nll(pred, y)),
                   ece=float(metrics.ece(pred, y)))
    else:
        mean, var = pred
        out.update(rmse=float(((mean - y) ** 2).mean().sqrt()),
                   nll=float((0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)).mean()))
    return out


def cmd_train(args) -> int:
    from .nn import UDN
    check_writable(args.plot, "--plot")
    if args.out is not None:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"--out: cannot create {args.out!r}: {exc}") from exc
        check_writable(os.path.join(args.out, "model.pt"), "--out")
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te, likelihood = load_dataset(args.dataset, phase=args.phase,
                                                      target=args.target, seed=args.seed)
    out_features = int(y_tr.max()) + 1 if likelihood == "categorical" else y_tr.shape[1]
    model = UDN.mlp(x_tr.shape[1], args.width, out_features, likelihood=likelihood,
                    layer=args.layer, init_rate=args.init_rate)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.attach_optimizer(optimizer)
    n = len(x_tr)
    history = []
    progress = _progress(args.epochs)
    for epoch in range(args.epochs):
        order = torch.randperm(n)
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            optimizer.zero_grad()
            loss = model.loss(x_tr[idx], y_tr[idx], n_data=n)
            loss.backward()
            optimizer.step()
        history.append(model.depth.probs().detach().clone())
        progress(epoch, {"loss": loss.item(), "E[depth]": model.depth.mean().item()})
    samples = args.samples if args.layer != "deterministic" else None
    result = evaluate(model, x_te, y_te, likelihood, samples)
    print()
    print(f"{'metric':<12}{'value':>10}")
    for key, value in result.items():
        print(f"{key:<12}{value:>10.4f}" if isinstance(value, float) else f"{key:<12}{value:>10}")
    if args.out is not None:
        path = os.path.join(args.out, "model.pt")
        torch.save({"state_dict": model.state_dict(), "args": vars(args) | {"run": None},
                    "metrics": result}, path)
        print(f"wrote {path}")
    if args.plot:
        _plot_depth_history(history, args.plot, args.dataset)
        print(f"wrote {args.plot}")
    return 0


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, desc="epochs") if tqdm else None

    def update(epoch: int, values: dict) -> None:
        text = " ".join(f"{k}={v:.3f}" for k, v in values.items())
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update(1)
            if epoch + 1 == total:
                bar.close()
        else:
            print(f"epoch {epoch + 1}/{total} {text}")
    return update


def _plot_depth_history(history: list[torch.Tensor], path: str, title: str) -> None:
    """Heat map of q(l) (rows: depth, columns: epoch)."""
    plt = pyplot()
    depth = max(len(h) for h in history)
    grid = torch.zeros(depth, len(history))
    for epoch, probs in enumerate(history):
        grid[: len(probs), epoch] = probs
    fig, ax = plt.subplots(figsize=(6, 3.2))
    image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis",
                      extent=(0.5, len(history) + 0.5, 0.5, depth + 0.5))
    fig.colorbar(image, ax=ax, label="q(l)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("depth l")
    ax.set_title(f"posterior over depth, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def add_train_parser(sub) -> None:
    """Register the ``train`` subcommand."""
    train = sub.add_parser("train", help="train a UDN on spirals, digits, diabetes or a CSV file")
    train.add_argument("dataset", help="spirals | digits | diabetes | path/to/file.csv")
    train.add_argument("--layer", choices=("deterministic", "gaussian", "bernoulli"), default="deterministic")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--width", type=int, default=32)
    train.add_argument("--phase", type=int, default=3, help="winding of the spirals (0 = straight)")
    train.add_argument("--target", help="target column of a CSV (default: last column)")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--init-rate", type=float, default=1.0)
    train.add_argument("--samples", type=int, default=20, help="MC samples for stochastic layers")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="checkpoint directory")
    train.add_argument("--plot", help="PNG of q(l) over training")
    train.set_defaults(run=cmd_train)
