"""torch.compile(fullgraph=True) of every op (forward and backward equal to eager, CPU backend), of a
UDN.mlp training step, and torch.export of a trained UDN's predict path.

The graphs compile with the "aot_eager" backend: it runs dynamo (fullgraph tracing), the fake
kernels and AOTAutograd's joint forward/backward graph -- everything the ops must support -- without
Inductor's C++ code generation (~40 s per graph on a loaded 2-core machine; test_heads.py already
compiles the heads op through Inductor).
"""
import pytest
import torch

import udn_kernels
from udn_kernels import (bernoulli_linear, depth_loglik, depth_mixture_nll, depth_mixture_predict,
                         gaussian_kl, gaussian_linear, log_uniform_kl)
from udn_kernels import nn as unn

pytestmark = [pytest.mark.skipif(not udn_kernels.available_backends()["cpu"], reason="C++ extension not built"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_and_compiled(fn, tensors, backend="aot_eager"):
    """(output, grads) of ``fn`` eagerly and under torch.compile(fullgraph=True)."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    results = []
    for f in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        out = f(*leaves)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), [t for t in leaves if t.requires_grad],
                                    allow_unused=True)
        results.append((out.detach(), grads))
    return results


def assert_same(results, rtol=1e-6, atol=1e-6):
    (out, grads), (c_out, c_grads) = results
    torch.testing.assert_close(c_out, out, rtol=rtol, atol=atol)
    for g, c in zip(grads, c_grads):
        if g is None or c is None:  # an input the function ignores
            assert g is None and c is None
            continue
        torch.testing.assert_close(c, g, rtol=rtol, atol=atol)


def heads_inputs(L=3, N=6, D=5, C=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(L, N, D, generator=gen, dtype=dtype), torch.randn(L, C, D, generator=gen, dtype=dtype),
            torch.randn(L, C, generator=gen, dtype=dtype), torch.randint(0, C, (N,), generator=gen),
            torch.randn(N, C, generator=gen, dtype=dtype), torch.rand(C, generator=gen, dtype=dtype) + 0.5,
            torch.log_softmax(torch.randn(L, generator=gen, dtype=dtype), 0))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_heads_ops_compile(likelihood):
    h, w, b, y, yg, s, lw = heads_inputs()

    def fn(h, w, b, yg, s, lw):
        kw = dict(likelihood=likelihood)
        target = y
        if likelihood == "gaussian":
            kw["noise_std"], target = s, yg
        ll = depth_loglik(h, w[0], b[0], target, **kw)  # shared head
        nll = depth_mixture_nll(h, w, b, target, lw, mode="mixture", reduction="sum", **kw)
        pred = depth_mixture_predict(h, w, b, lw, **kw)
        pred = pred[0] + pred[1] if isinstance(pred, tuple) else pred
        return torch.cat([ll.flatten(), nll.reshape(1), pred.flatten()])

    assert_same(eager_and_compiled(fn, [h, w, b, yg, s, lw]))


def linear_inputs(B=5, K=6, N=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(B, K, generator=gen, dtype=dtype), torch.randn(N, K, generator=gen, dtype=dtype),
            torch.rand(N, K, generator=gen, dtype=dtype) + 0.1, torch.randn(N, generator=gen, dtype=dtype),
            torch.rand(N, generator=gen, dtype=dtype) + 0.1)


def test_gaussian_linear_compile():
    def fn(x, mu, s, bm, bs):
        outs = [gaussian_linear(x, mu, s, bm, bs, estimator=e, seed=11, samples=2).flatten()
                for e in ("sample", "local", "flipout")]
        outs.append(gaussian_linear(x, None, s, None, bs, seed=12).flatten())
        return torch.cat(outs)

    assert_same(eager_and_compiled(fn, list(linear_inputs())))


def test_bernoulli_linear_compile():
    def fn(x, w, _, b, __):
        return torch.cat([bernoulli_linear(x, w, b, p=0.3, mask=m, seed=5, samples=2).flatten()
                          for m in ("input", "weight", "symmetric")])

    assert_same(eager_and_compiled(fn, list(linear_inputs())))


def test_kl_compile():
    def fn(x, mu, s, bm, bs):
        return gaussian_kl(mu, s, 0.5) + gaussian_kl(None, bs, bs.detach() + 1) + log_uniform_kl(mu)

    assert_same(eager_and_compiled(fn, list(linear_inputs())))


def test_seed_none_compiles_and_follows_manual_seed():
    """seed=None draws from torch's generator inside the graph: manual_seed reproduces compiled runs."""
    x, mu, s, bm, bs = linear_inputs()
    compiled = torch.compile(lambda x: gaussian_linear(x, mu, s, bm, bs), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a, b = compiled(x), compiled(x)
    torch.manual_seed(3)
    assert torch.equal(compiled(x), a) and not torch.equal(a, b)


def _data_term_loss(model, depth, x, y):
    """The fused ELBO data term of a UDN at a fixed truncation ``depth`` plus a KL term."""
    hidden = model.hidden_states(x, depth)
    weight, bias = model.head_parameters(depth)
    loss = udn_kernels.depth_mixture_nll(hidden, weight, bias, y, model.depth.log_probs(depth), reduction="mean")
    return loss + 1e-3 * unn.kl(model)


@pytest.mark.parametrize("layer", ["deterministic", "gaussian"])
def test_udn_training_step_compiles_fullgraph(layer):
    """A whole training step: the forward (every block, fused heads loss, KL) is one graph whose
    compiled backward runs on ``loss.backward()``; the truncation is decided eagerly, outside."""
    torch.manual_seed(0)
    model = unn.UDN.mlp(2, 8, 3, layer=layer, layer_kwargs={} if layer == "deterministic" else None)
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    depth = model.depth.max_depth
    compiled = torch.compile(_data_term_loss, fullgraph=True, backend="aot_eager")
    grads = []
    for loss_fn in (_data_term_loss, compiled):
        model.zero_grad()
        torch.manual_seed(1)  # gaussian layers draw their seeds from torch's generator
        loss = loss_fn(model, depth, x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, g), (c_loss, c_g) = grads
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert len(g) == len(c_g) > 0
    for a, b in zip(g, c_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_udn_loss_fullgraph():
    torch.manual_seed(0)
    model = unn.UDN.mlp(2, 8, 3)
    compiled = torch.compile(lambda x, y: model.loss(x, y, 100), fullgraph=True, backend="eager")
    compiled(torch.randn(8, 2), torch.randint(0, 3, (8,)))


class _Predict(torch.nn.Module):
    """A trained UDN's predict path at its current truncation (the exported program's forward)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.depth = model, model.depth.max_depth

    def forward(self, x):
        hidden = self.model.hidden_states(x, self.depth)
        weight, bias = self.model.head_parameters(self.depth)
        return depth_mixture_predict(hidden, weight, bias, self.model.depth.log_probs(self.depth))


def test_export_trained_udn_predict():
    torch.manual_seed(0)
    model = unn.UDN.mlp(2, 8, 3, init_rate=2.0)
    opt = model.attach_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    x, y = torch.randn(64, 2), torch.randint(0, 3, (64,))
    for _ in range(5):
        opt.zero_grad()
        model.loss(x, y, 64).backward()
        opt.step()
    model.eval()
    program = torch.export.export(_Predict(model), (x,))
    with torch.no_grad():
        expected = model.predict(x)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-6, atol=1e-6)
        x2 = torch.randn(64, 2)
        torch.testing.assert_close(program.module()(x2), model.predict(x2), rtol=1e-6, atol=1e-6)
