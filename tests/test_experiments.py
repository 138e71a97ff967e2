"""`udn experiment NAME --quick`: every reproduction runs, writes its PNG and JSON, and the
properties a tiny run can already show hold."""
import json
import math
import subprocess
import sys

import pytest
import torch

from udn_kernels import cli
from udn_kernels.experiments import EXPERIMENTS
from udn_kernels.experiments.bayesianize import shuffled_pixels
from udn_kernels.experiments.diffusion_resnet import PreActResidual

NAMES = ["depth-vs-complexity", "udn-vs-fixed", "mc-dropout", "variance-network", "diffusion-resnet", "bayesianize"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Run every quick experiment once in this process; ``{name: (json dict, png path)}``."""
    out = tmp_path_factory.mktemp("experiments")
    results = {}
    for name in NAMES:
        threads = torch.get_num_threads()
        assert cli.main(["experiment", name, "--quick", "--out", str(out), "--seed", "0"]) == 0
        assert torch.get_num_threads() == threads  # the single-thread setting is restored
        results[name] = (json.loads((out / f"{name}.json").read_text()), out / f"{name}.png")
    return results


def test_registry_lists_every_experiment():
    assert set(NAMES) <= set(EXPERIMENTS)


def test_unknown_experiment_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "udn_kernels", "experiment", "nope"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "expected one of" in out.stderr and "mc-dropout" in out.stderr


@pytest.mark.parametrize("name", NAMES)
def test_writes_png_and_json(outputs, name):
    data, png = outputs[name]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["experiment"] == name and data["quick"] is True and data["seed"] == 0


def test_diffusion_scaling_keeps_inputs_apart(outputs):
    data, _ = outputs["diffusion-resnet"]
    iid, diffusion, post = data["iid"], data["diffusion"], data["mlp_post_act"]
    # i.i.d. branches: the correlation of two orthogonal inputs climbs towards 1 with depth ...
    assert iid[-1] > 0.75 and iid[-1] > iid[0] + 0.5
    # ... the 1/sqrt(L) scaling keeps it near its depth-1 value (the gap is large even at L = 100).
    assert max(diffusion) < 0.35 and iid[-1] - diffusion[-1] > 0.5
    # A post-activation (non-zero-mean) ReLU branch drifts: 1/sqrt(L) does not save it.
    assert post[-1] > 0.9


def test_pre_activation_block_is_identity_plus_scaled_branch():
    block = PreActResidual(4, 0.25)
    h = torch.randn(3, 4)
    expected = h + 0.25 * block.linear(torch.relu(h))
    torch.testing.assert_close(block(h), expected)


def test_depth_vs_complexity_posterior_is_a_distribution(outputs):
    data, _ = outputs["depth-vs-complexity"]
    assert data["phases"] == [0, 3]
    for run in data["runs"]:
        assert math.isclose(sum(run["q"]), 1.0, rel_tol=1e-5)
        expected = sum((l + 1) * q for l, q in enumerate(run["q"]))
        assert math.isclose(run["E[l]"], expected, rel_tol=1e-5) and run["E[l]"] >= 1.0
    straight = next(r for r in data["runs"] if r["phase"] == 0)
    assert straight["accuracy"] > 0.9  # two opposite rays are separable after a few epochs


def test_udn_vs_fixed_reports_every_model(outputs):
    data, _ = outputs["udn-vs-fixed"]
    digits, diabetes = data["results"]["digits (MLP)"], data["results"]["diabetes (MLP)"]
    assert set(digits["summary"]) == {"udn", "d=1", "d=3"}
    assert digits["runs"]["udn"][0]["accuracy"] > 0.5 and digits["runs"]["udn"][0]["E[l]"] >= 1.0
    # Standardised targets: a useful regressor has RMSE below the target std of 1 (plus slack).
    assert all(0 < r["rmse"] < 1.2 for runs in diabetes["runs"].values() for r in runs)
    assert "digits 8x8 (ResNet)" in data["results"]
    # Every model is scored at its best-validation-NLL epoch, within the trained epochs.
    epochs = data["config"]["diabetes"]["epochs"]
    for runs in diabetes["runs"].values():
        assert all(1 <= r["epoch"] <= epochs and math.isfinite(r["val_nll"]) for r in runs)
    verdict = data["verdicts"]["diabetes (MLP)"]["rmse"]
    paired, _ = verdict["udn minus best (paired)"]
    assert math.isclose(paired, verdict["udn"] - verdict["best fixed value"], abs_tol=1e-6)


def test_mc_averaging_lowers_the_nll(outputs):
    data, _ = outputs["mc-dropout"]
    mc = data["mc"]
    t_max = max(mc, key=int)
    assert mc[t_max]["nll"] < mc["1"]["nll"] - 0.1
    assert mc[t_max]["accuracy"] >= mc["1"]["accuracy"]
    assert data["weight_scaling"]["accuracy"] > 0.8


def test_variance_networks_mean_prediction_is_constant(outputs):
    data, _ = outputs["variance-network"]
    results = data["results"]
    # Zero-mean hidden weights: the mean-weight network outputs one class for every input,
    # so its accuracy is that class's frequency (about 1/10 on digits).
    for kind in ("gaussian", "bernoulli"):
        assert results[kind]["deterministic"]["accuracy"] < 0.15
    assert results["dropout"]["deterministic"]["accuracy"] > 0.8
    # ... while sampling reads the information stored in the variances (6 epochs: MC 0.47).
    gaussian = results["gaussian"]
    assert gaussian["MC 8"]["accuracy"] > gaussian["deterministic"]["accuracy"] + 0.2


def test_bayesianize_scores_every_predictor(outputs):
    data, _ = outputs["bayesianize"]
    results = data["results"]
    assert len(results) == 4
    for name, r in results.items():
        assert r["accuracy"] > 0.5, name
        # shuffled pixels carry no digit: every predictor is less certain about them
        assert r["ood_entropy"] > r["entropy"] + 0.1, name
        bins = r["reliability"]
        n = sum(bins["count"])  # the reliability bins hold every test point, and agree with the accuracy
        assert math.isclose(sum(c * a for c, a in zip(bins["count"], bins["accuracy"])) / n, r["accuracy"],
                            rel_tol=1e-6)  # the accuracy is a float32 mean


def test_shuffled_pixels_permute_each_row():
    x = torch.arange(24.0).view(3, 8)
    shuffled = shuffled_pixels(x, seed=0)
    assert torch.equal(shuffled.sort(1).values, x) and not torch.equal(shuffled, x)
    assert not torch.equal(shuffled[1] - 8, shuffled[0])  # each row gets its own permutation
