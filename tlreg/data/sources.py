"""Data sources: where the images come from, as a name -> builder table.

Like timm's `create_reader("prefix/...")`, a prefix picks the source: `NAME:LOCATION` calls the
source registered as NAME in the `tlreg.sources` entry-point group with LOCATION, and anything
else is a class folder (the built-in `folder` source). Unlike timm's if-chain, the table is the
entry-point group, so a package adds a source without editing tlreg; tlreg's own `folder`
registers the same way. Names follow the registry's rules: when two packages register one
name, `DIST:NAME:LOCATION` picks one.

The contract, for every source::

    source(location: str, val_split: float | None, seed: int) -> DataSplit

- `DataSplit(classes, train, val)`: `classes` are the label names in label order (at least
  two); `train` and `val` are tuples of `Sample(path, label)`, `path` a local image file that
  `tlreg.data.images.load_rgb` decodes and `label` an index into `classes`.
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

import os
from dataclasses import dataclass
from pathlib import Path

from tlreg.errors import PluginError, UnknownNameError
from tlreg.plugins import find_plugins, normalize_dist
from tlreg.registry import find, load, suggest

#: The source a plain path goes to, qualified so another package's `folder` cannot shadow it.
FOLDER = "tlreg:folder"


@dataclass(frozen=True)
class Sample:
    """One image file and its label (an index into `DataSplit.classes`)."""

    path: str
    label: int


@dataclass(frozen=True)
class DataSplit:
    """What a source gives: class names in label order, and the train / val samples."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]


def open_source(location: str | os.PathLike[str], val_split: float | None,
                seed: int) -> DataSplit:
    """The train / val split at `location`: `NAME:REST` from source NAME, else a class folder."""
    name, rest = resolve(location)
    plugin = find("source", name)
    split = load(plugin)(rest, val_split, seed)
    if not isinstance(split, DataSplit):
        raise PluginError(f"source {plugin.name!r} from package {plugin.dist} {plugin.version} "
                          f"returned {type(split).__name__}, expected a "
                          "tlreg.data.sources.DataSplit")
    return split


def resolve(location: str | os.PathLike[str]) -> tuple[str, str]:
    """(registry name of the source, the location it is given) for `location`.

    A path object is always a folder; a string is parsed as the module docstring says.
    """
    if not isinstance(location, str):
        return FOLDER, os.fspath(location)
    head, sep, rest = location.partition(":")
    drive = len(head) == 1 and head.isalpha()
    if not sep or drive or Path(location).expanduser().exists():
        return FOLDER, location
    plugins = find_plugins("source")
    if any(p.name == head for p in plugins):
        return head, rest
    name, sep, inner = rest.partition(":")
    if sep and any(p.qualified_name == f"{normalize_dist(head)}:{name}" for p in plugins):
        return f"{head}:{name}", inner
    known = sorted({p.name for p in plugins})
    raise UnknownNameError(
        f"unknown data source {head!r} in {location!r} (not an existing path either)"
        f"{suggest(head, known) or '.'} Registered sources: {', '.join(known) or 'none'}; "
        "a class folder needs no prefix")
