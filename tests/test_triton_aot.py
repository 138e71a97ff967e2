"""Ahead-of-time compile of the shipped Triton kernels for sm_80 and sm_90 (no GPU needed).

Runs ``python -m udn_kernels.triton.aot`` in a subprocess (a clean Triton import: other test
modules may run with TRITON_INTERPRET=1). The full sweep (every config of every kernel for every
dtype it serves, both archs: 488 compiles) takes ~20 minutes on 2 busy cores, so CI compiles one
config per (kernel, dtype) per arch, the one with the most live state (most registers in the full
sweep): every (kernel, dtype, arch) combination is compiled, 132 compiles, ~5 minutes on 2 busy
cores with an empty Triton cache. Checks: every compile succeeds, no ptxas spill stores, shared
memory within the arch's per-block limit, every combination covered. Run the tool without
``--only`` for the full table (docs/triton.md).
"""
import json
import os
import subprocess
import sys

# Storage dtypes every kernel compiles for: the heads and KL kernels also float64 (the stochastic
# linear ops refuse it on CUDA), the Philox fills none (their output dtype is fixed).
DTYPES_16_32 = {"bf16", "fp16", "fp32"}
HEADS_AND_KL = {"_fwd_kernel", "_bwd_rows_kernel", "_bwd_weight_kernel", "_lse_kernel", "_predict_kernel",
                "_fused_rows_kernel", "gaussian_kl_fwd", "gaussian_kl_bwd", "log_uniform_kl_fwd",
                "log_uniform_kl_bwd"}
# Per (kernel, dtype), the config containing the first of these it has (else the group's first
# spec): the configs with the most registers in the full sweep. The fused row kernel's narrow
# categorical forward + gradient; the other heads kernels' wide Gaussian (16-bit) and Gaussian at
# the fp32 / fp64 tiles (two accumulators), categorical for the logsumexp pass; flipout
# (stochastic linear, a second product), DropConnect's per-weight masks, rho with a per-element
# prior (KL).
HEAVIEST = ("narrow/categorical/fwd+grad/", "wide/gaussian/", "fp32/gaussian/", "fp64/gaussian/",
            "wide/categorical/", "fp32/categorical/", "fp64/categorical/", "flipout/", "weight/", "rho+prior/")
# Paths no (kernel, dtype) choice above reaches: sigma_softplus (the SOFTPLUS loads of fwd and
# dx, dw's epilogue) and local's variance + std output.
EXTRA = ("[flipout+softplus/fp32]", "gaussian_linear_fwd [local/fp32]")


def ci_labels() -> list[str]:
    """``kernel [config]`` of the specs CI compiles: one per (kernel, dtype), plus EXTRA."""
    from udn_kernels.triton import aot

    groups = {}
    for _, _, spec in aot.collect_specs():
        groups.setdefault((spec["name"], spec.get("dtype")), []).append(spec)
    chosen = []
    for specs in groups.values():
        ranked = [spec for key in HEAVIEST for spec in specs if key in spec.get("config", "")]
        chosen.append(aot.label((ranked or specs)[0]))
    return chosen + list(EXTRA)


def test_every_kernel_and_dtype_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    from udn_kernels.triton import aot

    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "udn_kernels.triton.aot",
                           "--only", *ci_labels(), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    compiled = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    every_kernel = {spec["name"] for _, _, spec in aot.collect_specs()}
    for kernel in every_kernel:
        dtypes = ({None} if kernel.startswith("philox_") else
                  DTYPES_16_32 | {"fp64"} if kernel in HEADS_AND_KL else DTYPES_16_32)
        assert {(d, a) for k, d, a in compiled if k == kernel} == {
            (d, a) for d in dtypes for a in ("sm_80", "sm_90")}, kernel
    for r in rows:
        assert "error" not in r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0, r
        assert r["shared_bytes"] <= aot.SHARED_LIMIT_BYTES[int(r["arch"][3:])], r
    tensor_core = [r for r in rows if r["kernel"] in HEADS_AND_KL - {"_fused_rows_kernel"}
                   and r["kernel"].startswith("_") and r["dtype"] in ("bf16", "fp16")]
    assert len(tensor_core) == 5 * 2 * 2 and all(r["mma"] and r["cp_async"] for r in tensor_core)
    assert "0 spilling, 0 over the shared-memory limit" in proc.stdout


def test_specs_mirror_the_launch_configs():
    """The AOT specs compile exactly the tiles, warps and stages the launchers use, for the
    dtypes the launchers use them with."""
    import torch
    from udn_kernels.triton import heads, stochastic_linear as sl
    from udn_kernels.triton.aot import label as aot_label
    from udn_kernels.triton.heads_common import CONFIGS, select_config

    shipped = {(kind, name) for kind, configs in CONFIGS.items() for name in configs}
    kinds = {"_fwd_kernel": "fwd", "_bwd_rows_kernel": "bwd_rows", "_bwd_weight_kernel": "bwd_weight",
             "_predict_kernel": "predict", "_fused_rows_kernel": "fused_rows"}
    covered = {(kinds[s["name"]], s["config"].split("/")[0]) for s in heads.AOT_SPECS if s["name"] in kinds}
    assert covered == shipped
    for spec in heads.AOT_SPECS:
        kind = kinds.get(spec["name"], "fwd")  # _lse_kernel launches with the "fwd" configs
        config = CONFIGS[kind][spec["config"].split("/")[0]]
        assert {k: spec["constexprs"].get(k, spec.get(k)) for k in config} == config, aot_label(spec)
    # Each tl.dot config for the dtypes select_config gives it: 16-bit ones bf16 and fp16, "fp32"
    # float32, "fp64" float64; so 6 (config, dtype) pairs per kernel and likelihood. fwd / bwd
    # kernels: categorical and gaussian; predict: also the one-tile categorical path; the
    # logsumexp pass: categorical only; the fused row kernel: 2 configs x 2 likelihoods x 3 pass
    # sets (expected mode's one launch, mixture mode's two) x 4 storage dtypes.
    assert len(heads.AOT_SPECS) == 3 * 2 * 6 + 6 + 3 * 6 + 2 * 2 * 3 * 4
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    for spec in heads.AOT_SPECS:
        kind = kinds.get(spec["name"], "fwd")
        launched = [select_config(kind, classes, dim, torch_dtype[spec["dtype"]])
                    for classes in (16, 4096) for dim in (64, 256)]
        assert CONFIGS[kind][spec["config"].split("/")[0]] in launched, aot_label(spec)
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
