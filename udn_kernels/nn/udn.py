"""Unbounded Depth Networks (Nazaret & Blei, ICML 2022) on the fused depth-mixture heads.

A :class:`UDN` holds hidden blocks ``f_1, f_2, ...`` (built lazily), one linear head per depth, the
variational depth posterior ``q(l)`` (:class:`TruncatedPoisson`, ``model.depth``) and the prior
``mu(l)`` (:class:`PositivePoisson`). Its loss is ``-ELBO / n`` (DESIGN §1) where the data term
``sum_l q(l) sum_i log p(y_i | Omega_l(x_i))`` is ONE ``udn_kernels.depth_mixture_nll`` call over
the stacked hidden states ``[L, N, D]`` and stacked heads ``[L, C, D]``.

Weight-space terms (the reference implementation's convention): for depth ``l`` the model uses
blocks ``1..l`` and head ``l``, so ``log p(theta_{<=l}) = sum_{j<=l} log p(f_j) + log p(o_l)``. A
point-estimate parameter contributes its Gaussian log-prior ``-theta^2 / (2 s^2)`` (MAP; the
normalising constant is dropped: a point mass has no density, and the constant would charge every
extra layer a data-independent price); a stochastic layer contributes ``-KL(q || p)`` (its
``.kl()``). Stem parameters (used by every depth) enter with weight 1. The Gaussian noise std and
``q``'s rate are point estimates with flat priors.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
from torch import nn

import udn_kernels
from ..ops._checks import check_choice, check_float_tensor, check_same
from .depth import PositivePoisson, TruncatedPoisson
from .layers import (BernoulliConv2d, BernoulliLinear, GaussianConv2d, GaussianLinear,
                     StochasticLayer, VariationalDropoutLinear, _sample_axis_added, sampling)

LAYERS = ("deterministic", "gaussian", "bernoulli", "variational_dropout")


class _PriorPlan(NamedTuple):
    params: list            # point-estimate parameters of blocks 1..L
    segments: torch.Tensor | None  # block index of every element of their concatenation
    stochastic: list        # StochasticLayers of blocks 1..L
    stochastic_index: torch.Tensor  # their block indices
    log_mu: torch.Tensor    # log mu(l), l = 1..L


def _check_n_data(n_data) -> int:
    """``n_data`` (the dataset size the ELBO is scaled to) is an int >= 1."""
    if isinstance(n_data, bool) or not isinstance(n_data, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"n_data: expected an int >= 1 (the dataset size), got {type(n_data).__name__}")
    if n_data < 1:
        raise ValueError(f"n_data: expected an int >= 1 (the dataset size), got {n_data}")
    return n_data


class _Block(nn.Module):
    """``branch(h)`` or, when residual, ``h + branch(h) / sqrt(depth_scale)``."""

    def __init__(self, branch: nn.Module, residual: bool, depth_scale: float | None):
        super().__init__()
        self.branch = branch
        self.residual = residual
        self.scale = 1.0 if depth_scale is None else 1.0 / math.sqrt(depth_scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.branch(h)
        if not self.residual:
            return out
        return h + out if self.scale == 1.0 else h + self.scale * out


def _linear_factory(layer: str, prior_std: float, kwargs: dict) -> Callable[[int, int], nn.Module]:
    check_choice("layer", layer, LAYERS)
    if layer == "deterministic":
        return lambda i, o: nn.Linear(i, o, **kwargs)
    if layer == "gaussian":
        return lambda i, o: GaussianLinear(i, o, prior_std=prior_std, **kwargs)
    if layer == "bernoulli":
        return lambda i, o: BernoulliLinear(i, o, prior_std=prior_std, **kwargs)
    return lambda i, o: VariationalDropoutLinear(i, o, **kwargs)


def _conv_factory(layer: str, prior_std: float, kwargs: dict) -> Callable[[int, int], nn.Module]:
    check_choice("layer", layer, ("deterministic", "gaussian", "bernoulli"))
    if layer == "deterministic":
        return lambda i, o: nn.Conv2d(i, o, 3, padding=1, **kwargs)
    if layer == "gaussian":
        return lambda i, o: GaussianConv2d(i, o, 3, padding=1, prior_std=prior_std, **kwargs)
    return lambda i, o: BernoulliConv2d(i, o, 3, padding=1, prior_std=prior_std, **kwargs)


def _spatial_mean(h: torch.Tensor) -> torch.Tensor:
    return h.mean(dim=(-2, -1))


class UDN(nn.Module):
    """An Unbounded Depth Network. Build one with :meth:`mlp` or :meth:`resnet`, or directly.

    Args:
        block_factory: ``index -> nn.Module``, the hidden block ``f_{index+1}``; called on growth.
        hidden_features: width ``D`` of the (read-out) hidden state fed to the heads.
        out_features: ``C`` classes (categorical) or regression outputs (gaussian).
        stem: optional module applied to ``x`` before block 1 (shared by every depth).
        readout: optional map from a block output to the ``[..., D]`` head input (e.g. spatial pooling).
        likelihood: ``"categorical"`` (integer targets) or ``"gaussian"`` (float ``[N, C]`` targets,
            learnable per-output noise std ``exp(log_noise_std)``, initialised to ``noise_std``).
        init_rate, quantile: the truncated-Poisson posterior ``q``.
        prior_rate: ``mu(l) = 1 + Poisson(prior_rate)``.
        weight_prior_std: ``s`` of the Gaussian prior on point-estimate weights (heads, deterministic layers).
        in_features, feature_dim: when given, ``x.shape[feature_dim]`` must equal ``in_features``
            (checked with ``x``'s dtype and device before the forward).
    """

    def __init__(self, block_factory: Callable[[int], nn.Module], hidden_features: int, out_features: int,
                 *, stem: nn.Module | None = None, readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 likelihood: str = "categorical", init_rate: float = 1.0, prior_rate: float = 0.5,
                 weight_prior_std: float = 1.0, quantile: float = 0.95, noise_std: float = 1.0,
                 in_features: int | None = None, feature_dim: int = -1):
        super().__init__()
        # math.log below would only say "math domain error"
        if not 0 < noise_std < math.inf:
            raise ValueError(f"noise_std: expected a finite positive float, got {noise_std}")
        self.in_features, self.feature_dim = in_features, feature_dim
        self.block_factory = block_factory
        self.hidden_features, self.out_features = hidden_features, out_features
        self.likelihood = check_choice("likelihood", likelihood, ("categorical", "gaussian"))
        self.weight_prior_std = float(weight_prior_std)
        self.stem = stem
        self.readout = readout
        self.depth = TruncatedPoisson(init_rate, quantile)
        self.prior = PositivePoisson(prior_rate)
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        if likelihood == "gaussian":
            self.log_noise_std = nn.Parameter(torch.full((out_features,), math.log(noise_std)))
        self._optimizer: torch.optim.Optimizer | None = None
        self._plan_cache = None
        self.register_load_state_dict_pre_hook(UDN._grow_before_load)
        self.grow(self.depth.max_depth)

    # ----------------------------------------------------------------- construction
    @classmethod
    def mlp(cls, in_features: int, hidden_features: int, out_features: int, *,
            likelihood: str = "categorical", init_rate: float = 1.0, prior_rate: float = 0.5,
            weight_prior_std: float = 1.0, layer: str = "deterministic", layer_kwargs: dict | None = None,
            residual: bool = False, depth_scale: float | None = None,
            activation: Callable[[], nn.Module] = nn.ReLU, quantile: float = 0.95,
            noise_std: float = 1.0) -> "UDN":
        """A fully connected UDN: ``f_1 = act(layer(in -> hidden))``, ``f_l = act(layer(hidden -> hidden))``.

        ``layer``: ``"deterministic"`` (``nn.Linear``, MAP), ``"gaussian"`` (:class:`GaussianLinear`),
        ``"bernoulli"`` (:class:`BernoulliLinear`) or ``"variational_dropout"``; ``layer_kwargs`` go to
        its constructor. ``residual=True`` makes blocks ``l >= 2`` residual, ``h + f(h) / sqrt(depth_scale)``
        (``depth_scale`` gives the Peluchetti & Favaro diffusion-limit branch scaling; None -> 1).
        """
        make = _linear_factory(layer, weight_prior_std, dict(layer_kwargs or {}))

        def block_factory(index: int) -> nn.Module:
            width_in = in_features if index == 0 else hidden_features
            branch = nn.Sequential(make(width_in, hidden_features), activation())
            return _Block(branch, residual and index > 0, depth_scale)

        return cls(block_factory, hidden_features, out_features, likelihood=likelihood,
                   init_rate=init_rate, prior_rate=prior_rate, weight_prior_std=weight_prior_std,
                   quantile=quantile, noise_std=noise_std, in_features=in_features)

    @classmethod
    def resnet(cls, in_channels: int, channels: int, out_features: int, *,
               likelihood: str = "categorical", init_rate: float = 1.0, prior_rate: float = 0.5,
               weight_prior_std: float = 1.0, layer: str = "deterministic", layer_kwargs: dict | None = None,
               depth_scale: float | None = None, quantile: float = 0.95, noise_std: float = 1.0) -> "UDN":
        """A small convolutional UDN on ``[N, in_channels, H, W]`` images.

        Stem: ``relu(conv3x3(in -> channels))``; block ``l``: ``h + g(h) / sqrt(depth_scale)`` with
        ``g = conv3x3(relu(conv3x3(relu(h))))`` at constant width and resolution; the head of depth
        ``l`` reads the spatial mean of ``h_l`` (``[N, channels]``). ``layer`` picks ``nn.Conv2d`` or
        the (reference-path) :class:`GaussianConv2d` / :class:`BernoulliConv2d` for every convolution.
        """
        make = _conv_factory(layer, weight_prior_std, dict(layer_kwargs or {}))

        def block_factory(index: int) -> nn.Module:
            branch = nn.Sequential(nn.ReLU(), make(channels, channels), nn.ReLU(), make(channels, channels))
            return _Block(branch, True, depth_scale)

        stem = nn.Sequential(make(in_channels, channels), nn.ReLU())
        return cls(block_factory, channels, out_features, stem=stem, readout=_spatial_mean,
                   likelihood=likelihood, init_rate=init_rate, prior_rate=prior_rate,
                   weight_prior_std=weight_prior_std, quantile=quantile, noise_std=noise_std,
                   in_features=in_channels, feature_dim=-3)

    # ----------------------------------------------------------------- growth
    @property
    def built_depth(self) -> int:
        """Number of blocks (and heads) built so far (>= ``depth.max_depth`` after any call)."""
        return len(self.blocks)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Register ``optimizer``: parameters created by later growth join it as a new param group
        (hyper-parameters copied from its first group; Adam/SGD state starts lazily). Parameters of
        this model missing from it are added now. LR schedulers created before a growth do not see
        the new groups. After every step the truncation is re-read eagerly and the model grown to
        it, so a compiled loss sees the new depth (see ``TruncatedPoisson.max_depth``)."""
        self._optimizer = optimizer
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._add_to_optimizer([p for p in self.parameters() if id(p) not in known])
        optimizer.register_step_post_hook(lambda *_: self.grow(self.depth.max_depth))
        return optimizer

    def _add_to_optimizer(self, params: list[nn.Parameter]) -> None:
        if self._optimizer is None or not params:
            return
        group = {k: v for k, v in self._optimizer.param_groups[0].items() if k != "params"}
        group["params"] = params
        self._optimizer.add_param_group(group)

    def grow(self, depth: int) -> list[nn.Parameter]:
        """Build blocks and heads up to ``depth`` (nothing is removed); returns the new parameters."""
        reference = self.depth.raw_rate
        new: list[nn.Parameter] = []
        while len(self.blocks) < depth:
            block = self.block_factory(len(self.blocks)).to(device=reference.device, dtype=reference.dtype)
            head = nn.Linear(self.hidden_features, self.out_features).to(device=reference.device,
                                                                         dtype=reference.dtype)
            self.blocks.append(block)
            self.heads.append(head)
            new += list(block.parameters()) + list(head.parameters())
        self._add_to_optimizer(new)
        return new

    @staticmethod
    def _grow_before_load(module, state_dict, prefix, *args) -> None:
        # A grown model's state dict has more heads than a fresh model: build them before loading.
        marker = prefix + "heads."
        indices = [int(key[len(marker):].split(".", 1)[0]) for key in state_dict if key.startswith(marker)]
        if indices:
            module.grow(max(indices) + 1)

    # ----------------------------------------------------------------- forward pieces
    @property
    def noise_std(self) -> torch.Tensor | None:
        """Per-output Gaussian noise std ``[C]`` (gaussian likelihood), else None."""
        return self.log_noise_std.exp() if self.likelihood == "gaussian" else None

    def hidden_states(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Stacked read-out hidden states ``[L, ..., D]`` of depths ``1..L`` (grows if needed)."""
        self._check_input(x)
        depth = self.depth.max_depth if depth is None else int(depth)
        self.grow(depth)
        h = x if self.stem is None else self.stem(x)
        states = []
        for block in self.blocks[:depth]:
            h = block(h)
            states.append(h if self.readout is None else self.readout(h))
        # Under sampling(S) early depths may lack the sample axis that later stochastic blocks add.
        return torch.stack(torch.broadcast_tensors(*states))

    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor("x", x)
        check_same("the model parameters", self.depth.raw_rate, x=x)
        if self.in_features is not None and (x.dim() < -self.feature_dim
                                             or x.shape[self.feature_dim] != self.in_features):
            raise ValueError(f"x: expected {self.in_features} features on dim {self.feature_dim}, "
                             f"got shape {tuple(x.shape)}")

    def head_parameters(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked head weights ``[L, C, D]`` and biases ``[L, C]`` of depths ``1..L``."""
        heads = self.heads[:depth]
        return torch.stack([h.weight for h in heads]), torch.stack([h.bias for h in heads])

    def _hidden_flat(self, x: torch.Tensor, depth: int, samples: int | None):
        """``(hidden [L, S*N, D], S)``: hidden states with any MC sample axis folded into rows."""
        if samples is None:
            return self.hidden_states(x, depth), 1
        with sampling(samples):
            hidden = self.hidden_states(x, depth)
            sampled = _sample_axis_added()
        if not sampled:  # no stochastic layer: every sample is identical
            return hidden, 1
        return hidden.reshape(depth, -1, hidden.shape[-1]), samples

    def _prior_plan(self, depth: int, like: torch.Tensor) -> "_PriorPlan":
        """Per-depth bookkeeping of the weight-space terms, cached until the model grows."""
        key = (depth, len(self.blocks), like.dtype, like.device)
        if self._plan_cache is None or self._plan_cache[0] != key:
            params, segments, stochastic = [], [], []
            for index, block in enumerate(self.blocks[:depth]):
                for m in block.modules():
                    if isinstance(m, StochasticLayer):
                        stochastic.append((index, m))
                    else:
                        for p in m.parameters(recurse=False):
                            params.append(p)
                            segments.append(torch.full((p.numel(),), index, dtype=torch.int64))
            segments = torch.cat(segments).to(like.device) if segments else None
            depths = torch.arange(1, depth + 1, dtype=like.dtype, device=like.device)
            plan = _PriorPlan(params, segments, [m for _, m in stochastic],
                              torch.tensor([i for i, _ in stochastic], dtype=torch.int64, device=like.device),
                              self.prior.log_prob(depths))
            self._plan_cache = (key, plan)
        return self._plan_cache[1]

    def _block_log_priors(self, depth: int, plan: "_PriorPlan") -> torch.Tensor:
        """``[log p(f_1), ..., log p(f_L)]``: Gaussian log-prior of point weights minus KL of stochastic layers."""
        terms = plan.log_mu.new_zeros(depth)
        if plan.params:
            # One concatenation instead of a reduction per parameter: the step is dispatch-bound.
            squares = torch.cat([p.reshape(-1) for p in plan.params]).pow(2)
            terms = terms.index_add(0, plan.segments, squares, alpha=-0.5 / self.weight_prior_std ** 2)
        if plan.stochastic:
            kls = torch.stack([layer.kl() for layer in plan.stochastic])
            terms = terms.index_add(0, plan.stochastic_index, -kls)
        return terms

    def _point_log_prior(self, params) -> torch.Tensor:
        return -sum(p.pow(2).sum() for p in params) / (2.0 * self.weight_prior_std ** 2)

    def log_prior(self, module: nn.Module) -> torch.Tensor:
        """Weight-space ELBO term of ``module``: Gaussian log-prior of its point-estimate parameters
        (constant dropped) minus the KL of its stochastic layers."""
        terms = []
        for m in module.modules():
            if isinstance(m, StochasticLayer):
                terms.append(-m.kl())
            else:
                own = list(m.parameters(recurse=False))
                if own:
                    terms.append(self._point_log_prior(own))
        if not terms:
            return self.depth.raw_rate.new_zeros(())
        return torch.stack(terms).sum()

    # ----------------------------------------------------------------- objective and prediction
    def elbo(self, x: torch.Tensor, y: torch.Tensor, n_data: int, samples: int | None = None) -> torch.Tensor:
        """The ELBO of DESIGN §1 for a dataset of ``n_data`` points estimated from the batch ``(x, y)``.

        The data term is exact over the depth support (one fused ``depth_mixture_nll`` call) and
        scaled by ``n_data / B``; with ``samples=S`` it averages ``S`` weight draws in the same call.
        An empty batch has a zero data term (only the weight-space and depth terms remain).
        """
        _check_n_data(n_data)
        depth = self.depth.max_depth
        hidden, draws = self._hidden_flat(x, depth, samples)
        weight, bias = self.head_parameters(depth)
        log_q = self.depth.log_probs(depth)
        target = y if draws == 1 else y.repeat(draws, *([1] * (y.dim() - 1)))
        nll_sum = udn_kernels.depth_mixture_nll(hidden, weight, bias, target, log_q, mode="expected",
                                                likelihood=self.likelihood, noise_std=self.noise_std,
                                                reduction="sum")
        expected_loglik = -nll_sum * (n_data / max(draws * y.shape[0], 1))

        q = log_q.exp()
        head_terms = -(weight.pow(2).sum((1, 2)) + bias.pow(2).sum(1)) / (2.0 * self.weight_prior_std ** 2)
        plan = self._prior_plan(depth, q)
        per_depth = self._block_log_priors(depth, plan).cumsum(0) + head_terms + plan.log_mu
        stem_term = self.log_prior(self.stem) if self.stem is not None else 0.0
        entropy = -(q * log_q).sum()
        return expected_loglik + (q * per_depth).sum() + stem_term + entropy

    def loss(self, x: torch.Tensor, y: torch.Tensor, n_data: int, samples: int | None = None) -> torch.Tensor:
        """``-ELBO / n_data`` (the quantity to minimise; see :meth:`elbo`)."""
        return -self.elbo(x, y, n_data, samples) / n_data

    def predict(self, x: torch.Tensor, samples: int | None = None, return_samples: bool = False):
        """Posterior predictive ``sum_l q(l) p(y | Omega_l(x))`` (one ``depth_mixture_predict`` call).

        Categorical: probabilities ``[N, C]``; gaussian: ``(mean, var)`` each ``[N, C]``. With
        ``samples=S`` the ``S`` weight draws flow through the model in one pass and are averaged
        (gaussian: law of total variance). ``return_samples=True`` also returns the per-draw
        predictions (``[S, N, C]``, or a ``(means, vars)`` pair).
        """
        depth = self.depth.max_depth
        hidden, draws = self._hidden_flat(x, depth, samples)
        weight, bias = self.head_parameters(depth)
        out = udn_kernels.depth_mixture_predict(hidden, weight, bias, self.depth.log_probs(depth),
                                                likelihood=self.likelihood, noise_std=self.noise_std)
        count = samples or 1
        if self.likelihood == "categorical":
            per_sample = out.view(draws, -1, out.shape[-1]).expand(count, -1, -1)
            pred = per_sample.mean(0)
        else:
            means, variances = (t.view(draws, -1, t.shape[-1]).expand(count, -1, -1) for t in out)
            per_sample = (means, variances)
            pred = (means.mean(0), variances.mean(0) + means.var(0, unbiased=False))
        return (pred, per_sample) if return_samples else pred

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, n_data: int | None = None):
        """``predict(x)`` without targets, else ``loss(x, y, n_data)`` (so DDP can wrap the loss)."""
        if y is None:
            return self.predict(x)
        if n_data is None:
            raise ValueError("n_data: expected the dataset size (int) when y is given, got None")
        return self.loss(x, y, n_data)
