"""Benchmark cases (DESIGN §6) and the harness shared by `udn bench` and benchmarks/."""
