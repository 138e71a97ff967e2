"""``torch.library.opcheck`` on every ``udn_kernels::`` custom op, on each CPU-side backend.

opcheck checks the schema (no hidden mutation or aliasing), the autograd registration, the fake
kernel against the real one (shapes, dtypes, strides) and AOT dispatch with dynamic shapes — what
torch.compile and torch.export rely on.
"""
import pytest
import torch

import udn_kernels
from udn_kernels.ops import bernoulli_linear as bern_ops
from udn_kernels.ops import gaussian_linear as gauss_ops
from udn_kernels.ops import heads as heads_ops
from udn_kernels.ops import kl as kl_ops

BACKENDS = ["reference"] + (["cpu"] if udn_kernels.available_backends()["cpu"] else [])


def _heads_inputs(likelihood="categorical", per_depth=False):
    g = torch.Generator().manual_seed(0)
    L, N, D, C = 3, 7, 5, 4
    hidden = torch.randn(L, N, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(*((L,) if per_depth else ()), C, D, generator=g, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    if likelihood == "gaussian":
        target = torch.randn(N, C, generator=g, dtype=torch.float64)
        noise = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    else:
        target = torch.randint(0, C, (N,), generator=g)
        target[2] = -100
        noise = None
    return hidden, weight, bias, target, noise


def _cases(backend):
    cases = {}
    for likelihood in ("categorical", "gaussian"):
        gaussian = likelihood == "gaussian"
        hidden, weight, bias, target, noise = _heads_inputs(likelihood)
        fwd_args = (hidden, weight, bias, target, noise, gaussian, -100, backend)
        cases[f"loglik_fwd-{likelihood}"] = (heads_ops._loglik_fwd, fwd_args)
        loglik, aux = heads_ops._loglik_fwd(*fwd_args)
        grad = torch.randn_like(loglik)
        for tag, mask in (("", [True] * 4), ("-frozen-hidden", [False, True, True, True])):
            cases[f"loglik_bwd{tag}-{likelihood}"] = (
                heads_ops._loglik_bwd, (grad, hidden.detach(), weight.detach(), bias.detach(), target, noise, aux,
                                        gaussian, -100, mask, backend))
        L, N = loglik.shape
        coef = torch.full((L, N), -0.1, dtype=torch.float64, requires_grad=True)
        cases[f"loglik_dot-expected-{likelihood}"] = (
            heads_ops._loglik_dot, (hidden, weight, bias, target, noise, coef, None, gaussian, -100, [True] * 4,
                                    backend))
        cases[f"loglik_dot-expected-frozen-head-{likelihood}"] = (  # the gradients the forward skips: empty
            heads_ops._loglik_dot, (hidden, weight.detach(), bias, target, noise, coef, None, gaussian, -100,
                                    [True, False, True, gaussian], backend))
        log_weights = torch.log_softmax(torch.randn(L, dtype=torch.float64), 0).requires_grad_()
        row_scale = torch.full((N,), 1.0 / N, dtype=torch.float64)
        cases[f"loglik_dot-mixture-{likelihood}"] = (
            heads_ops._loglik_dot, (hidden, weight, bias, target, noise, row_scale, log_weights, gaussian, -100,
                                    [True] * 4, backend))
        if not gaussian:  # the loss options (label_smoothing, lse_square_scale, softcap) and stats' aux [2, L, N]
            options = (0.1, 1e-2, 3.0)
            cases["loglik_fwd-options-stats"] = (heads_ops._loglik_fwd, fwd_args + options + (True,))
            cases["loglik_bwd-options"] = (
                heads_ops._loglik_bwd, (grad, hidden.detach(), weight.detach(), bias.detach(), target, noise, aux,
                                        gaussian, -100, [True] * 4, backend) + options)
            for mode, scale, lw in (("expected", coef, None), ("mixture", row_scale, log_weights)):
                cases[f"loglik_dot-{mode}-options-stats"] = (
                    heads_ops._loglik_dot, (hidden, weight, bias, target, noise, scale, lw, gaussian, -100,
                                            [True] * 4, backend) + options + (True,))
        cases[f"predict-{likelihood}"] = (
            heads_ops._predict, (hidden, weight, bias, log_weights, gaussian, noise, backend))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = torch.rand(4, 5, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    for estimator in ("sample", "local", "flipout"):
        args = (x, mu, sigma, bias, sigma[:, 0].detach().clone().requires_grad_(), seed, estimator, 2, False,
                False, backend)
        cases[f"gaussian_fwd-{estimator}"] = (gauss_ops._fwd, args)
        out, std = gauss_ops._fwd(*args)
        detached = tuple(t.detach() for t in args[:5])
        # every gradient, and x and sigma frozen (their outputs empty)
        for tag, grad_mask in (("", [True] * 5), ("-frozen", [False, True, False, True, True])):
            cases[f"gaussian_bwd-{estimator}{tag}"] = (
                gauss_ops._bwd, (torch.randn_like(out), *detached, std, *args[5:-1], grad_mask, backend))
    for mask in ("input", "weight", "symmetric"):
        args = (x, mu, bias, 0.25, seed, mask, 2, False, backend)
        cases[f"bernoulli_fwd-{mask}"] = (bern_ops._fwd, args)
        out = bern_ops._fwd(*args)
        for tag, grad_mask in (("", [True] * 3), ("-frozen", [False, True, False])):
            cases[f"bernoulli_bwd-{mask}{tag}"] = (
                bern_ops._bwd, (torch.randn_like(out), x.detach(), mu.detach(), bias.detach(), *args[3:-1], grad_mask,
                                backend))
    for softplus in (False, True):
        prior = torch.rand(4, 5, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
        for prior_name, prior_std in (("scalar", torch.tensor(0.8, dtype=torch.float64)), ("full", prior)):
            tag = f"{'rho' if softplus else 'sigma'}-{prior_name}"
            args = (mu, sigma, prior_std, softplus, backend)
            cases[f"gaussian_kl_fwd-{tag}"] = (kl_ops._gauss_fwd, args)
            for mask in ([True, True, True], [False, True, False]):
                cases[f"gaussian_kl_bwd-{tag}-{''.join('1' if m else '0' for m in mask)}"] = (
                    kl_ops._gauss_bwd, (torch.tensor(0.3, dtype=torch.float64), mu.detach(), sigma.detach(),
                                        prior_std.detach(), softplus, mask, backend))
    log_alpha = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    cases["log_uniform_kl_fwd"] = (kl_ops._lu_fwd, (log_alpha, -1.0, 1.0, backend))
    cases["log_uniform_kl_bwd"] = (kl_ops._lu_bwd, (torch.tensor(0.3, dtype=torch.float64), log_alpha.detach(),
                                                    -1.0, 1.0, backend))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_cases("reference")))
def test_opcheck(backend, name):
    op, args = _cases(backend)[name]
    torch.library.opcheck(op, args)
