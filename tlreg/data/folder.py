"""The built-in `folder` source: class folders on disk (`tlreg.data.sources` has the contract).

Layout: `DATA/train/<class>/*` and `DATA/val/<class>/*`, or `DATA/<class>/*` with a seeded,
stratified `val_split`. Every structural problem (no images, an empty class, one class, val
classes unknown to train) is a clear error before any training starts. Hidden files, and
anything in a hidden folder, are not samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tlreg.data.images import IMAGE_EXTENSIONS
from tlreg.data.sources import DataSplit, Sample, stratified_split
from tlreg.errors import UsageError


def _images(folder: Path) -> list[Path]:
    """Image files under `folder`; hidden files and anything in a hidden folder are skipped."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...],
                                                                           list[Sample]]:
    """Samples of a `<class>/<image>` folder; with `classes`, labels follow that order."""
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    dirs = _class_dirs(root)
    if not dirs:
        raise UsageError(f"{root} has no class folders (expected {root}/<class>/<image files>)")
    names = tuple(d.name for d in dirs)
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise UsageError(f"{root} has classes that are not in training: {', '.join(unknown)}")
        index = {c: i for i, c in enumerate(classes)}
    else:
        index = {c: i for i, c in enumerate(names)}
    samples: list[Sample] = []
    for d in dirs:
        files = _images(d)
        if not files:
            raise UsageError(f"class folder {d} has no images "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples += [Sample(str(f), index[d.name]) for f in files]
    return (tuple(classes) if classes is not None else names), samples


def folder(location: str | Path, val_split: float | None = None, seed: int = 0) -> DataSplit:
    """Train and val samples under the folder `location` (see the module docstring)."""
    root = Path(location).expanduser()
    if not root.is_dir():
        raise UsageError(f"data folder {root} does not exist")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir():
        if val_split is not None:
            raise UsageError(f"{root} already has train/ and val/; drop --val-split")
        classes, train = scan_folder(train_dir)
        if not val_dir.is_dir():
            raise UsageError(f"{root} has train/ but no val/; add {val_dir} or use --val-split "
                             f"with a single {root}/<class>/ folder")
        _, val = scan_folder(val_dir, classes)
    else:
        if val_split is None:
            raise UsageError(f"{root} has no train/ and val/ folders; put images in "
                             f"{root}/train/<class>/ and {root}/val/<class>/, or pass "
                             f"--val-split 0.2 to split {root}/<class>/ folders")
        classes, samples = scan_folder(root)
        train, val = stratified_split(samples, val_split, seed)
    if len(classes) < 2:
        raise UsageError(f"{root} has a single class ({classes[0]!r}); classification needs two "
                         "or more class folders")
    if not val:
        raise UsageError(f"the validation split of {root} is empty: "
                         + ("every class has a single image, which stays in train; add images "
                            "or a val/ folder" if val_split is not None else "val/ has no images"))
    return DataSplit(classes, tuple(train), tuple(val), {"source": "folder", "location": str(root)})

