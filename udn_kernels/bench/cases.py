"""The benchmark cases of DESIGN §6, each a list of methods on shared inputs.

``build(case, quick, device)`` returns the methods: ours first, then the peers a user would otherwise
write, then the GEMM floor (the same matrix products alone). ``quick`` shrinks the shapes so the
whole set runs in minutes on 2 cores; the full shapes are DESIGN §6's.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

import udn_kernels
from .harness import Method

CASES: dict[str, Callable[[bool], list[Method]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def build(name: str, quick: bool, device: str = "cpu") -> list[Method]:
    """Methods of case ``name`` with inputs on ``device`` (tensor factories follow the device
    context, so on CUDA the ops dispatch to the Triton kernels); ValueError for an unknown case."""
    if name not in CASES:
        raise ValueError(f"case: expected one of {tuple(CASES)}, got {name!r}")
    torch.manual_seed(0)
    with torch.device(device):
        return CASES[name](quick)


def method_by_name(case_name: str, method: str, quick: bool, device: str = "cpu") -> Method:
    """One method of a case (used by the memory probe subprocess)."""
    return next(m for m in build(case_name, quick, device) if m.name == method)


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
    w = log_w.exp()

    def ours():
        return udn_kernels.depth_mixture_nll(hidden, weight, bias, target, log_w, mode="expected")

    def head(l):
        return (weight if shared else weight[l]), (None if bias is None else bias[l])

    def eager_loop():
        total = 0.0
        for l in range(L):
            wl, bl = head(l)
            total = total + w[l] * F.cross_entropy(F.linear(hidden[l], wl, bl), target)
        return total

    compiled_loop = torch.compile(eager_loop)

    def linear_ce():
        total = 0.0
        options = torch.nn.LinearCrossEntropyOptions()
        for l in range(L):
            wl, bl = head(l)
            total = total + w[l] * F.linear_cross_entropy(hidden[l], wl, target, linear_bias=bl,
                                                          options=options)
        return total

    grad_logits = torch.randn(L, N, C) if not shared else torch.randn(L * N, C)

    def gemm_floor():
        # forward logits, d hidden, d weight: the three products any exact method performs.
        with torch.no_grad():
            if shared:
                h2 = hidden.reshape(L * N, D)
                torch.mm(h2, weight.t())
                torch.mm(grad_logits, weight)
                torch.mm(grad_logits.t(), h2)
            else:
                torch.bmm(hidden, weight.transpose(1, 2))
                torch.bmm(grad_logits, weight)
                torch.bmm(grad_logits.transpose(1, 2), hidden)
        return hidden.sum()

    methods = [Method("udn_kernels", ours, role="ours"), Method("eager", eager_loop),
               Method("torch.compile(eager)", compiled_loop)]
    if shared:
        methods.append(Method("F.linear_cross_entropy", linear_ce))
    methods.append(Method("3-GEMM floor", gemm_floor, backward=False, role="floor"))
    return methods


@case("heads-small")
def heads_small(quick: bool) -> list[Method]:
    """L=16, N=256, D=128, C=10, a head per depth."""
    return _heads_methods(16, 256, 128, 10, shared=False)


@case("heads-lm")
def heads_lm(quick: bool) -> list[Method]:
    """L=4, N=2048, D=256, C=16384, one head shared by all depths (quick: N=512, C=4096)."""
    return _heads_methods(4, 512 if quick else 2048, 256, 4096 if quick else 16384, shared=True)


@case("heads-predict")
def heads_predict(quick: bool) -> list[Method]:
    """Posterior predictive ``sum_l w_l softmax(H_l W^T)``: L=8, N=2048, D=256, C=16384, shared
    head (quick: N=512, C=4096); no backward."""
    L, N, D, C = (8, 512, 256, 4096) if quick else (8, 2048, 256, 16384)
    hidden = torch.randn(L, N, D)
    weight = torch.randn(C, D) / math.sqrt(D)
    log_w = _depth_log_weights(L)
    w = log_w.exp()

    def ours():
        return udn_kernels.depth_mixture_predict(hidden, weight, None, log_w)

    def eager_loop():
        total = 0.0
        for l in range(L):
            total = total + w[l] * torch.softmax(hidden[l] @ weight.t(), dim=-1)
        return total

    def gemm_floor():
        for l in range(L):
            torch.mm(hidden[l], weight.t())
        return hidden.sum()

    return [Method("udn_kernels", ours, backward=False, role="ours"),
            Method("eager", eager_loop, backward=False),
            Method("torch.compile(eager)", torch.compile(eager_loop), backward=False),
            Method("1-GEMM floor", gemm_floor, backward=False, role="floor")]


def _linear_floor(x: torch.Tensor, weight: torch.Tensor, samples: int) -> Callable:
    grad_out = torch.randn(samples, x.shape[0], weight.shape[0])

    def floor():
        with torch.no_grad():
            for s in range(samples):
                torch.mm(x, weight.t())
                torch.mm(grad_out[s], weight)
                torch.mm(grad_out[s].t(), x)
        return x.sum()
    return floor


@case("gauss-linear")
def gauss_linear(quick: bool) -> list[Method]:
    """B=256, K=N_out=1024 (quick: 512), estimators sample/local/flipout, samples 1 and 8."""
    B, K, N = (256, 512, 512) if quick else (256, 1024, 1024)
    x = torch.randn(B, K, requires_grad=True)
    mu = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    rho = torch.full((N, K), -4.0, requires_grad=True)

    def ours(estimator, samples=None):
        return lambda: udn_kernels.gaussian_linear(x, mu, rho, estimator=estimator, samples=samples,
                                                   sigma_transform="softplus")

    def eager():  # bayesian-torch style: materialise the sampled weight, then F.linear
        return F.linear(x, mu + F.softplus(rho) * torch.randn_like(mu))

    def eager_loop8():
        return torch.stack([eager() for _ in range(8)])

    return [Method("udn sample", ours("sample"), role="ours"),
            Method("udn local", ours("local")), Method("udn flipout", ours("flipout")),
            Method("eager sample", eager),
            Method("udn sample S=8", ours("sample", 8)), Method("eager loop S=8", eager_loop8),
            Method("3-GEMM floor", _linear_floor(x, mu, 1), backward=False, role="floor"),
            Method("3-GEMM floor S=8", _linear_floor(x, mu, 8), backward=False, role="floor")]


@case("bern-linear")
def bern_linear(quick: bool) -> list[Method]:
    """B=256, K=N_out=1024 (quick: 512), masks input/weight/symmetric."""
    B, K, N = (256, 512, 512) if quick else (256, 1024, 1024)
    x = torch.randn(B, K, requires_grad=True)
    weight = (torch.randn(N, K) / math.sqrt(K)).requires_grad_()
    bias = torch.zeros(N, requires_grad=True)

    def ours(mask):
        return lambda: udn_kernels.bernoulli_linear(x, weight, bias, p=0.5, mask=mask)

    def dropout_linear():
        return F.linear(F.dropout(x, 0.5, training=True), weight, bias)

    def eager_weight_mask():
        return F.linear(x, weight * torch.bernoulli(torch.full_like(weight, 0.5)) * 2.0, bias)

    return [Method("udn input", ours("input"), role="ours"), Method("udn weight", ours("weight")),
            Method("udn symmetric", ours("symmetric")),
            Method("F.dropout + F.linear", dropout_linear), Method("eager weight mask", eager_weight_mask),
            Method("3-GEMM floor", _linear_floor(x, weight, 1), backward=False, role="floor")]


@case("rng")
def rng(quick: bool) -> list[Method]:
    """2^24 normals / uniforms / bernoullis (quick: 2^22)."""
    from udn_kernels import rng as urng
    n = 1 << (22 if quick else 24)
    device = torch.empty(0).device  # the device context build() entered
    return [Method("udn normal", lambda: urng.normal(n, seed=1, device=device), backward=False, role="ours"),
            Method("torch.randn", lambda: torch.randn(n), backward=False),
            Method("udn uniform", lambda: urng.uniform(n, seed=1, device=device), backward=False),
            Method("torch.rand", lambda: torch.rand(n), backward=False),
            Method("udn bernoulli", lambda: urng.bernoulli(n, 0.5, seed=1, device=device), backward=False),
            Method("torch.bernoulli_", lambda: torch.empty(n).bernoulli_(0.5), backward=False)]


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
    x, y = (t.to(device) for t in spirals(256, phase=3.0, noise=0.05, seed=0))
    model = UDN.mlp(2, 32, 2, init_rate=5.0).to(device)
    depths = model.depth.max_depth
    return [Method(f"UDN.mlp ({depths} depths)", lambda: model.loss(x, y, 1024), role="ours"),
            Method("eager UDN", lambda: eager_udn_loss(model, x, y, 1024))]
