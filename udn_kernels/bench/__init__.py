"""Benchmark cases (docs/design.md, "Benchmarks") and the harness shared by `udn bench` and benchmarks/."""
