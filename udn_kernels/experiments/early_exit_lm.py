"""early-exit-lm (LayerSkip-style early-exit training): a byte-level Llama trained with the fused
early-exit loss keeps usable predictions at every layer, where plain last-layer training leaves
its early layers' exits near chance.

Two copies of one randomly initialised byte-level ``LlamaForCausalLM`` (vocab 256, from a tiny
config: nothing is downloaded) train on the source files of Python's standard library (present on
every install), one with ``udn_kernels.integrations.early_exit_loss`` over every layer, one with
the model's own loss (last layer only), same batches, AdamW. Every few steps both are scored on
held-out text at every exit (the final norm and LM head on each layer's hidden state): per-exit
cross-entropy (bits per byte) and next-byte accuracy.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .._cli_support import CLIError, pyplot
from ._common import Timer, finish, register, table

# Standard-library modules whose source is the corpus: plain Python text, stable across versions.
SOURCES = ("argparse", "textwrap", "string", "heapq", "bisect", "fractions", "calendar", "difflib", "shlex",
           "ast", "dataclasses", "inspect", "pathlib", "statistics", "functools", "contextlib")
FULL = dict(hidden=64, layers=6, heads=4, seq=64, batch=16, steps=300, eval_every=25, lr=3e-3,
            scale="uniform", eval_batches=4)
QUICK = dict(hidden=32, layers=4, heads=4, seq=32, batch=4, steps=6, eval_every=3, lr=3e-3,
             scale="uniform", eval_batches=1)


def corpus(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the stdlib sources in ``SOURCES`` as int64 tensors: (train, held-out tail)."""
    root = os.path.dirname(os.__file__)
    text = b"".join(open(os.path.join(root, f"{name}.py"), "rb").read() for name in SOURCES
                    if os.path.exists(os.path.join(root, f"{name}.py")))
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, seq: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq]`` random windows of ``data``."""
    starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


def build_model(cfg: dict, seed: int):
    try:
        import transformers
    except ImportError as exc:
        raise CLIError("early-exit-lm: needs transformers (pip install 'udn_kernels[dev]')") from exc
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
                                      num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                                      num_key_value_heads=cfg["heads"], max_position_embeddings=cfg["seq"],
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


@torch.no_grad()
def exit_metrics(model, batches: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Held-out cross-entropy (bits per byte) and next-byte accuracy at every layer's exit
    (evaluation only: the logits of one small batch are materialised here)."""
    model.eval()
    layers = model.config.num_hidden_layers
    nll, hits, count = torch.zeros(layers, dtype=torch.float64), torch.zeros(layers, dtype=torch.float64), 0
    for ids in batches:
        out = model.model(input_ids=ids, output_hidden_states=True)
        target = ids[:, 1:].reshape(-1)
        for i in range(layers):
            h = out.last_hidden_state if i == layers - 1 else model.model.norm(out.hidden_states[i + 1])
            logits = model.lm_head(h)[:, :-1].reshape(-1, 256)
            nll[i] += F.cross_entropy(logits, target, reduction="sum").double()
            hits[i] += (logits.argmax(-1) == target).sum().double()
        count += target.numel()
    model.train()
    return (nll / count / torch.log(torch.tensor(2.0))).tolist(), (hits / count).tolist()


def train(cfg: dict, seed: int, train_data, eval_batches, early_exit: bool) -> dict:
    """Train one copy; the per-exit held-out curves at every ``eval_every`` steps."""
    from ..integrations import early_exit_loss
    model = build_model(cfg, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)  # the same batches for both runs
    curves = {"step": [], "bits": [], "accuracy": []}
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0:
            bits, accuracy = exit_metrics(model, eval_batches)
            curves["step"].append(step)
            curves["bits"].append(bits)
            curves["accuracy"].append(accuracy)
        if step == cfg["steps"]:
            break
        ids = windows(train_data, cfg["seq"], cfg["batch"], generator)
        if early_exit:
            loss = early_exit_loss(model, ids, ids, exits=None, scale=cfg["scale"])
        else:
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curves


@register("early-exit-lm")
def run(args) -> dict:
    """Early-exit vs last-layer training of a byte-level Llama on stdlib source: per-exit curves."""
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    train_data, val_data = corpus()
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batches = [windows(val_data, cfg["seq"], cfg["batch"], generator) for _ in range(cfg["eval_batches"])]
    runs = {name: train(cfg, args.seed, train_data, eval_batches, name == "early-exit")
            for name in ("early-exit", "last-layer")}
    layers = cfg["layers"]
    rows = [[f"layer {i + 1}", runs["early-exit"]["bits"][-1][i], runs["last-layer"]["bits"][-1][i],
             runs["early-exit"]["accuracy"][-1][i], runs["last-layer"]["accuracy"][-1][i]] for i in range(layers)]
    print(f"\nheld-out bits/byte and next-byte accuracy per exit after {cfg['steps']} steps "
          f"({len(train_data)} training bytes)")
    text = table(["exit", "bits early-exit", "bits last-only", "acc early-exit", "acc last-only"], rows,
                 [10, 17, 17, 17, 17])

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.cm.viridis(torch.linspace(0, 0.9, layers).tolist())
    for ax, metric, label in ((axes[0], "bits", "held-out bits per byte"), (axes[1], "accuracy", "next-byte accuracy")):
        for name, style in (("early-exit", "-"), ("last-layer", "--")):
            values = torch.tensor(runs[name][metric])
            for i in range(layers):
                ax.plot(runs[name]["step"], values[:, i].tolist(), style, color=colours[i],
                        label=f"layer {i + 1}" if name == "early-exit" else None)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    axes[0].set_title("per-exit loss (solid: early-exit loss, dashed: last layer only)", fontsize=9)
    axes[1].set_title("per-exit accuracy", fontsize=9)
    axes[0].legend(fontsize=7)
    print(f"time {timer():.1f} s")
    return finish(args, "early-exit-lm", {"config": cfg, "runs": runs, "table": text, "seconds": timer()}, fig)
