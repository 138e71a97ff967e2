"""Triton depth-head kernels (udn_kernels/triton/heads_*.py) vs the reference, in the Triton CPU interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, and other test modules in this
pytest process may already have imported it compiled-mode. So without the variable this module
only holds one test that re-runs the module in a fresh interpreter subprocess; with it (that
subprocess, or a run started with TRITON_INTERPRET=1) the real cases run.

Tolerances: float64 inputs run the kernels in float64 and match the reference to 1e-10; float32
inputs (fp32 accumulation, different summation order) match the float64 reference to
rtol = atol = 1e-4 on O(1) values; float16 inputs to 5e-3 of the output scale (the tiny-tile grid
and the shipped fp16 configs; the shipped fp32 and fp64 configs at the fp32 / fp64 tolerances).
The same holds for ``depth_mixture_predict`` (``_lse_kernel`` + ``_predict_kernel``) and for the fused
gradient-in-forward path (``fused_forward_backward``), whose bfloat16 case (no tl.dot, so the
interpreter runs it) is held to 1.5e-2 of the output scale (bf16's 2^-8 rounding of d_logits and
of every output).
"""

import pytest
from triton_interpreter import interpreted, record_kernels, rerun_under_interpreter

if not interpreted():

    def test_triton_heads_under_interpreter():
        rerun_under_interpreter(__file__)

else:
    import math

    import torch

    import udn_kernels
    from udn_kernels.reference import heads as reference
    from udn_kernels.triton import heads_backward, heads_forward, heads_fused, heads_predict

    # Tiny tiles so N=37, C=23, D=19 span several row blocks, class tiles, K chunks and d_hidden /
    # d_weight chunks, all with ragged edges.
    TINY_FWD = dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16)
    TINY_BWD = dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, BLOCK_DO=16)
    N, C, D = 37, 23, 19
    IGNORE = -100
    ALL_GRADS = [True] * 4  # grad_mask of the backward kernels: every gradient
    TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}

    def make_inputs(L, C, D, *, per_depth, bias_kind, gaussian, noise, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
        hidden = randn(L, N, D)
        weight = randn(*((L,) if per_depth else ()), C, D) / D**0.5
        bias = {None: None, "shared": randn(C), "per_depth": randn(L, C)}[bias_kind]
        if gaussian:
            target = randn(N, C)
            noise_std = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if noise else None
        else:
            target = torch.randint(0, C, (N,), generator=gen)
            target[::4] = IGNORE  # ignored rows, including the first row of every tile
            noise_std = None
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        grad = randn(L, N)
        return (cast(hidden), cast(weight), cast(bias), target if not gaussian else cast(target),
                cast(noise_std), cast(grad))

    # fp16: operands into tl.dot, fp32 accumulation, d_logits rounded to fp16 before the second GEMM
    # and outputs rounded to fp16 (each ~2^-11 relative), so 5e-3 of the output scale. (bf16 cannot
    # be checked here: the interpreter's tl.dot mishandles bf16 operands; it is the same code with
    # another storage type.)
    FP16_BOUND = 5e-3

    def assert_matches(actual, expected, dtype, name):
        assert actual.shape == expected.shape, name
        if dtype != torch.float16:
            torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=name)
        elif expected.numel():
            scale = max(1.0, expected.abs().max().item())
            assert (actual.double() - expected.double()).abs().max().item() <= FP16_BOUND * scale, name

    def check_against_reference(L, per_depth, bias_kind, gaussian, noise, dtype, fwd_config,
                                bwd_config, C=C, D=D):
        hidden, weight, bias, target, noise_std, grad = make_inputs(
            L, C, D, per_depth=per_depth, bias_kind=bias_kind, gaussian=gaussian, noise=noise,
            dtype=dtype)
        # The oracle always runs in float64 on the same (rounded) inputs.
        up = lambda t: None if t is None or not t.is_floating_point() else t.double()  # noqa: E731
        ref_target = target if not gaussian else target.double()
        ref_ll, ref_aux = reference.depth_loglik_fwd(up(hidden), up(weight), up(bias), ref_target,
                                                     up(noise_std), gaussian, IGNORE)
        ll, aux = heads_forward.forward(hidden, weight, bias, target, noise_std, gaussian, IGNORE,
                                        fwd_config)
        assert ll.dtype == dtype and aux.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches(ll, ref_ll, dtype, "loglik")
        if gaussian:
            assert aux.numel() == 0
        else:
            assert_matches(aux, ref_aux, dtype, "logsumexp")
            assert torch.all(ll[:, target == IGNORE] == 0)

        ref = reference.depth_loglik_bwd(up(grad), up(hidden), up(weight), up(bias), ref_target,
                                         up(noise_std), ref_aux, gaussian, IGNORE, ALL_GRADS)
        got = heads_backward.backward(grad, hidden, weight, bias, target, noise_std, aux, gaussian,
                                      IGNORE, bwd_config, bwd_config)
        for name, g, r, x in zip(("d_hidden", "d_weight", "d_bias", "d_noise_std"), got, ref,
                                 (hidden, weight, bias, noise_std)):
            if x is None:
                assert g.numel() == 0, name
            else:
                assert g.dtype == x.dtype, name
                assert_matches(g, r, dtype, name)

    @pytest.mark.parametrize("gaussian,noise", [(False, False), (True, False), (True, True)],
                             ids=["categorical", "gaussian-unit", "gaussian-noise"])
    @pytest.mark.parametrize("bias_kind", [None, "shared", "per_depth"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    def test_float32_matches_reference(per_depth, bias_kind, gaussian, noise):
        L = 1 + (len(str(bias_kind)) + per_depth + gaussian + noise) % 3  # L in 1..3 across the grid
        check_against_reference(L, per_depth, bias_kind, gaussian, noise, torch.float32,
                                TINY_FWD, TINY_BWD)

    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    def test_float64_matches_reference(per_depth, gaussian):
        check_against_reference(3, per_depth, "per_depth", gaussian, gaussian, torch.float64,
                                TINY_FWD, TINY_BWD)

    @pytest.mark.parametrize("gaussian,noise", [(False, False), (True, False), (True, True)],
                             ids=["categorical", "gaussian-unit", "gaussian-noise"])
    @pytest.mark.parametrize("bias_kind", [None, "shared", "per_depth"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    def test_float16_matches_reference(per_depth, bias_kind, gaussian, noise):
        check_against_reference(2, per_depth, bias_kind, gaussian, noise, torch.float16, TINY_FWD, TINY_BWD)

    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_split_weight_gradient(gaussian):
        # One class tile and one D chunk with a shared head: the d_weight work items
        # (3 depths x 3 row blocks) are split over several programs and summed afterwards.
        config = dict(TINY_BWD, BLOCK_DO=32)
        assert heads_backward._weight_splits(9, 1, torch.device("cpu")) > 1
        check_against_reference(3, False, "shared", gaussian, gaussian, torch.float32,
                                TINY_FWD, config, C=11)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_shipped_configs_through_kernel_table(gaussian, dtype):
        # KERNELS entries use the shipped config selection for the dtype (one tile covers this
        # whole head), against the float64 reference on the same inputs.
        hidden, weight, bias, target, noise_std, grad = make_inputs(
            2, C, D, per_depth=True, bias_kind="shared", gaussian=gaussian, noise=True, dtype=dtype)
        up = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
        fwd = udn_kernels.triton.KERNELS["depth_loglik_fwd"]
        bwd = udn_kernels.triton.KERNELS["depth_loglik_bwd"]
        assert fwd is heads_forward.depth_loglik_fwd
        ll, aux = fwd(hidden, weight, bias, target, noise_std, gaussian, IGNORE)
        ref_ll, ref_aux = reference.depth_loglik_fwd(up(hidden), up(weight), up(bias), up(target), up(noise_std),
                                                     gaussian, IGNORE)
        assert_matches(ll, ref_ll, dtype, "loglik")
        got = bwd(grad, hidden, weight, bias, target, noise_std, aux, gaussian, IGNORE, ALL_GRADS)
        ref = reference.depth_loglik_bwd(up(grad), up(hidden), up(weight), up(bias), up(target), up(noise_std),
                                         ref_aux, gaussian, IGNORE, ALL_GRADS)
        for name, g, r in zip(("d_hidden", "d_weight", "d_bias", "d_noise_std"), got, ref):
            assert_matches(g, r, dtype, name)

    def test_public_op_on_triton_backend_matches_reference_backend():
        hidden, weight, bias, target, _, grad = make_inputs(
            3, C, D, per_depth=False, bias_kind="per_depth", gaussian=False, noise=False,
            dtype=torch.float64)

        def run(name):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            with udn_kernels.backend(name):
                ll = udn_kernels.depth_loglik(*leaves, target)
                ll.backward(grad)
            return [ll.detach()] + [t.grad for t in leaves]

        for name, got, want in zip(("loglik", "d_hidden", "d_weight", "d_bias"),
                                   run("triton"), run("reference")):
            assert_matches(got, want, torch.float64, name)

    # ------------------------------------------------------------------ gradient in the forward
    # fused_forward_backward (depth_loglik_fwd_bwd / depth_loglik_mixture_fwd_bwd): GEMMs in torch,
    # _fused_rows_kernel on the materialised chunk. Tiny tiles (16 rows x 16 classes: C = 23 takes
    # two ragged class tiles) and a budget of 400 logits split N = 37 rows into several chunks:
    # expected mode 17 + 17 + 3 rows of one depth, mixture mode 5 samples x all L depths.
    TINY_FUSED = dict(BLOCK_N=16, BLOCK_C=16)
    SMALL_BUDGET = 400
    FUSED_NAMES = ("loglik", "aux", "d_hidden", "d_weight", "d_bias", "d_noise_std")

    def fused_inputs(L, *, mode, per_depth, bias_kind, gaussian, noise, dtype, seed=0):
        """``(args, kwargs)`` of ``fused_forward_backward`` and the float64 reference's outputs.

        Mixture mode: a -inf log-weight (L > 2), a zero row scale (row 3) besides the ignored
        rows (every 4th, categorical)."""
        hidden, weight, bias, target, noise_std, grad = make_inputs(
            L, C, D, per_depth=per_depth, bias_kind=bias_kind, gaussian=gaussian, noise=noise,
            dtype=dtype, seed=seed)
        up = lambda t: None if t is None or not t.is_floating_point() else t.double()  # noqa: E731
        ref_args = (up(hidden), up(weight), up(bias), up(target) if gaussian else target, up(noise_std))
        if mode == "expected":
            kwargs = dict(grad_loglik=grad)
            want = reference.KERNELS["depth_loglik_fwd_bwd"](*ref_args, up(grad), gaussian, IGNORE, ALL_GRADS)
        else:
            gen = torch.Generator().manual_seed(seed + 2)
            log_weights = torch.randn(L, generator=gen, dtype=torch.float64)
            if L > 2:
                log_weights[1] = -math.inf
            row_scale = torch.rand(N, generator=gen, dtype=torch.float64)
            row_scale[3] = 0.0
            kwargs = dict(log_weights=log_weights.to(dtype), row_scale=row_scale.to(dtype))
            want = reference.depth_loglik_mixture_fwd_bwd(*ref_args, up(kwargs["log_weights"]),
                                                          up(kwargs["row_scale"]), gaussian, IGNORE, ALL_GRADS)
        return (hidden, weight, bias, target, noise_std, gaussian, IGNORE), kwargs, want

    def check_fused_dtypes(got, args):
        hidden, weight, bias, _, noise_std, gaussian, _ = args
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        assert got[0].dtype == hidden.dtype and got[1].dtype == acc
        assert got[1].shape == ((0,) if gaussian else got[0].shape)
        for name, g, x in zip(FUSED_NAMES[2:], got[2:], (hidden, weight, bias, noise_std)):
            if x is None:
                assert g.numel() == 0, name
            else:
                assert g.dtype == x.dtype and g.shape == x.shape, name

    def check_fused(L, mode, per_depth, bias_kind, gaussian, noise, dtype, budget=SMALL_BUDGET):
        args, kwargs, want = fused_inputs(L, mode=mode, per_depth=per_depth, bias_kind=bias_kind,
                                          gaussian=gaussian, noise=noise, dtype=dtype)
        got = heads_fused.fused_forward_backward(*args, **kwargs, max_chunk_logits=budget,
                                                 config=TINY_FUSED)
        check_fused_dtypes(got, args)
        for name, g, r in zip(FUSED_NAMES, got, want):
            if r.numel():
                assert_matches(g, r, dtype, name)
        if not gaussian:
            assert torch.all(got[0][:, args[3] == IGNORE] == 0)

    @pytest.mark.parametrize("gaussian,noise", [(False, False), (True, False), (True, True)],
                             ids=["categorical", "gaussian-unit", "gaussian-noise"])
    @pytest.mark.parametrize("bias_kind", [None, "shared", "per_depth"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_fused_float32_matches_reference(mode, per_depth, bias_kind, gaussian, noise):
        L = 3 if mode == "mixture" else 1 + (len(str(bias_kind)) + per_depth + gaussian + noise) % 3
        check_fused(L, mode, per_depth, bias_kind, gaussian, noise, torch.float32)

    @pytest.mark.parametrize("budget", [SMALL_BUDGET, 2 * N * C, heads_fused.MAX_CHUNK_LOGITS],
                             ids=["row-chunks", "two-depth-chunks", "one-chunk"])
    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_fused_float64_matches_reference(mode, gaussian, budget):
        check_fused(3, mode, budget != SMALL_BUDGET, "per_depth", gaussian, gaussian, torch.float64,
                    budget)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_fused_16bit_matches_reference(mode, dtype):
        # fp32 logits (fp32 GEMM result), fp32 row statistics and mixture weights r; d_logits
        # rounded to the input dtype before the d_hidden / d_weight GEMMs, and every output rounded
        # to it (2^-11 relative for fp16, 2^-8 for bf16). Largest differences seen: 5.7e-4 (fp16)
        # and 5.6e-3 (bf16) of the output scale; bounds 5e-3 and 1.5e-2. The categorical case has
        # the ignored rows, the Gaussian one d_noise_std.
        gaussian = dtype == torch.bfloat16
        args, kwargs, want = fused_inputs(3, mode=mode, per_depth=mode == "mixture", bias_kind="shared",
                                          gaussian=gaussian, noise=gaussian, dtype=dtype)
        got = heads_fused.fused_forward_backward(*args, **kwargs, max_chunk_logits=SMALL_BUDGET,
                                                 config=TINY_FUSED)
        check_fused_dtypes(got, args)
        bound = 5e-3 if dtype == torch.float16 else 1.5e-2
        for name, g, r in zip(FUSED_NAMES, got, want):
            if r.numel():
                scale = max(1.0, r.abs().max().item())
                assert (g.double() - r).abs().max().item() <= bound * scale, name

    @pytest.mark.parametrize("mixture", [False, True], ids=["expected", "mixture"])
    def test_fused_chunks_cover_each_row_once_within_budget(mixture):
        L, C_ = 3, 23
        for budget in (1, 50, 400, 2 * N * C_, 10**9):
            seen = torch.zeros(L, N, dtype=torch.int64)
            for l0, l1, n0, n1 in heads_fused.fused_chunks(L, N, C_, mixture, budget):
                assert (l1 - l0) * (n1 - n0) * C_ <= max(budget, (l1 - l0) * C_)
                assert not mixture or (l0, l1) == (0, L)  # r needs every depth of a sample
                seen[l0:l1, n0:n1] += 1
            assert torch.all(seen == 1)

    def test_fused_kernel_table_entries_match_reference():
        # The triton_ops with the shipped configs and the default budget (one chunk).
        for mode, gaussian in (("expected", False), ("mixture", True)):
            args, kwargs, want = fused_inputs(3, mode=mode, per_depth=True, bias_kind="shared",
                                              gaussian=gaussian, noise=gaussian, dtype=torch.float64)
            hidden, weight, bias, target, noise_std, gaussian, ignore = args
            if mode == "expected":
                kernel = udn_kernels.triton.KERNELS["depth_loglik_fwd_bwd"]
                assert kernel is heads_fused.depth_loglik_fwd_bwd
                got = kernel(*args[:5], kwargs["grad_loglik"], gaussian, ignore, ALL_GRADS)
            else:
                kernel = udn_kernels.triton.KERNELS["depth_loglik_mixture_fwd_bwd"]
                assert kernel is heads_fused.depth_loglik_mixture_fwd_bwd
                got = kernel(*args[:5], kwargs["log_weights"], kwargs["row_scale"], gaussian, ignore, ALL_GRADS)
            for name, g, r in zip(FUSED_NAMES, got, want):
                assert_matches(g, r, torch.float64, name)

    def test_fused_empty_batch():
        hidden, weight = torch.zeros(2, 0, D), torch.randn(C, D)
        got = heads_fused.depth_loglik_fwd_bwd(hidden, weight, torch.randn(C), torch.zeros(0, dtype=torch.int64),
                                               None, torch.zeros(2, 0), False, IGNORE, ALL_GRADS)
        assert got[0].shape == (2, 0) and got[1].shape == (2, 0) and got[2].shape == hidden.shape
        assert torch.equal(got[3], torch.zeros_like(weight)) and torch.equal(got[4], torch.zeros(C))

    @pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
    @pytest.mark.parametrize("mode", ["expected", "mixture"])
    def test_nll_takes_the_fused_path_and_matches_reference_backend(mode, likelihood):
        # With a mean reduction and head inputs requiring grad the Triton backend runs its fused
        # gradient-in-forward kernel and no backward kernel.
        gaussian = likelihood == "gaussian"
        hidden, weight, bias, target, noise_std, _ = make_inputs(
            3, C, D, per_depth=mode == "expected", bias_kind="shared", gaussian=gaussian, noise=gaussian,
            dtype=torch.float64)
        log_weights = torch.log(torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))

        def run(name):
            leaves = [None if t is None else t.clone().requires_grad_()
                      for t in (hidden, weight, bias, log_weights, noise_std)]
            y = target.clone().requires_grad_() if gaussian else target
            with udn_kernels.backend(name), record_kernels(udn_kernels.triton.KERNELS) as kernels:
                loss = udn_kernels.depth_mixture_nll(*leaves[:3], y, leaves[3], mode=mode, likelihood=likelihood,
                                                     noise_std=leaves[4], ignore_index=IGNORE)
                loss.backward()
            grads = [t.grad for t in leaves if t is not None] + ([y.grad] if gaussian else [])
            return kernels, [loss.detach()] + grads

        kernels, got = run("triton")
        fused = "depth_loglik_fwd_bwd" if mode == "expected" else "depth_loglik_mixture_fwd_bwd"
        assert fused in kernels and not {"depth_loglik_fwd", "depth_loglik_bwd"} & kernels
        _, want = run("reference")
        assert len(got) == len(want) == 5 + 2 * gaussian
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, torch.float64, f"output {i}")

    def test_empty_batch():
        hidden = torch.zeros(2, 0, D)
        weight = torch.randn(C, D)
        ll, aux = heads_forward.depth_loglik_fwd(hidden, weight, None, torch.zeros(0, dtype=torch.int64),
                                                 None, False, IGNORE)
        assert ll.shape == (2, 0) and aux.shape == (2, 0)
        grads = heads_backward.depth_loglik_bwd(torch.zeros(2, 0), hidden, weight, None,
                                                torch.zeros(0, dtype=torch.int64), None, aux, False, IGNORE, ALL_GRADS)
        assert torch.equal(grads[1], torch.zeros_like(weight)) and grads[2].numel() == 0

    def test_zero_hidden_size_still_has_bias_gradient():
        # D = 0: logits are the bias alone, so d_bias is the only non-empty gradient.
        hidden, weight, bias, target, _, grad = make_inputs(
            2, C, 0, per_depth=False, bias_kind="per_depth", gaussian=False, noise=False,
            dtype=torch.float64)
        ll, aux = heads_forward.forward(hidden, weight, bias, target, None, False, IGNORE, TINY_FWD)
        ref_ll, ref_aux = reference.depth_loglik_fwd(hidden, weight, bias, target, None, False, IGNORE)
        assert_matches(ll, ref_ll, torch.float64, "loglik")
        got = heads_backward.backward(grad, hidden, weight, bias, target, None, aux, False, IGNORE,
                                      TINY_BWD, TINY_BWD)
        ref = reference.depth_loglik_bwd(grad, hidden, weight, bias, target, None, ref_aux, False, IGNORE, ALL_GRADS)
        assert_matches(got[2], ref[2], torch.float64, "d_bias")
        assert got[0].shape == hidden.shape and got[1].shape == weight.shape

    # ------------------------------------------------------------------ depth_mixture_predict
    # With BLOCK_C = 16, C = 11 takes the one-tile path (softmax inside the predict kernel) and
    # C = 23 the class-tiled one (_lse_kernel, then _predict_kernel over two class tiles).
    PREDICT_C = {"one-tile": 11, "class-tiled": 23}

    def predict_inputs(L, C, *, per_depth, bias_kind, noise, dtype, seed=0):
        hidden, weight, bias, _, noise_std, _ = make_inputs(
            L, C, D, per_depth=per_depth, bias_kind=bias_kind, gaussian=True, noise=noise, dtype=dtype,
            seed=seed)
        log_weights = torch.randn(L, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        if L > 2:
            log_weights[1] = -math.inf  # a depth outside the support: weight 0
        return hidden, weight, bias, log_weights.to(dtype), noise_std

    def reference_predict(hidden, weight, bias, log_weights, gaussian, noise_std):
        up = lambda t: None if t is None else t.double()  # noqa: E731
        return reference.depth_mixture_predict(up(hidden), up(weight), up(bias), up(log_weights),
                                               gaussian, up(noise_std))

    def check_predict(L, C, per_depth, bias_kind, gaussian, noise, dtype, config=TINY_FWD):
        inputs = predict_inputs(L, C, per_depth=per_depth, bias_kind=bias_kind, noise=noise, dtype=dtype)
        hidden, weight, bias, log_weights, noise_std = inputs
        got = heads_predict.predict(hidden, weight, bias, log_weights, gaussian, noise_std, config, config)
        want = reference_predict(hidden, weight, bias, log_weights, gaussian, noise_std)
        assert got[0].shape == (N, C) and got[1].shape == ((N, C) if gaussian else (0,))
        for name, g, r in zip(("out1", "out2"), got, want):
            assert g.dtype == dtype, name
            assert_matches(g, r, dtype, name)
        if not gaussian:  # mixture probabilities sum to one per row
            torch.testing.assert_close(got[0].double().sum(1), torch.ones(N, dtype=torch.float64),
                                       **TOL[dtype])

    @pytest.mark.parametrize("tiling", PREDICT_C)
    @pytest.mark.parametrize("gaussian,noise", [(False, False), (True, False), (True, True)],
                             ids=["categorical", "gaussian-unit", "gaussian-noise"])
    @pytest.mark.parametrize("bias_kind", [None, "shared", "per_depth"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    def test_predict_float32_matches_reference(per_depth, bias_kind, gaussian, noise, tiling):
        L = 1 + (len(str(bias_kind)) + per_depth + gaussian) % 3 if tiling == "one-tile" else 3
        check_predict(L, PREDICT_C[tiling], per_depth, bias_kind, gaussian, noise, torch.float32)

    @pytest.mark.parametrize("tiling", PREDICT_C)
    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    @pytest.mark.parametrize("per_depth", [False, True], ids=["shared-head", "head-per-depth"])
    def test_predict_float64_matches_reference(per_depth, gaussian, tiling):
        check_predict(3, PREDICT_C[tiling], per_depth, "per_depth", gaussian, gaussian, torch.float64)

    @pytest.mark.parametrize("tiling", PREDICT_C)
    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_predict_float16_matches_reference(gaussian, tiling):
        # fp16 operands, fp32 accumulation and softmax, outputs rounded to fp16: 5e-3 of the scale.
        hidden, weight, bias, log_weights, noise_std = predict_inputs(
            3, PREDICT_C[tiling], per_depth=True, bias_kind="shared", noise=gaussian, dtype=torch.float16)
        got = heads_predict.predict(hidden, weight, bias, log_weights, gaussian, noise_std, TINY_FWD, TINY_FWD)
        want = reference_predict(hidden, weight, bias, log_weights, gaussian, noise_std)
        for name, g, r in zip(("out1", "out2"), got, want):
            if r.numel():
                assert g.dtype == torch.float16, name
                scale = max(1.0, r.abs().max().item())
                assert (g.double() - r).abs().max().item() <= 5e-3 * scale, name

    @pytest.mark.parametrize("tiling", PREDICT_C)
    def test_predict_nan_and_infinite_weights(tiling):
        # The NaN rules of the C++ kernel and the reference (docs/heads.md): a NaN in one depth's
        # hidden row poisons that output row only; NaN or all -inf log-weights give NaN everywhere;
        # a row whose logits are all -inf has NaN probabilities (torch.softmax's 0/0).
        C = PREDICT_C[tiling]
        hidden, weight, bias, log_weights, _ = predict_inputs(3, C, per_depth=False, bias_kind="shared",
                                                              noise=False, dtype=torch.float32)
        run = lambda *args: heads_predict.predict(*args, TINY_FWD, TINY_FWD)  # noqa: E731
        h = hidden.clone()
        h[2, 5, 0] = math.nan  # depth 2 has a finite weight
        probs, _ = run(h, weight, bias, log_weights, False, None)
        assert torch.isnan(probs[5]).all() and torch.isfinite(probs[torch.arange(N) != 5]).all()
        mean, var = run(h, weight, bias, log_weights, True, None)
        assert torch.isnan(mean[5]).all() and torch.isnan(var[5]).all()
        assert torch.isfinite(mean[:5]).all() and torch.isfinite(var[6:]).all()
        for bad in (torch.full((3,), -math.inf), torch.tensor([0.0, math.nan, 0.0])):
            for gaussian in (False, True):
                out1, _ = run(hidden, weight, bias, bad, gaussian, None)
                want, _ = reference_predict(hidden, weight, bias, bad, gaussian, None)
                assert torch.isnan(out1).all() and torch.isnan(want).all()
        all_masked = torch.full_like(bias, -math.inf)
        probs, _ = run(hidden, weight, all_masked, log_weights, False, None)
        want, _ = reference_predict(hidden, weight, all_masked, log_weights, False, None)
        assert torch.isnan(probs).all() and torch.isnan(want).all()

    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_predict_shipped_configs_through_kernel_table(gaussian):
        # C = 70 > the fp32 config's 64-class tile: the class-tiled path with the shipped configs.
        hidden, weight, bias, log_weights, noise_std = predict_inputs(
            3, 70, per_depth=False, bias_kind="per_depth", noise=gaussian, dtype=torch.float32)
        kernel = udn_kernels.triton.KERNELS["depth_mixture_predict"]
        got = kernel(hidden, weight, bias, log_weights, gaussian, noise_std)
        want = reference_predict(hidden, weight, bias, log_weights, gaussian, noise_std)
        for name, g, r in zip(("out1", "out2"), got, want):
            assert_matches(g, r, torch.float32, name)

    def test_predict_empty_batch():
        hidden = torch.zeros(2, 0, D)
        out1, out2 = heads_predict.predict(hidden, torch.randn(C, D), None, torch.zeros(2), True, None)
        assert out1.shape == (0, C) and out2.shape == (0, C)

    @pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
    def test_public_predict_on_triton_backend_matches_reference_backend(likelihood):
        gaussian = likelihood == "gaussian"
        hidden, weight, bias, log_weights, noise_std = predict_inputs(
            3, 23, per_depth=True, bias_kind="per_depth", noise=True, dtype=torch.float64)
        grads_out = torch.randn(2, N, 23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

        def run(name):
            leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, log_weights, noise_std)]
            with udn_kernels.backend(name):
                out = udn_kernels.depth_mixture_predict(*leaves[:4], likelihood=likelihood,
                                                        noise_std=leaves[4] if gaussian else None)
            outs = out if gaussian else (out,)
            torch.autograd.backward(outs, tuple(grads_out[:len(outs)]))
            return [o.detach() for o in outs] + [t.grad for t in leaves[:4 + gaussian]]

        names = ("mean", "var") if gaussian else ("probs",)
        names += ("d_hidden", "d_weight", "d_bias", "d_log_weights", "d_noise_std")
        got, want = run("triton"), run("reference")
        assert len(got) == len(want) == len(names) - (not gaussian)
        for name, g, w in zip(names, got, want):
            assert_matches(g, w, torch.float64, name)
