"""No op reads a tensor value on the host when its tensors live off the CPU (on a GPU, a device
synchronisation per call and a failure under CUDA-graph capture), and float64 is refused before a
Triton launch that could not compile.

Without a GPU the heads and KL ops run on ``meta`` tensors, which carry no data: any ``.item()``,
``bool(tensor)`` or ``.tolist()`` on one raises, so the Python layer of each op (checks, dispatch,
the autograd formulas) is exercised for host reads the way it runs on CUDA (value checks follow
the tensor's device, ``_checks.checks_values``). Off-CPU devices other than CUDA run the reference
kernels, which are plain torch; the Triton kernels are covered by the AOT compile and the
interpreter tests. The float64 test uses fake CUDA tensors (FakeTensorMode), since the refusal
needs the CUDA device type and comes before any kernel.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import udn_kernels
from udn_kernels import _backend


def _heads_losses(gaussian: bool):
    L, N, D, C = 3, 8, 5, 4
    hidden = torch.randn(L, N, D, device="meta", requires_grad=True)
    weight = torch.randn(C, D, device="meta", requires_grad=True)
    bias = torch.randn(C, device="meta", requires_grad=True)
    log_weights = torch.randn(L, device="meta", requires_grad=True)
    if gaussian:
        target = torch.randn(N, C, device="meta")
        noise = torch.rand(C, device="meta", requires_grad=True)
        kwargs = dict(likelihood="gaussian", noise_std=noise)
    else:
        target = torch.randint(0, C, (N,), device="meta")
        kwargs = {}
    losses = [udn_kernels.depth_loglik(hidden, weight, bias, target, **kwargs).sum(),
              udn_kernels.depth_mixture_predict(hidden, weight, bias, log_weights,
                                                **kwargs)[0 if gaussian else slice(None)].sum()]
    for mode in ("expected", "mixture"):
        for reduction in ("mean", "none"):
            losses.append(udn_kernels.depth_mixture_nll(hidden, weight, bias, target, log_weights, mode=mode,
                                                        reduction=reduction, **kwargs).sum())
    return losses


@pytest.mark.parametrize("gaussian", [False, True])
def test_heads_ops_read_no_value_of_off_cpu_tensors(gaussian):
    for loss in _heads_losses(gaussian):
        loss.backward()


def test_kl_ops_read_no_value_of_off_cpu_tensors():
    mu = torch.randn(6, 5, device="meta", requires_grad=True)
    rho = torch.randn(6, 5, device="meta", requires_grad=True)
    prior = torch.rand(6, 5, device="meta") + 0.5
    (udn_kernels.gaussian_kl(mu, rho, prior, sigma_transform="softplus")
     + udn_kernels.log_uniform_kl(rho, clamp=(-8.0, 8.0))).backward()


def test_the_same_checks_run_on_cpu():
    """The value checks skipped on a GPU are not lost: on CPU tensors they still run."""
    with pytest.raises(ValueError, match="prior_std"):
        udn_kernels.gaussian_kl(torch.randn(3), torch.rand(3), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="weight_sigma"):
        udn_kernels.gaussian_linear(torch.randn(2, 3), torch.randn(4, 3), -torch.rand(4, 3) - 0.1, seed=1)


@pytest.mark.parametrize("op", ["gaussian_linear", "bernoulli_linear"])
def test_float64_is_refused_on_cuda_before_any_launch(op, monkeypatch):
    def no_launch(backend, name):
        raise AssertionError(f"kernel {name} looked up")
    monkeypatch.setattr(_backend, "kernel", no_launch)
    with FakeTensorMode():
        x = torch.randn(2, 3, device="cuda", dtype=torch.float64)
        weight = torch.randn(4, 3, device="cuda", dtype=torch.float64)
        with pytest.raises(TypeError, match=f"{op}: float64 is not supported by the Triton kernels on CUDA"):
            if op == "gaussian_linear":
                udn_kernels.gaussian_linear(x, weight, weight.abs(), seed=1)
            else:
                udn_kernels.bernoulli_linear(x, weight, seed=1)
