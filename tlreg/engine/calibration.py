"""Calibrated probabilities: temperature scaling and expected calibration error, on logits.

A fine-tuned network is usually over-confident: its softmax says 0.99 where it is right 90% of
the time. Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks")
divides every logit by one scalar T > 0 before the softmax, with T fitted by minimising the
negative log-likelihood (mean cross-entropy) of held-out labels. T > 1 softens over-confident
probabilities, T < 1 sharpens under-confident ones. Dividing by a positive scalar keeps the order
of each row's logits, so it changes the probabilities and never the argmax: accuracy, the
confusion matrix and every predicted class stay exactly as they were.

T is fitted on the validation split only, the split the training never saw: `fit_temperature`
uses nothing but the logits and labels it is handed (and never changes them), so whoever calls it
decides that, and gives it val. Fitted on train, T would learn the training set's over-fitting.

Expected calibration error (ECE) measures what the scaling buys: the top-label confidences are
put into equal-width bins and ECE is the count-weighted mean gap between each bin's accuracy and
its mean confidence; `reliability` gives the same bins for a reliability diagram.

Pure functions on tensors, torch imported inside them (as elsewhere in tlreg.engine), so the
later wiring (training, `predict`, `eval`) decides where the logits come from.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

# The range a fitted temperature is clamped to. Outside it the data say little more than "make
# the probabilities uniform" (T -> inf) or "make them one-hot" (T -> 0, separable val logits).
# Defined beside the deployed model's checks, which refuse a stored T outside it.
from tlreg.preprocess import T_MAX, T_MIN

if TYPE_CHECKING:
    import torch



def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor,
                         what: str = "logits") -> None:
    """Shapes and values shared by all three functions: (N, C) scores, (N,) class indices."""
    import torch

    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise UsageError(f"{what} and labels must be torch tensors")
    if logits.dim() != 2:
        raise UsageError(f"{what} must be 2-D (samples, classes), got shape {tuple(logits.shape)}")
    if labels.dim() != 1:
        raise UsageError(f"labels must be 1-D class indices, got shape {tuple(labels.shape)}")
    n, classes = logits.shape
    if n == 0:
        raise UsageError(f"{what} are empty: nothing to calibrate on")
    if labels.shape[0] != n:
        raise UsageError(f"{what} have {n} rows but labels has {labels.shape[0]}: "
                         "they must be the same samples")
    if classes < 2:
        raise UsageError(f"{what} must have at least 2 classes, got {classes}")
    if not logits.is_floating_point():
        raise UsageError(f"{what} must be floating point, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"labels must be integer class indices, got {labels.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise UsageError(f"{what} contain NaN or infinite values")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise UsageError(f"labels must lie in [0, {classes - 1}] for {classes} classes, "
                         f"got {low}..{high}")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature T minimising the mean cross-entropy of `softmax(logits / T)` on `labels`.

    `logits`: (N, C) raw scores of the validation split; `labels`: (N,) class indices. Fitted
    over log T (so T stays positive) by L-BFGS with a strong-Wolfe line search, in float64 on
    the CPU, starting at T = 1; the result is clamped to [T_MIN, T_MAX] = [0.05, 20]. The inputs
    are read only: neither is changed, and nothing but them is used. Raises UsageError for
    empty or mismatched inputs, non-finite logits or fewer than 2 samples."""
    import torch
    import torch.nn.functional as F

    _check_logits_labels(logits, labels)
    if logits.shape[0] < 2:
        raise UsageError("fit_temperature needs at least 2 samples, got 1")
    if max_iter < 1:
        raise UsageError(f"max_iter must be at least 1, got {max_iter}")
    x = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = F.cross_entropy(x / log_t.exp(), y)
        nll.backward()
        return nll

    with torch.enable_grad():
        opt.step(closure)
    t = math.exp(float(log_t.detach()))
    if math.isnan(t):  # a line search that left the finite range: no evidence to move T
        return 1.0
    return min(max(t, T_MIN), T_MAX)


def _check_probs(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> None:
    _check_logits_labels(probs, labels, what="probs")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise UsageError(f"bins must be a positive integer, got {bins!r}")
    p = probs.detach().double()
    if bool((p < 0).any()) or bool((p > 1).any()):
        raise UsageError("probs must lie in [0, 1]: pass softmax(logits), not logits")
    if bool(((p.sum(dim=1) - 1).abs() > 1e-3).any()):
        raise UsageError("each row of probs must sum to 1: pass softmax(logits), not logits")


def _bin_stats(probs: torch.Tensor, labels: torch.Tensor,
               bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bin edges (bins + 1,) and per bin: count, sum of correct, sum of confidence (float64).

    Bins are right-closed: (0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]; a confidence of exactly 0
    (impossible for a top label) would fall in the first."""
    import torch

    p = probs.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    # right=False: index i with edges[i] < conf <= edges[i + 1] (for the inner edges)
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=bins).double()
    hits = torch.bincount(idx, weights=correct, minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    return edges, count, hits, conf_sum


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, *,
                               bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins of |B|/n * |acc(B) - conf(B)|.

    `probs`: (N, C) class probabilities (softmax of the logits, each row summing to 1);
    `labels`: (N,) class indices. Each sample's confidence is its largest probability, its
    prediction that class; `bins` equal-width bins, right-closed: (0, 1/bins], ...,
    ((bins-1)/bins, 1]. Empty bins add nothing. In [0, 1]; 0 is perfectly calibrated."""
    _check_probs(probs, labels, bins)
    _, count, hits, conf_sum = _bin_stats(probs, labels, bins)
    return float((hits - conf_sum).abs().sum() / count.sum())


def reliability(probs: torch.Tensor, labels: torch.Tensor,
                bins: int = 15) -> list[dict[str, Any]]:
    """The bins of `expected_calibration_error`, for a reliability diagram.

    One dict per bin, in order: `lower`, `upper` (the bin is (lower, upper]), `count`, and
    `accuracy` and `confidence` (mean correctness and mean top-label confidence of its samples;
    None for an empty bin). ECE is sum(count * |accuracy - confidence|) / n over the bins."""
    _check_probs(probs, labels, bins)
    edges, count, hits, conf_sum = _bin_stats(probs, labels, bins)
    out: list[dict[str, Any]] = []
    for i in range(bins):
        c = int(count[i])
        out.append({
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": c,
            "accuracy": float(hits[i] / c) if c else None,
            "confidence": float(conf_sum[i] / c) if c else None,
        })
    return out


def calibrate(logits: torch.Tensor, labels: torch.Tensor, *, bins: int = 15) -> dict[str, Any]:
    """T fitted on (validation) `logits` and what it changed there: ECE and the reliability
    bins before and after, as the run records them (summary.json's `calibration`).

    The "after" numbers are measured on the samples T was fitted on, so they are optimistic by
    the little one scalar can over-fit; `tlreg eval` on held-out images gives the unbiased ECE.
    When every sample is classified right, the likelihood only grows as T -> 0: the data hold
    no evidence of how confident to be, so no temperature is fitted (`temperature` None, and
    `reason` says why) rather than one that makes every later answer a certainty."""
    import torch

    x = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    raw = x.softmax(1)
    if bool((x.argmax(1) == y).all()):
        return {"temperature": None, "images": len(y),
                "ece_before": expected_calibration_error(raw, y, bins=bins),
                "reliability_before": reliability(raw, y, bins),
                "reason": "every validation image is classified right: no evidence to scale by"}
    t = fit_temperature(logits, labels)
    scaled = (x / t).softmax(1)
    return {"temperature": t, "images": len(y),
            "ece_before": expected_calibration_error(raw, y, bins=bins),
            "ece_after": expected_calibration_error(scaled, y, bins=bins),
            "reliability_before": reliability(raw, y, bins),
            "reliability_after": reliability(scaled, y, bins)}
