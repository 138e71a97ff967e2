"""The raw C++ ops ``torch.ops.udn_kernels_C.*`` check their tensor arguments (csrc/checks.h).

Every op is called straight through ``torch.ops`` with one bad argument at a time (wrong shape,
dtype, layout, a mismatched sigma, a wrong bias length, ...) and must raise a RuntimeError naming
the op and the argument; one valid call per op (and non-contiguous input where the op copies it
itself) must pass. The calls run in one child process that prints a JSON line per case, so an
out-of-bounds read that crashes the process fails the cases instead of killing pytest.
"""
import json
import subprocess
import sys

import pytest

from udn_kernels import _backend

pytestmark = pytest.mark.skipif(_backend.load_extension() is None, reason="C++ extension not built")

# Child-side setup: inputs (float64) and one helper per op taking keyword overrides of its arguments.
SETUP = r'''
import torch
import udn_kernels._C  # registers torch.ops.udn_kernels_C
ops = torch.ops.udn_kernels_C
torch.manual_seed(0)
f64 = torch.float64
L, N, D, C = 3, 5, 4, 6
S, B, K, NO = 2, 3, 4, 5
H, W, WL = torch.randn(L, N, D, dtype=f64), torch.randn(C, D, dtype=f64), torch.randn(L, C, D, dtype=f64)
BIAS, BIAS_L = torch.randn(C, dtype=f64), torch.randn(L, C, dtype=f64)
Y, YG, NS = torch.randint(0, C, (N,)), torch.randn(N, C, dtype=f64), torch.rand(C, dtype=f64) + 0.5
GL, LW, RS = torch.randn(L, N, dtype=f64), torch.log_softmax(torch.randn(L, dtype=f64), 0), torch.rand(N, dtype=f64)
AUX = ops.depth_loglik_fwd(H, W, BIAS, Y, None, False, -100)[1]
X, XS = torch.randn(1, B, K, dtype=f64), torch.randn(S, B, K, dtype=f64)
MU, SIG = torch.randn(NO, K, dtype=f64), torch.rand(NO, K, dtype=f64)
BMU, BSIG, GO = torch.randn(NO, dtype=f64), torch.rand(NO, dtype=f64), torch.randn(S, B, NO, dtype=f64)
STD = ops.gaussian_linear_fwd(X, MU, SIG, BMU, BSIG, 1, "local", S, False, False)[1]
PRIOR, G0 = torch.tensor(0.8, dtype=f64), torch.tensor(0.3, dtype=f64)

DEFAULTS = {
    "depth_loglik_fwd": dict(hidden=H, weight=W, bias=BIAS, target=Y, noise_std=None, gaussian=False,
                             ignore_index=-100),
    "depth_loglik_bwd": dict(grad_loglik=GL, hidden=H, weight=W, bias=BIAS, target=Y, noise_std=None, aux=AUX,
                             gaussian=False, ignore_index=-100, grad_mask=[True] * 4),
    "depth_loglik_fwd_bwd": dict(hidden=H, weight=W, bias=BIAS, target=Y, noise_std=None, grad_loglik=GL,
                                 gaussian=False, ignore_index=-100, grad_mask=[True] * 4),
    "depth_loglik_mixture_fwd_bwd": dict(hidden=H, weight=W, bias=BIAS, target=Y, noise_std=None, log_weights=LW,
                                         row_scale=RS, gaussian=False, ignore_index=-100, grad_mask=[True] * 4),
    "depth_mixture_predict": dict(hidden=H, weight=W, bias=BIAS, log_weights=LW, gaussian=False, noise_std=None),
    "gaussian_linear_fwd": dict(x=X, weight_mu=MU, weight_sigma=SIG, bias_mu=BMU, bias_sigma=BSIG, seed=1,
                                estimator="sample", samples=S, x_sampled=False, sigma_softplus=False),
    "gaussian_linear_bwd": dict(grad_out=GO, x=X, weight_mu=MU, weight_sigma=SIG, bias_mu=BMU, bias_sigma=BSIG,
                                std=torch.empty(0, dtype=f64), seed=1, estimator="sample", samples=S,
                                x_sampled=False, sigma_softplus=False, grad_mask=[True] * 5),
    "bernoulli_linear_fwd": dict(x=X, weight=MU, bias=BMU, p=0.5, seed=1, mask="weight", samples=S,
                                 x_sampled=False),
    "bernoulli_linear_bwd": dict(grad_out=GO, x=X, weight=MU, bias=BMU, p=0.5, seed=1, mask="weight", samples=S,
                                 x_sampled=False, grad_mask=[True] * 3),
    "gaussian_kl_fwd": dict(mu=MU, sigma=SIG, prior_std=PRIOR, sigma_softplus=False),
    "gaussian_kl_bwd": dict(grad=G0, mu=MU, sigma=SIG, prior_std=PRIOR, sigma_softplus=False,
                            grad_mask=[True, True, True]),
    "log_uniform_kl_fwd": dict(log_alpha=MU, min=-1.0, max=1.0),
    "log_uniform_kl_bwd": dict(grad=G0, log_alpha=MU, min=-1.0, max=1.0),
}


def call(op, **overrides):
    args = dict(DEFAULTS[op], **overrides)
    return getattr(ops, op)(*args.values())


def shrunk(t):  # last dim one shorter
    return t[..., :-1].contiguous()


def other_dtype(t):  # float64 -> float32, int64 -> int32
    return t.float() if t.dtype == f64 else t.to(torch.int32)


def strided(t):  # same values, not contiguous
    return torch.stack([t, t], -1)[..., 0]
'''

# Child-side loop: one JSON line per case, flushed, so a crash leaves the earlier results.
RUN = r'''
import json, sys
for name, expr in json.loads(sys.stdin.read()):
    try:
        eval(expr)
        result = {"name": name, "error": None, "message": ""}
    except Exception as exc:  # the case asserts the type and message
        result = {"name": name, "error": type(exc).__name__, "message": str(exc).splitlines()[0]}
    print(json.dumps(result), flush=True)
'''

HEADS_OPS = ("depth_loglik_fwd", "depth_loglik_bwd", "depth_loglik_fwd_bwd", "depth_loglik_mixture_fwd_bwd")
GAUSSIAN_HEADS = {"gaussian": "True", "target": "YG", "noise_std": "NS"}
LOCAL = {"gaussian_linear_fwd": {"estimator": "'local'"},
         "gaussian_linear_bwd": {"estimator": "'local'", "std": "STD"}}
# (op, tensor argument, a valid value, the call's other overrides): each gets a valid, a wrong-shape,
# a wrong-dtype and a non-contiguous case.
TENSOR_ARGS = [
    *[(op, arg, value, {}) for op in HEADS_OPS
      for arg, value in (("hidden", "H"), ("weight", "W"), ("bias", "BIAS"), ("target", "Y"))],
    *[(op, arg, value, GAUSSIAN_HEADS) for op in HEADS_OPS for arg, value in (("target", "YG"), ("noise_std", "NS"))],
    ("depth_loglik_fwd", "weight", "WL", {}),
    ("depth_loglik_fwd", "bias", "BIAS_L", {}),
    ("depth_loglik_bwd", "grad_loglik", "GL", {}),
    ("depth_loglik_bwd", "aux", "AUX", {}),
    ("depth_loglik_fwd_bwd", "grad_loglik", "GL", {}),
    ("depth_loglik_mixture_fwd_bwd", "log_weights", "LW", {}),
    ("depth_loglik_mixture_fwd_bwd", "row_scale", "RS", {}),
    *[("depth_mixture_predict", arg, value, {}) for arg, value in
      (("hidden", "H"), ("weight", "W"), ("bias", "BIAS"), ("log_weights", "LW"))],
    ("depth_mixture_predict", "noise_std", "NS", {"gaussian": "True"}),
    *[(op, arg, value, extra) for op in ("gaussian_linear_fwd", "gaussian_linear_bwd")
      for extra in ({"estimator": "'sample'"}, LOCAL[op], {"estimator": "'flipout'"})
      for arg, value in (("x", "X"), ("weight_mu", "MU"), ("weight_sigma", "SIG"), ("bias_mu", "BMU"),
                         ("bias_sigma", "BSIG"))],
    ("gaussian_linear_bwd", "grad_out", "GO", {}),
    ("gaussian_linear_bwd", "std", "STD", {"estimator": "'local'"}),
    *[(op, arg, value, {"mask": f"'{mask}'"}) for op in ("bernoulli_linear_fwd", "bernoulli_linear_bwd")
      for mask in ("input", "weight", "symmetric")
      for arg, value in (("x", "X"), ("weight", "MU"), ("bias", "BMU"))],
    ("bernoulli_linear_bwd", "grad_out", "GO", {}),
    *[(op, arg, value, {}) for op in ("gaussian_kl_fwd", "gaussian_kl_bwd")
      for arg, value in (("sigma", "SIG"), ("mu", "MU"), ("prior_std", "SIG"))],
    ("log_uniform_kl_fwd", "log_alpha", "MU", {}),
    ("log_uniform_kl_bwd", "log_alpha", "MU", {}),
]
# The first tensor argument sets the dtype and sizes the others are checked against: its wrong dtype
# is a non-float one, and a wrong shape of it is reported on the argument it then mismatches
# (the explicit cases below).
REFERENCE_ARGS = ("hidden", "x", "sigma", "log_alpha")
# Arguments the op copies into contiguous memory itself: any layout is valid.
ANY_LAYOUT = {("depth_mixture_predict", a) for a in ("hidden", "weight", "bias", "log_weights", "noise_std")} | {
    ("gaussian_linear_bwd", "grad_out"), ("gaussian_linear_bwd", "std"), ("bernoulli_linear_bwd", "grad_out")}


def _overrides(overrides):
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def _call(op, overrides):
    return f"call('{op}', {_overrides(overrides)})"


def _cases():
    """{name: (expression, expected message fragment, or None for a call that must pass)}."""
    cases = {}
    for op, arg, value, extra in TENSOR_ARGS:
        tag = f"{op} {arg}" + (f" ({_overrides(extra)})" if extra else "")
        with_value = lambda v: _call(op, {**extra, arg: v})  # noqa: E731
        cases[f"{tag} valid"] = (with_value(value), None)
        if arg not in REFERENCE_ARGS:
            cases[f"{tag} shape"] = (with_value(f"shrunk({value})"), f"{op}: {arg}: expected shape")
        bad_dtype = f"{value}.to(torch.int32)" if arg in REFERENCE_ARGS else f"other_dtype({value})"
        cases[f"{tag} dtype"] = (with_value(bad_dtype), f"{op}: {arg}: expected dtype")
        layout_expect = None if (op, arg) in ANY_LAYOUT else f"{op}: {arg}: expected a contiguous tensor"
        cases[f"{tag} non-contiguous"] = (with_value(f"strided({value})"), layout_expect)
    explicit = [
        ("depth_loglik_fwd", {"hidden": "H[0]"}, "hidden: expected 3 dims"),
        ("depth_loglik_fwd", {"hidden": "shrunk(H)"}, "weight: expected shape"),
        ("depth_loglik_fwd", {"weight": "W[0]"}, "weight: expected 2 or 3 dims"),
        ("depth_loglik_fwd", {"weight": "WL[:2]"}, "weight: expected shape"),  # per-depth head of another L
        ("depth_loglik_bwd", {"aux": "AUX[:, :-1]"}, "aux: expected shape"),
        ("depth_loglik_fwd_bwd", {"grad_loglik": "GL.reshape(-1)"}, "grad_loglik: expected shape"),
        ("depth_loglik_mixture_fwd_bwd", {"row_scale": "RS[:-1]"}, "row_scale: expected shape"),
        # grad_mask: any subset of the gradients, none included (arguments checked all the same)
        *[(op, {"grad_mask": mask, **extra}, None) for op in HEADS_OPS[1:]
          for mask in ("[False, True, False, False]", "[True, False, True, False]", "[False] * 4")
          for extra in ({}, GAUSSIAN_HEADS)],
        ("depth_loglik_bwd", {"grad_mask": "[False] * 4", "aux": "AUX[:, :-1]"}, "aux: expected shape"),
        ("depth_mixture_predict", {"hidden": "H[0]"}, "hidden: expected 3 dims"),
        ("depth_mixture_predict", {"bias": "BIAS_L[:2]"}, "bias: expected shape"),
        ("gaussian_linear_fwd", {"x": "shrunk(X)"}, "weight_sigma: expected shape"),  # sigma mismatched with x
        ("gaussian_linear_fwd", {"x": "X[0]"}, "x: expected 3 dims"),
        ("gaussian_linear_fwd", {"x_sampled": "True"}, "x: expected shape"),  # x not [S, B, K]
        ("gaussian_linear_fwd", {"x": "XS", "x_sampled": "True"}, None),
        ("gaussian_linear_fwd", {"samples": "0"}, "samples: expected >= 1"),
        ("gaussian_linear_fwd", {"estimator": "'reparam'"}, "estimator: expected"),
        ("gaussian_linear_bwd", {"estimator": "'reparam'"}, "estimator: expected"),
        ("gaussian_linear_bwd", {"estimator": "'local'", "std": "STD.expand(S, B, NO)"}, "std: expected shape"),
        ("gaussian_linear_bwd", {"grad_out": "GO[:1]"}, "grad_out: expected shape"),
        # grad_mask: any subset of the gradients is a valid call
        ("gaussian_linear_bwd", {"grad_mask": "[False] * 5"}, None),
        ("gaussian_linear_bwd", {"grad_mask": "[False, True, False, True, False]"}, None),
        ("gaussian_linear_bwd", {"grad_mask": "[True, False, True, False, True]", "estimator": "'local'",
                                 "std": "STD"}, None),
        ("gaussian_linear_bwd", {"grad_mask": "[False, True, True, False, False]", "estimator": "'flipout'"}, None),
        ("bernoulli_linear_fwd", {"x": "shrunk(X)"}, "weight: expected shape"),
        ("bernoulli_linear_fwd", {"x": "XS", "x_sampled": "True"}, None),
        ("bernoulli_linear_fwd", {"p": "1.0"}, "p: expected a probability"),
        ("bernoulli_linear_bwd", {"p": "-0.5"}, "p: expected a probability"),
        ("bernoulli_linear_bwd", {"grad_mask": "[True, False, False]"}, None),
        ("bernoulli_linear_bwd", {"grad_mask": "[False, True, True]", "mask": "'input'"}, None),
        ("bernoulli_linear_fwd", {"samples": "0"}, "samples: expected >= 1"),
        ("bernoulli_linear_fwd", {"mask": "'dropout'"}, "unknown mask"),
        ("gaussian_kl_fwd", {"mu": "None"}, None),
        ("gaussian_kl_fwd", {"prior_std": "PRIOR.reshape(1, 1)"}, None),  # one element: the scalar prior
        ("gaussian_kl_fwd", {"prior_std": "SIG[:1]"}, "prior_std: expected shape"),  # a row: not expanded
        ("gaussian_kl_bwd", {"grad": "G0.reshape(1)"}, "grad: expected shape"),
        ("gaussian_kl_bwd", {"grad": "G0.float()"}, "grad: expected dtype"),
        ("log_uniform_kl_fwd", {"min": "2.0"}, "clamp: expected min <= max"),
        ("log_uniform_kl_bwd", {"grad": "G0.reshape(1)"}, "grad: expected shape"),
    ]
    for op, overrides, fragment in explicit:
        expect = None if fragment is None else (fragment if fragment == "unknown mask" else f"{op}: {fragment}")
        cases[f"{op} {_overrides(overrides)}"] = (_call(op, overrides), expect)
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def results():
    """Runs every case in one child process; {name: result} of the cases it finished."""
    proc = subprocess.run([sys.executable, "-c", SETUP + RUN], input=json.dumps([(n, e) for n, (e, _) in CASES.items()]),
                          capture_output=True, text=True, timeout=600)
    finished = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    return finished, proc


@pytest.mark.parametrize("name", list(CASES))
def test_op_checks(results, name):
    finished, proc = results
    assert name in finished, (f"the child died before or in this case (exit code {proc.returncode}): "
                              f"{proc.stderr[-2000:]}")
    result = finished[name]
    expected = CASES[name][1]
    if expected is None:
        assert result["error"] is None, f"valid call rejected: {result['error']}: {result['message']}"
    else:
        assert result["error"] == "RuntimeError", f"expected a RuntimeError, got {result}"
        assert expected in result["message"], result["message"]
