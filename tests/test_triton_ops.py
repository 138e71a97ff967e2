"""The Triton backend's kernels: ``udn_kernels.triton.KERNELS``, ``torch.library.triton_op``s
(``udn_kernels_triton::*``) whose bodies launch the kernels through ``wrap_triton``.

Two properties:

- Traceability (this process, Triton in compiled mode, no GPU): a fake-tensor trace with
  functionalization, and ``torch.compile(fullgraph=True)`` through AOTAutograd (graph captured at
  the compiler, the run then stopped), decompose every triton_op into
  ``triton_kernel_wrapper_functional`` nodes naming the Triton kernels, so a graph of these calls
  holds the kernels themselves rather than an opaque call. Triton's kernel-mutation analysis
  needs a compile target; a stub driver supplies sm_90 (it only lowers to TTIR), and the analysis
  then clones only the kernels' output buffers, never the inputs.
- Numerics (a TRITON_INTERPRET=1 subprocess): each triton_op called eagerly on CPU tensors equals
  the reference kernel, and the public ops on the triton backend run the Triton kernels (recorded
  by wrapping the kernel table) with outputs and autograd equal to the reference backend's.
  Tolerances: float64 1e-10 (heads), float32 1e-4 (stochastic linear, fp32 accumulation vs the
  float64-free reference), RNG words bit-identical and normals within 1e-6.
"""
import pytest
from triton_interpreter import interpreted, record_kernels, rerun_under_interpreter

import torch

ALL_GRADS = [True] * 4  # grad_mask of the heads backward kernels: every gradient

if not interpreted():
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    def test_triton_ops_under_interpreter():
        rerun_under_interpreter(__file__)

    class _TargetOnlyDriver:
        """What ``generate_ttir`` (the mutation analysis) asks a Triton driver for."""

        def get_current_target(self):
            from triton.backends.compiler import GPUTarget
            return GPUTarget("cuda", 90, 32)

    @pytest.fixture
    def trace(monkeypatch):
        """``trace(fn, *args)``: the functionalized fake-tensor graph of ``fn``; returns
        ``(kernel names with their cloned arguments, names of every called op)``."""
        monkeypatch.setattr(triton.runtime.driver, "_active", _TargetOnlyDriver())
        import udn_kernels.triton  # noqa: F401  (registers the ops)

        def run(fn, *args):
            graph = make_fx(dispatch_functionalize(fn), tracing_mode="fake")(*args).graph
            kernels, ops = [], []
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                ops.append(str(node.target))
                if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                    kernels.append((kernel.fn.__name__, set(node.kwargs["tensors_to_clone"])))
            assert not any("udn_kernels" in op for op in ops), ops  # no opaque custom-op call left
            return kernels, ops
        return run

    def heads_inputs(per_depth=True):
        gen = torch.Generator().manual_seed(0)
        L, N, D, C = 3, 37, 19, 23
        weight_shape = (L, C, D) if per_depth else (C, D)
        return (torch.randn(L, N, D, generator=gen), torch.randn(*weight_shape, generator=gen),
                torch.randn(C, generator=gen), torch.randint(0, C, (N,), generator=gen),
                torch.randn(L, generator=gen))

    def test_depth_loglik_traces_to_forward_and_backward_kernels(trace):
        hidden, weight, bias, target, _ = heads_inputs()

        def loglik_and_grads(hidden, weight, bias, target):
            ops = torch.ops.udn_kernels_triton
            loglik, aux = ops.depth_loglik_fwd(hidden, weight, bias, target, None, False, -100)
            return ops.depth_loglik_bwd(torch.ones_like(loglik), hidden, weight, bias, target, None, aux, False,
                                        -100, ALL_GRADS)

        kernels, _ = trace(loglik_and_grads, hidden, weight, bias, target)
        assert [name for name, _ in kernels] == ["_fwd_kernel", "_bwd_rows_kernel", "_bwd_weight_kernel"]
        assert kernels[0][1] == {"out_ptr", "lse_ptr"}
        assert kernels[1][1] <= {"dh_ptr", "col_ptr"}
        assert kernels[2][1] <= {"dw_ptr"}

    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_gradient_in_forward_traces_to_fused_kernels(trace, mode):
        """``depth_loglik_fwd_bwd`` / ``depth_loglik_mixture_fwd_bwd``: the fused row kernel
        (mixture: its forward launch, then its gradient launch) between aten GEMMs; only the
        kernel's outputs are cloned."""
        hidden, weight, bias, target, log_weights = heads_inputs()

        def loglik_and_grads(hidden, weight, bias, target, log_weights):
            ops = torch.ops.udn_kernels_triton
            if mode == "mixture":
                return ops.depth_loglik_mixture_fwd_bwd(hidden, weight, bias, target, None, log_weights,
                                                        torch.full((hidden.shape[1],), 0.5), False, -100, ALL_GRADS)
            return ops.depth_loglik_fwd_bwd(hidden, weight, bias, target, None, torch.ones(hidden.shape[:2]),
                                            False, -100, ALL_GRADS)

        kernels, ops = trace(loglik_and_grads, hidden, weight, bias, target, log_weights)
        assert [name for name, _ in kernels] == ["_fused_rows_kernel"] * (2 if mode == "mixture" else 1)
        assert all(cloned <= {"gz_ptr", "out_ptr", "lse_ptr", "col_ptr"} for _, cloned in kernels)
        assert sum(op.startswith("aten.bmm") for op in ops) == 3  # logits, d_hidden, d_weight

    @pytest.mark.parametrize("num_classes,kernel_names", [(23, ["_predict_kernel"]),
                                                          (200, ["_lse_kernel", "_predict_kernel"])],
                             ids=["one-tile", "class-tiled"])
    def test_depth_mixture_predict_traces_to_kernels(trace, num_classes, kernel_names):
        hidden, _, _, _, log_weights = heads_inputs()
        weight, bias = torch.randn(num_classes, hidden.shape[2]), torch.randn(num_classes)

        def probs(hidden, weight, bias, log_weights):
            return torch.ops.udn_kernels_triton.depth_mixture_predict(hidden, weight, bias, log_weights,
                                                                      False, None)[0]

        kernels, ops = trace(probs, hidden, weight, bias, log_weights)
        assert [name for name, _ in kernels] == kernel_names
        assert all(cloned <= {"lse_ptr", "out1_ptr", "out2_ptr"} for _, cloned in kernels)
        assert "aten._softmax.default" in ops  # the mixture weights, a graph op Inductor can fuse

    @pytest.mark.parametrize("op,args,kernel_names", [
        ("gaussian_linear", ("sample", 2, False, False), ["_fwd_kernel", "_dx_kernel", "_dw_kernel"]),
        # sigma_softplus: _dw_kernel also reads rho (sig_ptr), which must not be cloned
        ("gaussian_linear", ("flipout", 2, False, True), ["_fwd_kernel", "_dx_kernel", "_dw_kernel"]),
        # local: the forward also writes the output std; backward regenerates the output eps only
        ("gaussian_linear", ("local", 2, False, False), ["_fwd_kernel", "_philox_fill_kernel"]),
        ("bernoulli_linear", ("weight", 2, False), ["_fwd_kernel", "_dx_kernel", "_dw_kernel"]),
    ])
    def test_stochastic_linear_traces_to_kernels(trace, op, args, kernel_names):
        gen = torch.Generator().manual_seed(1)
        x, weight, bias = torch.randn(1, 5, 24, generator=gen), torch.randn(20, 24, generator=gen), \
            torch.randn(20, generator=gen)

        def out_and_grads(x, weight, bias):
            ops = torch.ops.udn_kernels_triton
            if op == "gaussian_linear":  # weight_mu, weight_sigma, bias_mu; no bias noise
                tensors = (x, weight, weight.abs(), bias, None)
                out, std = ops.gaussian_linear_fwd(*tensors, 7, *args)
                return ops.gaussian_linear_bwd(torch.ones_like(out), *tensors, std, 7, *args, [True] * 5)
            out = ops.bernoulli_linear_fwd(x, weight, bias, 0.25, 7, *args)
            return ops.bernoulli_linear_bwd(torch.ones_like(out), x, weight, bias, 0.25, 7, *args, [True] * 3)

        kernels, _ = trace(out_and_grads, x, weight, bias)
        assert [name for name, _ in kernels] == kernel_names
        assert not {"x_ptr", "w_ptr", "sig_ptr"} & set().union(*(cloned for _, cloned in kernels))

    class _Traced(Exception):
        """Raised by the compiled function: the graph is captured, and there is no GPU to run it."""

    @pytest.mark.parametrize("op,kernel_names", [
        ("depth_loglik", ["_fwd_kernel", "_bwd_rows_kernel", "_bwd_weight_kernel"]),
        ("depth_mixture_predict", ["_lse_kernel", "_predict_kernel"]),
        ("depth_loglik_mixture_fwd_bwd", ["_fused_rows_kernel"] * 2),
        ("gaussian_linear", ["_fwd_kernel", "_dx_kernel", "_dw_kernel"]),
    ])
    def test_torch_compile_fullgraph_sees_the_kernels(trace, op, kernel_names):
        """The real pipeline, Dynamo (fullgraph) + AOTAutograd: the graph it hands to the compiler
        (Inductor's place) holds the kernels themselves."""
        from torch._dynamo.backends.common import aot_autograd

        graphs = []

        def compiler(graph_module, example_inputs):
            graphs.append(graph_module)

            def stop(*args):
                raise _Traced
            return stop

        hidden, weight, bias, target, log_weights = heads_inputs()
        ops = torch.ops.udn_kernels_triton

        def depth_loglik():
            loglik, aux = ops.depth_loglik_fwd(hidden, weight, bias, target, None, False, -100)
            return ops.depth_loglik_bwd(torch.ones_like(loglik), hidden, weight, bias, target, None, aux, False,
                                        -100, ALL_GRADS)

        def gaussian_linear():
            tensors = (hidden[:1], weight[0, :, :19], weight[1].abs(), None, None)
            out, std = ops.gaussian_linear_fwd(*tensors, 3, "flipout", 2, False)
            return ops.gaussian_linear_bwd(torch.ones_like(out), *tensors, std, 3, "flipout", 2, False, False,
                                           [True] * 5)

        calls = {
            "depth_loglik": depth_loglik,
            "depth_loglik_mixture_fwd_bwd": lambda: ops.depth_loglik_mixture_fwd_bwd(
                hidden, weight, bias, target, None, log_weights, torch.full((hidden.shape[1],), 0.5), False,
                -100, ALL_GRADS),
            "depth_mixture_predict": lambda: ops.depth_mixture_predict(
                hidden, weight[0].repeat(4, 1), bias.repeat(4), log_weights, False, None),
            "gaussian_linear": gaussian_linear,
        }
        torch._dynamo.reset()
        # Every output is used: a kernel whose outputs are all unused would be dead code.
        compiled = torch.compile(lambda: sum(out.sum() for out in calls[op]()), fullgraph=True,
                                 backend=aot_autograd(fw_compiler=compiler))
        with pytest.raises(_Traced):
            compiled()
        nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
        names = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in nodes
                 if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
        torch._dynamo.reset()  # also clears the kernel side table
        assert names == kernel_names
        assert not any("udn_kernels" in str(n.target) for n in nodes)

    def test_rng_traces_to_fill_kernel(trace):
        def draws():
            return torch.ops.udn_kernels_triton.philox_normal(1000, 5, 2**40, torch.device("cpu"))

        kernels, _ = trace(draws)
        assert kernels == [("_philox_fill_kernel", {"out_ptr"})]

else:
    import math

    import udn_kernels
    import udn_kernels.triton  # noqa: F401  (registers the udn_kernels_triton:: ops)
    from udn_kernels import reference

    TOL64 = dict(rtol=1e-10, atol=1e-10)
    TOL32 = dict(rtol=1e-4, atol=1e-4)

    def assert_all_close(got, want, tol):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g.double(), w.double(), **tol)

    def heads_inputs(gaussian):
        gen = torch.Generator().manual_seed(0)
        L, N, D, C = 3, 37, 19, 23
        randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        target = randn(N, C) if gaussian else torch.randint(0, C, (N,), generator=gen)
        noise = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if gaussian else None
        return randn(L, N, D), randn(L, C, D) / 4, randn(L, C), target, noise, randn(L), randn(L, N)

    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_heads_ops_equal_reference(gaussian):
        hidden, weight, bias, target, noise, log_weights, grad = heads_inputs(gaussian)
        ops = torch.ops.udn_kernels_triton
        fwd = ops.depth_loglik_fwd(hidden, weight, bias, target, noise, gaussian, -100)
        ref_fwd = reference.KERNELS["depth_loglik_fwd"](hidden, weight, bias, target, noise, gaussian, -100)
        assert_all_close(fwd, ref_fwd, TOL64)
        args = (hidden, weight, bias, target, noise, fwd[1], gaussian, -100, ALL_GRADS)
        got = ops.depth_loglik_bwd(grad, *args)
        want = reference.KERNELS["depth_loglik_bwd"](grad, *args[:5], ref_fwd[1], *args[6:])
        assert_all_close([g for g in got if g.numel()], [w for w in want if w.numel()], TOL64)
        nonempty = lambda outs: [t for t in outs if t.numel()]  # noqa: E731
        fused_args = (hidden, weight, bias, target, noise)
        assert_all_close(nonempty(ops.depth_loglik_fwd_bwd(*fused_args, grad, gaussian, -100, ALL_GRADS)),
                         nonempty(reference.KERNELS["depth_loglik_fwd_bwd"](*fused_args, grad, gaussian, -100,
                                                                            ALL_GRADS)),
                         TOL64)
        row_scale = torch.linspace(0, 1, grad.shape[1], dtype=torch.float64)
        assert_all_close(nonempty(ops.depth_loglik_mixture_fwd_bwd(*fused_args, log_weights, row_scale, gaussian,
                                                                   -100, ALL_GRADS)),
                         nonempty(reference.KERNELS["depth_loglik_mixture_fwd_bwd"](
                             *fused_args, log_weights, row_scale, gaussian, -100, ALL_GRADS)), TOL64)
        log_weights[1] = -math.inf
        assert_all_close(ops.depth_mixture_predict(hidden, weight, bias, log_weights, gaussian, noise),
                         reference.KERNELS["depth_mixture_predict"](hidden, weight, bias, log_weights,
                                                                    gaussian, noise), TOL64)

    def test_rng_ops_equal_reference():
        ops, cpu = torch.ops.udn_kernels_triton, torch.device("cpu")
        n, seed, offset = 3000, 2**40 + 9, 2**32 - 1000  # the counter's high word changes mid-way
        assert torch.equal(ops.philox_uint32(n, seed, offset, cpu), reference.philox.random_uint32(n, seed, offset))
        assert torch.equal(ops.philox_uniform(n, seed, offset, cpu), reference.philox.uniform(n, seed, offset))
        torch.testing.assert_close(ops.philox_normal(n, seed, offset, cpu),
                                   reference.philox.normal(n, seed, offset), rtol=0, atol=1e-6)
        assert torch.equal(ops.philox_bernoulli(n, 0.3, seed, offset, cpu),
                           reference.philox.bernoulli(n, 0.3, seed, offset))

    @pytest.mark.parametrize("estimator", ["sample", "local", "flipout"])
    def test_gaussian_linear_ops_equal_reference(estimator):
        gen = torch.Generator().manual_seed(2)
        x, mu = torch.randn(1, 6, 20, generator=gen), torch.randn(17, 20, generator=gen) / 4
        sigma, b_mu, b_sigma = torch.rand(17, 20, generator=gen) / 4, torch.randn(17, generator=gen), \
            torch.rand(17, generator=gen)
        args = (x, mu, sigma, b_mu, b_sigma, 11, estimator, 2, False)
        out, std = torch.ops.udn_kernels_triton.gaussian_linear_fwd(*args)
        want_out, want_std = reference.KERNELS["gaussian_linear_fwd"](*args)
        torch.testing.assert_close(out, want_out, **TOL32)
        torch.testing.assert_close(std, want_std, **TOL32)  # local's output std [Sx, B, N], else empty
        grad = torch.randn(out.shape, generator=gen)
        bwd_options = (*args[5:], False, [True] * 5)
        assert_all_close(torch.ops.udn_kernels_triton.gaussian_linear_bwd(grad, *args[:5], std, *bwd_options),
                         reference.KERNELS["gaussian_linear_bwd"](grad, *args[:5], want_std, *bwd_options), TOL32)

    @pytest.mark.parametrize("mask", ["input", "weight", "symmetric"])
    def test_bernoulli_linear_ops_equal_reference(mask):
        gen = torch.Generator().manual_seed(3)
        x, weight, bias = torch.randn(1, 6, 20, generator=gen), torch.randn(17, 20, generator=gen), \
            torch.randn(17, generator=gen)
        args = (x, weight, bias, 0.3, 13, mask, 2, False)
        out = torch.ops.udn_kernels_triton.bernoulli_linear_fwd(*args)
        torch.testing.assert_close(out, reference.KERNELS["bernoulli_linear_fwd"](*args), **TOL32)
        grad = torch.randn(out.shape, generator=gen)
        assert_all_close(torch.ops.udn_kernels_triton.bernoulli_linear_bwd(grad, *args, [True] * 3),
                         reference.KERNELS["bernoulli_linear_bwd"](grad, *args, [True] * 3), TOL32)

    def public_calls():
        """``name -> fn(leaves) -> output`` over the public ops; leaves as ``public_leaves()``."""
        _, _, _, target, _, _, _ = heads_inputs(False)
        return {
            "depth_loglik": lambda h, w, b, lw, x, m, s: udn_kernels.depth_loglik(h, w, b, target),
            "depth_mixture_nll": lambda h, w, b, lw, x, m, s: udn_kernels.depth_mixture_nll(h, w, b, target, lw),
            "depth_mixture_predict": lambda h, w, b, lw, x, m, s: udn_kernels.depth_mixture_predict(h, w, b, lw),
            "gaussian_linear": lambda h, w, b, lw, x, m, s: udn_kernels.gaussian_linear(
                x, m, s, estimator="flipout", seed=4, samples=2),
            "bernoulli_linear": lambda h, w, b, lw, x, m, s: udn_kernels.bernoulli_linear(
                x, m, p=0.2, mask="weight", seed=4),
        }

    def public_leaves():
        hidden, weight, bias, _, _, log_weights, _ = heads_inputs(False)
        gen = torch.Generator().manual_seed(4)
        x, mu, sigma = (torch.randn(5, 20, generator=gen), torch.randn(9, 20, generator=gen) / 4,
                        torch.rand(9, 20, generator=gen) / 4)
        return [t.clone().requires_grad_() for t in
                (hidden, weight, bias, log_weights, x.double(), mu.double(), sigma.double())]

    # The Triton kernels each public op runs, forward and backward: depth_mixture_nll (mean) takes
    # the gradient in the forward; predict's backward is not a kernel.
    PUBLIC_KERNELS = {
        "depth_loglik": {"depth_loglik_fwd", "depth_loglik_bwd"},
        "depth_mixture_nll": {"depth_loglik_fwd_bwd"},  # expected mode, the default
        "depth_mixture_predict": {"depth_mixture_predict"},
        "gaussian_linear": {"gaussian_linear_fwd", "gaussian_linear_bwd"},
        "bernoulli_linear": {"bernoulli_linear_fwd", "bernoulli_linear_bwd"},
    }

    @pytest.mark.parametrize("name", list(PUBLIC_KERNELS))
    def test_public_ops_run_the_triton_kernels_with_autograd(name):
        fn = public_calls()[name]

        def run(backend):
            leaves = public_leaves()
            with udn_kernels.backend(backend), record_kernels(udn_kernels.triton.KERNELS) as kernels:
                out = fn(*leaves)
                weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
                (out * weights).sum().backward()
            return kernels, [out.detach()] + [t.grad for t in leaves if t.grad is not None]

        kernels, got = run("triton")
        assert kernels == PUBLIC_KERNELS[name]
        _, want = run("reference")
        # stochastic linear runs in fp32 on every backend's Triton kernel (docs/triton.md)
        assert_all_close(got, want, TOL32 if name.endswith("linear") else TOL64)
