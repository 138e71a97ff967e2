"""Ahead-of-time compile of the Triton depth-head kernels for sm_80 and sm_90 (no GPU needed).

Runs ``python -m udn_kernels.triton.aot`` in a subprocess (a clean Triton import: other test
modules may run with TRITON_INTERPRET=1) for one shipped config of each heads kernel, and checks
the resource table: every compile succeeds, nothing spills, sm_90 uses wgmma and sm_80 mma.sync.
"""
import json
import os
import subprocess
import sys

HEADS_KERNELS = {"_fwd_kernel", "_bwd_rows_kernel", "_bwd_weight_kernel"}


def test_heads_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The gaussian configs carry the most live state (targets, noise, two gradients).
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "udn_kernels.triton.aot",
                           "--only", "narrow/gaussian", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in HEADS_KERNELS for a in ("sm_80", "sm_90")}
    for r in rows:
        assert "error" not in r
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0, r
        assert r["wgmma"] == (r["arch"] == "sm_90"), r
        assert r["mma"], r
    assert "sm_90" in proc.stdout and "0 spilling" in proc.stdout


def test_specs_cover_every_shipped_config():
    from udn_kernels.triton import heads

    shipped = {(kind, name) for kind, configs in heads.CONFIGS.items() for name in configs}
    kinds = {"_fwd_kernel": "fwd", "_bwd_rows_kernel": "bwd_rows", "_bwd_weight_kernel": "bwd_weight"}
    covered = {(kinds[s["name"]], s["config"].split("/")[0]) for s in heads.AOT_SPECS}
    assert covered == shipped
    assert len(heads.AOT_SPECS) == 2 * len(shipped)  # categorical and gaussian each


def test_tool_exits_nonzero_on_spill_or_failure(monkeypatch, capsys):
    from udn_kernels.triton import aot

    ok = {"kernel": "k", "config": "c", "arch": "sm_80", "num_warps": 4, "num_stages": 2,
          "registers": 64, "spill_bytes": 0, "shared_bytes": 1024, "wgmma": False, "mma": True,
          "cp_async": True}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for rows, code in (([ok], 0), ([dict(ok, spill_bytes=8)], 1),
                       ([ok, {"kernel": "k", "config": "c", "arch": "sm_90", "error": "boom"}], 1)):
        monkeypatch.setattr(aot, "run", lambda *args, rows=rows: rows)
        assert aot.main([]) == code
    out = capsys.readouterr()
    assert "FAILED" in out.out and "boom" in out.err and "SPILL k [c] sm_80: 8 bytes" in out.err
