"""The built-in `hf` source: a Hugging Face `datasets` data set (`pip install "tlreg[hf]"`).

`hf:LOCATION` is, in this order:
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`load_from_disk`);
- a local Parquet or Arrow file (`load_dataset("parquet", data_files=...)`: one `train` split);
- any other local folder `datasets` can read (`load_dataset(folder)`: Parquet files named by
  split, `data/train-*.parquet`, an imagefolder, ...);
- a Hub data set id, `user/name` or `user/name@revision`: the revision is resolved to a commit,
  that commit is downloaded with `huggingface_hub.snapshot_download` (honouring `HF_HUB_OFFLINE`
  and the token) and read with `load_dataset` from the local copy, so the run records exactly
  which commit it trained on. Failures are the same one-line Hub errors as `tlreg pull`.

The image column is the first `datasets.Image` column (or `image_column`); images are read as
their encoded bytes (`Image(decode=False)`), never decoded here: a row stored as a local file
is a file sample (its path), a row stored as bytes an in-memory sample keyed by its content
hash. The label column is the first `ClassLabel` column, else one named `label` / `labels`
(or `label_column`); `ClassLabel` names are the classes, in their order. Splits: `train`, and
`validation` / `valid` / `val` (or `train=` / `val=` the split names), else a seeded
`val_split` of train.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tlreg.data.sources import (
    DataSplit,
    Sample,
    checked_split,
    multi_hot,
    sort_labels,
    stratified_split,
)
from tlreg.errors import UsageError, first_line

VAL_NAMES = ("validation", "valid", "val")
_EXTRA = "reading Hugging Face data sets needs the `datasets` package: pip install 'tlreg[hf]'"


def hf(location: str, val_split: float | None = None, seed: int = 0, *,
       image_column: str | None = None, label_column: str | None = None,
       train: str = "train", val: str | None = None,
       multi_label: bool | None = None) -> DataSplit:
    """Train and val samples of a `datasets` data set (see the module docstring)."""
    try:
        import datasets
    except ImportError:
        raise UsageError(_EXTRA) from None
    if not location:
        raise UsageError("hf: needs a data set: hf:user/name, hf:./saved_dataset or "
                         "hf:data.parquet")
    loaded, info = _load(datasets, location)
    splits = ({"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded))
    if train not in splits:
        raise UsageError(f"{location} has no split {train!r} (its splits: "
                         f"{', '.join(splits)}); name one with --source-arg train=NAME")
    val_name = val if val is not None else next((n for n in VAL_NAMES if n in splits), None)
    if val is not None and val not in splits:
        raise UsageError(f"{location} has no split {val!r} (its splits: {', '.join(splits)})")
    if val_name is not None and val_split is not None:
        raise UsageError(f"{location} has a validation split ({val_name!r}); drop --val-split")
    if val_name is None and val_split is None:
        raise UsageError(f"{location} has no validation split (its splits: "
                         f"{', '.join(splits)}); pass --val-split 0.2, or --source-arg "
                         "val=NAME to validate on another split")
    first = splits[train]
    image_column = _image_column(datasets, first, image_column, location)
    label_column, classes, several = _label_column(datasets, first, label_column, location)
    if several and multi_label is False:
        raise UsageError(f"hf:{location}: column {label_column!r} holds lists of labels; drop "
                         "--single-label to train a multi-label model")
    multi = several or bool(multi_label)
    if classes is None:  # plain values: the classes are the labels seen in train and val
        seen = {str(v) for name in (train, val_name) if name
                for v in _values(splits[name][label_column], several)}
        classes = sort_labels(seen)
    where = f"hf:{location}"
    parts = {name: _samples(datasets, splits[name], image_column, label_column, classes,
                            f"{where}/{name}", multi) for name in (train, val_name) if name}
    train_samples, val_samples = parts[train], parts.get(val_name or "", [])
    if val_name is None:
        train_samples, val_samples = stratified_split(train_samples, val_split or 0.2, seed)
    info |= {"splits": {"train": train, "val": val_name}, "image_column": image_column,
             "label_column": label_column}
    return checked_split(where, classes, train_samples, val_samples, info)


def _load(datasets: Any, location: str) -> tuple[Any, dict[str, Any]]:
    """The data set at `location` and what the run records about it."""
    path = Path(location).expanduser()
    info: dict[str, Any] = {"source": "hf", "dataset": location}
    if path.exists():
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file()
                                  or (path / "state.json").is_file()):
                return datasets.load_from_disk(str(path)), info
            if path.is_file():
                builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix.lower())
                if builder is None:
                    raise UsageError(f"hf:{location}: expected a .parquet or .arrow file, a "
                                     "folder `datasets` reads, or a Hub data set id")
                return datasets.load_dataset(builder, data_files=str(path)), info
            # a folder: datasets infers the format and the splits from the file names
            return datasets.load_dataset(str(path)), info
        except UsageError:
            raise
        except Exception as exc:  # datasets raises many kinds for unreadable local data
            raise UsageError(f"hf:{location}: `datasets` cannot read it: "
                             f"{type(exc).__name__}: {first_line(exc)}") from exc
    folder, sha = _snapshot(location)
    info |= {"revision": sha}
    try:
        return datasets.load_dataset(str(folder)), info
    except Exception as exc:
        raise UsageError(f"hf:{location} (commit {sha[:12]}): `datasets` cannot read it: "
                         f"{type(exc).__name__}: {first_line(exc)}") from exc


def _snapshot(location: str) -> tuple[Path, str]:
    """A local copy of a Hub data set at a pinned commit: (folder, commit sha)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from tlreg.hubclient import check_revision, hf_api, hub_errors, remember_ref

    repo_id, sep, rev = location.partition("@")
    try:  # `user/name`, or a legacy bare name (`beans`), which the Hub redirects
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"hf:{location} is neither a local path nor a Hub data set id "
                         f"(user/name[@revision]): {exc}") from None
    revision = check_revision(rev) if sep else "main"
    api = hf_api(None, None)
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true"):
        with hub_errors(repo_id, revision, api.endpoint):
            folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                            local_files_only=True))
        return folder, folder.name
    with hub_errors(repo_id, revision, api.endpoint):
        sha = api.dataset_info(repo_id, revision=revision).sha
        assert sha is not None
        folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=sha,
                                        endpoint=api.endpoint))
    if revision != sha:
        remember_ref(folder, revision, sha)  # so an offline run finds `main` in the cache
    return folder, sha


def _columns(ds: Any) -> str:
    return ", ".join(f"{name} ({type(feat).__name__})" for name, feat in ds.features.items())


def _image_column(datasets: Any, ds: Any, name: str | None, location: str) -> str:
    if name is not None:
        if name not in ds.features:
            raise UsageError(f"hf:{location} has no column {name!r} (its columns: "
                             f"{_columns(ds)})")
        return name
    found = [n for n, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not found:
        raise UsageError(f"hf:{location} has no image column (its columns: {_columns(ds)}); "
                         "name the column of image bytes or paths with --image-column")
    return found[0]


def _values(column: Any, several: bool) -> list[Any]:
    return [v for row in column for v in row] if several else list(column)


def _label_column(datasets: Any, ds: Any, name: str | None,
                  location: str) -> tuple[str, tuple[str, ...] | None, bool]:
    """(label column, a ClassLabel's names or None for classes from the values, whether each
    row holds a list of labels: a `Sequence` / `List` of them is multi-label)."""
    if name is None:
        name = next((n for n, f in ds.features.items()
                     if isinstance(getattr(f, "feature", f), datasets.ClassLabel)),
                    next((n for n in ("label", "labels") if n in ds.features), None))
        if name is None:
            raise UsageError(f"hf:{location} has no label column (its columns: "
                             f"{_columns(ds)}); name it with --label-column")
    if name not in ds.features:
        raise UsageError(f"hf:{location} has no column {name!r} (its columns: {_columns(ds)})")
    feature = ds.features[name]
    inner = getattr(feature, "feature", None)  # Sequence(...) / List(...): labels per row
    several = inner is not None and not isinstance(feature, dict)
    if several:
        feature = inner
    if isinstance(feature, datasets.ClassLabel):
        return name, tuple(feature.names), several
    if not isinstance(feature, datasets.Value):
        raise UsageError(f"hf:{location}: column {name!r} is {type(ds.features[name]).__name__}"
                         "; labels must be a ClassLabel, a value, or a list of either")
    return name, None, several


def _samples(datasets: Any, ds: Any, image_column: str, label_column: str,
             classes: tuple[str, ...], where: str, multi: bool = False) -> list[Sample]:
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    feature = ds.features[label_column]
    labelled = isinstance(getattr(feature, "feature", feature), datasets.ClassLabel)
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for i, (image, label) in enumerate(zip(ds[image_column], ds[label_column], strict=True)):
        values = label if isinstance(label, list) else [label]
        if label is None or not values or any(v is None or (not labelled and str(v) == "")
                                              for v in values):
            raise UsageError(f"{where} row {i}: empty label ({label_column!r})")
        found = [int(v) if labelled else index[str(v)] for v in values]
        if not all(0 <= t < len(classes) for t in found):  # datasets marks unlabelled rows -1
            raise UsageError(f"{where} row {i} has no label ({label_column!r} is {label}); "
                             "train and validate on labelled splits")
        target: int | tuple[int, ...] = (multi_hot(found, len(classes)) if multi
                                         else found[0])
        if isinstance(image, dict):  # Image(decode=False): {"bytes": ..., "path": ...}
            data, path = image.get("bytes"), image.get("path")
        elif isinstance(image, bytes | bytearray):
            data, path = bytes(image), None
        elif isinstance(image, str):
            data, path = None, image
        else:
            data, path = None, None
        if data is not None:
            samples.append(Sample(f"{where}/{i}", target, data=data))
        elif path and Path(path).is_file():
            samples.append(Sample(path, target))
        else:  # no bytes and no readable file: unreadable, like a corrupt image
            samples.append(Sample(f"{where}/{i}", target, data=b""))
    return samples

