"""What the head's outputs mean, and the loss that trains them: one label or many per image.

Single-label targets are class indices (a 1-D long tensor): softmax outputs, cross-entropy.
Multi-label targets are 0/1 rows, one column per class (a 2-D tensor): independent sigmoids,
`binary_cross_entropy_with_logits`, as transformers' `problem_type="multi_label_classification"`.
Every loss, count and prediction in the engine goes through here, so the shape of `y` is the
only switch and no loop, feed or fitter has an `if multi_label` of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL)

#: An evaluation pass: (mean loss, labels, outputs); class indices and predicted classes, or for
#: multi-label 0/1 rows and probability rows (`outputs`).
Evaluation = tuple[float, list[Any], list[Any]]


def is_multi_label(y: torch.Tensor) -> bool:
    return y.dim() == 2


def smoothed(y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """0/1 targets pulled towards 1/2 by `label_smoothing` (the binary form of timm's)."""
    y = y.float()
    return y * (1 - label_smoothing) + label_smoothing / 2 if label_smoothing else y


def loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for class indices; for 0/1 rows, binary cross-entropy averaged over the
    classes of each image (`reduction='none'` gives one value per image either way)."""
    import torch.nn.functional as F

    if not is_multi_label(y):
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=label_smoothing)
    per_image = F.binary_cross_entropy_with_logits(
        logits.float(), smoothed(y, label_smoothing), reduction="none").mean(1)
    if reduction == "none":
        return per_image
    return per_image.sum() if reduction == "sum" else per_image.mean()


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How many images are labelled right: the top class, or every label (at probability 0.5)
    right at once for multi-label (exact match, scikit-learn's multi-label accuracy)."""
    if not is_multi_label(y):
        return (logits.argmax(1) == y).sum()
    return ((logits > 0) == y.bool()).all(1).sum()


def outputs(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What evaluation keeps per image: the predicted class, or each class's probability."""
    return logits.sigmoid().float() if is_multi_label(y) else logits.argmax(1)
