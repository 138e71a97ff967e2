"""Predictive-quality metrics for classifiers: NLL, accuracy, ECE, Brier, entropy, mutual information.

Inputs are predictive probabilities ``probs [N, C]`` (rows sum to 1, e.g. from ``UDN.predict`` or
``udn_kernels.nn.mc_predict``) and integer labels ``target [N]``; the uncertainty decompositions take
per-sample probabilities ``sample_probs [S, N, C]``. Every metric accepts ``reduction="mean"``
(default) or ``"none"`` (per example; ``ece`` is a dataset-level quantity and has no per-example form).
"""
from __future__ import annotations

import torch

_TINY = 1e-12


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction: expected 'mean' or 'none', got {reduction!r}")


def _check(probs: torch.Tensor, target: torch.Tensor | None = None) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs: expected a 2-D [N, C] tensor, got shape {tuple(probs.shape)}")
    if target is not None and tuple(target.shape) != (probs.shape[0],):
        raise ValueError(f"target: expected shape ({probs.shape[0]},), got {tuple(target.shape)}")


def nll(probs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood ``-log p(y_i)`` (probabilities clamped at 1e-12)."""
    _check(probs, target)
    picked = probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return _reduce(-picked.clamp_min(_TINY).log(), reduction)


def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, target: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
    """Gaussian negative log-likelihood of ``target`` under ``N(mean, var)``, summed over outputs."""
    if mean.shape != var.shape or mean.shape != target.shape:
        raise ValueError(f"mean, var, target: expected equal shapes, got {tuple(mean.shape)}, "
                         f"{tuple(var.shape)}, {tuple(target.shape)}")
    var = var.clamp_min(_TINY)
    per = 0.5 * (torch.log(2 * torch.pi * var) + (target - mean) ** 2 / var)
    return _reduce(per.reshape(per.shape[0], -1).sum(1), reduction)


def accuracy(probs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Fraction of examples whose arg-max class is the target."""
    _check(probs, target)
    return _reduce((probs.argmax(1) == target).to(probs.dtype), reduction)


def brier(probs: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Brier score ``sum_c (p_c - 1[y = c])^2`` (multi-class form, in [0, 2])."""
    _check(probs, target)
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[1]).to(probs.dtype)
    return _reduce(((probs - onehot) ** 2).sum(1), reduction)


def ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error with ``n_bins`` equal-width confidence bins on [0, 1].

    ``sum_b (|B_b| / N) |acc(B_b) - conf(B_b)|`` with confidence = max probability; bin ``b``
    holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0).
    """
    _check(probs, target)
    if n_bins < 1:
        raise ValueError(f"n_bins: expected an int >= 1, got {n_bins}")
    confidence, predicted = probs.max(1)
    correct = (predicted == target).to(probs.dtype)
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    # |sum_{i in b} (correct_i - conf_i)| / N == (|B_b| / N) |acc(B_b) - conf(B_b)|
    gap = torch.zeros(n_bins, dtype=probs.dtype, device=probs.device).index_add_(
        0, bins, correct - confidence)
    return gap.abs().sum() / probs.shape[0]


def predictive_entropy(probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Entropy of the predictive distribution ``-sum_c p_c log p_c`` (nats)."""
    _check(probs)
    return _reduce(-(probs * probs.clamp_min(_TINY).log()).sum(1), reduction)


def mutual_information(sample_probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Epistemic uncertainty (BALD): ``H[mean_s p_s] - mean_s H[p_s]`` from ``[S, N, C]`` samples."""
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs: expected a 3-D [S, N, C] tensor, got shape "
                         f"{tuple(sample_probs.shape)}")
    total = predictive_entropy(sample_probs.mean(0), reduction="none")
    per_sample = -(sample_probs * sample_probs.clamp_min(_TINY).log()).sum(2)
    return _reduce((total - per_sample.mean(0)).clamp_min(0.0), reduction)
