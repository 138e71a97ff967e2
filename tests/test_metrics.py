"""udn_kernels.metrics against hand-computed values and defining identities."""
import math

import pytest
import torch

from udn_kernels import metrics

PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25], [0.05, 0.05, 0.9]],
                     dtype=torch.float64)
TARGET = torch.tensor([0, 1, 1, 0])


def test_nll_accuracy_brier_by_hand():
    nll = -(math.log(0.7) + math.log(0.8) + math.log(0.35) + math.log(0.05)) / 4
    assert float(metrics.nll(PROBS, TARGET)) == pytest.approx(nll, rel=1e-12)
    assert float(metrics.accuracy(PROBS, TARGET)) == 0.5
    brier = [(0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2), (0.1 ** 2 + 0.2 ** 2 + 0.1 ** 2),
             (0.4 ** 2 + 0.65 ** 2 + 0.25 ** 2), (0.95 ** 2 + 0.05 ** 2 + 0.9 ** 2)]
    torch.testing.assert_close(metrics.brier(PROBS, TARGET, reduction="none"),
                               torch.tensor(brier, dtype=torch.float64))
    assert metrics.nll(PROBS, TARGET, reduction="none").shape == (4,)


def test_ece_by_hand_with_two_bins():
    # confidences 0.7, 0.8, 0.4, 0.9; correct 1, 1, 0, 0. Bins (0, .5]: {0.4}; (.5, 1]: {0.7, 0.8, 0.9}.
    expected = (1 / 4) * abs(0 - 0.4) + (3 / 4) * abs(2 / 3 - (0.7 + 0.8 + 0.9) / 3)
    assert float(metrics.ece(PROBS, TARGET, n_bins=2)) == pytest.approx(expected, rel=1e-12)


def test_ece_of_calibrated_predictions_is_small():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    conf = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    correct = torch.rand(n, generator=gen, dtype=torch.float64) < conf
    probs = torch.stack([conf, 1 - conf], 1)
    target = torch.where(correct, 0, 1)
    # Within-bin accuracy matches confidence up to sampling noise (~1/sqrt(n/bins)).
    assert float(metrics.ece(probs, target, n_bins=10)) < 0.01
    assert float(metrics.ece(probs, 1 - target, n_bins=10)) > 0.5


def test_entropy_and_mutual_information():
    uniform = torch.full((3, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(metrics.predictive_entropy(uniform), torch.tensor(math.log(4), dtype=torch.float64))
    same = PROBS.expand(5, -1, -1)
    torch.testing.assert_close(metrics.mutual_information(same), torch.tensor(0.0, dtype=torch.float64))
    # Two confident samples that disagree: total entropy log 2, expected entropy ~0 -> MI ~ log 2.
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert float(metrics.mutual_information(disagree)) == pytest.approx(math.log(2), abs=1e-9)
    mi = metrics.mutual_information(torch.softmax(torch.randn(7, 6, 3, dtype=torch.float64), -1), reduction="none")
    assert mi.shape == (6,) and bool((mi >= 0).all())


def test_gaussian_nll_matches_torch():
    gen = torch.Generator().manual_seed(1)
    mean, target = torch.randn(5, 2, generator=gen), torch.randn(5, 2, generator=gen)
    var = torch.rand(5, 2, generator=gen) + 0.1
    expected = torch.nn.functional.gaussian_nll_loss(mean, target, var, full=True, reduction="none").sum(1)
    torch.testing.assert_close(metrics.gaussian_nll(mean, var, target, reduction="none"), expected)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="probs"):
        metrics.nll(PROBS[0], TARGET[:1])
    with pytest.raises(ValueError, match="target"):
        metrics.accuracy(PROBS, TARGET[:2])
    with pytest.raises(ValueError, match="sample_probs"):
        metrics.mutual_information(PROBS)
    with pytest.raises(ValueError, match="reduction"):
        metrics.brier(PROBS, TARGET, reduction="sum")
