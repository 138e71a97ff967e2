"""No op reads a tensor value on the host when its tensors live off the CPU (on a GPU, a device
synchronisation per call and a failure under CUDA-graph capture), and float64 is refused before a
Triton launch that could not compile.

Without a GPU the heads and KL ops run on ``meta`` tensors, which carry no data: any ``.item()``,
``bool(tensor)`` or ``.tolist()`` on one raises, so the Python layer of each op (checks, dispatch,
the autograd formulas) is exercised for host reads the way it runs on CUDA (value checks follow
the tensor's device, ``_checks.checks_values``). Off-CPU devices other than CUDA run the reference
kernels, which are plain torch; the Triton kernels are covered by the AOT compile and the
interpreter tests. The float64 test uses fake CUDA tensors (FakeTensorMode), since the refusal
needs the CUDA device type and comes before any kernel. The last section traces every public op
with ``torch.compile(fullgraph=True)`` on the CUDA path (fake CUDA tensors, and meta tensors with
the triton backend forced for the backward).
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


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of the public ops on the CUDA path, without a CUDA runtime.
#
# Under torch.compile the ops call their ``udn_kernels::`` custom ops, whose fake kernels need no
# device, with the backend chosen at trace time ("triton" for CUDA) baked into the graph. A graph
# break or a host read of a tensor value makes a fullgraph trace fail. Autograd cannot run on fake
# CUDA tensors in a CPU-only build (creating an autograd node asks for the CUDA device guard and
# aborts the process), so: (a) forwards are traced on fake CUDA tensors, in a subprocess in case a
# future change does touch autograd; (b) forward and backward are traced on ``meta`` tensors with
# the triton backend forced, the same Python path as CUDA but for its few device-type tests, all
# in forwards (covered by (a)): float64 refusal, the skipped value checks (also skipped on meta),
# autocast.
# ------------------------------------------------------------------------------------------------
L, N, D, C = 3, 8, 16, 10
B, K, OUT = 6, 16, 12


def _trace_inputs(device, dtype, requires_grad):
    def make(*shape, positive=False):
        t = torch.rand(*shape, device=device, dtype=dtype) + 0.5 if positive else \
            torch.randn(*shape, device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)
    return {"hidden": make(L, N, D), "weight": make(C, D), "bias": make(C), "log_weights": make(L),
            "classes": torch.randint(0, C, (N,), device=device), "values": make(N, C),
            "noise_std": make(C, positive=True), "x": make(B, K), "w_mu": make(OUT, K),
            "w_sigma": make(OUT, K, positive=True), "b_mu": make(OUT), "b_sigma": make(OUT, positive=True)}


def _heads_call(op, gaussian, **kwargs):
    def call(t):
        head = (t["hidden"], t["weight"], t["bias"])
        target = t["values"] if gaussian else t["classes"]
        options = dict(likelihood="gaussian", noise_std=t["noise_std"]) if gaussian else {}
        if op == "depth_mixture_predict":
            return udn_kernels.depth_mixture_predict(*head, t["log_weights"], **options)
        if op == "depth_mixture_nll":
            return udn_kernels.depth_mixture_nll(*head, target, t["log_weights"], **options, **kwargs)
        return udn_kernels.depth_loglik(*head, target, **options)
    return call


# name -> (call, udn_kernels ops of a forward without gradients (fake CUDA), of a forward with
# gradients, of its backward (meta))
TRACED_CALLS = {
    "depth_loglik categorical": (_heads_call("depth_loglik", False), {"depth_loglik_fwd"},
                                 {"depth_loglik_fwd"}, {"depth_loglik_bwd"}),
    "depth_loglik gaussian": (_heads_call("depth_loglik", True), {"depth_loglik_fwd"},
                              {"depth_loglik_fwd"}, {"depth_loglik_bwd"}),
    **{f"depth_mixture_nll {likelihood} {mode} {reduction}": (
        _heads_call("depth_mixture_nll", likelihood == "gaussian", mode=mode, reduction=reduction),
        {"depth_loglik_fwd"},
        # mean / sum with a head input requiring grad: head gradients in the forward, no kernel after
        {"depth_loglik_fwd"} if reduction == "none" else {"depth_loglik_dot"},
        {"depth_loglik_bwd"} if reduction == "none" else set())
       for likelihood in ("categorical", "gaussian") for mode in ("expected", "mixture")
       for reduction in ("mean", "none")},
    # the predict backward recomputes per depth in torch
    **{f"depth_mixture_predict {likelihood}": (_heads_call("depth_mixture_predict", likelihood == "gaussian"),
                                               {"depth_mixture_predict"}, {"depth_mixture_predict"}, set())
       for likelihood in ("categorical", "gaussian")},
    **{f"gaussian_linear {estimator}": (
        lambda t, estimator=estimator: udn_kernels.gaussian_linear(
            t["x"], t["w_mu"], t["w_sigma"], t["b_mu"], t["b_sigma"], estimator=estimator, samples=2, seed=5),
        {"gaussian_linear_fwd"}, {"gaussian_linear_fwd"}, {"gaussian_linear_bwd"})
       for estimator in ("sample", "local", "flipout")},
    **{f"bernoulli_linear {mask}": (
        lambda t, mask=mask: udn_kernels.bernoulli_linear(t["x"], t["w_mu"], t["b_mu"], p=0.3, mask=mask,
                                                          samples=2, seed=5),
        {"bernoulli_linear_fwd"}, {"bernoulli_linear_fwd"}, {"bernoulli_linear_bwd"})
       for mask in ("input", "weight", "symmetric")},
    "gaussian_kl": (lambda t: udn_kernels.gaussian_kl(t["w_mu"], t["w_sigma"], 0.7, sigma_transform="softplus"),
                    {"gaussian_kl_fwd"}, {"gaussian_kl_fwd"}, {"gaussian_kl_bwd"}),
    "log_uniform_kl": (lambda t: udn_kernels.log_uniform_kl(t["w_mu"], clamp=(-8.0, 8.0)),
                       {"log_uniform_kl_fwd"}, {"log_uniform_kl_fwd"}, {"log_uniform_kl_bwd"}),
}


def _udn_ops(graph) -> list[tuple[str, object]]:
    """``(op name, backend argument)`` of every ``udn_kernels::`` call in an FX graph."""
    return [(node.target._opname, _backend_arg(node)) for node in graph.nodes
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "udn_kernels"]


def _backend_arg(node):
    """The ``backend`` argument of a ``udn_kernels::`` call (by name: loss options follow it)."""
    names = [a.name for a in node.target._schema.arguments]
    index = names.index("backend")
    return node.args[index] if index < len(node.args) else node.kwargs["backend"]


def _output_sum(out):
    return sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)))


# A CPU-only torch cannot index a fake CUDA tensor with ``[:, None]`` (the indexing code takes the
# CUDA device guard): mixture mode's ``log_weights[:, None]`` stops the fake-CUDA trace with this
# error and nothing else; its forward and backward are traced on meta below.
NO_CUDA_GUARD = "PyTorch is not linked with support for cuda devices"


def fake_cuda_calls(dtype_name: str) -> list[str]:
    """The traced calls that take ``dtype`` on CUDA: the stochastic linear ops refuse float64
    (their kernels do not compile in fp64; test_float64_is_refused_on_cuda_before_any_launch),
    the heads and KL ops take it (every kernel they launch compiles in fp64: test_triton_aot.py)."""
    if dtype_name != "float64":
        return list(TRACED_CALLS)
    return [name for name in TRACED_CALLS if not name.startswith(("gaussian_linear", "bernoulli_linear"))]


def _output_dtype(name: str, dtype_name: str) -> torch.dtype:
    """Log-likelihoods, losses and KL terms of a 16-bit call are float32 (docs/precision.md); the
    other outputs keep the inputs' dtype."""
    dtype = getattr(torch, dtype_name)
    loss_like = name.startswith(("depth_loglik", "depth_mixture_nll", "gaussian_kl", "log_uniform_kl"))
    return torch.float32 if loss_like and dtype in (torch.bfloat16, torch.float16) else dtype


def trace_forwards_on_fake_cuda(dtype_name: str) -> dict[str, list | str]:
    """Dynamo's fullgraph forward graph of every traced call on fake CUDA tensors of ``dtype``:
    ``{name: [[op, backend], ...] or the error of a mixture-mode trace}`` (what the subprocess
    below prints)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    found = {}
    for name in fake_cuda_calls(dtype_name):
        call = TRACED_CALLS[name][0]
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm.graph)
            return gm.forward
        torch._dynamo.reset()
        try:
            with FakeTensorMode():
                tensors = _trace_inputs("cuda", getattr(torch, dtype_name), requires_grad=False)
                out = torch.compile(lambda t: _output_sum(call(t)), fullgraph=True, backend=record)(tensors)
                assert out.device.type == "cuda" and out.dtype == _output_dtype(name, dtype_name), name
        except torch._dynamo.exc.TorchRuntimeError as error:
            if " mixture " not in name:
                raise
            found[name] = str(error)
            continue
        assert len(graphs) == 1, name
        found[name] = [list(op) for op in _udn_ops(graphs[0])]
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_public_ops_trace_fullgraph_on_fake_cuda(dtype):
    import json
    import os
    import subprocess
    import sys
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UDN_KERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([tests, os.path.dirname(tests), env.get("PYTHONPATH", "")])
    script = f"import json, test_device_sync as t; print(json.dumps(t.trace_forwards_on_fake_cuda({dtype!r})))"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(found) == fake_cuda_calls(dtype)
    for name in found:
        forward_ops = TRACED_CALLS[name][1]
        if isinstance(found[name], str):
            assert NO_CUDA_GUARD in found[name] and "log_weights[:, None]" in found[name], found[name]
            continue
        assert {op for op, _ in found[name]} == forward_ops, (name, found[name])
        assert all(backend == "triton" for _, backend in found[name]), (name, found[name])


@pytest.mark.parametrize("name", list(TRACED_CALLS))
def test_public_ops_trace_forward_and_backward_on_the_triton_path(name):
    """meta tensors requiring grad, backend "triton": AOTAutograd's forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    call, _, forward_ops, backward_ops = TRACED_CALLS[name]
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.graph)
        return make_boxed_func(gm)
    torch._dynamo.reset()
    tensors = _trace_inputs("meta", torch.float32, requires_grad=True)
    with udn_kernels.backend("triton"):
        compiled = torch.compile(lambda t: _output_sum(call(t)), fullgraph=True,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        compiled(tensors).backward()
    torch._dynamo.reset()
    assert len(graphs) == 2, name  # one forward, one backward graph: no break
    (fwd, bwd) = (_udn_ops(g) for g in graphs)
    assert {op for op, _ in fwd} == forward_ops and {op for op, _ in bwd} == backward_ops, (fwd, bwd)
    assert all(backend == "triton" for _, backend in fwd + bwd), (fwd, bwd)
