"""Classification metrics from predictions: pure functions, no torch needed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def classification_report(labels: Sequence[int], preds: Sequence[int],
                          classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision / recall / support and the
    confusion matrix (rows: true). Balanced accuracy averages the recall of the classes present
    in `labels`, macro F1 the F1 of the classes in `labels` or `preds` (scikit-learn's rules)."""
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
    present = [m for m in per_class.values() if m["support"]]
    seen = [m for i, m in enumerate(per_class.values())
            if m["support"] or sum(matrix[r][i] for r in range(n))]
    f1 = [2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"])
          if m["precision"] + m["recall"] else 0.0 for m in seen]
    return {"accuracy": correct / total if total else 0.0,
            "balanced_accuracy": sum(m["recall"] for m in present) / len(present) if present
            else 0.0,
            "macro_f1": sum(f1) / len(f1) if f1 else 0.0, "images": total,
            "per_class": per_class, "confusion_matrix": matrix, "classes": list(classes)}


# -- multi-label ----------------------------------------------------------------------------

_TORCHMETRICS = ("multi-label metrics need the `torchmetrics` package: "
                 "pip install 'tlreg[multilabel]'")


def _functional() -> Any:
    import warnings

    try:
        from torchmetrics.functional import classification
    except ImportError:
        from tlreg.errors import UsageError

        raise UsageError(_TORCHMETRICS) from None
    # A class with no positive among these images is handled here (AP None, threshold 0.5).
    warnings.filterwarnings("ignore", message="No positive samples found in target",
                            module="torchmetrics")
    return classification


def require_multilabel() -> None:
    """Raise the one-line UsageError naming the extra when torchmetrics is missing."""
    _functional()


def multilabel_report(labels: Sequence[Sequence[int]], probs: Sequence[Sequence[float]],
                      classes: Sequence[str],
                      thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """mAP, micro / macro F1, exact-match accuracy and per-class precision / recall / AP.

    A label is predicted when its probability reaches its class's threshold (0.5 without
    `thresholds`). mAP averages the classes that have a positive here (AP is undefined for the
    others); torchmetrics computes every number (scikit-learn's definitions).
    """
    import torch

    tm = _functional()
    n = len(classes)
    y = torch.tensor(list(labels), dtype=torch.long).reshape(-1, n)
    p = torch.tensor(list(probs), dtype=torch.float32).reshape(-1, n)
    t = torch.tensor(list(thresholds) if thresholds else [0.5] * n, dtype=torch.float32)
    pred = (p >= t).long()
    total = len(y)
    positives = y.sum(0)
    if total:
        ap = tm.multilabel_average_precision(p, y, num_labels=n, average=None, thresholds=None)
        kw: dict[str, Any] = {"num_labels": n, "threshold": 0.5, "zero_division": 0}
        precision = tm.multilabel_precision(pred, y, average=None, **kw)
        recall = tm.multilabel_recall(pred, y, average=None, **kw)
        micro_f1 = float(tm.multilabel_f1_score(pred, y, average="micro", **kw))
        macro_f1 = float(tm.multilabel_f1_score(pred, y, average="macro", **kw))
        has = positives > 0
        mean_ap = float(ap[has].mean()) if bool(has.any()) else 0.0
        exact = float((pred == y).all(1).float().mean())
    else:
        ap = precision = recall = torch.zeros(n)
        micro_f1 = macro_f1 = mean_ap = exact = 0.0
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]),
               "ap": float(ap[i]) if positives[i] > 0 else None, "support": int(positives[i]),
               "threshold": float(t[i])}
        for i, name in enumerate(classes)
    }
    return {"accuracy": exact, "map": mean_ap, "micro_f1": micro_f1, "macro_f1": macro_f1,
            "images": total, "per_class": per_class, "classes": list(classes),
            "thresholds": [float(v) for v in t]}


def tune_thresholds(labels: Sequence[Sequence[int]], probs: Sequence[Sequence[float]],
                    num_classes: int) -> list[float]:
    """Per class, the probability threshold with the best F1 on these (validation) images:
    halfway between the lowest score it keeps and the next score below.

    A class with no positive here keeps 0.5: there is nothing to tune it on.
    """
    import torch

    tm = _functional()
    y = torch.tensor(list(labels), dtype=torch.long).reshape(-1, num_classes)
    p = torch.tensor(list(probs), dtype=torch.float32).reshape(-1, num_classes)
    if not len(y):
        return [0.5] * num_classes
    precision, recall, cuts = tm.multilabel_precision_recall_curve(
        p, y, num_labels=num_classes, thresholds=None)
    out = []
    for c in range(num_classes):
        if int(y[:, c].sum()) == 0 or len(cuts[c]) == 0:
            out.append(0.5)
            continue
        prec, rec = precision[c][:-1], recall[c][:-1]  # the last point is (1, 0), no threshold
        f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-12)
        best = int(f1.argmax())
        # Halfway down to the next score: the lowest positive kept is not on the edge.
        below = cuts[c][best - 1] if best > 0 else cuts[c][best]
        out.append(float((cuts[c][best] + below) / 2))
    return out
