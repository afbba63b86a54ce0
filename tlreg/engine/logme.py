"""LogME: how transferable a backbone's frozen features are to a labelled data set, untrained.

LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021, http://proceedings.mlr.press/v139/you21b.html) scores features F (n, d)
against targets y by the *evidence* (marginal likelihood) of a Bayesian linear model on them:
``y = F w + noise``, prior ``w ~ N(0, I / alpha)``, noise ``N(0, 1 / beta)``, with alpha and beta
set to maximise the evidence. The evidence integrates over every weight vector rather than
fitting one, so it rewards features that explain the labels with a simple linear map and does
not reward over-fitting; it needs no hyper-parameter, no cross-validation and no gradient
step. Higher means more transferable, so it ranks candidate backbones for a data set cheaply
(the future ``tlreg rank``, issue 16).

For single-label classification the targets are the K one-hot columns; the score is the
log evidence per sample, averaged over the classes (the paper's Algorithm 1 and its reference
implementation, github.com/thuml/LogME). The maximisation is the paper's fixed-point iteration
(MacKay's updates ``gamma = sum beta s_i / (alpha + beta s_i)``, ``alpha = gamma / m^T m``,
``beta = (n - gamma) / ||F m - y||^2``), run on one eigendecomposition of F's Gram matrix: of
``F^T F`` (d, d) when n > d, else of ``F F^T`` (n, n), so the cost is that of the smaller side.

NumPy only, imported when called (as tlreg's other array code does): the module is importable
without it and without torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["log_evidence", "logme", "max_evidence"]

#: Stop when an update changes alpha, beta and alpha / beta by at most this, relatively (the
#: reference stops on alpha / beta alone, at the same 1e-3).
TOLERANCE = 1e-3
#: The reference stops after 11 updates ("typically converge after two or three steps"). With
#: n < d the iteration can contract slowly (rate ~0.76 per step on an 8 x 20 test problem, still
#: 1% off in alpha after 11), and an update costs O(rank) here, so the cap is higher.
MAX_ITERATIONS = 100


def log_evidence(features: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The closed-form log evidence of target vector ``y`` (n,) at the given alpha and beta.

    ``L = n/2 log beta + d/2 log alpha - n/2 log 2pi - beta/2 ||F m - y||^2 - alpha/2 m^T m
    - 1/2 log det A``, with ``A = alpha I + beta F^T F`` and ``m = beta A^-1 F^T y``. Computed
    directly (a d x d solve), as a check on `max_evidence` and for small problems.
    """
    import numpy as np

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = f.shape
    a = alpha * np.eye(d) + beta * (f.T @ f)
    m = beta * np.linalg.solve(a, f.T @ y)
    sign, logdet = np.linalg.slogdet(a)
    if sign <= 0:
        raise UsageError("alpha and beta must be positive")
    residual = float(np.sum((f @ m - y) ** 2))
    return float(
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * float(m @ m)
        - logdet / 2
    )


class _Spectrum:
    """F's nonzero squared singular values and the map from a target to its coordinates."""

    def __init__(self, f: np.ndarray) -> None:
        import numpy as np

        n, d = f.shape
        self.n, self.d = n, d
        if n > d:  # eigendecomposition of F^T F (d, d): F = U S V^T, U = F V / s
            sigma, v = np.linalg.eigh(f.T @ f)
            self._project = lambda y: v.T @ (f.T @ y)  # = s * (U^T y)
        else:  # of F F^T (n, n): its eigenvectors are U
            sigma, u = np.linalg.eigh(f @ f.T)
            self._project = lambda y: u.T @ y
        self._keep = sigma > max(float(sigma.max()), 0.0) * max(n, d) * np.finfo(np.float64).eps
        if not self._keep.any():
            raise UsageError("features are all zero: LogME needs features of nonzero rank")
        self.sigma = sigma[self._keep]  # k = rank(F) values
        self._scale = np.sqrt(self.sigma) if n > d else None

    def coordinates(self, y: np.ndarray) -> tuple[np.ndarray, float]:
        """``x = U_k^T y`` squared, and ``||y||^2 - ||x||^2`` (y's part outside F's columns)."""
        x = self._project(y)[self._keep]
        if self._scale is not None:
            x = x / self._scale
        x2 = x * x
        return x2, max(float(y @ y) - float(x2.sum()), 0.0)


def _terms(
    spec: _Spectrum, x2: np.ndarray, rest: float, alpha: float, beta: float
) -> tuple[float, float, float]:
    """gamma, m^T m and ||F m - y||^2 at alpha, beta, in F's eigenbasis."""
    t = alpha / beta
    sigma = spec.sigma
    gamma = float((sigma / (sigma + t)).sum())
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + rest
    return gamma, m2, res2


def _evidence(spec: _Spectrum, x2: np.ndarray, rest: float, alpha: float, beta: float) -> float:
    import numpy as np

    _, m2, res2 = _terms(spec, x2, rest, alpha, beta)
    n, d, k = spec.n, spec.d, spec.sigma.size
    # log det A: the k nonzero directions, plus log alpha for each of F's d - k null directions.
    logdet = float(np.log(alpha + beta * spec.sigma).sum()) + (d - k) * math.log(alpha)
    return (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * res2
        - alpha / 2 * m2
        - logdet / 2
    )


def _maximise(
    spec: _Spectrum, y: np.ndarray, tol: float = TOLERANCE, max_iter: int = MAX_ITERATIONS
) -> tuple[float, float, float]:
    x2, rest = spec.coordinates(y)
    tiny = 1e-300  # only guards a division by an exact zero (y orthogonal to F's columns)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        old_alpha, old_beta = alpha, beta
        gamma, m2, res2 = _terms(spec, x2, rest, alpha, beta)
        new_alpha = gamma / max(m2, tiny)
        new_beta = (spec.n - gamma) / max(res2, tiny)
        if not (0 < new_alpha < math.inf and 0 < new_beta < math.inf):
            # y lies in F's span (n <= rank F: random features of 140 face crops did): the
            # residual vanishes, gamma reaches n and the update would set beta to 0. The
            # evidence's supremum is its limit; stop at the last finite step.
            break
        alpha, beta = new_alpha, new_beta
        changes = (
            abs(alpha - old_alpha) / old_alpha,
            abs(beta - old_beta) / old_beta,
            abs(alpha / beta - old_alpha / old_beta) / (old_alpha / old_beta),
        )
        if max(changes) <= tol:
            break
    return _evidence(spec, x2, rest, alpha, beta), alpha, beta


def _as_features(features: object) -> np.ndarray:
    import numpy as np

    f = np.asarray(features)
    if f.ndim != 2:
        raise UsageError(f"features must be a 2-D array (n samples, d dims), got shape {f.shape}")
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise UsageError(f"features need at least 2 samples and 1 dimension, got {f.shape}")
    if not np.issubdtype(f.dtype, np.number) or np.iscomplexobj(f):
        raise UsageError(f"features must be real numbers, got dtype {f.dtype}")
    f = f.astype(np.float64)
    if not np.isfinite(f).all():
        raise UsageError("features contain NaN or infinite values")
    return f


def max_evidence(
    features: np.ndarray,
    y: np.ndarray,
    *,
    tol: float = TOLERANCE,
    max_iter: int = MAX_ITERATIONS,
) -> tuple[float, float, float]:
    """Maximise the log evidence of one target vector ``y`` (n,) over alpha and beta.

    Returns ``(L, alpha, beta)``: the log evidence (not divided by n) at the alpha and beta the
    fixed-point iteration reached (from alpha = beta = 1, at most ``max_iter`` updates, until
    one changes alpha and beta by at most ``tol`` relatively), and those two.
    """
    import numpy as np

    f = _as_features(features)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (f.shape[0],):
        raise UsageError(f"y must have shape ({f.shape[0]},) to match features, got {y.shape}")
    if not np.isfinite(y).all():
        raise UsageError("y contains NaN or infinite values")
    return _maximise(_Spectrum(f), y, tol, max_iter)


def logme(features: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None) -> float:
    """LogME of ``features`` (n, d) for single-label ``labels`` (n,): higher = more transferable.

    The maximum log evidence of each class's one-hot target, divided by n, averaged over the
    classes that occur in ``labels``. ``num_classes``, when given, is the label range: a label
    outside ``[0, num_classes)`` is an error; classes with no sample here carry no evidence and
    are left out of the average.
    """
    import numpy as np

    f = _as_features(features)
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != f.shape[0]:
        raise UsageError(
            f"labels must be a 1-D array of {f.shape[0]} class indices (one per feature row), "
            f"got shape {y.shape}"
        )
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.min() < 0:
        raise UsageError(f"labels must be non-negative class indices, got {int(y.min())}")
    if num_classes is not None:
        if num_classes < 2:
            raise UsageError(f"num_classes must be at least 2, got {num_classes}")
        if y.max() >= num_classes:
            raise UsageError(f"label {int(y.max())} is outside [0, {num_classes})")
    classes = np.unique(y)
    if classes.size < 2:
        raise UsageError(
            f"LogME needs at least 2 classes among the labels, got {classes.size} "
            f"({classes.tolist()})"
        )
    # The maximum evidence does not change when F is scaled (alpha absorbs c^2), but the fixed
    # point from alpha = beta = 1 does: features a million times too large saturate gamma at n,
    # beta becomes 0 and the next step divides by it (random-init features of 140 face crops
    # did). Rows of unit mean square keep the start on the scale of the data.
    rms = float(np.sqrt(np.mean(np.sum(f * f, axis=1))))
    spec = _Spectrum(f / rms if rms > 0 else f)
    n = f.shape[0]
    scores = [_maximise(spec, (y == c).astype(np.float64))[0] / n for c in classes]
    return float(np.mean(scores))
