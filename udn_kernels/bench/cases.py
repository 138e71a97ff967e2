"""The benchmark cases (docs/design.md, "Benchmarks"), each a list of methods on shared inputs.

``build(case, quick, device)`` returns the methods: ours first, then the peers a user would otherwise
write, then the GEMM floor (the same matrix products alone). ``quick`` shrinks the shapes so the
whole set runs in minutes on 2 cores. The full shapes, the eager baselines and the GEMM floors
defined here are also the ones the pytest-benchmark suites in benchmarks/ import.
"""
from __future__ import annotations

import copy
import importlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import udn_kernels
from udn_kernels import nn as udn_nn
from .harness import Method

CASES: dict[str, Callable[[bool], list[Method]]] = {}
# Cases that also have "tiny" shapes (run by the test suite and benchmarks/step_ratios.py):
# their builders take the size, "tiny", "quick" or "full".
SIZED_CASES: dict[str, Callable[[str], list[Method]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def sized_case(name: str):
    def register(fn):
        SIZED_CASES[name] = fn
        CASES[name] = lambda quick: fn("quick" if quick else "full")
        return fn
    return register


def build(name: str, quick: bool, device: str = "cpu", size: str | None = None) -> list[Method]:
    """Methods of case ``name`` with inputs on ``device`` (tensor factories follow the device
    context, so on CUDA the ops dispatch to the Triton kernels); ``size`` ("tiny", "quick",
    "full"), for the cases that have it, overrides ``quick``. ValueError for an unknown case."""
    if name not in CASES or (size is not None and name not in SIZED_CASES):
        raise ValueError(f"case: expected one of {tuple(CASES if size is None else SIZED_CASES)}, got {name!r}")
    torch.manual_seed(0)
    with torch.device(device):
        return CASES[name](quick) if size is None else SIZED_CASES[name](size)


def method_by_name(case_name: str, method: str, quick: bool, device: str = "cpu",
                   size: str | None = None) -> Method:
    """One method of a case (used by the memory probe subprocess)."""
    return next(m for m in build(case_name, quick, device, size) if m.name == method)


# Full shapes of the cases: heads (L, N, D, C, a head per depth), linear (B, K, N_out), rng size.
HEADS_SHAPES = {"heads-small": (16, 256, 128, 10, True), "heads-lm": (4, 2048, 256, 16384, False)}
PREDICT_SHAPE = (8, 2048, 256, 16384, False)
LINEAR_SHAPE = (256, 1024, 1024)
RNG_SIZE = 1 << 24
UDN_STEP_SHAPE = (256, 32, 5.0)  # batch, width, initial rate of q(l) (rate 5 -> 10 depths)
BERNOULLI_P = 0.5


def _head(weight, bias, l: int) -> tuple:
    """Weight and bias of depth ``l``'s head (a shared ``[C, D]`` head serves every depth)."""
    return (weight if weight.dim() == 2 else weight[l]), (None if bias is None else (bias if bias.dim() == 1 else bias[l]))


def eager_heads_loss(hidden, weight, bias, target, log_weights, mode: str = "expected") -> torch.Tensor:
    """The depth-mixture loss as users write it: a loop over depths of ``F.linear`` (what an
    ``nn.Linear`` head does) and ``F.cross_entropy``; ``weight [C, D]`` is a shared head."""
    def logits(l):
        return F.linear(hidden[l], *_head(weight, bias, l))

    if mode == "mixture":
        loglik = torch.stack([-F.cross_entropy(logits(l), target, reduction="none") for l in range(len(hidden))])
        return -torch.logsumexp(log_weights[:, None] + loglik, 0).mean()
    w = log_weights.exp()
    return sum(w[l] * F.cross_entropy(logits(l), target) for l in range(len(hidden)))


def linear_ce_heads_loss(hidden, weight, bias, target, log_weights) -> torch.Tensor:
    """The expected-mode loss with ``F.linear_cross_entropy`` (``LinearCrossEntropyOptions()``) per depth."""
    w, options = log_weights.exp(), torch.nn.LinearCrossEntropyOptions()
    total = 0.0
    for l in range(len(hidden)):
        wl, bl = _head(weight, bias, l)
        total = total + w[l] * F.linear_cross_entropy(hidden[l], wl, target, linear_bias=bl, options=options)
    return total


def heads_floor_forward(hidden, weight) -> torch.Tensor:
    """The logits GEMM(s) of every depth, nothing else."""
    with torch.no_grad():
        if weight.dim() == 3:
            return torch.bmm(hidden, weight.transpose(1, 2))
        return hidden.reshape(-1, hidden.shape[-1]) @ weight.t()


def heads_floor_backward(hidden, weight, grad_logits, *, hidden_grad: bool = True,
                         weight_grad: bool = True) -> tuple:
    """d hidden and d weight from given logits gradients (``[L, N, C]``, or ``[L*N, C]`` for a
    shared head); a gradient not asked for is None, its GEMM not issued."""
    with torch.no_grad():
        if weight.dim() == 3:
            return (torch.bmm(grad_logits, weight) if hidden_grad else None,
                    torch.bmm(grad_logits.transpose(1, 2), hidden) if weight_grad else None)
        return (grad_logits @ weight if hidden_grad else None,
                grad_logits.t() @ hidden.reshape(-1, hidden.shape[-1]) if weight_grad else None)


def eager_predict(hidden, weight, bias, log_weights) -> torch.Tensor:
    """``sum_l softmax(log_weights)_l softmax(head_l(h_l))`` as a loop over depths."""
    w = torch.softmax(log_weights, 0)
    total = 0.0
    for l in range(len(hidden)):
        wl, bl = _head(weight, bias, l)
        total = total + w[l] * torch.softmax(F.linear(hidden[l], wl, bl), dim=-1)
    return total


def predict_floor(hidden, weight) -> torch.Tensor:
    """The L logits GEMMs of the predictive, nothing else."""
    with torch.no_grad():
        for l in range(len(hidden)):
            hidden[l] @ _head(weight, None, l)[0].t()
    return hidden


def linear_floor(x: torch.Tensor, weight: torch.Tensor, samples: int,
                 input_grad: bool = True) -> Callable[[], torch.Tensor]:
    """x W^T, dY W and dY^T x for each draw: the 3 GEMMs of a dense linear layer's step (without
    ``input_grad``, the 2 left when ``x`` needs no gradient: no dY W)."""
    grad_out = torch.randn(samples, x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)

    def floor():
        with torch.no_grad():
            for s in range(samples):
                torch.mm(x, weight.t())
                if input_grad:
                    torch.mm(grad_out[s], weight)
                torch.mm(grad_out[s].t(), x)
        return grad_out
    return floor


def eager_gauss(estimator: str, x, mu, rho, bias=None) -> torch.Tensor:
    """One draw of a Gaussian layer with ``sigma = softplus(rho)`` as users write it in eager
    PyTorch: bayesian-torch style for "sample" (materialise the weight, then ``F.linear``) and
    "flipout"; the local-reparameterisation formula for "local"."""
    sigma = F.softplus(rho)
    if estimator == "sample":
        return F.linear(x, mu + sigma * torch.randn_like(mu), bias)
    if estimator == "local":
        mean = F.linear(x, mu, bias)
        return mean + torch.sqrt(F.linear(x * x, sigma * sigma)) * torch.randn_like(mean)
    sign_in = torch.empty_like(x).bernoulli_(0.5) * 2 - 1
    sign_out = torch.empty(*x.shape[:-1], mu.shape[0], dtype=x.dtype, device=x.device).bernoulli_(0.5) * 2 - 1
    return F.linear(x, mu, bias) + F.linear(x * sign_in, sigma * torch.randn_like(mu)) * sign_out


def eager_bern(mask: str, x, weight, bias=None, p: float = BERNOULLI_P) -> torch.Tensor:
    """One draw of a Bernoulli layer in eager PyTorch: ``F.dropout`` + ``F.linear`` ("input"), a
    ``bernoulli_`` weight mask ("weight"), random weight signs ("symmetric")."""
    if mask == "input":
        return F.linear(F.dropout(x, p, training=True), weight, bias)
    if mask == "weight":
        return F.linear(x, weight * torch.empty_like(weight).bernoulli_(1 - p) / (1 - p), bias)
    return F.linear(x, weight * (torch.empty_like(weight).bernoulli_(0.5) * 2 - 1), bias)


def rng_methods(n: int, seed: int = 1, device=None) -> dict[str, Callable[[], torch.Tensor]]:
    """``n`` draws of each kind, ours and torch's: ``{"udn normal": ..., "torch.randn": ..., ...}``."""
    from udn_kernels import rng as urng
    return {"udn normal": lambda: urng.normal(n, seed=seed, device=device),
            "torch.randn": lambda: torch.randn(n, device=device),
            "udn uniform": lambda: urng.uniform(n, seed=seed, device=device),
            "torch.rand": lambda: torch.rand(n, device=device),
            "udn bernoulli": lambda: urng.bernoulli(n, BERNOULLI_P, seed=seed, device=device),
            "torch.bernoulli_": lambda: torch.empty(n, device=device).bernoulli_(BERNOULLI_P)}


def _depth_log_weights(depths: int) -> torch.Tensor:
    rate = depths / 2.0
    log_q = torch.tensor([(l * math.log(rate) - math.lgamma(l + 1)) for l in range(depths)])
    return log_q - torch.logsumexp(log_q, 0)


def _heads_methods(L: int, N: int, D: int, C: int, shared: bool) -> list[Method]:
    hidden = torch.randn(L, N, D, requires_grad=True)
    wshape = (C, D) if shared else (L, C, D)
    weight = (torch.randn(*wshape) / math.sqrt(D)).requires_grad_()
    bias = None if shared else torch.zeros(L, C, requires_grad=True)
    target = torch.randint(0, C, (N,))
    log_w = _depth_log_weights(L)

    def ours():
        return udn_kernels.depth_mixture_nll(hidden, weight, bias, target, log_w, mode="expected")

    def eager_loop():
        return eager_heads_loss(hidden, weight, bias, target, log_w)

    grad_logits = torch.randn(L, N, C) if not shared else torch.randn(L * N, C)

    def gemm_floor():  # forward logits, d hidden, d weight: the three products any exact method performs
        heads_floor_forward(hidden, weight)
        heads_floor_backward(hidden, weight, grad_logits)
        return hidden.sum()

    methods = [Method("udn_kernels", ours, role="ours"), Method("eager", eager_loop),
               Method("torch.compile(eager)", torch.compile(eager_loop))]
    if shared:
        methods.append(Method("F.linear_cross_entropy",
                              lambda: linear_ce_heads_loss(hidden, weight, bias, target, log_w)))
    methods.append(Method("3-GEMM floor", gemm_floor, backward=False, role="floor"))
    return methods


@case("heads-small")
def heads_small(quick: bool) -> list[Method]:
    """L=16, N=256, D=128, C=10, a head per depth."""
    L, N, D, C, _ = HEADS_SHAPES["heads-small"]
    return _heads_methods(L, N, D, C, shared=False)


@case("heads-lm")
def heads_lm(quick: bool) -> list[Method]:
    """L=4, N=2048, D=256, C=16384, one head shared by all depths (quick: N=512, C=4096)."""
    L, N, D, C, _ = HEADS_SHAPES["heads-lm"]
    return _heads_methods(L, 512 if quick else N, D, 4096 if quick else C, shared=True)


@case("heads-predict")
def heads_predict(quick: bool) -> list[Method]:
    """Posterior predictive ``sum_l w_l softmax(H_l W^T)``: L=8, N=2048, D=256, C=16384, shared
    head (quick: N=512, C=4096); no backward."""
    L, N, D, C, _ = PREDICT_SHAPE
    N, C = (512, 4096) if quick else (N, C)
    hidden = torch.randn(L, N, D)
    weight = torch.randn(C, D) / math.sqrt(D)
    log_w = _depth_log_weights(L)

    def ours():
        return udn_kernels.depth_mixture_predict(hidden, weight, None, log_w)

    def eager_loop():
        return eager_predict(hidden, weight, None, log_w)

    return [Method("udn_kernels", ours, backward=False, role="ours"),
            Method("eager", eager_loop, backward=False),
            Method("torch.compile(eager)", torch.compile(eager_loop), backward=False),
            Method("1-GEMM floor", lambda: predict_floor(hidden, weight), backward=False, role="floor")]


@case("gauss-linear")
def gauss_linear(quick: bool) -> list[Method]:
    """B=256, K=N_out=1024 (quick: 512), estimators sample/local/flipout, samples 1 and 8."""
    B, K, N = (LINEAR_SHAPE[0], 512, 512) if quick else LINEAR_SHAPE
    x = torch.randn(B, K, requires_grad=True)
    mu = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    rho = torch.full((N, K), -4.0, requires_grad=True)

    def ours(estimator, samples=None):
        return lambda: udn_kernels.gaussian_linear(x, mu, rho, estimator=estimator, samples=samples,
                                                   sigma_transform="softplus")

    def eager():
        return eager_gauss("sample", x, mu, rho)

    def eager_loop8():
        return torch.stack([eager() for _ in range(8)])

    return [Method("udn sample", ours("sample"), role="ours"),
            Method("udn local", ours("local")), Method("udn flipout", ours("flipout")),
            Method("eager sample", eager),
            Method("udn sample S=8", ours("sample", 8)), Method("eager loop S=8", eager_loop8),
            Method("3-GEMM floor", linear_floor(x, mu, 1), backward=False, role="floor"),
            Method("3-GEMM floor S=8", linear_floor(x, mu, 8), backward=False, role="floor")]


@case("bern-linear")
def bern_linear(quick: bool) -> list[Method]:
    """B=256, K=N_out=1024 (quick: 512), masks input/weight/symmetric."""
    B, K, N = (LINEAR_SHAPE[0], 512, 512) if quick else LINEAR_SHAPE
    x = torch.randn(B, K, requires_grad=True)
    weight = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    bias = torch.zeros(N, requires_grad=True)

    def ours(mask):
        return lambda: udn_kernels.bernoulli_linear(x, weight, bias, p=BERNOULLI_P, mask=mask)

    def eager(mask):
        return lambda: eager_bern(mask, x, weight, bias)

    return [Method("udn input", ours("input"), role="ours"), Method("udn weight", ours("weight")),
            Method("udn symmetric", ours("symmetric")),
            Method("F.dropout + F.linear", eager("input")), Method("eager weight mask", eager("weight")),
            Method("3-GEMM floor", linear_floor(x, weight, 1), backward=False, role="floor")]


@case("rng")
def rng(quick: bool) -> list[Method]:
    """2^24 normals / uniforms / bernoullis (quick: 2^22)."""
    n = RNG_SIZE >> 2 if quick else RNG_SIZE
    device = torch.empty(0).device  # the device context build() entered
    methods = [Method(name, draw, backward=False) for name, draw in rng_methods(n, device=device).items()]
    methods[0].role = "ours"
    return methods


def eager_udn_loss(model, x: torch.Tensor, y: torch.Tensor, n_data: int) -> torch.Tensor:
    """``-ELBO / n`` of a ``UDN.mlp`` computed the way the reference implementation does (Nazaret &
    Blei's code): a Python loop over depths, each depth's ``nn.Linear`` head and cross-entropy,
    per-depth prior terms. Same parameters and same value as ``model.loss``."""
    depth = model.depth.max_depth
    model.grow(depth)
    rate = model.depth.rate
    k = torch.arange(depth, dtype=x.dtype)
    weights = (k * rate.log() - torch.lgamma(k + 1)).exp()
    q = weights / weights.sum()
    scale = 2.0 * model.weight_prior_std ** 2
    h, elbo, cumulative = x, 0.0, 0.0
    for l in range(depth):
        h = model.blocks[l](h)
        logits = model.heads[l](h)
        loglik = -F.cross_entropy(logits, y, reduction="mean") * n_data
        cumulative = cumulative + sum(-(p ** 2).sum() / scale for p in model.blocks[l].parameters())
        head_prior = sum(-(p ** 2).sum() / scale for p in model.heads[l].parameters())
        log_mu = model.prior.log_prob(torch.tensor(l + 1.0))
        elbo = elbo + q[l] * (loglik + cumulative + head_prior + log_mu)
    return -(elbo - (q * q.log()).sum()) / n_data


@case("udn-step")
def udn_step(quick: bool) -> list[Method]:
    """One training step (loss, backward) of a width-32 UDN MLP with ~10 depths, batch 256, spirals."""
    from udn_kernels.nn import UDN
    from udn_kernels.data import spirals
    device = torch.empty(0).device
    batch, width, rate = UDN_STEP_SHAPE
    x, y = (t.to(device) for t in spirals(batch, phase=3.0, noise=0.05, seed=0))
    model = UDN.mlp(2, width, 2, init_rate=rate).to(device)
    depths = model.depth.max_depth
    return [Method(f"UDN.mlp ({depths} depths)", lambda: model.loss(x, y, 1024), role="ours"),
            Method("eager UDN", lambda: eager_udn_loss(model, x, y, 1024))]


# ------------------------------------------------------------------ training steps as users run them
# Shapes per size: "full" (the figures), "quick" (`udn bench --quick`), "tiny" (the test suite).
STEP_SHAPES = {
    "heads-frozen": {"full": (4, 1024, 256, 16384), "quick": (4, 256, 256, 4096), "tiny": (3, 8, 16, 32)},  # L, N, D, C
    "first-layer": {"full": LINEAR_SHAPE, "quick": (256, 512, 512), "tiny": (8, 16, 12)},  # B, K, N_out
    # layer width; MLP widths; batch
    "bnn-step": {"full": (1024, (784, 1024, 1024, 10), 256), "quick": (512, (784, 256, 256, 10), 128),
                 "tiny": (16, (12, 16, 16, 3), 8)},
    "mcdropout-step": {"full": ((784, 1024, 1024, 10), 256), "quick": ((784, 256, 256, 10), 128),
                       "tiny": ((12, 16, 16, 3), 8)},
    # heads (L, N, D, C) and gaussian_linear (B, K, N_out) of the thread-memory rows
    "threads": {"full": ((2, 1024, 1024, 32000), LINEAR_SHAPE), "quick": ((2, 256, 256, 4096), (256, 512, 512)),
                "tiny": ((2, 8, 16, 32), (8, 16, 12))},
}
THREAD_COUNTS = (1, 2, 8, 16)
N_DATA = 60000  # the KL is divided by the data set size (MNIST's), as in a mini-batch ELBO
# bayesian-torch's documented dnn_to_bnn settings
BAYESIAN_TORCH_PRIOR = {"prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
                        "posterior_rho_init": -3.0, "type": "Reparameterization",
                        "moped_enable": False, "moped_delta": 0.5}
NOT_INSTALLED = "bayesian-torch not installed: pip install 'udn_kernels[peers]'"


def bayesian_torch():
    """The bayesian-torch package, or None when it is not installed (its rows are then skipped)."""
    try:
        return importlib.import_module("bayesian_torch.layers"), importlib.import_module("bayesian_torch.models.dnn_to_bnn")
    except ImportError:
        return None


def stacked_heads_loss(hidden, weight, target, log_weights) -> torch.Tensor:
    """The expected-mode loss of a head shared by all depths as users write it for stacked depths:
    one logits GEMM over ``[L, N, D]``, then cross-entropy (log_softmax + target pick) per depth."""
    L, N = hidden.shape[:2]
    nll = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), target.repeat(L), reduction="none")
    return (log_weights.exp() * nll.view(L, N).mean(1)).sum()


def _heads_frozen_group(frozen: str, L: int, N: int, D: int, C: int, target, log_w, grad_logits) -> list[Method]:
    hidden = torch.randn(L, N, D, requires_grad=frozen != "hidden")
    weight = (torch.randn(C, D) / math.sqrt(D)).requires_grad_(frozen != "head")
    group = f"{frozen} frozen"

    def floor():  # forward logits and the one backward product still needed
        heads_floor_forward(hidden, weight)
        heads_floor_backward(hidden, weight, grad_logits, hidden_grad=hidden.requires_grad,
                             weight_grad=weight.requires_grad)
        return grad_logits

    return [Method(f"udn, {group}", lambda: udn_kernels.depth_mixture_nll(hidden, weight, None, target, log_w),
                   role="ours", group=group),
            Method(f"eager, {group}", lambda: stacked_heads_loss(hidden, weight, target, log_w), group=group),
            Method(f"2-GEMM floor, {group}", floor, backward=False, role="floor", group=group)]


@sized_case("heads-frozen")
def heads_frozen(size: str) -> list[Method]:
    """heads-lm-like (L=4, N=1024, D=256, C=16384, shared head), the head frozen or the hidden
    states frozen (``requires_grad=False``): ours vs the stacked eager loss and the 2-GEMM floor."""
    L, N, D, C = STEP_SHAPES["heads-frozen"][size]
    target, log_w, grad_logits = torch.randint(0, C, (N,)), _depth_log_weights(L), torch.randn(L * N, C)
    return [m for frozen in ("head", "hidden") for m in _heads_frozen_group(frozen, L, N, D, C, target, log_w, grad_logits)]


@sized_case("first-layer")
def first_layer(size: str) -> list[Method]:
    """``gaussian_linear`` sample and ``bernoulli_linear`` input mask on an input without grad
    (a network's first layer), B=256, K=N_out=1024: ours vs eager and the 2-GEMM floor."""
    B, K, N = STEP_SHAPES["first-layer"][size]
    x = torch.randn(B, K)  # the data: no gradient
    mu = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    rho = torch.full((N, K), -4.0, requires_grad=True)
    weight = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    bias = torch.zeros(N, requires_grad=True)
    gauss, bern = "gaussian sample", "bernoulli input"
    return [Method("udn gaussian sample", lambda: udn_kernels.gaussian_linear(x, mu, rho, sigma_transform="softplus"),
                   role="ours", group=gauss),
            Method("eager gaussian sample", lambda: eager_gauss("sample", x, mu, rho), group=gauss),
            Method("2-GEMM floor, gaussian", linear_floor(x, mu, 1, input_grad=False), backward=False,
                   role="floor", group=gauss),
            Method("udn bernoulli input", lambda: udn_kernels.bernoulli_linear(x, weight, bias, p=BERNOULLI_P),
                   role="ours", group=bern),
            Method("F.dropout + F.linear", lambda: eager_bern("input", x, weight, bias), group=bern),
            Method("2-GEMM floor, bernoulli", linear_floor(x, weight, 1, input_grad=False), backward=False,
                   role="floor", group=bern)]


def mlp(widths, layer: Callable[[int, int, int], list[nn.Module]]) -> nn.Sequential:
    """An MLP of ``widths`` whose layer ``i`` is the modules ``layer(i, n_in, n_out)``, ReLU between layers."""
    modules = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        modules += ([nn.ReLU()] if i else []) + layer(i, n_in, n_out)
    return nn.Sequential(*modules)


def adam_step(name: str, model: nn.Module, loss: Callable[[], torch.Tensor], role: str = "peer",
              group: str = "") -> Method:
    """A training step: ``loss()``, backward, then an Adam update of ``model``."""
    return Method(name, loss, role=role, group=group, step=torch.optim.Adam(model.parameters(), lr=1e-3).step)


def eager_gaussian_kl(mu, sigma, prior_std: float = 1.0) -> torch.Tensor:
    """``sum KL(N(mu, sigma^2) || N(0, prior_std^2))`` in eager PyTorch."""
    return (math.log(prior_std) - sigma.log() + (sigma * sigma + mu * mu) / (2 * prior_std ** 2) - 0.5).sum()


def eager_gaussian_mlp_loss(model: nn.Sequential, x, y, n_data: int) -> torch.Tensor:
    """Cross-entropy + KL / n_data of an MLP of ``udn_nn.GaussianLinear`` s (sigma = softplus(rho),
    prior N(0, prior_std^2)) written by hand: each layer samples its weight and bias, ``F.linear``,
    ReLU between layers, closed-form KL."""
    h, kl = x, 0.0
    for module in model:
        if not isinstance(module, udn_nn.GaussianLinear):
            h = module(h)
            continue
        w_sigma, b_sigma = F.softplus(module.weight_rho), F.softplus(module.bias_rho)
        h = F.linear(h, module.weight_mu + w_sigma * torch.randn_like(w_sigma),
                     module.bias_mu + b_sigma * torch.randn_like(b_sigma))
        kl = kl + eager_gaussian_kl(module.weight_mu, w_sigma, module.prior_std) \
            + eager_gaussian_kl(module.bias_mu, b_sigma, module.prior_std)
    return F.cross_entropy(h, y) + kl / n_data


def _gaussian_layer_group(estimator: str, width: int, x, peers) -> list[Method]:
    layer = udn_nn.GaussianLinear(width, width, estimator=estimator)
    peer_name = {"sample": "LinearReparameterization", "flipout": "LinearFlipout"}[estimator]
    group = f"layer {estimator}"
    ours = Method(f"udn GaussianLinear {estimator} + kl()", lambda: layer(x).sum() + layer.kl(), role="ours", group=group)
    if peers is None:
        return [ours, Method(f"bayesian-torch {peer_name}", None, group=group, missing=NOT_INSTALLED)]
    peer = getattr(peers[0], peer_name)(width, width)

    def peer_loss():  # its documented use: forward returns the output and the layer's KL
        out, kl = peer(x)
        return out.sum() + kl

    return [ours, Method(f"bayesian-torch {peer_name} + kl", peer_loss, group=group)]


def gaussian_mlps(widths) -> tuple[nn.Sequential, nn.Sequential]:
    """An MLP of ``udn_nn.GaussianLinear`` s and a copy for :func:`eager_gaussian_mlp_loss`."""
    ours = mlp(widths, lambda i, n_in, n_out: [udn_nn.GaussianLinear(n_in, n_out)])
    return ours, copy.deepcopy(ours)


@sized_case("bnn-step")
def bnn_step(size: str) -> list[Method]:
    """``nn.GaussianLinear(1024, 1024)`` forward + backward with its KL vs bayesian-torch's
    ``LinearReparameterization`` / ``LinearFlipout`` (sample, flipout); and an Adam step of a Bayesian
    MLP 784-1024-1024-10, B=256, cross-entropy + KL / 60000: ours vs bayesian-torch's ``dnn_to_bnn``
    of the same MLP and vs eager PyTorch written by hand."""
    width, widths, batch = STEP_SHAPES["bnn-step"][size]
    peers = bayesian_torch()
    x = torch.randn(batch, width, requires_grad=True)  # a hidden layer's input
    methods = _gaussian_layer_group("sample", width, x, peers) + _gaussian_layer_group("flipout", width, x, peers)
    data, labels = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    ours, by_hand = gaussian_mlps(widths)
    methods.append(adam_step("udn GaussianLinear MLP", ours,
                             lambda: F.cross_entropy(ours(data), labels) + udn_nn.kl(ours) / N_DATA, "ours", "mlp"))
    if peers is None:
        methods.append(Method("bayesian-torch dnn_to_bnn MLP", None, group="mlp", missing=NOT_INSTALLED))
    else:
        converted = mlp(widths, lambda i, n_in, n_out: [nn.Linear(n_in, n_out)])
        peers[1].dnn_to_bnn(converted, BAYESIAN_TORCH_PRIOR)
        methods.append(adam_step("bayesian-torch dnn_to_bnn MLP", converted, lambda: F.cross_entropy(
            converted(data), labels) + peers[1].get_kl_loss(converted) / N_DATA, group="mlp"))
    methods.append(adam_step("eager MLP by hand", by_hand,
                             lambda: eager_gaussian_mlp_loss(by_hand, data, labels, N_DATA), group="mlp"))
    return methods


def mcdropout_mlps(widths) -> tuple[nn.Sequential, nn.Sequential]:
    """The MC-dropout MLP (p before the 2nd and later Linear) with ``BernoulliLinear``, and with
    ``nn.Dropout`` + ``nn.Linear`` starting from the same weights."""
    ours = mlp(widths, lambda i, n_in, n_out: [nn.Linear(n_in, n_out) if i == 0 else
                                               udn_nn.BernoulliLinear(n_in, n_out, p=BERNOULLI_P)])
    eager = mlp(widths, lambda i, n_in, n_out: ([nn.Dropout(BERNOULLI_P)] if i else []) + [nn.Linear(n_in, n_out)])
    with torch.no_grad():
        for mine, theirs in zip(*([m for m in model if hasattr(m, "weight")] for model in (ours, eager))):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
    return ours, eager


@sized_case("mcdropout-step")
def mcdropout_step(size: str) -> list[Method]:
    """Adam step of an MC-dropout MLP 784-1024-1024-10, B=256, p=0.5 before the 2nd and 3rd
    Linear: ``BernoulliLinear`` vs ``nn.Dropout`` + ``nn.Linear`` (same initial weights)."""
    widths, batch = STEP_SHAPES["mcdropout-step"][size]
    data, labels = torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,))
    ours, eager = mcdropout_mlps(widths)
    return [adam_step("udn BernoulliLinear MLP", ours, lambda: F.cross_entropy(ours(data), labels), "ours"),
            adam_step("nn.Dropout + nn.Linear MLP", eager, lambda: F.cross_entropy(eager(data), labels))]


@sized_case("threads")
def threads(size: str, thread_counts=THREAD_COUNTS) -> list[Method]:
    """Peak extra memory (and time) at 1/2/8/16 torch threads of the fused heads forward+backward
    (L=2, N=1024, D=1024, C=32000, shared head, everything trainable; in float32 and in bfloat16)
    and of ``gaussian_linear`` sample forward+backward (B=256, K=N_out=1024), each vs eager at the
    same thread count."""
    (L, N, D, C), (B, K, N_out) = STEP_SHAPES["threads"][size]
    hidden = torch.randn(L, N, D, requires_grad=True)
    weight = (torch.randn(C, D) / math.sqrt(D)).requires_grad_()
    target, log_w = torch.randint(0, C, (N,)), _depth_log_weights(L)
    x = torch.randn(B, K, requires_grad=True)
    mu = (torch.randn(N_out, K) / math.sqrt(K)).requires_grad_()
    rho = torch.full((N_out, K), -4.0, requires_grad=True)
    hidden16, weight16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight))
    methods = []
    for t in thread_counts:
        for h, w, tag in ((hidden, weight, ""), (hidden16, weight16, " bf16")):
            heads = f"heads{tag}, {t} threads"
            methods += [Method(f"udn {heads}", lambda h=h, w=w: udn_kernels.depth_mixture_nll(h, w, None, target, log_w),
                               role="ours", group=heads, threads=t),
                        Method(f"eager {heads}", lambda h=h, w=w: stacked_heads_loss(h, w, target, log_w),
                               group=heads, threads=t)]
        gauss = f"gaussian sample, {t} threads"
        methods += [Method(f"udn {gauss}", lambda: udn_kernels.gaussian_linear(x, mu, rho, sigma_transform="softplus"),
                           role="ours", group=gauss, threads=t),
                    Method(f"eager {gauss}", lambda: eager_gauss("sample", x, mu, rho), group=gauss, threads=t)]
    return methods


# ---------------------------------------------------------------- mixed precision (docs/precision.md)
def _heads_bf16_methods(L: int, N: int, D: int, C: int, shared: bool) -> list[Method]:
    """Expected-mode fwd+bwd in bfloat16 (ours, the eager loop) and in float32 (the same values),
    so one run gives bf16 vs eager bf16, and the peak memory of the bf16 path against ours in fp32."""
    hidden = torch.randn(L, N, D)
    weight = torch.randn(*((C, D) if shared else (L, C, D))) / math.sqrt(D)
    bias = None if shared else torch.zeros(L, C)
    target, log_w = torch.randint(0, C, (N,)), _depth_log_weights(L)

    def leaves(dtype):
        return [None if x is None else x.to(dtype).requires_grad_() for x in (hidden, weight, bias)]

    (h16, w16, b16), (h32, w32, b32) = leaves(torch.bfloat16), leaves(torch.float32)
    return [Method("udn_kernels bf16", lambda: udn_kernels.depth_mixture_nll(h16, w16, b16, target, log_w),
                   role="ours"),
            Method("eager bf16", lambda: eager_heads_loss(h16, w16, b16, target, log_w)),
            Method("udn_kernels fp32", lambda: udn_kernels.depth_mixture_nll(h32, w32, b32, target, log_w)),
            Method("eager fp32", lambda: eager_heads_loss(h32, w32, b32, target, log_w))]


@case("heads-small-bf16")
def heads_small_bf16(quick: bool) -> list[Method]:
    """heads-small (L=16, N=256, D=128, C=10, a head per depth) in bfloat16, with fp32 rows."""
    L, N, D, C, _ = HEADS_SHAPES["heads-small"]
    return _heads_bf16_methods(L, N, D, C, shared=False)


@sized_case("heads-lm-bf16")
def heads_lm_bf16(size: str) -> list[Method]:
    """heads-lm (L=4, N=2048, D=256, C=16384, shared head; quick: N=512, C=4096; tiny: N=32,
    D=16, C=256) in bfloat16, with fp32 rows."""
    L, N, D, C, _ = HEADS_SHAPES["heads-lm"]
    N, D, C = {"full": (N, D, C), "quick": (512, D, 4096), "tiny": (32, 16, 256)}[size]
    return _heads_bf16_methods(L, N, D, C, shared=True)


# bnn-conv: batch, channels (in = out), image side; 3x3 kernels, padding 1
CONV_SHAPES = {"full": (64, 64, 32), "quick": (32, 32, 16), "tiny": (2, 4, 6)}
CONV_PEERS = {"sample": "Conv2dReparameterization", "flipout": "Conv2dFlipout"}


@sized_case("bnn-conv")
def bnn_conv(size: str) -> list[Method]:
    """``nn.GaussianConv2d`` forward + backward with its KL (64 -> 64 channels, 3x3, batch 64,
    32x32, input with grad as in a hidden layer) per estimator: sample vs bayesian-torch's
    ``Conv2dReparameterization``, flipout vs ``Conv2dFlipout``, local alone (no peer)."""
    batch, channels, side = CONV_SHAPES[size]
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    peers = bayesian_torch()
    methods = []
    for estimator in ("sample", "flipout", "local"):
        layer = udn_nn.GaussianConv2d(channels, channels, 3, padding=1, estimator=estimator)
        group = f"conv {estimator}"
        methods.append(Method(f"udn GaussianConv2d {estimator} + kl()", lambda layer=layer: layer(x).sum() + layer.kl(),
                              role="ours", group=group))
        if estimator not in CONV_PEERS:
            continue
        if peers is None:
            methods.append(Method(f"bayesian-torch {CONV_PEERS[estimator]}", None, group=group, missing=NOT_INSTALLED))
            continue
        peer = getattr(peers[0], CONV_PEERS[estimator])(channels, channels, 3, padding=1)

        def peer_loss(peer=peer):  # its documented use: forward returns the output and the layer's KL
            out, kl = peer(x)
            return out.sum() + kl

        methods.append(Method(f"bayesian-torch {CONV_PEERS[estimator]} + kl", peer_loss, group=group))
    return methods


# ---- convert-step: models converted from plain nn.Linear / nn.Conv2d (issue 16) ----------------
# MLP widths and batch; CNN (side of the square input, conv channels, hidden width) and batch
CONVERT_SHAPES = {"full": ((784, 1024, 1024, 10), 256, (28, (32, 64), 128), 64),
                  "quick": ((784, 256, 256, 10), 128, (28, (8, 16), 64), 32),
                  "tiny": ((12, 16, 16, 3), 8, (8, (2, 4), 8), 4)}
MOPED_DELTA = 0.1


def plain_cnn(side: int, channels: tuple[int, int], hidden: int, classes: int = 10) -> nn.Sequential:
    """conv-relu-pool twice, then a one-hidden-layer MLP head (``side`` divisible by 4)."""
    c1, c2 = channels
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c2 * (side // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _converted_pair(name: str, plain: nn.Module, data, labels, peers) -> list[Method]:
    """Adam steps of ``plain`` converted by ``udn_nn.bayesianize`` and by bayesian-torch's
    ``dnn_to_bnn``, both MOPED from the same weights, loss cross-entropy + KL / 60000."""
    ours = udn_nn.bayesianize(plain, delta=MOPED_DELTA)
    methods = [adam_step(f"udn bayesianize {name}", ours,
                         lambda: F.cross_entropy(ours(data), labels) + udn_nn.kl(ours) / N_DATA, "ours", name)]
    if peers is None:
        return methods + [Method(f"bayesian-torch dnn_to_bnn {name}", None, group=name, missing=NOT_INSTALLED)]
    theirs = copy.deepcopy(plain)
    peers[1].dnn_to_bnn(theirs, {**BAYESIAN_TORCH_PRIOR, "moped_enable": True, "moped_delta": MOPED_DELTA})
    return methods + [adam_step(f"bayesian-torch dnn_to_bnn {name}", theirs, lambda: F.cross_entropy(
        theirs(data), labels) + peers[1].get_kl_loss(theirs) / N_DATA, group=name)]


@sized_case("convert-step")
def convert_step(size: str) -> list[Method]:
    """Adam step of a plain MLP 784-1024-1024-10 (B=256) and of a small CNN (28x28, conv 32/64,
    hidden 128, B=64), each converted MOPED-style by ``udn_kernels.nn.bayesianize`` vs by
    bayesian-torch's ``dnn_to_bnn``."""
    widths, batch, (side, channels, hidden), cnn_batch = CONVERT_SHAPES[size]
    peers = bayesian_torch()
    mlp_plain = mlp(widths, lambda i, n_in, n_out: [nn.Linear(n_in, n_out)])
    cnn_plain = plain_cnn(side, channels, hidden, widths[-1])
    return (_converted_pair("mlp", mlp_plain, torch.randn(batch, widths[0]),
                            torch.randint(0, widths[-1], (batch,)), peers)
            + _converted_pair("cnn", cnn_plain, torch.randn(cnn_batch, 1, side, side),
                              torch.randint(0, widths[-1], (cnn_batch,)), peers))


# ------------------------------------------------------------------ 16-bit stochastic linear layers

HALF_LINEAR_SHAPES = {"full": LINEAR_SHAPE, "quick": (LINEAR_SHAPE[0], 512, 512), "tiny": (8, 32, 16)}


def _half_linear_inputs(dtype: torch.dtype, size: str, with_rho: bool) -> tuple:
    """gauss-linear / bern-linear's inputs in ``dtype``: ``x``, the weight (mu) and rho or a bias."""
    B, K, N = HALF_LINEAR_SHAPES[size]
    x = torch.randn(B, K, dtype=dtype, requires_grad=True)
    weight = (torch.randn(N, K) / math.sqrt(K)).to(dtype).requires_grad_()
    extra = torch.full((N, K) if with_rho else (N,), -4.0 if with_rho else 0.0, dtype=dtype, requires_grad=True)
    return x, weight, extra


@sized_case("gauss-linear-bf16")
def gauss_linear_bf16(size: str) -> list[Method]:
    """gauss-linear's shapes in bfloat16, ours and eager (``mu + softplus(rho) * randn_like(mu)`` then
    ``F.linear``, all in bfloat16), with the float32 pair and floor for reference."""
    methods = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        x, mu, rho = _half_linear_inputs(dtype, size, with_rho=True)
        estimators = ("sample", "local", "flipout") if dtype == torch.bfloat16 else ("sample",)
        methods += [Method(f"udn {e} {tag}", lambda e=e, x=x, mu=mu, rho=rho: udn_kernels.gaussian_linear(
            x, mu, rho, estimator=e, sigma_transform="softplus"), role="ours" if e == "sample" else "peer", group=tag)
            for e in estimators]
        methods.append(Method(f"eager sample {tag}", lambda x=x, mu=mu, rho=rho: eager_gauss("sample", x, mu, rho),
                              group=tag))
        methods.append(Method(f"3-GEMM floor {tag}", linear_floor(x, mu, 1), backward=False, role="floor", group=tag))
    return methods


@case("bern-linear-bf16")
def bern_linear_bf16(quick: bool) -> list[Method]:
    """bern-linear's shapes in bfloat16, ours and eager (``F.dropout`` + ``F.linear``, a ``bernoulli_``
    weight mask) in bfloat16, with the float32 pair for reference."""
    methods = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        x, weight, bias = _half_linear_inputs(dtype, "quick" if quick else "full", with_rho=False)
        masks = ("input", "weight") if dtype == torch.bfloat16 else ("input",)
        for mask in masks:
            methods += [Method(f"udn {mask} {tag}", lambda m=mask, x=x, w=weight, b=bias: udn_kernels.bernoulli_linear(
                                   x, w, b, p=BERNOULLI_P, mask=m), role="ours" if mask == "input" else "peer", group=tag),
                        Method(f"eager {mask} {tag}", lambda m=mask, x=x, w=weight, b=bias: eager_bern(m, x, w, b),
                               group=tag)]
    return methods


LOSS_OPTIONS = {"label_smoothing": dict(label_smoothing=0.1), "z-loss": dict(lse_square_scale=1e-4),
                "softcap": dict(softcap=30.0), "stats": dict(return_stats=True),
                "all": dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0, return_stats=True)}


@case("heads-loss-options")
def heads_loss_options(quick: bool) -> list[Method]:
    """The fused expected-mode loss at the heads-lm shape (quick: N=512, C=4096), plain ("ours") vs
    each loss option and all of them (docs/heads.md, "Loss options"; target: each <= 1.10x plain)."""
    L, N, D, C, _ = HEADS_SHAPES["heads-lm"]
    N, C = (512, 4096) if quick else (N, C)
    hidden = torch.randn(L, N, D, requires_grad=True)
    weight = (torch.randn(C, D) / math.sqrt(D)).requires_grad_()
    target, log_w = torch.randint(0, C, (N,)), _depth_log_weights(L)

    def loss(**options):
        out = udn_kernels.depth_mixture_nll(hidden, weight, None, target, log_w, **options)
        return out[0] if options.get("return_stats") else out

    return [Method("fused loss, plain", loss, role="ours")] + [
        Method(f"fused loss, {name}", lambda options=options: loss(**options))
        for name, options in LOSS_OPTIONS.items()]


# ------------------------------------------------------------------ Hugging Face early-exit training step
# vocab, hidden size, batch, sequence length of a 4-layer Llama with an exit after every layer
HF_STEP_SHAPES = {"full": (32000, 256, 4, 256), "quick": (8000, 128, 2, 256), "tiny": (100, 32, 2, 8)}


def materialising_exit_loss(hidden, weight, target, weights) -> torch.Tensor:
    """torchtune's early-exit loss once the exits' hidden states are normed (``[E, B, T, D]``):
    the ``[E, B*T, vocab]`` logits, per-exit mean token cross-entropy, weighted sum."""
    E = hidden.shape[0]
    logits = hidden.flatten(1, 2) @ weight.t()
    nll = F.cross_entropy(logits.flatten(0, 1), target.repeat(E), reduction="none").view(E, -1)
    return (weights * nll.sum(1)).sum() / (target != -100).sum()


def eager_early_exit_step_loss(model, input_ids, head_loss=materialising_exit_loss) -> torch.Tensor:
    """The early-exit loss of every layer of an HF Llama as users write it: base model with hidden
    states, the final norm on the earlier layers, ``head_loss`` on all (uniform weights)."""
    out = model.model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    layers = model.config.num_hidden_layers
    hidden = torch.stack([model.model.norm(h) for h in out.hidden_states[1:layers]] + [out.last_hidden_state])
    target = F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)
    return head_loss(hidden, model.lm_head.weight, target, torch.full((layers,), 1.0 / layers))


@sized_case("hf-early-exit-step")
def hf_early_exit_step(size: str) -> list[Method]:
    """An Adam training step of a 4-layer Hugging Face Llama (vocab 32000, hidden 256, 1024 tokens)
    with the early-exit loss of all 4 layers (uniform scale): ``integrations.early_exit_loss`` vs the
    eager loss that materialises every exit's logits, and vs ``torch.compile`` of that loss's head
    part (the base model runs eager in all three)."""
    names = ("udn early_exit_loss", "eager materialising", "torch.compile(head loss)")
    try:
        import transformers
    except ImportError:  # reported, not measured, like a missing peer
        return [Method(name, None, role="ours" if i == 0 else "peer",
                       missing="transformers not installed: pip install 'udn_kernels[dev]'")
                for i, name in enumerate(names)]
    from udn_kernels.integrations import early_exit_loss
    vocab, hidden, batch, seq = HF_STEP_SHAPES[size]
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=seq, bos_token_id=0, eos_token_id=0)
    ours = transformers.LlamaForCausalLM(config)
    eager, compiled = copy.deepcopy(ours), copy.deepcopy(ours)
    input_ids = torch.randint(0, vocab, (batch, seq))
    compiled_head = torch.compile(materialising_exit_loss)

    return [adam_step(names[0], ours, lambda: early_exit_loss(ours, input_ids, input_ids), "ours"),
            adam_step(names[1], eager, lambda: eager_early_exit_step_loss(eager, input_ids)),
            adam_step(names[2], compiled, lambda: eager_early_exit_step_loss(compiled, input_ids, compiled_head))]
