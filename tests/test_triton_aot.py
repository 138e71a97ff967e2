"""Ahead-of-time compile of the shipped Triton kernels for sm_80 and sm_90 (no GPU needed).

Runs ``python -m udn_kernels.triton.aot`` in a subprocess (a clean Triton import: other test
modules may run with TRITON_INTERPRET=1). The full sweep (every config of every kernel, both
archs: 254 compiles) takes ~5 minutes on 2 cores, so CI compiles one config per kernel per arch,
the one with the most live state (most registers in the full sweep), and checks: every compile
succeeds, no ptxas spill stores, every kernel is covered. Run the tool without ``--only`` for
the full table (docs/triton.md).
"""
import json
import os
import subprocess
import sys

# One config per kernel: heads fp32 (exact-fp32 FMA dots, 255 registers; the predict kernel's
# Gaussian path keeps two accumulators), the logsumexp pass of predict, the fused path's row
# kernel (categorical forward + gradient, fp32 storage: its most registers), gaussian flipout fp32,
# gaussian local fp32 (variance + std output), bernoulli weight fp32, and every Philox kernel;
# plus gaussian flipout with sigma_softplus (the SOFTPLUS paths of fwd, dx and dw's epilogue
# compile; same register counts as plain flipout); the KL kernels on rho and on log_alpha.
ONE_CONFIG_PER_KERNEL = ("[fp32/gaussian/fp32]", "_lse_kernel [fp32/categorical/fp32]",
                         "_fused_rows_kernel [narrow/categorical/fwd+grad/fp32]", "philox_",
                         "[flipout/fp32]", "[flipout+softplus/fp32]", "gaussian_linear_fwd [local/fp32]",
                         "[weight/fp32]", "[rho/fp32]", "[log_alpha/fp32]")


def test_one_config_per_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    from udn_kernels.triton import aot

    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "udn_kernels.triton.aot",
                           "--only", *ONE_CONFIG_PER_KERNEL, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    every_kernel = {spec["name"] for _, _, spec in aot.collect_specs()}
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in every_kernel for a in ("sm_80", "sm_90")}
    for r in rows:
        assert "error" not in r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0, r
        assert r["shared_bytes"] <= aot.SHARED_LIMIT_BYTES[int(r["arch"][3:])], r
    heads = [r for r in rows if not r["kernel"].startswith(("philox", "gaussian", "bernoulli", "log_uniform"))]
    assert len(heads) == 12 and all(r["shared_bytes"] > 0 for r in heads)  # 6 kernels x 2 archs
    assert "0 spilling, 0 over the shared-memory limit" in proc.stdout


def test_specs_mirror_the_launch_configs():
    """The AOT specs compile exactly the tiles, warps and stages the launchers use."""
    from udn_kernels.triton import heads, stochastic_linear as sl
    from udn_kernels.triton.aot import label as aot_label
    from udn_kernels.triton.heads_common import CONFIGS

    shipped = {(kind, name) for kind, configs in CONFIGS.items() for name in configs}
    kinds = {"_fwd_kernel": "fwd", "_bwd_rows_kernel": "bwd_rows", "_bwd_weight_kernel": "bwd_weight",
             "_predict_kernel": "predict", "_fused_rows_kernel": "fused_rows"}
    covered = {(kinds[s["name"]], s["config"].split("/")[0]) for s in heads.AOT_SPECS if s["name"] in kinds}
    assert covered == shipped
    for spec in heads.AOT_SPECS:
        kind = kinds.get(spec["name"], "fwd")  # _lse_kernel launches with the "fwd" configs
        config = CONFIGS[kind][spec["config"].split("/")[0]]
        assert {k: spec["constexprs"].get(k, spec.get(k)) for k in config} == config, aot_label(spec)
    # fwd / bwd kernels: categorical and gaussian; predict: also the one-tile categorical path;
    # the logsumexp pass: categorical only; the fused row kernel: 2 configs x 2 likelihoods x
    # 3 pass sets (expected mode's one launch, mixture mode's two) x bf16 / fp32 storage
    assert len(heads.AOT_SPECS) == 2 * 9 + 3 * 3 + 3 + 2 * 2 * 3 * 2
    kernel_of = {sl._fwd_kernel: "fwd", sl._dx_kernel: "dx", sl._dw_kernel: "dw"}
    for spec in sl.AOT_SPECS:
        # What the launcher passes for a large problem (tiles not shrunk to the shape).
        launch = sl._tiles(kernel_of[spec["fn"]], 4096, 4096, 4096)
        compiled = {k: spec["constexprs"][k] for k in ("BM", "BN", "BK")}
        assert compiled | {k: spec[k] for k in ("num_warps", "num_stages")} == launch, spec["name"]


# A local array indexed at run time cannot live in registers: a stack frame without spills.
_LOCAL_ARRAY_PTX = """
.version 7.0
.target sm_80
.address_size 64
.visible .entry local_array(.param .u64 out, .param .u32 i)
{
  .local .align 4 .b8 depot[32];
  .reg .b32 %r<4>;
  .reg .b64 %rd<6>;
  ld.param.u64 %rd1, [out];
  ld.param.u32 %r1, [i];
  and.b32 %r2, %r1, 7;
  mul.wide.u32 %rd2, %r2, 4;
  mov.u64 %rd3, depot;
  add.u64 %rd4, %rd3, %rd2;
  st.local.u32 [%rd4], %r1;
  ld.local.u32 %r3, [%rd3];
  cvta.to.global.u64 %rd5, %rd1;
  st.global.u32 [%rd5], %r3;
  ret;
}
"""


def test_ptxas_usage_separates_stack_frame_from_spills():
    """A stack frame is not a spill (libdevice cosf, used by tl.randn, keeps such a local array);
    and the register count is the one of the cubin Triton built with the same ptxas flags."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    from udn_kernels.triton import aot, stochastic_linear as sl

    usage = aot.ptxas_usage(_LOCAL_ARRAY_PTX, 80)
    assert usage["stack"] >= 32 and usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    spec = next(s for s in sl.AOT_SPECS if aot.label(s) == "gaussian_linear_bwd_dw [flipout/fp32]")
    compiled = triton.compile(ASTSource(fn=spec["fn"], signature=spec["signature"],
                                        constexprs=spec["constexprs"], attrs=spec.get("attrs")),
                              target=GPUTarget("cuda", 80, 32),
                              options={k: spec[k] for k in ("num_warps", "num_stages")})
    usage = aot.ptxas_usage(compiled.asm["ptx"], 80)
    assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    assert f"REG:{usage['registers']}" in _res_usage(compiled.asm["cubin"])


def _res_usage(cubin: bytes) -> str:
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(os.path.dirname(get_ptxas(80).path), "cuobjdump")
        return subprocess.run([tool, "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout


def test_tool_exits_nonzero_on_spill_or_failure(monkeypatch, capsys):
    from udn_kernels.triton import aot

    ok = {"kernel": "k", "config": "c", "arch": "sm_80", "num_warps": 4, "num_stages": 2,
          "registers": 64, "spill_stores": 0, "spill_loads": 0, "stack": 32, "shared_bytes": 1024,
          "wgmma": False, "mma": True, "cp_async": True}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for rows, code in (([ok], 0), ([dict(ok, spill_stores=8, spill_loads=8)], 1),
                       ([ok, {"kernel": "k", "config": "c", "arch": "sm_90", "error": "boom"}], 1)):
        monkeypatch.setattr(aot, "run", lambda *args, rows=rows: rows)
        assert aot.main([]) == code
    out = capsys.readouterr()
    assert "FAILED" in out.out and "boom" in out.err
    assert "SPILL k [c] sm_80: 8 bytes stored, 8 bytes loaded" in out.err
