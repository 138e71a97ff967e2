"""Input checks shared by every public op: each error names the argument, the expected and the actual."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Sequence

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
CPU_FLOAT_DTYPES = (torch.float32, torch.float64)
CUDA_FLOAT_DTYPES = (torch.float32, torch.float64) + HALF_DTYPES
MAX_SEED = 2**63 - 1


CHECK_VALUES_ENV = "UDN_KERNELS_CHECK_VALUES"


def checks_values(tensor: torch.Tensor) -> bool:
    """Whether an op runs its data-dependent checks (ranges, signs, finiteness) on ``tensor``:
    eager calls on CPU tensors, where reading a value costs no device synchronisation; on other
    devices only with ``UDN_KERNELS_CHECK_VALUES=1`` (each check would stall the host until the
    device catches up, and break CUDA-graph capture); never inside torch.compile (a graph break)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or os.environ.get(CHECK_VALUES_ENV, "0") == "1"


def float_dtypes_for(device: torch.device) -> tuple[torch.dtype, ...]:
    """Floating dtypes the ops accept on ``device``."""
    return CUDA_FLOAT_DTYPES


def compute_dtype(device: torch.device, **tensors) -> torch.dtype:
    """The dtype an op computes in, from its main inputs (None allowed) — the mixed-precision rule.

    Under ``torch.autocast`` on ``device`` it is the autocast dtype (float32 and 16-bit inputs are
    cast to it, as ``F.linear`` casts them). Otherwise the inputs' one dtype; with inputs of one
    16-bit dtype beside float32/float64 ones, that 16-bit dtype (what autocast would pick); bfloat16
    beside float16, or float32 beside float64, is a TypeError naming the argument.
    """
    given = {name: t.dtype for name, t in tensors.items() if t is not None}
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    halves = {d for d in given.values() if d in HALF_DTYPES}
    if len(halves) > 1:
        name = next(n for n, d in given.items() if d == torch.float16)
        raise TypeError(f"{name}: expected dtype bfloat16 (as the other 16-bit inputs), got float16")
    if halves:
        return halves.pop()
    first_name, first = next(iter(given.items()))
    for name, dtype in given.items():
        if dtype != first:
            raise TypeError(f"{name}: expected dtype {str(first).replace('torch.', '')} "
                            f"(as {first_name}), got {str(dtype).replace('torch.', '')}")
    return first


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators, log-sum-exps and losses of a ``dtype`` computation: float32 for 16-bit."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def autocast_off(device: torch.device):
    """A context where autocast is off on ``device``: the kernels' own ATen calls (``at::mm`` on
    tiles) must not be re-cast once the op has chosen its dtypes."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def check_tensor(name: str, value, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """``value`` must be a Tensor with one of the given ranks and dtypes."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_float_tensor(name: str, value, *, ndim=None) -> torch.Tensor:
    """A floating tensor of a dtype supported on its device."""
    check_tensor(name, value, ndim=ndim)
    return check_tensor(name, value, dtypes=float_dtypes_for(value.device))


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int]) -> None:
    """``value.shape`` must equal ``expected``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) lives on ``reference``'s device."""
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name}: expected device {reference.device} (as {reference_name}), "
                             f"got {value.device}")


def check_same(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None allowed) shares ``reference``'s device and dtype."""
    check_same_device(reference_name, reference, **others)
    for name, value in others.items():
        if value is None:
            continue
        if value.dtype != reference.dtype:
            raise TypeError(f"{name}: expected dtype {reference.dtype} (as {reference_name}), "
                            f"got {value.dtype}")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_samples(samples) -> int | None:
    """``samples`` is None or an int >= 1."""
    if samples is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples: expected an int >= 1 or None, got {type(samples).__name__}")
    if samples < 1:
        raise ValueError(f"samples: expected an int >= 1 or None, got {samples}")
    return samples


def check_probability(name: str, p, *, upper_inclusive: bool = False) -> float:
    """``p`` is a real number in [0, 1) (or [0, 1])."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(p).__name__}")
    ok = 0.0 <= p <= 1.0 if upper_inclusive else 0.0 <= p < 1.0
    if not ok:
        raise ValueError(f"{name}: expected a float in [0, 1{']' if upper_inclusive else ')'}, got {p}")
    return float(p)


def resolve_seed(seed) -> torch.Tensor:
    """A 0-d int64 CPU tensor holding a seed in [0, 2^63).

    ``None`` draws one from torch's default generator (so ``torch.manual_seed`` reproduces runs);
    a tensor keeps the value on the graph, which lets ``torch.compile(fullgraph=True)`` trace it.
    """
    if seed is None:
        return torch.randint(0, MAX_SEED, (), dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected an int or a one-element int64 tensor, got "
                            f"{seed.dtype} tensor of shape {tuple(seed.shape)}")
        # Eager calls check the value; a compiled graph cannot read it without a graph break.
        if not torch.compiler.is_compiling() and not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed: expected a value in [0, 2^63), got {int(seed)}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int in [0, 2^63) or None, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, 2^63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)
