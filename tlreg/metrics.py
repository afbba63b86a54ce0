"""Classification metrics from predictions: pure functions, no torch needed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classification_report(labels: Sequence[int], preds: Sequence[int],
                          classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / support and the confusion matrix (rows: true)."""
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]
    for y, p in zip(labels, preds, strict=True):
        matrix[y][p] += 1
    total = len(labels)
    correct = sum(matrix[i][i] for i in range(n))
    per_class = {}
    for i, name in enumerate(classes):
        predicted = sum(matrix[r][i] for r in range(n))
        support = sum(matrix[i])
        per_class[name] = {
            "precision": matrix[i][i] / predicted if predicted else 0.0,
            "recall": matrix[i][i] / support if support else 0.0,
            "support": support,
        }
    return {"accuracy": correct / total if total else 0.0, "images": total,
            "per_class": per_class, "confusion_matrix": matrix, "classes": list(classes)}
