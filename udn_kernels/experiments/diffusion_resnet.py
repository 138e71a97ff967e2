"""diffusion-resnet (Peluchetti & Favaro 2020): deep residual MLPs at initialisation.

A residual MLP ``h_1 = W_1 x + b_1``, ``h_l = h_{l-1} + s * (W_l relu(h_{l-1}) + b_l)`` (a UDN built
from a custom block factory; PyTorch's default ``nn.Linear`` initialisation) is drawn at random and
pairs of orthogonal inputs are pushed through it. With i.i.d. branch weights (``s = 1``) every
layer adds a term more correlated than its input (the ReLU arc-cosine kernel) and the correlation
of the two outputs collapses to 1 with depth: the deep network forgets its input. With the
diffusion scaling ``s = 1 / sqrt(L)`` (total depth ``L``) the network converges to a diffusion as
``L`` grows and the correlation stays where the first layers put it.

The branch must have zero mean for the diffusion limit: ``UDN.mlp(residual=True, depth_scale=L)``
uses the post-activation branch ``relu(W h + b) / sqrt(L)``, whose positive mean is a drift that
grows like ``sqrt(L)`` — measured here as a third curve, it collapses too.

Correlation: the cosine similarity of the final hidden states, ``<h(x), h(x')> / (|h(x)| |h(x')|)``,
which is the correlation (over random readout weights) of the outputs of a linear head on ``h``.
Averaged over pairs and network draws; float64 (un-scaled deep nets grow geometrically).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._cli_support import pyplot
from ._common import Timer, finish, register, table

FULL = dict(depths=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], width=128, in_features=32, pairs=32, nets=8)
QUICK = dict(depths=[1, 3, 10, 30, 100], width=64, in_features=16, pairs=16, nets=2)
VARIANTS = {
    "iid": "i.i.d. branch W relu(h) + b",
    "diffusion": "same, branch / sqrt(L)",
    "mlp_post_act": "UDN.mlp residual relu(W h + b) / sqrt(L)",
}


class PreActResidual(nn.Module):
    """``h + scale * (W relu(h) + b)``: a residual block whose branch has zero mean at initialisation."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * self.linear(torch.relu(h))


def network(variant: str, cfg: dict, depth: int):
    """A float64 UDN whose hidden states of depths ``1..depth`` are the residual MLP of ``variant``."""
    from ..nn import UDN
    width = cfg["width"]
    if variant == "mlp_post_act":
        model = UDN.mlp(cfg["in_features"], width, 1, residual=True, depth_scale=float(depth), init_rate=0.5)
    else:
        scale = 1.0 if variant == "iid" else 1.0 / math.sqrt(depth)

        def block(index: int) -> nn.Module:
            return nn.Linear(cfg["in_features"], width) if index == 0 else PreActResidual(width, scale)

        model = UDN(block, width, 1, init_rate=0.5)
    return model.double()


def _orthogonal_pairs(pairs: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``[2 * pairs, dim]`` inputs of norm ``sqrt(dim)``: rows ``i`` and ``pairs + i`` are orthogonal."""
    a = torch.randn(pairs, dim, generator=generator, dtype=torch.float64)
    b = torch.randn(pairs, dim, generator=generator, dtype=torch.float64)
    b = b - (b * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
    x = torch.cat([a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)])
    return x * math.sqrt(dim)


def _cosines(hidden: torch.Tensor, pairs: int) -> torch.Tensor:
    """Mean cosine similarity of paired rows, for every depth of ``hidden [L, 2 * pairs, D]``."""
    a, b = hidden[:, :pairs], hidden[:, pairs:]
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean(-1)


def correlations(cfg: dict, seed: int) -> dict:
    """``{variant: [mean output correlation at each depth of cfg["depths"]]}``."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    depths, pairs = cfg["depths"], cfg["pairs"]
    sums = {v: torch.zeros(len(depths), dtype=torch.float64) for v in VARIANTS}
    with torch.no_grad():
        for _ in range(cfg["nets"]):
            x = _orthogonal_pairs(pairs, cfg["in_features"], generator)
            # The i.i.d. net does not depend on L: one net of the largest depth gives every depth.
            hidden = network("iid", cfg, max(depths)).hidden_states(x, depth=max(depths))
            sums["iid"] += _cosines(hidden, pairs)[torch.tensor(depths) - 1]
            for variant in ("diffusion", "mlp_post_act"):
                for i, depth in enumerate(depths):
                    hidden = network(variant, cfg, depth).hidden_states(x, depth=depth)
                    sums[variant][i] += _cosines(hidden[-1:], pairs)[0]
    return {v: (total / cfg["nets"]).tolist() for v, total in sums.items()}


@register("diffusion-resnet")
def run(args) -> dict:
    """Correlation of two inputs' outputs vs depth, i.i.d. vs diffusion-scaled residual branches."""
    cfg = QUICK if args.quick else FULL
    timer = Timer()
    corr = correlations(cfg, args.seed)
    print(f"diffusion-resnet: width {cfg['width']}, {cfg['nets']} networks x {cfg['pairs']} "
          f"orthogonal input pairs per depth; output correlation")
    text = table(["depth", "i.i.d.", "1/sqrt(L)", "UDN.mlp post-act 1/sqrt(L)"],
                 zip(cfg["depths"], *corr.values()), [8, 10, 12, 28])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (variant, label), marker in zip(VARIANTS.items(), "os^"):
        ax.plot(cfg["depths"], corr[variant], marker + "-", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("depth L")
    ax.set_ylabel("correlation of outputs")
    ax.set_title("residual MLP at init, two orthogonal inputs")
    ax.legend(fontsize=8)
    print(f"time {timer():.1f} s")
    return finish(args, "diffusion-resnet", {"config": cfg, "depths": cfg["depths"], **corr,
                                             "table": text, "seconds": timer()}, fig)
