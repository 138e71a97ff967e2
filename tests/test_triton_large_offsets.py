"""Scale, Triton: every kernel's index arithmetic is 64-bit past 2^31 elements (issue 8, item 5).

Each case launches a Triton kernel in the CPU interpreter on a tensor of more than 2^31 elements
and runs only the programs whose element indices pass 2^31 (``only_programs``); the big tensors
come from ``torch.empty``, so untouched pages never become resident. The interpreter evaluates
index arithmetic with the GPU's integer widths (int32 arguments and program ids wrap like on the
device), so an offset computed in int32 would read or write the wrong elements (or crash the
subprocess) and the comparison with the reference on the touched slice would fail.

Covered: the RNG fill kernel (2^31 + 77 outputs) and its normals = tl.randn4x past counter 2^32;
heads forward and d_hidden kernels with L*N*D > 2^31 (depth 1 starts past 2^30); the heads d_weight
kernel with per-depth heads of L*C*D > 2^31; the predict kernels (logsumexp pass and predict) with
L*N*D > 2^31 and N*C > 2^31; the stochastic-linear forward and d_weight kernels with N_out*K >
2^31, and the forward and d_x kernels with S*N*K > 2^31 (noise offsets and x / grad / out draws
past 2^31).
Tolerance: float32 in and out, 1e-4 relative / 1e-4 absolute on O(1)..O(10) values.
"""
import pytest
from triton_interpreter import interpreted, only_programs, rerun_under_interpreter

if not interpreted():

    def test_triton_large_offsets_under_interpreter():
        rerun_under_interpreter(__file__)

else:
    import torch
    import triton
    import triton.language as tl

    from udn_kernels.reference import heads as reference_heads
    from udn_kernels.reference import philox
    from udn_kernels.triton import heads_backward, heads_common, heads_forward, heads_predict
    from udn_kernels.triton import rng as triton_rng
    from udn_kernels.triton import stochastic_linear as tsl

    TOL = dict(rtol=1e-4, atol=1e-4)
    SEED = 2**33 + 5
    BIG = 2**31

    def programs_from(axis, first, kernels=None):
        """Keep the programs from index ``first`` on along ``axis``, of the named kernels (all if None)."""
        def keep(name, pid, grid):
            return (kernels is None or name in kernels) and pid[axis] >= first
        return keep

    def filled_tail(shape, start, dim, gen, fill=torch.randn):
        """``torch.empty(shape)`` with only the slice ``start:`` along ``dim`` written."""
        big = torch.empty(shape)
        tail = big.narrow(dim, start, shape[dim] - start)
        tail.copy_(fill(tail.shape, generator=gen))
        return big

    @pytest.mark.parametrize("kind", ["uniform", "normal"])
    def test_rng_fill_past_2_31(kind):
        n, offset = BIG + 77, 2**40 + 3
        start = (triton.cdiv(n, triton_rng.BLOCK) - 1) * triton_rng.BLOCK
        with only_programs(programs_from(0, start // triton_rng.BLOCK)):
            out = triton_rng.KERNELS[f"philox_{kind}"](n, SEED, offset)
        expected = getattr(philox, f"{kind}_at")(torch.arange(offset + start, offset + n), SEED)
        torch.testing.assert_close(out[start:], expected, rtol=0, atol=1e-6 if kind == "normal" else 0)

    @triton.jit
    def _randn4x_kernel(out_ptr, seed, counter0, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK).to(tl.int64)
        n0, n1, n2, n3 = tl.randn4x(seed, counter0 + i)
        tl.store(out_ptr + 4 * i, n0)
        tl.store(out_ptr + 4 * i + 1, n1)
        tl.store(out_ptr + 4 * i + 2, n2)
        tl.store(out_ptr + 4 * i + 3, n3)

    def test_normal_stream_is_randn4x_past_2_32():
        """docs/rng.md: normal e = tl.randn4x(seed, e >> 2)[e & 3], with counters past 2^32 (within
        1e-6: the kernels' own sincos replaces libdevice's, ~1 ulp)."""
        counter0, block = 2**32 - 100, 256
        want = torch.empty(4 * block)
        _randn4x_kernel[(1,)](want, SEED, counter0, BLOCK=block)
        got = triton_rng.philox_normal(4 * block, SEED, 4 * counter0, want.device)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    def test_heads_forward_and_d_hidden_past_2_31():
        L, C, D = 2, 10, 64
        N = BIG // (L * D) + 37
        fwd_rows = heads_common.select_config("fwd", C, D, torch.float32)["BLOCK_N"]
        bwd_rows = heads_common.select_config("bwd_rows", C, D, torch.float32)["BLOCK_N"]
        r0 = (triton.cdiv(N, fwd_rows) - 1) * fwd_rows
        assert r0 % bwd_rows == 0  # the last backward row block lies inside the forward one
        gen = torch.Generator().manual_seed(0)
        hidden = filled_tail((L, N, D), r0, 1, gen)
        assert L * N * D > BIG and hidden[1, r0:].data_ptr() - hidden.data_ptr() > 4 * BIG
        weight, bias = torch.randn(L, C, D, generator=gen) / 8, torch.randn(L, C, generator=gen)
        target = torch.zeros(N, dtype=torch.long)
        target[r0:] = torch.randint(0, C, (N - r0,), generator=gen)
        target[r0::3] = -100
        with only_programs(programs_from(0, r0 // fwd_rows)):
            loglik, lse = heads_forward.forward(hidden, weight, bias, target, None, False, -100)
        ref_loglik, ref_lse = reference_heads.depth_loglik_fwd(hidden[:, r0:], weight, bias, target[r0:],
                                                              None, False, -100)
        torch.testing.assert_close(loglik[:, r0:], ref_loglik, **TOL)
        torch.testing.assert_close(lse[:, r0:], ref_lse, **TOL)

        # d_hidden rows of the last block; the d_weight kernel loops over every row block, so it is
        # covered by the next test instead.
        grad = filled_tail((L, N), r0, 1, gen)
        with only_programs(programs_from(0, r0 // bwd_rows, kernels={"_bwd_rows_kernel"})):
            d_hidden = heads_backward.backward(grad, hidden, weight, bias, target, None, lse, False, -100)[0]
        ref_d_hidden = reference_heads.depth_loglik_bwd(grad[:, r0:], hidden[:, r0:], weight, bias, target[r0:],
                                                        None, ref_lse, False, -100, [True] * 4)[0]
        torch.testing.assert_close(d_hidden[:, r0:], ref_d_hidden, **TOL)

    def test_heads_d_weight_past_2_31():
        L, N, D = 2, 5, 64
        C = BIG // (L * D) + 13
        c_block = heads_common.select_config("bwd_weight", C, D, torch.float32)["BLOCK_C"]
        c0 = (triton.cdiv(C, c_block) - 1) * c_block
        gen = torch.Generator().manual_seed(1)
        weight = filled_tail((L, C, D), c0, 1, gen)
        assert L * C * D > BIG
        hidden = torch.randn(L, N, D, generator=gen)
        target = torch.tensor([C - 1, c0, 3, -100, C - 2])  # in the last tile, outside it, ignored
        grad = torch.randn(L, N, generator=gen)
        # Any logsumexp defines a G = g (onehot - exp(s - lse)); the kernel must use this one.
        lse = torch.randn(L, N, generator=gen) + 4.0
        with only_programs(programs_from(0, c0 // c_block, kernels={"_bwd_weight_kernel"})):
            d_weight = heads_backward.backward(grad, hidden, weight, None, target, None, lse, False, -100)[1]
        logits = hidden @ weight[:, c0:].transpose(1, 2)  # [L, N, C - c0]
        onehot = (target[:, None] == torch.arange(c0, C)).float()
        g = (grad * (target != -100))[..., None] * (onehot - torch.exp(logits - lse[..., None]))
        torch.testing.assert_close(d_weight[:, c0:], g.transpose(1, 2) @ hidden, **TOL)

    @pytest.mark.parametrize("gaussian", [False, True], ids=["categorical", "gaussian"])
    def test_heads_predict_past_2_31(gaussian):
        """depth_mixture_predict with L*N*D > 2^31 (hidden rows of depth 1) and N*C > 2^31 (the
        [N, C] outputs of the last row block); C spans two class tiles, so the categorical case runs
        _lse_kernel and the class-tiled _predict_kernel."""
        L, C, D = 2, 128, 64
        N = BIG // C + 100  # the last row block starts past row 2^24: r0 * C > 2^31
        config = heads_common.select_config("predict", C, D, torch.float32)
        rows = config["BLOCK_N"]
        assert heads_common.select_config("fwd", C, D, torch.float32)["BLOCK_N"] == rows  # lse rows
        assert C > config["BLOCK_C"]
        r0 = (triton.cdiv(N, rows) - 1) * rows
        gen = torch.Generator().manual_seed(4)
        hidden = filled_tail((L, N, D), r0, 1, gen)
        assert hidden[1, r0:].data_ptr() - hidden.data_ptr() > 4 * BIG and r0 * C > BIG
        weight, bias = torch.randn(L, C, D, generator=gen) / 8, torch.randn(C, generator=gen)
        log_weights = torch.tensor([0.3, -0.2])
        noise_std = torch.rand(C, generator=gen) + 0.5 if gaussian else None
        with only_programs(programs_from(0, r0 // rows)):
            got = heads_predict.predict(hidden, weight, bias, log_weights, gaussian, noise_std)
        want = reference_heads.depth_mixture_predict(hidden[:, r0:], weight, bias, log_weights, gaussian,
                                                     noise_std)
        torch.testing.assert_close(got[0][r0:], want[0], **TOL)
        if gaussian:
            torch.testing.assert_close(got[1][r0:], want[1], **TOL)

    def sampled_weight(mu, sigma, draw, rows, K, N):
        """W_s = mu + sigma * eps_s for output rows ``rows`` (eps at s*N*K + n*K + k, docs/rng.md)."""
        offsets = draw * N * K + rows[:, None] * K + torch.arange(K)
        return mu[rows] + sigma[rows] * philox.normal_at(offsets, SEED)

    def test_stochastic_linear_forward_and_d_weight_past_2_31():
        B, K = 3, 64
        N = BIG // K + 48
        n_block = tsl._tiles("fwd", B, N, K)["BN"]
        n0 = (triton.cdiv(N, n_block) - 1) * n_block
        dw_block = tsl._tiles("dw", B, N, K)["BN"]
        assert n0 % dw_block == 0
        gen = torch.Generator().manual_seed(2)
        mu = filled_tail((N, K), n0, 0, gen)
        sigma = filled_tail((N, K), n0, 0, gen, fill=torch.rand)
        assert N * K > BIG
        bias_mu, bias_sigma = torch.zeros(N), torch.zeros(N)
        bias_mu[n0:], bias_sigma[n0:] = torch.randn(N - n0, generator=gen), torch.rand(N - n0, generator=gen)
        x = torch.randn(1, B, K, generator=gen)
        rows = torch.arange(n0, N)
        with only_programs(programs_from(1, n0 // n_block)):
            out, _ = tsl.gaussian_linear_fwd(x, mu, sigma, bias_mu, bias_sigma, SEED, "sample", 1, False)
        w = sampled_weight(mu, sigma, 0, rows, K, N)
        bias = bias_mu[n0:] + bias_sigma[n0:] * philox.normal_at(N * K + rows, SEED)  # bias eps after S*N*K
        torch.testing.assert_close(out[0, :, n0:], x[0] @ w.T + bias, **TOL)

        grad = filled_tail((1, B, N), n0, 2, gen)
        with only_programs(programs_from(0, n0 // dw_block)):
            d_mu, d_sigma = tsl._grad_w(grad, x, sigma, SEED, tsl.SAMPLE, 1, need_dw=True, need_dsig=True)
        g_x = grad[0, :, n0:].T @ x[0]
        eps = philox.normal_at(rows[:, None] * K + torch.arange(K), SEED)
        torch.testing.assert_close(d_mu[n0:], g_x, **TOL)
        torch.testing.assert_close(d_sigma[n0:], g_x * eps, **TOL)

    @pytest.mark.parametrize("estimator", ["sample", "flipout"])
    def test_stochastic_linear_last_draw_past_2_31(estimator):
        """samples=S with S*N*K > 2^31 and x carrying the sample axis: the last draw's noise, x, grad
        and output offsets all pass 2^31, as do the flipout sign offsets."""
        B, N, K = 2, 64, 64
        S = BIG // (N * K) + 2
        gen = torch.Generator().manual_seed(3)
        x = filled_tail((S, B, K), S - 1, 0, gen)
        mu, sigma = torch.randn(N, K, generator=gen), torch.rand(N, K, generator=gen)
        with only_programs(programs_from(2, S - 1)):
            out, _ = tsl.gaussian_linear_fwd(x, mu, sigma, None, None, SEED, estimator, S, True)
        rows, s = torch.arange(N), S - 1
        if estimator == "sample":
            expected = x[s] @ sampled_weight(mu, sigma, s, rows, K, N).T
        else:
            _, sign_in_base, sign_out_base = tsl._bases(S, B, N, K)
            sign_in = philox.sign_at(sign_in_base + s * B * K + torch.arange(B * K).view(B, K), SEED)
            sign_out = philox.sign_at(sign_out_base + s * B * N + torch.arange(B * N).view(B, N), SEED)
            noise = sampled_weight(torch.zeros_like(mu), sigma, s, rows, K, N)
            expected = x[s] @ mu.T + ((x[s] * sign_in) @ noise.T) * sign_out
        assert s * N * K > BIG and tsl._bases(S, B, N, K)[1] > BIG  # noise and flipout sign offsets
        torch.testing.assert_close(out[s], expected, **TOL)

        if estimator == "sample":
            grad = filled_tail((S, B, N), S - 1, 0, gen)
            with only_programs(programs_from(2, S - 1)):
                dx = tsl._grad_x(grad, x, mu, sigma, SEED, tsl.SAMPLE, S, x_sampled=True)
            torch.testing.assert_close(dx[s], grad[s] @ sampled_weight(mu, sigma, s, rows, K, N), **TOL)
