"""LogME (tlreg.engine.logme): the fixed point, the maximum, the ordering, the errors."""

from __future__ import annotations

import numpy as np
import pytest

from tlreg.engine.logme import log_evidence, logme, max_evidence
from tlreg.errors import UsageError

# Both eigendecomposition branches: n > d uses F^T F, n <= d uses F F^T.
SHAPES = [(30, 5), (8, 20)]


def _problem(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    features = rng.normal(size=(n, d)) + np.eye(3)[labels] @ rng.normal(size=(3, d))
    return features, (labels == 0).astype(np.float64)


def _update(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> tuple[float, float]:
    """One MacKay update, straight from numpy.linalg (no shortcut through the spectrum)."""
    n, d = f.shape
    s = np.linalg.eigvalsh(f.T @ f)
    m = beta * np.linalg.solve(alpha * np.eye(d) + beta * f.T @ f, f.T @ y)
    gamma = float(np.sum(beta * s / (alpha + beta * s)))
    return gamma / float(m @ m), (n - gamma) / float(np.sum((f @ m - y) ** 2))


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_evidence_matches_closed_form_at_a_fixed_point(n: int, d: int) -> None:
    f, y = _problem(n, d)
    evidence, alpha, beta = max_evidence(f, y)
    assert evidence == pytest.approx(log_evidence(f, y, alpha, beta), rel=1e-6)
    new_alpha, new_beta = _update(f, y, alpha, beta)
    assert abs(new_alpha - alpha) / alpha < 1e-3
    assert abs(new_beta - beta) / beta < 1e-3


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_the_fixed_point_maximises_the_evidence(n: int, d: int) -> None:
    f, y = _problem(n, d, seed=1)
    evidence, alpha, beta = max_evidence(f, y)
    for fa in (0.1, 0.5, 0.9, 1.1, 2.0, 10.0, 1.0):
        for fb in (0.1, 0.5, 0.9, 1.1, 2.0, 10.0, 1.0):
            if fa == fb == 1.0:
                continue
            assert evidence >= log_evidence(f, y, alpha * fa, beta * fb) - 1e-9


def test_informative_features_score_above_noise() -> None:
    rng = np.random.default_rng(2)
    n, d, k = 120, 16, 4
    labels = np.arange(n) % k
    means = 3.0 * rng.normal(size=(k, d))
    informative = means[labels] + rng.normal(size=(n, d))
    noise = rng.normal(size=(n, d))
    projected = informative @ rng.normal(size=(d, d))
    score_noise = logme(noise, labels)
    assert logme(informative, labels) > score_noise
    assert logme(projected, labels) > score_noise
    assert logme(informative, labels) == logme(informative.copy(), labels.copy())  # deterministic


def test_permuting_samples_keeps_the_score() -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(50) % 5
    f = rng.normal(size=(50, 12)) + labels[:, None]
    order = rng.permutation(50)
    assert logme(f[order], labels[order]) == pytest.approx(logme(f, labels), rel=1e-9, abs=1e-12)


def test_num_classes_bounds_the_labels_and_absent_classes_are_skipped() -> None:
    f, _ = _problem(30, 5)
    labels = np.arange(30) % 3
    assert logme(f, labels, num_classes=5) == logme(f, labels)
    with pytest.raises(UsageError, match="outside"):
        logme(f, labels, num_classes=2)


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (np.zeros(10), np.arange(10) % 2, "2-D"),
        (np.ones((10, 3)), np.arange(9) % 2, "labels must be"),
        (np.random.default_rng(0).normal(size=(10, 3)), np.zeros(10, dtype=int), "2 classes"),
        (np.full((10, 3), np.nan), np.arange(10) % 2, "NaN"),
        (np.ones((10, 3)), (np.arange(10) % 2).astype(float), "integer"),
        (np.ones((10, 3)), np.arange(10) % 2 - 1, "non-negative"),
        (np.zeros((10, 3)), np.arange(10) % 2, "all zero"),
    ],
)
def test_bad_input_is_a_usage_error(features, labels, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        logme(features, labels)


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_the_default_stop_is_close_to_the_converged_maximum(n: int, d: int) -> None:
    f, y = _problem(n, d)
    evidence, _, _ = max_evidence(f, y)
    converged, _, _ = max_evidence(f, y, tol=1e-12, max_iter=10_000)
    assert converged >= evidence - 1e-12
    assert (converged - evidence) / n < 1e-5


def test_the_score_does_not_depend_on_the_features_scale() -> None:
    """The maximum evidence is invariant to scaling F (alpha absorbs it); the fixed point from
    alpha = beta = 1 was not: features 1e9 times too large saturated gamma at n and divided
    by zero (random-init features of a small data set did, in `tlreg rank`)."""
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(40, 120)), np.arange(40) % 4
    ref = logme(f, y)
    for scale in (1e-6, 1e3, 1e9, 1e12):
        assert logme(f * scale, y) == pytest.approx(ref, rel=1e-9)
