"""The `udn` command, each subcommand run small."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from udn_kernels import _cli_support, cli
from udn_kernels.bench import cases, harness


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "udn_kernels", *args], capture_output=True, text=True)


def test_info_reports_backends_and_isa():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    isa = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    assert "cpu=yes" in out.stdout and f"C++ ISA       {isa}" in out.stdout
    assert f"C++ module    udn_kernels._C_{isa}" in out.stdout and f"-m{isa.replace('512', '512f')}" in out.stdout
    no_avx512 = subprocess.run([sys.executable, "-m", "udn_kernels", "info"], capture_output=True, text=True,
                               env={**os.environ, "UDN_KERNELS_NO_AVX512": "1"})
    assert "C++ module    udn_kernels._C_avx2\n" in no_avx512.stdout and "C++ ISA       avx2" in no_avx512.stdout
    portable = subprocess.run([sys.executable, "-m", "udn_kernels", "info"], capture_output=True, text=True,
                              env={**os.environ, "UDN_KERNELS_NO_AVX2": "1"})
    assert "C++ module    udn_kernels._C\n" in portable.stdout and "C++ ISA       generic" in portable.stdout
    assert "-mavx2" not in portable.stdout


def _table_cells(table: str) -> list[list[str]]:
    """Cells of every line of a results table, split where two or more spaces separate them."""
    return [re.split(r" {2,}", line.strip()) for line in table.splitlines() if not line.startswith("-")]


def test_bench_quick_writes_json_plot_progress_and_table(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = cli.main(["bench", "--quick", "--cases", "rng", "heads-small", "--repeats", "1",
                     "--no-memory", "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert set(data["cases"]) == {"rng", "heads-small"}
    methods = {t["method"]: t for t in data["cases"]["heads-small"]}
    assert {"udn_kernels", "eager", "3-GEMM floor"} <= set(methods)
    assert all(t["total_ms"] > 0 for t in methods.values())
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stdout, stderr = capsys.readouterr()
    # Progress on stderr: a line per case, then one per method as it is measured, in order.
    expected = []
    for index, case in enumerate(("rng", "heads-small"), 1):
        names = [t["method"] for t in data["cases"][case]]
        expected.append(f"[{index}/2] {case}: {len(names)} methods")
        expected += [f"[{index}/2] {case} {i}/{len(names)} {name}: total " for i, name in enumerate(names, 1)]
    progress = [line for line in stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len(expected) and all(p.startswith(e) for p, e in zip(progress, expected))
    # The table on stdout: every row has all its cells, separated (no peak MB with --no-memory).
    table = stdout[:stdout.index("ours x: total time")]
    header, *rows = _table_cells(table)
    assert header == list(harness.TABLE_HEADER[:-1])
    assert [row[:2] for row in rows] == [[case, t["method"]] for case in ("rng", "heads-small")
                                         for t in data["cases"][case]]
    assert all(len(row) == len(header) for row in rows)


def test_bench_table_columns_fit_the_longest_names():
    # "heads-predict" once ran into its method name: widths must come from the content.
    long_method = "torch.compile(eager) of a long name"
    results = {"heads-predict": [harness.Timing("udn_kernels", "ours", 1.5, None, 2.0, 12.0),
                                 harness.Timing(long_method, "peer", 1000.25, 2.0, 3000.5, None),
                                 harness.Timing("1-GEMM floor", "floor", 1.0, None, 1.0, 0.0)]}
    header, *rows = _table_cells(harness.format_table(results))
    assert header == list(harness.TABLE_HEADER)
    assert rows == [["heads-predict", "udn_kernels", "1.50", "-", "2.00", "-", "2.00", "12.0"],
                    ["heads-predict", long_method, "1000.25", "2.00", "3000.50", "1500.25", "3000.50", "-"],
                    ["heads-predict", "1-GEMM floor", "1.00", "-", "1.00", "0.50", "-", "0.0"]]


def test_bench_every_case_builds_and_ours_matches_eager_value():
    # The peers must compute the same loss as ours, or the comparison is meaningless.
    for name in ("heads-small", "heads-lm"):
        methods = {m.name: m for m in cases.build(name, quick=True)}
        ours, eager = methods["udn_kernels"].forward().item(), methods["eager"].forward().item()
        assert abs(ours - eager) <= 1e-4 * abs(eager), name
    methods = {m.name: m for m in cases.build("heads-predict", quick=True)}
    torch.testing.assert_close(methods["udn_kernels"].forward(), methods["eager"].forward(), rtol=1e-5, atol=1e-7)


def test_memory_probe_measures_a_known_allocation():
    method = harness.Method("alloc", lambda: __import__("torch").ones(64 * 2**20 // 4) * 2.0,
                            backward=False)
    peak = harness.measure_peak_in_this_process(method)
    assert 60 <= peak <= 200  # one 64 MiB tensor (plus the `ones` input) must show


def test_bench_unknown_case_is_a_clear_error():
    out = run_cli("bench", "--cases", "nope")
    assert out.returncode == 2 and "unknown case 'nope'" in out.stderr


def test_unwritable_output_path_is_a_clear_error():
    out = run_cli("bench", "--cases", "rng", "--json", "/nonexistent-dir/x.json")
    assert out.returncode == 2 and "cannot write" in out.stderr


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(_cli_support.CLIError, match=r"udn_kernels\[experiments\]"):
        _cli_support.import_optional("surely_not_installed_module", "experiments")


def test_train_unknown_dataset_is_a_clear_error():
    out = run_cli("train", "imagenet", "--epochs", "1")
    assert out.returncode == 2 and "expected spirals, digits, diabetes" in out.stderr


@pytest.mark.parametrize("dataset", ["spirals", "diabetes"])
def test_train_runs_and_saves_checkpoint_and_plot(tmp_path, dataset):
    png = tmp_path / "q.png"
    out = run_cli("train", dataset, "--epochs", "2", "--width", "16", "--out", str(tmp_path / "ckpt"),
                  "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "ckpt" / "model.pt").exists() and png.exists()
    assert "E[depth]" in out.stdout


def test_train_csv(tmp_path):
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{'yes' if i % 2 else 'no'}" for i in range(60)]
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows))
    out = run_cli("train", str(path), "--epochs", "1", "--width", "8")
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout


def test_bench_cuda_device_without_gpu_is_a_clear_error():
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: this checks the error on machines without one")
    out = run_cli("bench", "--cases", "rng", "--device", "cuda")
    assert out.returncode == 2 and "no CUDA device is available" in out.stderr


def test_bench_inputs_follow_the_device():
    # On CUDA the same cases must build their inputs on the GPU (so the Triton kernels run);
    # the meta device shows that every tensor factory follows the device context.
    methods = cases.build("gauss-linear", quick=True, device="meta")
    out = next(m for m in methods if m.name == "eager sample").forward()
    assert out.device.type == "meta"


def test_timed_steps_assign_gradients_instead_of_accumulating():
    # Each timed forward+backward starts from .grad = None (as optimizer.zero_grad() leaves it), so
    # after any number of repeats a leaf holds exactly one step's gradient; the graph walk finds
    # leaves behind views and several ops, and not tensors that do not require grad.
    import torch
    x, w = torch.ones(3, requires_grad=True), torch.full((3,), 2.0, requires_grad=True)
    const = torch.ones(3)
    timing = harness.time_method(harness.Method("m", lambda: (x.view(3, 1) * w.view(3, 1) * const[:, None])),
                                 warmup=2, repeats=3, min_time=0.0)
    assert timing.backward_ms is not None
    assert torch.equal(x.grad, w.detach()) and torch.equal(w.grad, x.detach())
    assert const.grad is None
