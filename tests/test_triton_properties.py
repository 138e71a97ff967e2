"""The property-based tests of tests/test_properties.py, run against the Triton kernels in the CPU
interpreter (random shapes, dtypes, strides and options; Triton == reference)."""
import os

from triton_interpreter import rerun_under_interpreter


def test_triton_properties_under_interpreter():
    rerun_under_interpreter(os.path.join(os.path.dirname(__file__), "test_properties.py"))
