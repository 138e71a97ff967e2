"""Model conversion: make an existing PyTorch model Bayesian without rewriting it (docs/bayesianize.md).

- :func:`bayesianize`: ``nn.Linear`` / ``nn.Conv2d`` -> :class:`GaussianLinear` / :class:`GaussianConv2d`,
  initialised fresh or MOPED-style from the trained weights (``mu = w``, ``sigma = delta |w|``).
- :func:`to_mc_dropout`: ``nn.Dropout`` followed by ``nn.Linear`` -> ``Identity`` + :class:`BernoulliLinear`
  (``mask="input"``), so the masks are drawn inside the kernel and stay on for :func:`mc_predict`.
- :func:`from_bayesian_torch`: bayesian-torch's Linear/Conv2d Reparameterization and Flipout layers ->
  ours, with their ``mu``, ``rho`` and prior.

Every converter validates the whole model and builds every new module before it replaces
anything, so a bad argument or an unsupported module raises and leaves the model unchanged. They
also wrap the shape-sensitive deterministic modules (``Flatten``, pooling, batch norm, convolutions
left as they are) in :class:`SampleFold`, so Monte-Carlo samples flow through CNNs as a leading axis.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

import torch
from torch import nn

from .._checks import check_choice
from .conv import GaussianConv2d
from .layers import BernoulliLinear, GaussianLinear, StochasticLayer, _sample_axis_added

SUPPORTED = (nn.Linear, nn.Conv2d)  # exact types: subclasses (e.g. attention's out_proj) are used differently
SUPPORTED_NAMES = "nn.Linear, nn.Conv2d"
INITS = ("fresh", "moped")
MIN_SIGMA = 1e-8  # MOPED's sigma floor: a zero weight would give rho = -inf
# Modules that read the batch or channel axis at a fixed position, or take a fixed number of
# dimensions, and so must see the Monte-Carlo samples folded into the batch (SampleFold is public
# for modules not listed here).
_FOLDED = (nn.Flatten, nn.Unflatten, nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
           nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
           nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.batchnorm._BatchNorm,
           nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
           nn.Upsample, nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd)
# bayesian-torch layer -> (our kind, its estimator)
_BAYESIAN_TORCH = {"LinearReparameterization": ("linear", "sample"), "LinearFlipout": ("linear", "flipout"),
                   "Conv2dReparameterization": ("conv", "sample"), "Conv2dFlipout": ("conv", "flipout")}


class SampleFold(nn.Module):
    """Runs ``module`` with the Monte-Carlo sample axis folded into the batch axis.

    Inside :func:`sampling` the tensors after the first stochastic layer are ``[S, N, ...]``;
    ``nn.Flatten`` would merge ``N`` into the features and pooling / ``nn.Conv2d`` refuse 5-D
    input, so this runs ``module`` on ``[S*N, ...]`` and restores ``[S, N, ...]``. Outside a
    sampled pass (training, :func:`deterministic`, layers before the first stochastic one) it is
    ``module`` itself.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _sample_axis_added():
            return self.module(x)
        out = self.module(x.flatten(0, 1))
        return out.unflatten(0, x.shape[:2])


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _replace(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Swap the named submodules, then fold the sample axis around the shape-sensitive ones."""
    for name, module in replacements.items():
        setattr(*_parent(model, name), module)
    folds = {name: SampleFold(m) for name, m in model.named_modules()
             if name and isinstance(m, _FOLDED) and not isinstance(_parent(model, name)[0], SampleFold)}
    for name, module in folds.items():
        setattr(*_parent(model, name), module)


def _target(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    return model if inplace else copy.deepcopy(model)


def _selected(model: nn.Module, select, last_layer: bool) -> list[str]:
    """Names of the modules to convert: every supported one, or those ``select`` picks."""
    modules = {name: m for name, m in model.named_modules() if name}
    if select is None:
        names = [n for n, m in modules.items() if type(m) in SUPPORTED]
    elif isinstance(select, type) or (isinstance(select, tuple) and all(isinstance(t, type) for t in select)):
        types = select if isinstance(select, tuple) else (select,)
        bad = [t.__name__ for t in types if t not in SUPPORTED]
        if bad:
            raise TypeError(f"select: unsupported module type(s) {bad}; supported: {SUPPORTED_NAMES}")
        names = [n for n, m in modules.items() if type(m) in types]
    elif callable(select):  # asked of the supported modules only, so it need not repeat the type test
        names = [n for n, m in modules.items() if type(m) in SUPPORTED and select(n, m)]
    elif isinstance(select, Iterable) and not isinstance(select, str):
        names = list(select)
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"select: no submodule named {missing} in the model")
    else:
        raise TypeError("select: expected None, a module type or tuple of types, a list of submodule names "
                        f"or a callable (name, module) -> bool, got {select!r}")
    for name in names:
        if type(modules[name]) not in SUPPORTED:
            raise TypeError(f"select: module {name!r} is a {type(modules[name]).__name__}; "
                            f"supported: {SUPPORTED_NAMES}")
    if not names:
        raise ValueError(f"select: no module to convert (the model has no selected {SUPPORTED_NAMES})")
    return names[-1:] if last_layer else names


def _set_posterior(layer: nn.Module, weight_mu, weight_rho, bias_mu, bias_rho) -> None:
    with torch.no_grad():
        layer.weight_mu.copy_(weight_mu)
        layer.weight_rho.copy_(weight_rho)
        if layer.bias_mu is not None:
            layer.bias_mu.copy_(bias_mu)
            layer.bias_rho.copy_(bias_rho)


def _moped_rho(weight: torch.Tensor, delta: float) -> torch.Tensor:
    """``softplus^-1(delta |w|)``, computed stably: ``s + log(-expm1(-s))``."""
    sigma = (delta * weight.detach().abs()).clamp_min(MIN_SIGMA)
    return sigma + torch.log(-torch.expm1(-sigma))


def _gaussian_layer(name: str, kind: str, shape: dict, *, bias: bool, estimator: str, prior_std: float,
                    init_sigma: float, like: torch.Tensor) -> StochasticLayer:
    """A fresh GaussianLinear / GaussianConv2d on ``like``'s device and dtype."""
    if kind == "linear":
        layer = GaussianLinear(shape["in_features"], shape["out_features"], bias=bias, prior_std=prior_std,
                               estimator=estimator, init_sigma=init_sigma)
    else:
        if shape["groups"] != 1:
            raise ValueError(f"module {name!r}: GaussianConv2d has no groups; expected groups=1, got {shape['groups']}")
        if shape.get("padding_mode", "zeros") != "zeros":
            raise ValueError(f"module {name!r}: GaussianConv2d pads with zeros; expected padding_mode='zeros', "
                             f"got {shape['padding_mode']!r}")
        layer = GaussianConv2d(shape["in_channels"], shape["out_channels"], shape["kernel_size"],
                               stride=shape["stride"], padding=shape["padding"], dilation=shape["dilation"],
                               bias=bias, prior_std=prior_std, init_sigma=init_sigma, estimator=estimator)
    return layer.to(device=like.device, dtype=like.dtype)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite float > 0, got {value!r}")
    return float(value)


def bayesianize(model: nn.Module, *, select=None, last_layer: bool = False, estimator: str = "sample",
                prior_std: float = 1.0, init: str = "moped", delta: float = 0.1, init_sigma: float = 1e-2,
                inplace: bool = False) -> nn.Module:
    """Replace ``nn.Linear`` / ``nn.Conv2d`` modules by :class:`GaussianLinear` / :class:`GaussianConv2d`.

    ``select``: None (every ``nn.Linear`` and ``nn.Conv2d``), a type or tuple of them, a list of
    submodule names (``model.named_modules()``), or ``callable(name, module) -> bool`` (asked of
    each ``nn.Linear`` / ``nn.Conv2d``);
    ``last_layer=True`` keeps only the last selected module (a Bayesian last layer).
    ``estimator``: ``"sample"``, ``"local"``, ``"flipout"`` (linear and convolution layers). Prior ``N(0, prior_std^2)``. ``init="moped"``: ``mu = w``,
    ``sigma = delta |w|`` (floored at 1e-8), bias alike (Krishnan et al., MOPED); ``"fresh"``:
    the layers' own initialisation with ``sigma = init_sigma``. Returns the converted copy (the
    model itself with ``inplace=True``).
    """
    check_choice("init", init, INITS)
    check_choice("estimator", estimator, ("sample", "local", "flipout"))
    prior_std = _check_positive("prior_std", prior_std)
    delta = _check_positive("delta", delta)
    init_sigma = _check_positive("init_sigma", init_sigma)
    names = _selected(model, select, last_layer)
    replacements = {}
    for name in names:
        module = model.get_submodule(name)
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        layer = _gaussian_layer(name, kind, vars(module), bias=module.bias is not None, estimator=estimator,
                                prior_std=prior_std, init_sigma=init_sigma, like=module.weight)
        if init == "moped":
            bias = module.bias
            _set_posterior(layer, module.weight, _moped_rho(module.weight, delta), bias,
                           None if bias is None else _moped_rho(bias, delta))
        replacements[name] = layer
    model = _target(model, inplace)
    _replace(model, replacements)
    return model


def to_mc_dropout(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``nn.Dropout(p)`` directly followed by ``nn.Linear`` in an ``nn.Sequential`` -> ``nn.Identity()``
    + :class:`BernoulliLinear` (``mask="input"``, the same ``p``, weight and bias).

    The masks are then drawn in the kernel and stay on in ``eval()`` (the package's rule,
    docs/bayesianize.md); :func:`deterministic` gives the weight-scaling prediction, which equals
    the original model in ``eval()``. Dropout elsewhere (not in a Sequential, or not before a
    Linear) is not recognised: the order of calls in a custom ``forward`` is not visible.
    """
    pairs = {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (drop_name, drop), (lin_name, lin) in zip(children, children[1:]):
            if type(drop) is nn.Dropout and type(lin) is nn.Linear:
                prefix = f"{seq_name}." if seq_name else ""
                pairs[prefix + drop_name] = (prefix + lin_name, drop, lin)
    if not pairs:
        raise ValueError("model: expected an nn.Sequential with nn.Dropout directly before nn.Linear, found none")
    replacements = {}
    for drop_name, (lin_name, drop, lin) in pairs.items():
        layer = BernoulliLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, p=drop.p)
        layer = layer.to(device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(lin.weight)
            if lin.bias is not None:
                layer.bias.copy_(lin.bias)
        replacements[drop_name], replacements[lin_name] = nn.Identity(), layer
    model = _target(model, inplace)
    _replace(model, replacements)
    return model


def _bayesian_torch_prior(name: str, module: nn.Module) -> float:
    """The prior std of a bayesian-torch layer; ValueError unless it is ``N(0, s^2)`` with one ``s``."""
    means = [module.prior_weight_mu] + ([module.prior_bias_mu] if module.mu_bias is not None else [])
    stds = [module.prior_weight_sigma] + ([module.prior_bias_sigma] if module.mu_bias is not None else [])
    if any(bool((m != 0).any()) for m in means):
        raise ValueError(f"module {name!r}: our KL is against N(0, prior_std^2); expected prior mean 0, got "
                         f"prior_weight_mu in [{float(means[0].min())}, {float(means[0].max())}]")
    values = torch.cat([s.flatten() for s in stds])
    if not bool((values == values[0]).all()) or float(values[0]) <= 0:
        raise ValueError(f"module {name!r}: expected one prior std > 0 for every weight and bias, got values in "
                         f"[{float(values.min())}, {float(values.max())}]")
    return float(values[0])


def from_bayesian_torch(model: nn.Module, *, estimator: str | None = None, inplace: bool = False) -> nn.Module:
    """Replace bayesian-torch's ``LinearReparameterization`` / ``LinearFlipout`` /
    ``Conv2dReparameterization`` / ``Conv2dFlipout`` by our layers with the same ``mu``, ``rho``
    (``sigma = softplus(rho)`` in both) and prior std.

    ``estimator=None`` keeps each layer's (Reparameterization -> ``"sample"``, Flipout ->
    ``"flipout"``); a string uses that one everywhere (the estimators share each output's marginal
    mean and variance). Only a zero-mean prior with one std per layer converts. Our ``kl()`` is
    summed over weights, bayesian-torch's ``kl_loss()`` is averaged: train with ``kl(model) / n``.
    The layers must be used as plain modules (``dnn_to_bnn`` models, ``nn.Sequential``): ours
    return the output alone, not bayesian-torch's ``(output, kl)``.
    """
    if estimator is not None:
        check_choice("estimator", estimator, ("sample", "local", "flipout"))
    replacements = {}
    for name, module in model.named_modules():
        if not type(module).__module__.startswith("bayesian_torch"):
            continue
        if type(module).__name__ not in _BAYESIAN_TORCH:
            if hasattr(module, "kl_loss"):
                raise TypeError(f"model: bayesian-torch layer {name!r} is a {type(module).__name__}; supported: "
                                f"{', '.join(_BAYESIAN_TORCH)}")
            continue
        kind, own = _BAYESIAN_TORCH[type(module).__name__]
        weight_mu, weight_rho = ((module.mu_weight, module.rho_weight) if kind == "linear"
                                 else (module.mu_kernel, module.rho_kernel))
        layer = _gaussian_layer(name, kind, vars(module), bias=module.mu_bias is not None,
                                estimator=estimator or own, prior_std=_bayesian_torch_prior(name, module),
                                init_sigma=1.0, like=weight_mu)  # init_sigma: rho is copied next
        _set_posterior(layer, weight_mu, weight_rho, module.mu_bias, module.rho_bias)
        replacements[name] = layer
    if not replacements:
        raise ValueError(f"model: no bayesian-torch layer to convert; supported: {', '.join(_BAYESIAN_TORCH)}")
    model = _target(model, inplace)
    _replace(model, replacements)
    return model


__all__ = ["SampleFold", "bayesianize", "from_bayesian_torch", "to_mc_dropout"]
