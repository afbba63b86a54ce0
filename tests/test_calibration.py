"""Temperature scaling and expected calibration error (tlreg.engine.calibration), on CPU."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from tlreg.engine.calibration import (
    T_MAX,
    T_MIN,
    expected_calibration_error,
    fit_temperature,
    reliability,
)
from tlreg.errors import UsageError


def _synthetic(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """True log-probabilities of each sample's class and labels drawn from them."""
    g = torch.Generator().manual_seed(seed)
    true_logp = torch.log_softmax(2.0 * torch.randn(n, classes, generator=g), dim=1)
    labels = torch.multinomial(true_logp.exp(), 1, generator=g).squeeze(1)
    return true_logp, labels


def _ece(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return expected_calibration_error(logits.softmax(dim=1), labels)


def test_over_confident_model_is_softened_by_about_its_factor():
    true_logp, labels = _synthetic()
    logits = 4.0 * true_logp  # over-confident on purpose: calibrated logits times 4
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.10)

    scaled = logits / t
    ece_before, ece_after = _ece(logits, labels), _ece(scaled, labels)
    assert ece_after < ece_before
    assert ece_after < 0.03
    assert F.cross_entropy(scaled, labels) < F.cross_entropy(logits, labels)
    assert torch.equal(scaled.argmax(dim=1), logits.argmax(dim=1))


def test_under_confident_model_is_sharpened():
    true_logp, labels = _synthetic(seed=1)
    t = fit_temperature(0.3 * true_logp, labels)
    assert t < 1.0
    assert t == pytest.approx(0.3, rel=0.10)


def test_calibrated_logits_keep_a_temperature_near_one():
    true_logp, labels = _synthetic(seed=2)
    assert fit_temperature(true_logp, labels) == pytest.approx(1.0, rel=0.05)


def test_float32_logits_and_max_iter():
    true_logp, labels = _synthetic(n=1000, seed=3)
    t = fit_temperature((3.0 * true_logp).float(), labels, max_iter=50)
    assert t == pytest.approx(3.0, rel=0.15)


def test_separable_logits_are_clamped_not_broken():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = F.one_hot(labels, 3).double() * 5.0  # always right: NLL falls as T -> 0
    t = fit_temperature(logits, labels)
    assert T_MIN <= t <= T_MAX
    assert t < 1.0


def test_fit_temperature_reads_its_inputs_only():
    true_logp, labels = _synthetic(n=500, seed=4)
    logits = (4.0 * true_logp).float().requires_grad_(True)
    logits_copy, labels_copy = logits.detach().clone(), labels.clone()
    fit_temperature(logits, labels)
    assert torch.equal(logits.detach(), logits_copy)
    assert torch.equal(labels, labels_copy)
    assert logits.dtype == torch.float32 and logits.grad is None
    assert labels.dtype == torch.long


# -- ECE ------------------------------------------------------------------------------------

# 4 classes, 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]; top confidence, prediction, label, right?
HAND_PROBS = torch.tensor([
    [0.30, 0.25, 0.25, 0.20],  # 0.3 -> bin 0, predicts 0, label 0: right
    [0.25, 0.30, 0.25, 0.20],  # 0.3 -> bin 0, predicts 1, label 2: wrong
    [0.50, 0.20, 0.20, 0.10],  # 0.5 -> bin 1, predicts 0, label 0: right
    [0.10, 0.60, 0.20, 0.10],  # 0.6 -> bin 1, predicts 1, label 1: right
    [0.90, 0.05, 0.03, 0.02],  # 0.9 -> bin 2, predicts 0, label 1: wrong
    [0.80, 0.10, 0.05, 0.05],  # 0.8 -> bin 2, predicts 0, label 0: right
], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 2, 0, 1, 1, 0])
# bin 0: acc 1/2, conf 0.30, gap 0.20; bin 1: acc 1, conf 0.55, gap 0.45;
# bin 2: acc 1/2, conf 0.85, gap 0.35. ECE = (2 * 0.20 + 2 * 0.45 + 2 * 0.35) / 6 = 1/3.
HAND_ECE = 1 / 3


def test_ece_matches_a_hand_computed_example():
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, bins=3) == pytest.approx(HAND_ECE)
    assert expected_calibration_error(HAND_PROBS.float(), HAND_LABELS, bins=3) == pytest.approx(
        HAND_ECE, abs=1e-6)


def test_hand_example_bins():
    rows = reliability(HAND_PROBS, HAND_LABELS, bins=3)
    assert [r["count"] for r in rows] == [2, 2, 2]
    assert [r["accuracy"] for r in rows] == pytest.approx([0.5, 1.0, 0.5])
    assert [r["confidence"] for r in rows] == pytest.approx([0.30, 0.55, 0.85])
    assert [r["lower"] for r in rows] == pytest.approx([0, 1 / 3, 2 / 3])
    assert [r["upper"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 1])


def test_bins_are_right_closed():
    # confidences exactly on the edges of 4 bins (0.25, 0.5, 0.75 are exact in binary)
    probs = torch.tensor([
        [0.50, 0.25, 0.25],  # 0.50 -> (0.25, 0.50], bin 1
        [0.75, 0.25, 0.00],  # 0.75 -> (0.50, 0.75], bin 2
        [1.00, 0.00, 0.00],  # 1.00 -> (0.75, 1.00], bin 3
    ])
    rows = reliability(probs, torch.tensor([0, 0, 0]), bins=4)
    assert [r["count"] for r in rows] == [0, 1, 1, 1]
    assert rows[0]["accuracy"] is None and rows[0]["confidence"] is None


def test_perfect_confident_predictions_have_zero_ece():
    labels = torch.tensor([0, 1, 2, 1])
    probs = F.one_hot(labels, 3).float()
    assert expected_calibration_error(probs, labels) == 0.0


def test_reliability_counts_sum_to_n_and_weighted_gap_is_ece():
    true_logp, labels = _synthetic(n=3000, seed=5)
    probs = (4.0 * true_logp).softmax(dim=1)
    for bins in (1, 10, 15):
        rows = reliability(probs, labels, bins=bins)
        assert len(rows) == bins
        assert sum(r["count"] for r in rows) == len(labels)
        gap = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])
        assert gap / len(labels) == pytest.approx(
            expected_calibration_error(probs, labels, bins=bins))
        assert rows[0]["lower"] == 0.0 and rows[-1]["upper"] == 1.0
        assert all(a["upper"] == pytest.approx(b["lower"]) for a, b in itertools.pairwise(rows))


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("logits", "labels", "message"), [
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), "4 rows but labels has 3"),
    (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), torch.tensor([0, 1]), "NaN or infinite"),
    (torch.tensor([[0.0, float("inf")], [1.0, 0.0]]), torch.tensor([0, 1]), "NaN or infinite"),
    (torch.zeros(1, 3), torch.tensor([0]), "at least 2 samples"),
    (torch.zeros(3), torch.tensor([0, 1, 2]), "must be 2-D"),
    (torch.zeros(3, 3), torch.zeros(3, 1, dtype=torch.long), "must be 1-D"),
    (torch.zeros(3, 1), torch.tensor([0, 0, 0]), "at least 2 classes"),
    (torch.zeros(3, 3), torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
    (torch.zeros(3, 3), torch.tensor([0, 1, 3]), "must lie in [0, 2]"),
    (torch.zeros(3, 3, dtype=torch.long), torch.tensor([0, 1, 2]), "floating point"),
])
def test_fit_temperature_rejects_bad_input(logits, labels, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        fit_temperature(logits, labels)


def test_fit_temperature_rejects_bad_max_iter():
    true_logp, labels = _synthetic(n=10)
    with pytest.raises(UsageError, match="max_iter"):
        fit_temperature(true_logp, labels, max_iter=0)


@pytest.mark.parametrize("func", [expected_calibration_error, reliability])
def test_ece_and_reliability_reject_bad_input(func):
    labels = torch.tensor([0, 1])
    with pytest.raises(UsageError, match="not logits"):
        func(torch.tensor([[2.0, -1.0], [0.5, 0.3]]), labels)  # logits, not probabilities
    with pytest.raises(UsageError, match="sum to 1"):
        func(torch.tensor([[0.2, 0.2], [0.5, 0.3]]), labels)
    with pytest.raises(UsageError, match="bins"):
        func(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), labels, bins=0)
    with pytest.raises(UsageError, match="empty"):
        func(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(UsageError, match="2 rows but labels has 1"):
        func(torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([0]))
