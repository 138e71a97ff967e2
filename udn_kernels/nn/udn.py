"""Unbounded Depth Networks (Nazaret & Blei, ICML 2022) on the fused depth-mixture heads.

A :class:`UDN` holds hidden blocks ``f_1, f_2, ...`` (built lazily), one linear head per depth, the
variational depth posterior ``q(l)`` (:class:`TruncatedPoisson`, ``model.depth``) and the prior
``mu(l)`` (:class:`PositivePoisson`). Its loss is ``-ELBO / n`` (docs/design.md, "Mathematics") where the data term
``sum_l q(l) sum_i log p(y_i | Omega_l(x_i))`` is ONE fused ``udn_kernels.depth_loglik`` call (the
kernel under ``depth_mixture_nll``) over the stacked hidden states ``[L, N, D]`` and stacked heads
``[L, C, D]``.

Speed (the udn-step benchmark: width 32, ~10 depths, batch 256 is dispatch-bound, every ATen op
and autograd node costs about as much as the arithmetic): all ELBO terms are per-depth ``[L]``
vectors that meet ``q`` in one node (``TruncatedPoisson.expectation_plus_entropy``); the Gaussian
weight prior is one autograd node (:class:`_DepthSquares`); ``UDN.mlp``'s default
``relu(linear)`` blocks run as one autograd node (:class:`_ReluTrunk`) that also yields the
blocks' squared norms. See docs/udn.md.

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
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as nn_module

import udn_kernels
from .._checks import check_choice, check_float_tensor, check_same, check_samples
from .depth import PositivePoisson, TruncatedPoisson
from .conv import BernoulliConv2d, GaussianConv2d
from .layers import (BernoulliLinear, GaussianLinear, StochasticLayer, VariationalDropoutLinear, _sample_axis_added,
                     active_samples, sampling)

LAYERS = ("deterministic", "gaussian", "bernoulli", "variational_dropout")


class _PriorPlan(NamedTuple):
    params: list                 # point-estimate parameters of blocks 1..L
    coef: torch.Tensor           # [P, L]: 1 where depth l uses parameter p (its block j <= l), else 0
    stochastic: list             # StochasticLayers of blocks 1..L
    stochastic_coef: torch.Tensor | None  # [K, L]: 1 where depth l uses stochastic layer k
    log_mu: torch.Tensor         # log mu(l), l = 1..L


class _DepthSquares(torch.autograd.Function):
    """``sum_{p in blocks 1..l} ||p||^2 + ||head_l||^2`` for every depth ``l`` as ONE autograd node.

    Inputs: ``coef [P, L]`` (``coef[p, l] = 1`` if depth ``l`` uses block parameter ``p``), the
    stacked head ``weight [L, C, D]`` and ``bias [L, C]``, then the ``P`` block parameters. The
    step is dispatch-bound: per-parameter autograd nodes would cost more than the arithmetic, so
    the forward is one foreach norm and the backward one foreach multiply.
    """

    @staticmethod
    def forward(ctx, coef, weight, bias, *params):
        ctx.save_for_backward(coef, weight, bias, *params)
        blocks = torch.stack(torch._foreach_norm(params)).square() @ coef if params else 0.0
        return blocks + weight.square().sum((1, 2)) + bias.square().sum(1)

    @staticmethod
    def backward(ctx, grad):
        coef, weight, bias, *params = ctx.saved_tensors
        grad = 2.0 * grad
        block_grads = torch._foreach_mul(params, (coef @ grad).unbind()) if params else []
        return (None, grad[:, None, None] * weight, grad[:, None] * bias, *block_grads)


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


def _plain_relu_layout(blocks) -> tuple | None:
    """``((residual, scale), ...)`` when every block is ``_Block(Sequential(nn.Linear, nn.ReLU))``
    without hooks (what ``UDN.mlp`` builds by default), else None."""
    if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
            or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
        return None
    layout, width = [], None
    for block in blocks:
        branch = block._modules.get("branch") if type(block) is _Block else None
        parts = tuple(branch._modules.values()) if type(branch) is nn.Sequential else ()
        if len(parts) != 2 or type(parts[0]) is not nn.Linear or type(parts[1]) is not nn.ReLU \
                or parts[0].bias is None:
            return None
        if width is None:
            width = parts[0].out_features
        elif parts[0].in_features != width or parts[0].out_features != width:  # blocks 2..L: D -> D
            return None
        for m in (block, branch, *parts):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return None
        layout.append((block.residual, block.scale))
    return tuple(layout)


class _ReluTrunk(torch.autograd.Function):
    """Hidden states ``[L, N, D]`` of a chain of ``relu(linear)`` blocks and each block's squared
    parameter norm ``||W_j||^2 + ||b_j||^2`` (``[L]``, for the weight prior) as ONE autograd node.

    Block ``j``: ``a_j = relu(h_{j-1} W_j^T + b_j)``, ``h_j = a_j`` or (residual) ``h_{j-1} + s_j a_j``.
    Same ATen GEMMs as the module path without an autograd node per op (the UDN step at width 32
    is dispatch-bound): the backward runs the chain in reverse, batches the weight gradients of
    blocks ``2..L`` (all ``D x D``) into one ``bmm`` and adds the prior's gradient in place of a
    separate accumulation per parameter. Inputs: ``x [N, K]``, the layout from
    :func:`_plain_relu_layout`, then ``W_1, b_1, ..., W_L, b_L``.
    """

    @staticmethod
    def forward(ctx, x, layout, *params):
        n, rows, width = len(layout), x.shape[0], params[0].shape[0]
        weights, biases = params[0::2], torch.stack(params[1::2])
        rest = torch.stack(weights[1:]) if n > 1 else params[0].new_empty(0, width, width)
        acts = x.new_empty(n, rows, width)
        any_residual = any(res for res, _ in layout)
        hidden = x.new_empty(n, rows, width) if any_residual else acts
        h = x
        for j, (res, scale) in enumerate(layout):
            a = torch.addmm(biases[j], h, weights[j].t(), out=acts[j]).relu_()
            if res:
                h = torch.add(h, a, alpha=scale, out=hidden[j])
            else:
                h = hidden[j].copy_(a) if any_residual else a
        squares = biases.square().sum(1)
        squares[0] += weights[0].square().sum()
        squares[1:] += rest.square().sum((1, 2))
        ctx.layout = layout
        ctx.save_for_backward(x, acts, hidden, weights[0], rest, biases, *weights)
        return hidden, squares

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, grad_squares):
        x, acts, hidden, first, rest, biases, *weights = ctx.saved_tensors
        layout, n = ctx.layout, len(ctx.layout)
        grad_z = torch.empty_like(acts)  # d/d pre-activations
        carry = None  # d/d h_j from block j + 1
        for j in reversed(range(n)):
            res, scale = layout[j]
            g_h = grad[j] if carry is None else grad[j] + carry
            g_a = g_h * scale if res and scale != 1.0 else g_h
            torch.ops.aten.threshold_backward.grad_input(g_a, acts[j], 0, grad_input=grad_z[j])
            if j > 0 or ctx.needs_input_grad[0]:
                carry = grad_z[j].mm(weights[j])
                if res:
                    carry += g_h
        two_g = 2.0 * grad_squares
        grad_first = torch.addmm(first, grad_z[0].t(), x, beta=0.0).add_(first * two_g[0])
        grad_rest = torch.bmm(grad_z[1:].transpose(1, 2), hidden[:-1]).addcmul_(rest, two_g[1:, None, None])
        grad_bias = grad_z.sum(1).addcmul_(biases, two_g[:, None])
        grads = [None] * (2 * n)
        grads[0::2] = (grad_first, *grad_rest.unbind())
        grads[1::2] = grad_bias.unbind()
        return (carry if ctx.needs_input_grad[0] else None, None, *grads)


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
        :class:`GaussianConv2d` (estimator "sample") / :class:`BernoulliConv2d` for every convolution.
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
        return self._hidden_and_squares(x, depth)[0]

    def _hidden_and_squares(self, x: torch.Tensor, depth: int | None):
        """``(hidden [L, ..., D], block_squares [L] or None)``.

        A plain ``relu(linear)`` chain (``UDN.mlp``'s default blocks, no hooks) that needs
        gradients runs as one :class:`_ReluTrunk` node, which also returns every block's squared
        parameter norm for the weight prior; other models run their modules one by one.
        """
        self._check_input(x)
        depth = self.depth.max_depth if depth is None else int(depth)
        self.grow(depth)
        blocks = list(self.blocks)[:depth]  # (slicing the ModuleList would build a new one)
        if (self.stem is None and self.readout is None and active_samples() is None and x.dim() == 2
                and torch.is_grad_enabled() and not torch.compiler.is_compiling()):
            layout = _plain_relu_layout(blocks)
            if layout is not None:
                linears = [b.branch._modules["0"] for b in blocks]
                return _ReluTrunk.apply(x, layout, *[p for m in linears for p in (m.weight, m.bias)])
        h = x if self.stem is None else self.stem(x)
        states = []
        for block in blocks:
            h = block(h)
            states.append(h if self.readout is None else self.readout(h))
        if active_samples() is not None:
            # Under sampling(S) early depths may lack the sample axis that later stochastic blocks add.
            states = torch.broadcast_tensors(*states)
        return torch.stack(states), None

    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor("x", x)
        check_same("the model parameters", self.depth.raw_rate, x=x)
        if self.in_features is not None and (x.dim() < -self.feature_dim
                                             or x.shape[self.feature_dim] != self.in_features):
            raise ValueError(f"x: expected {self.in_features} features on dim {self.feature_dim}, "
                             f"got shape {tuple(x.shape)}")

    def head_parameters(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked head weights ``[L, C, D]`` and biases ``[L, C]`` of depths ``1..L``."""
        heads = list(self.heads)[:depth]
        return torch.stack([h.weight for h in heads]), torch.stack([h.bias for h in heads])

    def _hidden_flat(self, x: torch.Tensor, depth: int, samples: int | None):
        """``(hidden [L, S*N, D], S, block_squares)``: hidden states with any MC sample axis folded
        into rows; ``block_squares`` as in :meth:`_hidden_and_squares`."""
        if samples is None:
            return (*self._hidden_and_squares(x, depth), 1)
        with sampling(samples):
            hidden, squares = self._hidden_and_squares(x, depth)
            sampled = _sample_axis_added()
        if not sampled:  # no stochastic layer: every sample is identical
            return hidden, squares, 1
        return hidden.reshape(depth, -1, hidden.shape[-1]), squares, samples

    def _prior_plan(self, depth: int, like: torch.Tensor) -> "_PriorPlan":
        """Which weight-space terms enter which depth, cached until the model grows (or is converted)."""
        key = (depth, len(self.blocks), like.dtype, like.device)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        params, first, stochastic, stochastic_first = [], [], [], []
        for index, block in enumerate(list(self.blocks)[:depth]):
            for m in block.modules():
                if isinstance(m, StochasticLayer):
                    stochastic.append(m)
                    stochastic_first.append(index)
                else:
                    own = list(m.parameters(recurse=False))
                    params += own
                    first += [index] * len(own)
        depths = torch.arange(depth)
        used = (torch.tensor(first, dtype=torch.int64)[:, None] <= depths).to(like.dtype)
        stochastic_coef = None
        if stochastic:
            stochastic_coef = (torch.tensor(stochastic_first)[:, None] <= depths).to(like.device, like.dtype)
        plan = _PriorPlan(params, used.to(like.device), stochastic, stochastic_coef,
                          self.prior.log_prob(depths.to(like.dtype) + 1).to(like.device))
        if not torch.compiler.is_compiling():
            self._plan_cache = (key, plan)
        return plan

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
        """The ELBO of docs/design.md ("Mathematics") for a dataset of ``n_data`` points estimated from the batch ``(x, y)``.

        The data term is exact over the depth support (one fused ``depth_loglik`` call for all
        depths) and scaled by ``n_data / B``; with ``samples=S`` it averages ``S`` weight draws in
        the same call. An empty batch has a zero data term (only the weight-space and depth terms
        remain). Every term is a per-depth vector ``v``; the result is ``E_q[v] + H[q]``.
        """
        _check_n_data(n_data)
        depth = self.depth.max_depth
        hidden, block_squares, draws = self._hidden_flat(x, depth, samples)
        weight, bias = self.head_parameters(depth)
        target = y if draws == 1 else y.repeat(draws, *([1] * (y.dim() - 1)))
        # [L, B*S] log-likelihoods; rows of ignore_index targets give 0 (as depth_mixture_nll's sum)
        loglik = udn_kernels.depth_loglik(hidden, weight, bias, target, likelihood=self.likelihood,
                                          noise_std=self.noise_std)
        plan = self._prior_plan(depth, weight)
        if block_squares is None:
            squares = _DepthSquares.apply(plan.coef, weight, bias, *plan.params)
        else:  # the trunk already has its blocks' squares: depth l sums blocks 1..l
            squares = _DepthSquares.apply(None, weight, bias) + block_squares.cumsum(0)
        per_depth = torch.add(plan.log_mu, squares, alpha=-0.5 / self.weight_prior_std ** 2)
        per_depth = torch.add(per_depth, loglik.sum(1), alpha=n_data / max(draws * y.shape[0], 1))
        if plan.stochastic:
            per_depth = per_depth - torch.stack([m.kl() for m in plan.stochastic]) @ plan.stochastic_coef
        elbo = self.depth.expectation_plus_entropy(per_depth)
        return elbo if self.stem is None else elbo + self.log_prior(self.stem)

    def loss(self, x: torch.Tensor, y: torch.Tensor, n_data: int, samples: int | None = None) -> torch.Tensor:
        """``-ELBO / n_data`` (the quantity to minimise; see :meth:`elbo`)."""
        return self.elbo(x, y, n_data, samples) * (-1.0 / n_data)

    def predict(self, x: torch.Tensor, samples: int | None = None, return_samples: bool = False):
        """Posterior predictive ``sum_l q(l) p(y | Omega_l(x))`` (one ``depth_mixture_predict`` call).

        Categorical: probabilities ``[N, C]``; gaussian: ``(mean, var)`` each ``[N, C]``. With
        ``samples=S`` the ``S`` weight draws flow through the model in one pass and are averaged
        (gaussian: law of total variance). ``return_samples=True`` also returns the per-draw
        predictions (``[S, N, C]``, or a ``(means, vars)`` pair).
        """
        depth = self.depth.max_depth
        hidden, _, draws = self._hidden_flat(x, depth, samples)
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


def mc_predict(model: nn.Module, x: torch.Tensor, samples: int, *, softmax: bool = True,
               return_samples: bool = False):
    """Monte-Carlo predictive of ``model`` at ``x`` from ``samples`` weight draws in one batched pass.

    Classifiers (``softmax=True``): the mean of the ``S`` softmax outputs ``[N, C]``; otherwise
    the mean of the raw outputs. With ``return_samples=True`` also returns the per-sample
    ``[S, N, C]`` tensor (e.g. for :func:`udn_kernels.metrics.mutual_information`). A UDN is
    delegated to ``model.predict(x, samples=S)`` (mixture over depths of each sample).
    """
    samples = check_samples(samples)
    if samples is None:
        raise ValueError("samples: expected an int >= 1, got None")
    if isinstance(model, UDN):
        return model.predict(x, samples=samples, return_samples=return_samples)
    with sampling(samples):
        out = model(x)
        if not _sample_axis_added():  # no stochastic layer ran: every sample is the same
            out = out.unsqueeze(0).expand(samples, *out.shape)
    per_sample = out.softmax(-1) if softmax else out
    mean = per_sample.mean(0)
    return (mean, per_sample) if return_samples else mean
