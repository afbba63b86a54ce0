"""What the head's outputs mean, and the loss that trains them: one label or many per image.

Single-label targets are class indices (a 1-D long tensor): softmax outputs, cross-entropy.
Multi-label targets are 0/1 rows, one column per class (a 2-D tensor): independent sigmoids,
`binary_cross_entropy_with_logits`, as transformers' `problem_type="multi_label_classification"`.
Every loss, count and prediction in the engine goes through here, so the shape of `y` is the
only switch and no loop, feed or fitter has an `if multi_label` of its own.

The one exception is said, not inferred: `soft=True` marks 2-D rows of class probabilities
(one label per image, mixed by Mixup / CutMix, tlreg.data.mixup), trained by soft-target
cross-entropy (timm's `SoftTargetCrossEntropy`) and counted right by their top class. The
shape alone cannot tell them from 0/1 multi-label rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL)

class Evaluation(NamedTuple):
    """An evaluation pass: class indices and predicted classes, or for multi-label 0/1 rows and
    probability rows (`outputs`); one label per image also keeps the raw (N, C) float logits
    on the CPU, in sample order, which temperature scaling is fitted on."""

    loss: float
    labels: list[Any]
    outputs: list[Any]
    logits: torch.Tensor | None = None


def is_multi_label(y: torch.Tensor) -> bool:
    return y.dim() == 2


def smoothed(y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """0/1 targets pulled towards 1/2 by `label_smoothing` (the binary form of timm's)."""
    y = y.float()
    return y * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else y


def loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
         reduction: str = "mean", weight: torch.Tensor | None = None, *,
         soft: bool = False) -> torch.Tensor:
    """Cross-entropy for class indices; for 0/1 rows, binary cross-entropy averaged over the
    classes of each image (`reduction='none'` gives one value per image either way).

    `weight` (`class_weights`): per-class weights of the cross-entropy (its mean is then
    PyTorch's weighted mean), or for 0/1 rows each class's `pos_weight`.
    `soft`: `y` holds class probabilities: -sum(y * log_softmax), timm's soft-target
    cross-entropy (the mean over images, weighted per class); their smoothing is already in
    them, so `label_smoothing` is not applied again."""
    import torch.nn.functional as F

    if soft:
        return F.cross_entropy(logits.float(), y.float(), weight=weight, reduction=reduction)
    if not is_multi_label(y):
        return F.cross_entropy(logits, y, weight=weight, reduction=reduction,
                               label_smoothing=label_smoothing)
    per_image = F.binary_cross_entropy_with_logits(
        logits.float(), smoothed(y, label_smoothing), reduction="none",
        pos_weight=weight).mean(1)
    if reduction == "none":
        return per_image
    return per_image.sum() if reduction == "sum" else per_image.mean()


def correct(logits: torch.Tensor, y: torch.Tensor, *, soft: bool = False) -> torch.Tensor:
    """How many images are labelled right: the top class, or every label (at probability 0.5)
    right at once for multi-label (exact match, scikit-learn's multi-label accuracy); for
    `soft` rows, the top class against the row's largest share (the mix's main image)."""
    if soft:
        return (logits.argmax(1) == y.argmax(1)).sum()
    if not is_multi_label(y):
        return (logits.argmax(1) == y).sum()
    return ((logits > 0) == y.bool()).all(1).sum()


def outputs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What evaluation keeps per image: the predicted class, or each class's probability."""
    return logits.sigmoid().float() if is_multi_label(y) else logits.argmax(1)


def class_counts(labels: Sequence[int | tuple[int, ...]], k: int) -> list[int]:
    """Images per class; for 0/1 rows, positives per class (an image counts in each)."""
    counts = [0] * k
    for y in labels:
        if isinstance(y, int):
            counts[y] += 1
        else:
            for i, v in enumerate(y):
                counts[i] += bool(v)
    return counts


def balanced_sample_weights(labels: Sequence[int], k: int) -> list[float]:
    """`--sampler balanced`: each image drawn with probability 1 / (k x its class's images),
    so every class is drawn equally often in expectation."""
    counts = class_counts(labels, k)
    return [1.0 / counts[y] for y in labels]


def class_weights(spec: str, labels: Sequence[int | tuple[int, ...]],
                  classes: Sequence[str]) -> list[float] | None:
    """Per-class loss weights from `--class-weights`: none, auto, or a YAML / JSON file.

    `auto` is scikit-learn's `class_weight="balanced"`, n / (classes x n_c), for one label per
    image; for 0/1 rows it is each class's `pos_weight`, negatives / positives (PyTorch's
    `BCEWithLogitsLoss`). A file maps every class name to its weight.
    """
    if spec == "none":
        return None
    if spec == "auto":
        n, k = len(labels), len(classes)
        counts = class_counts(labels, k)
        if labels and isinstance(labels[0], tuple):
            return [(n - p) / p if p else 1.0 for p in counts]
        return [n / (k * c) if c else 1.0 for c in counts]
    return _weights_file(spec, classes)


def _weights_file(path: str, classes: Sequence[str]) -> list[float]:
    import math
    from pathlib import Path

    import yaml

    from tlreg.errors import UsageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError("--class-weights takes none, auto or a YAML / JSON file of class: "
                         f"weight; {path} is none of these")
    try:
        table = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read class weights from {file}: {exc}") from None
    if not isinstance(table, dict):
        raise UsageError(f"{file} must map class names to weights, e.g. {{ants: 1.0, bees: 3.5}}")
    table = {str(k): v for k, v in table.items()}
    missing = [c for c in classes if c not in table]
    unknown = sorted(set(table) - set(classes))
    if missing or unknown:
        raise UsageError(f"{file}: " + "; ".join(
            part for part in (missing and f"no weight for {', '.join(map(repr, missing))}",
                              unknown and f"classes not in the data: "
                                          f"{', '.join(map(repr, unknown))}") if part))
    out = []
    for c in classes:
        v = table[c]
        if (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                or v <= 0):
            raise UsageError(f"{file}: the weight of {c!r} must be a positive number, got {v!r}")
        out.append(float(v))
    return out
