"""The mixed-precision rule every op applies (``_checks.compute_dtype``), on its own."""
import pytest
import torch

from udn_kernels._checks import accumulate_dtype, autocast_off, compute_dtype

CPU = torch.device("cpu")


def t(dtype):
    return torch.zeros(2, dtype=dtype)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("other", [torch.float32, torch.float64])
def test_a_16_bit_input_beside_wider_ones_sets_the_compute_dtype(half, other):
    assert compute_dtype(CPU, hidden=t(half), weight=t(other), bias=None) == half
    assert compute_dtype(CPU, hidden=t(other), weight=t(half), bias=t(other)) == half
    assert accumulate_dtype(half) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_shared_dtype_is_kept(dtype):
    assert compute_dtype(CPU, x=t(dtype), weight=t(dtype)) == dtype
    assert accumulate_dtype(dtype) == dtype


@pytest.mark.parametrize("dtypes,message", [
    ((torch.bfloat16, torch.float16), "weight: expected dtype bfloat16 (as the other 16-bit inputs), got float16"),
    ((torch.float32, torch.float64), "weight: expected dtype float32 (as hidden), got float64"),
])
def test_incompatible_mixes_name_the_argument(dtypes, message):
    with pytest.raises(TypeError) as info:
        compute_dtype(CPU, hidden=t(dtypes[0]), weight=t(dtypes[1]))
    assert str(info.value) == message


def test_autocast_dtype_wins_and_autocast_off_stops_recasting_inside_the_kernels():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(CPU, hidden=t(torch.float32), weight=t(torch.float32)) == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
        with autocast_off(CPU):
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
