"""Ahead-of-time compile every shipped Triton kernel config for sm_80 and sm_90 (no GPU needed).

    python -m udn_kernels.triton.aot [--arch 80 90] [--only SUBSTRING ...] [--json FILE] [--jobs N]

Collects ``AOT_SPECS`` from the modules of ``udn_kernels/triton``: dicts ``name, fn, signature,
constexprs`` and optionally ``config`` (a label), ``dtype`` (the storage dtype, Triton's name;
absent for the Philox fills, whose output dtype is fixed), ``attrs`` (ASTSource argument
attributes such as ``tt.divisibility``), ``num_warps``, ``num_stages``. Compiles each with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and prints registers,
spill stores/loads, stack frame and shared memory per kernel/config/arch. Registers, spills and
stack frame come from the bundled ``ptxas -v`` on the compiled PTX (a stack frame alone is not a
spill: ``tl.randn``'s libdevice ``cosf`` keeps a 28-byte local array); shared memory is Triton's
dynamic shared allocation from the kernel metadata, checked against the arch's per-block limit
(``SHARED_LIMIT_BYTES``). Exit status 1 on any compile failure, spill store or shared-memory
overrun.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

MODULES = ("heads", "kl", "rng", "stochastic_linear")
ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (CUDA's opt-in maximum per block): a config above
# it compiles but fails at launch.
SHARED_LIMIT_BYTES = {80: 163 * 1024, 90: 227 * 1024}


def collect_specs(modules=MODULES) -> list[tuple[str, int, dict]]:
    """``(module, index, spec)`` for every ``AOT_SPECS`` entry of the existing kernel modules."""
    found = []
    for name in modules:
        try:
            module = importlib.import_module(f"udn_kernels.triton.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"udn_kernels.triton.{name}":
                raise
            continue
        found += [(name, i, spec) for i, spec in enumerate(getattr(module, "AOT_SPECS", ()))]
    return found


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True) -> dict:
    """``{"registers", "spill_stores", "spill_loads", "stack"}`` (bytes) of the kernel in ``ptx``.

    Re-runs the bundled ptxas with the flags Triton's ``make_cubin`` uses (Triton deletes its own
    ``-v`` log, and ``CompiledKernel.n_spills`` is only filled in when a GPU loads the cubin).
    Spills come from ptxas's "spill stores/loads" counts, not from the stack frame: libdevice
    functions such as ``cosf`` (used by ``tl.randn``) keep a local array on the stack.
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if frame is None or registers is None:
        raise RuntimeError(f"unparsed ptxas -v output:\n{log}")
    return {"registers": int(registers[1]), "stack": int(frame[1]), "spill_stores": int(frame[2]),
            "spill_loads": int(frame[3])}


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile spec ``index`` of ``module`` for ``sm_<arch>``; a result row (``error`` set on failure)."""
    spec = dict(importlib.import_module(f"udn_kernels.triton.{module}").AOT_SPECS[index])
    row = {"kernel": spec["name"], "config": spec.get("config", ""), "dtype": spec.get("dtype"),
           "arch": f"sm_{arch}", "num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import ASTSource

        source = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                           attrs=spec.get("attrs"))
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": row["num_warps"], "num_stages": row["num_stages"]})
        row.update(ptxas_usage(compiled.asm["ptx"], arch, compiled.metadata.enable_fp_fusion),
                   shared_bytes=compiled.metadata.shared,
                   wgmma="wgmma" in compiled.asm["ptx"], mma="mma" in compiled.asm["ptx"],
                   cp_async="cp.async" in compiled.asm["ptx"])
    except Exception:  # noqa: BLE001 - reported as a failed row, the tool exits non-zero
        row["error"] = traceback.format_exc(limit=-3)
    return row


def label(spec: dict) -> str:
    """``"name [config]"``: what ``--only`` substrings match (brackets pin a whole config)."""
    return f"{spec['name']} [{spec.get('config', '')}]"


def run(archs=ARCHS, only=None, jobs: int | None = None, modules=MODULES) -> list[dict]:
    """Compile every collected spec (whose label contains one of the ``only`` substrings, if
    given) for every arch, in ``jobs`` processes; rows in spec order."""
    only = [only] if isinstance(only, str) else only
    tasks = [(module, i, arch) for module, i, spec in collect_specs(modules)
             if not only or any(o in label(spec) for o in only)
             for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_one(*t) for t in tasks]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_one, *zip(*tasks))) if tasks else []


def format_table(rows: list[dict]) -> str:
    """Fixed-width table: kernel, config, arch, warps/stages, registers, spill stores/loads, stack
    frame, shared memory,
    MMA flavour (wgmma / mma.sync / fma) and whether loads are software-pipelined (cp.async)."""
    header = ("kernel", "config", "arch", "warps", "stages", "regs", "spill st B", "spill ld B",
              "stack B", "shared B", "mma", "cp.async")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append((r["kernel"], r["config"], r["arch"], "", "", "FAILED") + ("",) * 6)
            continue
        mma = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "fma")
        lines.append((r["kernel"], r["config"], r["arch"], str(r["num_warps"]), str(r["num_stages"]),
                      str(r["registers"]), str(r["spill_stores"]), str(r["spill_loads"]),
                      str(r["stack"]), str(r["shared_bytes"]), mma,
                      "yes" if r["cp_async"] else "no"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m udn_kernels.triton.aot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="SM versions (default 80 90)")
    parser.add_argument("--only", nargs="+", metavar="SUBSTRING",
                        help="compile only specs whose 'kernel [config]' contains one of these")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPUs)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    rows = run(args.arch, args.only, args.jobs)
    if not rows:
        print("no AOT_SPECS found", file=sys.stderr)
        return 1
    print(format_table(rows))
    failures = [r for r in rows if "error" in r]
    spills = [r for r in rows if r.get("spill_stores")]
    overruns = [r for r in rows if r.get("shared_bytes", 0) > SHARED_LIMIT_BYTES[int(r["arch"][3:])]]
    for r in failures:
        print(f"\nFAILED {r['kernel']} [{r['config']}] {r['arch']}:\n{r['error']}", file=sys.stderr)
    for r in spills:
        print(f"SPILL {r['kernel']} [{r['config']}] {r['arch']}: {r['spill_stores']} bytes stored, "
              f"{r['spill_loads']} bytes loaded", file=sys.stderr)
    for r in overruns:
        print(f"SHARED {r['kernel']} [{r['config']}] {r['arch']}: {r['shared_bytes']} bytes > "
              f"{SHARED_LIMIT_BYTES[int(r['arch'][3:])]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"\n{len(rows)} compiles, {len(failures)} failed, {len(spills)} spilling, "
          f"{len(overruns)} over the shared-memory limit")
    return 1 if failures or spills or overruns else 0


if __name__ == "__main__":
    sys.exit(main())
