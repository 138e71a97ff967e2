"""Closed-form formulas shared by the reference and Triton kernels (and the ops): torch code with
no backend of its own, so every backend computes them identically. Imports only torch."""
from __future__ import annotations

import torch


def mixture_grad(loglik, log_weights, row_scale):
    """Gradient of the mixture NLL ``-sum_n s_n logsumexp_l(lw_l + loglik[l, n])`` w.r.t. ``loglik``:
    ``-s_n r[l, n]`` with ``r`` the softmax over depths (exactly 0 on rows with ``s_n = 0``)."""
    r = torch.softmax(log_weights[:, None] + loglik, dim=0)
    return torch.where(row_scale == 0, torch.zeros_like(r), -row_scale * r)


def local_reparam_grads(grad, x, weight_mu, weight_sigma, bias_mu, bias_sigma, std, eps, x_sampled: bool,
                        grad_mask):
    """Gradients ``(d_x, d_weight_mu, d_weight_sigma, d_bias_mu, d_bias_sigma)`` (empty for None and
    where ``grad_mask`` is False: those products are not computed) of local reparameterisation
    ``out = x mu^T + bias_mu + std * eps``, ``std^2 = x^2 (sigma^2)^T + bias_sigma^2``, from the
    forward's ``std [Sx, B, N]`` and the regenerated output noise ``eps [S, B, N]``: the variance GEMM
    is not recomputed. Computed in at least float32; zero gradient through the variance where ``std``
    is 0 (or NaN)."""
    want_x, want_mu, want_sigma, want_bmu, want_bsig = (
        want and t is not None for want, t in zip(grad_mask, (x, weight_mu, weight_sigma, bias_mu, bias_sigma)))
    ct = torch.promote_types(x.dtype, torch.float32)
    g, std, eps = grad.to(ct), std.to(ct), eps.to(ct)
    xs = x.to(ct).expand(g.shape[0], -1, -1)
    d_x, d_mu, d_sigma, d_bmu, d_bsig = (x.new_empty(0) for _ in range(5))  # distinct: outputs must not alias
    if want_x or want_sigma or want_bsig:
        positive = std > 0
        # 2 dL/dvar = g eps / std: the 2 cancels those of d(x^2) and d(sigma^2).
        g_var = torch.where(positive, g * eps / torch.where(positive, std, 1), 0)
        sigma = weight_sigma.to(ct)
        if want_x:
            d_x = xs * (g_var @ sigma.square())
            if weight_mu is not None:
                d_x = d_x + g @ weight_mu.to(ct)
            d_x = (d_x if x_sampled else d_x.sum(0, keepdim=True)).to(x.dtype)
        if want_sigma:
            d_sigma = (sigma * (g_var.transpose(1, 2) @ xs.square()).sum(0)).to(weight_sigma.dtype)
        if want_bsig:
            d_bsig = (bias_sigma.to(ct) * g_var.sum((0, 1))).to(bias_sigma.dtype)
    if want_mu:
        d_mu = (g.transpose(1, 2) @ xs).sum(0).to(weight_mu.dtype)
    if want_bmu:
        d_bmu = g.sum((0, 1)).to(bias_mu.dtype)
    return d_x, d_mu, d_sigma, d_bmu, d_bsig
