"""`tlreg audit`: what to fix in a data set before (or after) training, file by file.

One feature pass of a frozen backbone (the feature cache training uses), then:

* **label issues**: out-of-fold probabilities of a k-fold cross-validated linear probe on train
  and val together (tlreg's own solver: C chosen by `cv_linear`, then each fold fitted on the
  others at that C), given to cleanlab's confident learning (`find_label_issues`, Northcutt et
  al. 2021). Needs `pip install 'tlreg[audit]'`; without cleanlab the other checks still run
  and the summary says why this one did not (or `label_issues=True` makes it an error);
* **duplicates** inside a split and **leaks** across train / val: byte-identical files, and
  centred cosine similarity of features at or above `duplicate_threshold` (duplicates.py);
* **outliers**: images far less like their nearest neighbours than the median image is
  (a robust z-score of the mean raw cosine to the 5 nearest images);
* **unreadable** files (no decoder takes them) and **tiny** images (shorter side under
  `min_side` px);
* **class balance**: images per class and the smallest / largest ratio (summary only).

Every finding names a file, its kind, a score and one sentence a person can act on; the list
is sorted by kind (`KINDS`, most severe first), then by score.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.analysis.duplicates import (
    DUPLICATE_THRESHOLD,
    NEIGHBOURS,
    OUTLIER_Z,
    duplicates_across,
    duplicates_within,
    identical_files,
    normalise,
    outliers,
)
from tlreg.errors import UsageError, first_line

if TYPE_CHECKING:
    import torch

    from tlreg.analysis.features import DatasetFeatures
    from tlreg.data.sources import DataSplit, Sample

#: Kinds of finding, most severe first: the report's order.
KINDS = ("unreadable", "leak", "label_issue", "duplicate", "outlier", "tiny")
#: Images with a shorter side below this many pixels are reported as tiny: CIFAR's 32 px is the
#: smallest size classifiers are commonly trained at; a 224 px backbone sees such an image
#: upscaled 7x, mostly blur.
MIN_SIDE = 32
INSTALL = "pip install 'tlreg[audit]'"
CSV_COLUMNS = ("rank", "kind", "score", "file", "split", "label", "suggested", "other", "reason")


@dataclass(frozen=True)
class Finding:
    """One file to look at. `score`: higher is surer or worse, within its kind (docs/audit.md):
    1 - the probe's probability of the given label, a cosine similarity, a robust z-score, or
    how far below `min_side` an image is."""

    file: str
    kind: str
    score: float
    reason: str
    split: str
    label: str = ""
    suggested: str = ""  # label_issue: the label the probe gives
    other: str = ""  # duplicate / leak: the file it copies

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.kind != "label_issue":
            d.pop("suggested")
        if self.kind not in ("duplicate", "leak"):
            d.pop("other")
        return d


@dataclass(frozen=True)
class AuditReport:
    data: str
    backbone: str
    summary: dict[str, Any]
    findings: tuple[Finding, ...]

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "backbone": self.backbone, "summary": self.summary,
                "findings": [f.to_dict() for f in self.findings]}

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for rank, f in enumerate(self.findings, 1):
            writer.writerow([rank, f.kind, f"{f.score:.4f}", f.file, f.split, f.label,
                             f.suggested, f.other, f.reason])
        return buf.getvalue()


def default_backbone() -> str:
    """`tlreg train`'s default backbone: audit looks through the features training would use."""
    from tlreg.engine.config import TrainConfig

    return TrainConfig.__dataclass_fields__["backbone"].default


def audit(data: str | os.PathLike[str] | DataSplit, *, backbone: str | None = None,
          val_split: float | None = None, seed: int = 0,
          source_args: Mapping[str, Any] | None = None, folds: int = 5,
          duplicate_threshold: float = DUPLICATE_THRESHOLD, outlier_z: float = OUTLIER_Z,
          min_side: int = MIN_SIDE, label_issues: bool | None = None, pretrained: bool = True,
          weights: str | None = None, img_size: int | None = None, cache: bool = True,
          cache_dir: str | None = None, feature_dtype: str = "float32", device: str = "auto",
          batch_size: int = 64,
          workers: int = 2, say: Callable[[str], None] = lambda _: None) -> AuditReport:
    """Audit the data set at `data` (any source `tlreg train` reads, or a DataSplit).

    `label_issues`: None checks labels when cleanlab is installed (the summary says when it is
    not), True requires it (a UsageError naming the install otherwise), False skips the check.
    """
    from tlreg.analysis.features import dataset_features
    from tlreg.data.sources import DataSplit, open_source

    _check_options(folds, duplicate_threshold, outlier_z, min_side)
    if label_issues:
        _cleanlab()  # before the feature pass: fail in a second, not after minutes
    name = backbone or default_backbone()
    split = data if isinstance(data, DataSplit) else open_source(data, val_split, seed,
                                                                 source_args)
    where = str(split.info.get("location", "")) if isinstance(data, DataSplit) else str(data)
    features = dataset_features(split, name, pretrained=pretrained, weights=weights,
                                img_size=img_size, cache=cache, cache_dir=cache_dir,
                                feature_dtype=feature_dtype, device=device,
                                batch_size=batch_size, workers=workers, say=say)
    return audit_features(split, features, data=where, folds=folds, seed=seed,
                          duplicate_threshold=duplicate_threshold, outlier_z=outlier_z,
                          min_side=min_side, label_issues=label_issues)


def audit_features(split: DataSplit, features: DatasetFeatures, *, data: str = "",
                   folds: int = 5, seed: int = 0,
                   duplicate_threshold: float = DUPLICATE_THRESHOLD,
                   outlier_z: float = OUTLIER_Z, min_side: int = MIN_SIDE,
                   label_issues: bool | None = None) -> AuditReport:
    """The audit of `split` from its features (`dataset_features`): no backbone runs here."""
    import torch

    _check_options(folds, duplicate_threshold, outlier_z, min_side)
    t0 = time.perf_counter()
    classes = list(split.classes)
    everything = [(s, "train") for s in split.train] + [(s, "val") for s in split.val]
    short = _shortener([s.path for s, _ in everything])
    rows = [(s, "train") for s in features.train_samples] + [
        (s, "val") for s in features.val_samples]
    x = torch.cat([features.x_train, features.x_val]).detach().cpu()
    y = torch.cat([features.y_train, features.y_val]).detach().cpu()
    findings: list[Finding] = []

    def finding(sample: Sample, part: str, kind: str, score: float, reason: str,
                **extra: str) -> Finding:
        return Finding(sample.path, kind, float(score), reason, part,
                       _label_name(sample.label, classes), **extra)

    # Files: unreadable, tiny, byte-identical.
    skipped = set(features.skipped)
    for (s, part), size in zip(everything, image_sizes([s for s, _ in everything]),
                               strict=True):
        if isinstance(size, str) or s.path in skipped:
            error = size if isinstance(size, str) else _decode_error(s)
            findings.append(finding(s, part, "unreadable", 1.0,
                                    f"cannot be decoded ({error}): the run skips it"))
        elif min(size) < min_side:
            findings.append(finding(s, part, "tiny", 1 - min(size) / min_side,
                                    f"{size[0]}x{size[1]} px, under {min_side} px on a side: "
                                    "the backbone sees it upscaled, mostly blur"))
    identical = set()
    for i, j in identical_files([s for s, _ in everything]):
        (s, part), (o, other_part) = everything[i], everything[j]
        if part == "val" and other_part == "train":  # a leak is reported on its train copy
            (s, part), (o, other_part) = (o, other_part), (s, part)
        kind = "duplicate" if part == other_part else "leak"
        identical.add((s.path, kind))
        findings.append(finding(s, part, kind, 1.0, _copy_reason(
            "byte-identical to", short(o.path), other_part, part, None, None), other=o.path))

    # Features: near-duplicates, leaks, outliers.
    xn = normalise(x)
    is_train = torch.tensor([part == "train" for _, part in rows], dtype=torch.bool)
    train_rows = torch.nonzero(is_train).flatten().tolist()
    val_rows = torch.nonzero(~is_train).flatten().tolist()
    matches = [(train_rows[m.index], train_rows[m.other], m.similarity, "duplicate")
               for m in duplicates_within(xn[train_rows], duplicate_threshold)]
    matches += [(val_rows[m.index], val_rows[m.other], m.similarity, "duplicate")
                for m in duplicates_within(xn[val_rows], duplicate_threshold)]
    matches += [(train_rows[m.index], val_rows[m.other], m.similarity, "leak")
                for m in duplicates_across(xn[train_rows], xn[val_rows], duplicate_threshold)]
    for i, j, sim, kind in matches:
        (s, part), (o, other_part) = rows[i], rows[j]
        if (s.path, kind) not in identical:
            findings.append(finding(s, part, kind, sim, _copy_reason(
                "a near-copy of", short(o.path), other_part, part, sim, duplicate_threshold),
                other=o.path))
    for i, typ, z, median in outliers(normalise(x, centre=False), outlier_z):
        s, part = rows[i]
        findings.append(finding(
            s, part, "outlier", z, f"unlike the rest of the data set: mean cosine {typ:.2f} to "
            f"its {NEIGHBOURS} nearest images, median {median:.2f} (robust z {z:.2f} > "
            f"{outlier_z:g}): off-topic, corrupted, or a rare view worth more examples"))

    # Labels: confident learning on out-of-fold probabilities.
    probe = _label_issues(x, y, classes, rows, findings, folds=folds, seed=seed,
                          multi_label=split.multi_label, wanted=label_issues)

    order = {k: i for i, k in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], -f.score, f.file))
    counts = {k: sum(f.kind == k for f in findings) for k in KINDS}
    summary = {
        "images": {"train": len(split.train), "val": len(split.val),
                   "featurised": len(rows), "unreadable": counts["unreadable"]},
        "classes": class_counts(split),
        "balance": balance(split),
        "counts": counts,
        "thresholds": {"duplicate": duplicate_threshold, "outlier_z": outlier_z,
                       "neighbours": NEIGHBOURS, "min_side": min_side},
        "label_issues": probe,
        "features": {"backbone": features.backbone, "feature_dim": features.feature_dim,
                     "seconds": round(features.seconds, 3), "cached": features.cached},
        "seconds": round(time.perf_counter() - t0 + features.seconds, 3),
    }
    return AuditReport(data, features.backbone, summary, tuple(findings))


def _label_issues(x: torch.Tensor, y: torch.Tensor, classes: list[str],
                  rows: Sequence[tuple[Sample, str]], findings: list[Finding], *, folds: int,
                  seed: int, multi_label: bool, wanted: bool | None) -> dict[str, Any]:
    """Append label_issue findings; returns what the check did (the summary's entry)."""
    if wanted is False:
        return {"checked": False, "reason": "not asked for (--no-label-issues)"}
    if multi_label:
        return {"checked": False, "reason": "multi-label data: the check covers one label per "
                "image"}
    try:
        cleanlab = _cleanlab()
    except UsageError as exc:
        if wanted:
            raise
        return {"checked": False, "reason": str(exc)}
    probs, fit = out_of_fold_probs(x, y, len(classes), folds=folds, seed=seed)
    if probs is None:
        return {"checked": False, "reason": fit["reason"]}
    import numpy as np
    from cleanlab.filter import find_label_issues

    labels = y.numpy()
    p = probs.numpy()
    ranked = find_label_issues(labels, p, return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    for i in np.asarray(ranked).tolist():
        s, part = rows[i]
        given, best = int(labels[i]), int(p[i].argmax())
        reason = (f"labelled {classes[given]!r} but the out-of-fold probe gives "
                  f"{classes[best]!r} {p[i, best]:.2f}" if best != given else
                  f"labelled {classes[given]!r}, which the out-of-fold probe gives only "
                  f"{p[i, given]:.2f}")
        findings.append(Finding(s.path, "label_issue", 1 - float(p[i, given]), reason, part,
                                classes[given], suggested=classes[best]))
    return {"checked": True, "cleanlab": cleanlab.__version__, "candidates": len(ranked),
            **fit}


def out_of_fold_probs(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, folds: int = 5,
                      seed: int = 0, C: float | None = None,
                      ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """(probabilities, what was fitted): each row's class probabilities from a linear probe that
    never saw it. C is chosen by `cv_linear`'s stratified k-fold CV (unless given); then each
    fold is fitted on the other folds at that C (standardised by their own statistics) and
    predicts the held-out one. (None, {'reason': ...}) when a class is too small for 2 folds.
    """
    import torch

    from tlreg.engine.solver import FINAL_TOL, cv_linear, fit_logistic, moments, stratified_folds

    t0 = time.perf_counter()
    x64, y = x.detach().to(torch.float64), y.detach().long()
    counts = torch.bincount(y, minlength=num_classes)
    k = min(folds, int(counts[counts > 0].min()) if len(y) else 0)
    if k < 2:
        return None, {"reason": "a class has fewer than 2 images: no held-out probabilities"}
    cv_accuracy = None
    if C is None:
        fit = cv_linear(x, y, num_classes, folds=k, seed=seed)
        C, cv_accuracy = float(fit.C), fit.cv_accuracy
    fold_of = stratified_folds(y, k, seed).to(x.device)
    probs = torch.empty(len(y), num_classes, dtype=torch.float64, device=x.device)
    for f in range(k):
        tr, te = fold_of != f, fold_of == f
        mean, std = moments(x64[tr])
        w, b, _ = fit_logistic((x64[tr] - mean) / std, y[tr], num_classes, C, tol=FINAL_TOL)
        probs[te] = (((x64[te] - mean) / std) @ w.T + b).softmax(1)
    accuracy = float((probs.argmax(1) == y).double().mean())
    return probs.cpu(), {"folds": k, "C": C, "cv_accuracy": cv_accuracy,
                         "oof_accuracy": round(accuracy, 6),
                         "seconds": round(time.perf_counter() - t0, 3)}


def _cleanlab() -> Any:
    try:
        import cleanlab
    except ImportError:
        raise UsageError(f"label-issue detection needs cleanlab: {INSTALL} (or pass "
                         "--no-label-issues to run the other checks)") from None
    return cleanlab


def image_sizes(samples: Sequence[Sample]) -> list[tuple[int, int] | str]:
    """Each image's (width, height) from its header, or why it cannot be opened."""
    from PIL import Image

    from tlreg.data.sources import image_file

    out: list[tuple[int, int] | str] = []
    for s in samples:
        try:
            with Image.open(image_file(s)) as img:
                out.append(img.size)
        except Exception as exc:  # any decoder failure is a finding, not a crash
            out.append(f"{type(exc).__name__}: {first_line(exc)}")
    return out


def _decode_error(sample: Sample) -> str:
    from tlreg.data.images import load_sample

    try:
        load_sample(sample)
    except Exception as exc:
        return f"{type(exc).__name__}: {first_line(exc)}"
    return "the feature pass could not decode it"


def class_counts(split: DataSplit) -> dict[str, dict[str, int]]:
    """Images per class in train and val (multi-label: images carrying each label)."""
    counts = {c: {"train": 0, "val": 0} for c in split.classes}
    for part, samples in (("train", split.train), ("val", split.val)):
        for s in samples:
            labels = ([i for i, v in enumerate(s.label) if v] if isinstance(s.label, tuple)
                      else [s.label])
            for i in labels:
                counts[split.classes[i]][part] += 1
    return counts


def balance(split: DataSplit) -> dict[str, Any]:
    """The smallest and the largest class in train, and their ratio (1: balanced)."""
    train = {c: n["train"] for c, n in class_counts(split).items()}
    if not train:
        return {}
    small, large = min(train, key=train.__getitem__), max(train, key=train.__getitem__)
    ratio = train[small] / train[large] if train[large] else 0.0
    return {"smallest": small, "smallest_count": train[small], "largest": large,
            "largest_count": train[large], "ratio": round(ratio, 4)}


def write_audit(report: AuditReport, out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir/audit.json` (written atomically); returns its path."""
    from tlreg._io import atomic_write_json

    path = Path(out_dir) / "audit.json"
    atomic_write_json(path, report.to_dict())
    return path


def write_csv(report: AuditReport, path: str | os.PathLike[str]) -> Path:
    """The findings as CSV (`CSV_COLUMNS`), written atomically."""
    from tlreg._io import atomic_write_text

    atomic_write_text(Path(path), report.to_csv())
    return Path(path)


def _check_options(folds: int, threshold: float, z: float, min_side: int) -> None:
    if folds < 2:
        raise UsageError(f"--folds must be at least 2, got {folds}")
    if not -1 <= threshold <= 1:
        raise UsageError(f"--duplicate-threshold is a cosine similarity in [-1, 1], got "
                         f"{threshold:g}")
    if z <= 0:
        raise UsageError(f"--outlier-z must be positive, got {z:g}")
    if min_side < 0:
        raise UsageError(f"--min-side must be >= 0, got {min_side}")


def _label_name(label: int | tuple[int, ...], classes: Sequence[str]) -> str:
    if isinstance(label, tuple):
        return ",".join(c for c, v in zip(classes, label, strict=True) if v)
    return classes[label]


def _copy_reason(what: str, other: str, other_part: str, part: str, sim: float | None,
                 threshold: float | None) -> str:
    measured = "" if sim is None else f" (cosine {sim:.3f} >= {threshold:g})"
    if other_part != part:
        return (f"{what} val image {other}{measured}: validation scores an image the model "
                "trained on; remove one of them")
    return f"{what} {other}{measured}: counted twice; keep one"


def _shortener(paths: Sequence[str]) -> Callable[[str], str]:
    """Paths relative to the data set's common folder, for the sentences."""
    try:
        root = os.path.commonpath([p for p in paths if os.path.isabs(p)]) if paths else ""
    except ValueError:
        root = ""
    if not root or not os.path.isdir(root):
        return lambda p: p
    return lambda p: os.path.relpath(p, root) if p.startswith(root) else p


__all__ = ["CSV_COLUMNS", "INSTALL", "KINDS", "MIN_SIDE", "AuditReport", "Finding", "audit",
           "audit_features", "balance", "class_counts", "default_backbone", "image_sizes",
           "out_of_fold_probs", "write_audit", "write_csv"]
