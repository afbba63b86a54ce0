"""Data sources: where the images come from, as a name -> builder table.

Like timm's `create_reader("prefix/...")`, a prefix picks the source: `NAME:LOCATION` calls the
source registered as NAME in the `tlreg.datasets` entry-point group with LOCATION, and anything
else is a class folder (the built-in `folder` source). Unlike timm's if-chain, the table is the
entry-point group, so a package adds a source without editing tlreg; tlreg's own `folder`
registers the same way. Names follow the registry's rules: when two packages register one
name, `DIST:NAME:LOCATION` picks one.

The contract, for every source::

    source(location: str, val_split: float | None, seed: int) -> DataSplit

- `DataSplit(classes, train, val)`: `classes` are the label names in label order (at least
  two); `train` and `val` are tuples of `Sample(path, label)`, `path` a local image file that
  `tlreg.data.images.load_rgb` decodes and `label` an index into `classes`, or for a
  multi-label data set a 0/1 tuple with one entry per class (`multi_hot`).
- `val_split` is the fraction of each class to hold out when the data has no validation
  split of its own (None: use the source's own split, or raise a `UsageError` saying the data
  has none); `seed` makes that hold-out the same on every run.
- The same arguments give the same samples in the same order: resume, the feature cache and
  the decoded-image cache compare them.
- Bad input is a `tlreg.errors.UsageError` (exit 2) that says what to fix, raised before any
  training starts.
- Optional dependencies (`datasets`, `pandas`, a cloud SDK) are imported inside the builder
  that needs them, never at module level: listing sources reads metadata only, and a missing
  extra fails only the run that names that source.

What counts as a folder: a location with no `:`, a one-letter prefix (a Windows drive,
`C:\\data`), or a path that exists (a source name never hides a folder on disk). An unknown
prefix that is not an existing path is an error naming the registered sources.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tlreg.errors import PluginError, UnknownNameError, UsageError
from tlreg.plugins import find_plugins, normalize_dist
from tlreg.registry import find, load, suggest

#: The source a plain path goes to, qualified so another package's `folder` cannot shadow it.
FOLDER = "tlreg:folder"


@dataclass(frozen=True)
class Sample:
    """One image and its label: an index into `DataSplit.classes`, or (multi-label) a 0/1
    tuple with one entry per class, so `torch.tensor([s.label ...])` is the target either way.

    A file on disk is just its `path`. An image held in memory (an Arrow row, a download) also
    carries its encoded bytes as `data`, and `path` is only its name in messages and records
    (`hf:beans/train/17`); its identity is then the bytes' SHA-256, computed once here.
    """

    path: str
    label: int | tuple[int, ...]
    data: bytes | None = field(default=None, repr=False, compare=False)
    key: str = ""

    def __post_init__(self) -> None:
        if self.data is not None and not self.key:
            object.__setattr__(self, "key", "sha256:" + hashlib.sha256(self.data).hexdigest())


def identity(sample: Sample) -> tuple[str, list[int]]:
    """(name, stamp) that the feature and decoded-image caches key a sample on.

    A file: its path, with its size and modification time as the stamp (touching it recomputes
    it). An in-memory image: its content hash, with its size: equal bytes are one entry.
    """
    if sample.data is not None:
        return sample.key, [len(sample.data), 0]
    st = os.stat(sample.path)
    return sample.path, [st.st_size, st.st_mtime_ns]


def image_file(sample: Sample) -> str | IO[bytes]:
    """What `PIL.Image.open` reads for `sample`: its path, or its bytes."""
    return io.BytesIO(sample.data) if sample.data is not None else sample.path


@dataclass(frozen=True)
class DataSplit:
    """What a source gives: class names in label order, the train / val samples, and what the
    run should record about where they came from (`info`: a data set id, its revision...)."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def multi_label(self) -> bool:
        """Whether labels are 0/1 tuples (any number of classes per image)."""
        first = self.train[0] if self.train else self.val[0] if self.val else None
        return first is not None and isinstance(first.label, tuple)


def open_source(location: str | os.PathLike[str], val_split: float | None, seed: int,
                options: Mapping[str, Any] | None = None) -> DataSplit:
    """The train / val split at `location`: `NAME:REST` from source NAME, a table file from
    `csv`, anything else from `folder`. `options` are the source's own keyword arguments."""
    import inspect

    name, rest = resolve(location)
    plugin = find("source", name)
    builder = load(plugin)
    options = dict(options or {})
    signature = inspect.signature(builder)
    try:  # the user's mistake (an option this source lacks) is told apart from the source's bug
        signature.bind(rest, val_split, seed, **options)
    except TypeError:
        params = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
        takes = ", ".join(p.name for p in params) or "no options"
        unknown = ", ".join(sorted(k for k in options if k not in {p.name for p in params}))
        raise UsageError(f"data source {plugin.name!r} does not take {unknown or 'these options'}"
                         f" (it takes: {takes})") from None
    split = builder(rest, val_split, seed, **options)
    if not isinstance(split, DataSplit):
        raise PluginError(f"source {plugin.name!r} from package {plugin.dist} {plugin.version} "
                          f"returned {type(split).__name__}, expected a "
                          "tlreg.data.sources.DataSplit")
    return split


#: File suffixes the built-in `csv` source reads (a plain path to one of these is a table).
TABLE_SUFFIXES = (".csv", ".tsv", ".tab", ".parquet", ".pq")
TABLE = "tlreg:csv"


def resolve(location: str | os.PathLike[str]) -> tuple[str, str]:
    """(registry name of the source, the location it is given) for `location`.

    A path object, or a string that is an existing path, is a folder or (a file with a table
    suffix) a table; other strings are parsed as the module docstring says.
    """
    text = os.fspath(location)
    if not isinstance(location, str) or Path(text).expanduser().exists():
        path = Path(text).expanduser()
        return (TABLE if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES
                else FOLDER), text
    head, sep, rest = text.partition(":")
    drive = len(head) == 1 and head.isalpha()
    if not sep or drive:
        return (TABLE if Path(text).suffix.lower() in TABLE_SUFFIXES else FOLDER), text
    plugins = find_plugins("source")
    if any(p.name == head for p in plugins):
        return head, rest
    name, sep, inner = rest.partition(":")
    if sep and any(p.qualified_name == f"{normalize_dist(head)}:{name}" for p in plugins):
        return f"{head}:{name}", inner
    known = sorted({p.name for p in plugins})
    raise UnknownNameError(
        f"unknown data source {head!r} in {text!r} (not an existing path either)"
        f"{suggest(head, known) or '.'} Registered sources: {', '.join(known) or 'none'}; "
        "a class folder needs no prefix")


# -- helpers every source can use ---------------------------------------------------------------


def stratified_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[
        list[Sample], list[Sample]]:
    """Hold out `fraction` of each class with a fixed seed (at least one image, never a class's
    last): the same images go to val on every run. Both parts come back sorted by path."""
    if not 0 < fraction < 1:
        raise UsageError(f"--val-split must be between 0 and 1, got {fraction:g}")
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    strata = [_stratum(s.label) for s in samples]
    for label in sorted(set(strata)):
        group = [s for s, k in zip(samples, strata, strict=True) if k == label]
        rng.shuffle(group)
        n_val = min(len(group) - 1, max(1, math.ceil(len(group) * fraction)))
        val += group[:n_val]
        train += group[n_val:]
    return sorted(train, key=lambda s: s.path), sorted(val, key=lambda s: s.path)


def _stratum(label: int | tuple[int, ...]) -> int:
    """A class, or for a multi-label row its first label (-1 for none): images that share a
    stratum are split together."""
    if isinstance(label, int):
        return label
    return next((i for i, v in enumerate(label) if v), -1)


def multi_hot(indices: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """The 0/1 label of a multi-label sample from its class indices."""
    chosen = set(indices)
    return tuple(int(i in chosen) for i in range(num_classes))


def label_classes(label: int | tuple[int, ...]) -> list[int]:
    """The class indices a label names (one, or a multi-label row's ones)."""
    return [label] if isinstance(label, int) else [i for i, v in enumerate(label) if v]


def sort_labels(labels: set[str] | Sequence[str]) -> tuple[str, ...]:
    """Labels in class order: numerically when all are integers (2 before 10), else by text."""
    if all(lb.lstrip("-").isdigit() for lb in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def checked_split(where: str, classes: Sequence[str], train: Sequence[Sample],
                  val: Sequence[Sample], info: Mapping[str, Any] | None = None) -> DataSplit:
    """A DataSplit, or the one error that says what is wrong with it: fewer than two classes, a
    class with no training image, an empty val, or a val label that train lacks."""
    if len(classes) < 2:
        raise UsageError(f"{where} has {len(classes)} class{'es' if len(classes) != 1 else ''}"
                         f"{f' ({classes[0]!r})' if classes else ''}; classification needs two "
                         "or more")
    seen = {i for s in train for i in label_classes(s.label)}
    empty = [c for i, c in enumerate(classes) if i not in seen]
    only_val = sorted({classes[i] for s in val for i in label_classes(s.label)}
                      - {classes[i] for i in seen})
    if only_val:
        raise UsageError(f"{where}: label{'s' if len(only_val) > 1 else ''} "
                         f"{', '.join(map(repr, only_val))} appear in val but not in train")
    if empty:
        raise UsageError(f"{where}: class{'es' if len(empty) > 1 else ''} "
                         f"{', '.join(map(repr, empty))} have no training images")
    if not val:
        raise UsageError(f"the validation split of {where} is empty")
    return DataSplit(tuple(classes), tuple(train), tuple(val), dict(info or {}))
