"""The built-in `csv` source: a table of image paths and labels (CSV, TSV or Parquet).

Like fastai's `ImageDataLoaders.from_csv`: one row per image, a path column (relative to the
table's folder, or to `root`), a label column, and either a split column (`train`, `val` /
`valid` / `validation`, `test`: test rows are left out of training) or a seeded, stratified
`val_split`. A column named `split` is used without being named. Class names are the labels,
sorted (numerically when every label is an integer), and the run keeps them.

Multi-label, like fastai's `label_delim`: with `label_delimiter`, a cell holds several labels
(`"ant outdoor"`), and the data set is multi-label when any row has more than one (or always,
with `multi_label=True`; `False` makes several labels an error). Labels are then 0/1 rows.

Every problem is one error before training starts, naming the table and the line: a missing
column (with the columns there are), an empty path or label, a path listed twice, a label in
val that train lacks, a file that is not UTF-8. A row whose file is missing is skipped and
counted, like an unreadable image; when most rows are missing it is an error instead (the
paths are probably relative to another folder: `--root`).
"""

from __future__ import annotations

import csv as _csv
import hashlib
import warnings
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
from tlreg.errors import UsageError

SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                "test": "test"}


def csv(location: str, val_split: float | None = None, seed: int = 0, *,
        path_column: str = "path", label_column: str = "label", split_column: str | None = None,
        root: str | None = None, label_delimiter: str | None = None,
        multi_label: bool | None = None) -> DataSplit:
    """Train and val samples listed in the table at `location` (see the module docstring)."""
    table = Path(location).expanduser()
    if not table.is_file():
        raise UsageError(f"table {table} does not exist")
    columns, rows = read_table(table)
    if split_column is None and "split" in columns and val_split is None:
        split_column = "split"
    for column, flag in ((path_column, "--path-column"), (label_column, "--label-column"),
                         (split_column, "--split-column")):
        if column is not None and column not in columns:
            raise UsageError(f"{table} has no column {column!r} (its columns: "
                             f"{', '.join(columns)}); name the right one with {flag}")
    if split_column is not None and val_split is not None:
        raise UsageError(f"{table} has a split column ({split_column!r}); drop --val-split")
    if split_column is None and val_split is None:
        raise UsageError(f"{table} has no split column; pass --val-split 0.2 to hold out a "
                         "fraction of each class, or --split-column NAME (values train / val)")
    base = Path(root).expanduser() if root else table.parent
    seen: dict[Path, int] = {}
    kept: list[tuple[str, tuple[str, ...], str]] = []  # (path, labels, split)
    missing: list[str] = []
    tests = 0
    for line, row in rows:
        rel, label = row[path_column].strip(), row[label_column].strip()
        if not rel:
            raise UsageError(f"{table} line {line}: the path ({path_column!r}) is empty")
        if not label:
            raise UsageError(f"{table} line {line}: {rel} has an empty label ({label_column!r})")
        tokens = tuple(sorted({t.strip() for t in label.split(label_delimiter)} - {""}
                              if label_delimiter else {label}))
        if not tokens:
            raise UsageError(f"{table} line {line}: {rel} has an empty label ({label_column!r})")
        if len(tokens) > 1 and multi_label is False:
            raise UsageError(f"{table} line {line}: {rel} has several labels ({label!r}); drop "
                             "--single-label to train a multi-label model")
        path = base / rel
        ident = path.resolve()
        if ident in seen:
            raise UsageError(f"{table} lists {rel} twice (lines {seen[ident]} and {line}); "
                             "one row per image")
        seen[ident] = line
        split = "train"
        if split_column is not None:
            value = row[split_column].strip().lower()
            if value not in SPLIT_VALUES:
                raise UsageError(f"{table} line {line}: split {row[split_column]!r} is not one "
                                 f"of {', '.join(SPLIT_VALUES)}")
            split = SPLIT_VALUES[value]
        if split == "test":
            tests += 1
            continue
        if not path.is_file():
            missing.append(rel)
            continue
        kept.append((str(path), tokens, split))
    listed = len(kept) + len(missing)
    if not listed:
        raise UsageError(f"{table} lists no training or validation images")
    if missing and len(missing) * 2 > listed:
        raise UsageError(f"{len(missing)} of the {listed} files listed in {table} do not exist "
                         f"(first: {base / missing[0]}); paths are read relative to {base}; "
                         "if they are relative to another folder, pass --root")
    if missing:
        warnings.warn(f"skipped {len(missing)} rows of {table} whose files do not exist "
                      f"(first: {base / missing[0]})", stacklevel=2)
    classes = sort_labels({t for _, tokens, _ in kept for t in tokens})
    index = {c: i for i, c in enumerate(classes)}
    multi = multi_label if multi_label is not None else any(len(t) > 1 for _, t, _ in kept)

    def target(tokens: tuple[str, ...]) -> int | tuple[int, ...]:
        return multi_hot([index[t] for t in tokens], len(classes)) if multi else index[tokens[0]]

    train = [Sample(p, target(t)) for p, t, s in kept if s == "train"]
    val = [Sample(p, target(t)) for p, t, s in kept if s == "val"]
    if val_split is not None:
        train, val = stratified_split(train, val_split, seed)
    info = {"source": "csv", "table": str(table), "sha256": _sha256(table), "rows": len(rows),
            "missing": len(missing), "test_rows": tests}
    return checked_split(str(table), classes, train, val, info)


def read_table(table: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, row)]) of a CSV, TSV or Parquet file; values as text."""
    if table.suffix.lower() in (".parquet", ".pq"):
        return _read_parquet(table)
    delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") else ","
    try:
        text = table.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{table} is not UTF-8 (byte {exc.start} is {exc.object[exc.start]:#x});"
                         " save it as UTF-8") from None
    reader = _csv.reader(text.splitlines(), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise UsageError(f"{table} is empty: expected a header row, then one row per image")
        columns = [h.strip() for h in header]
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise UsageError(f"{table} has the column {', '.join(map(repr, twice))} twice")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank lines
            if len(values) != len(columns):
                raise UsageError(f"{table} line {reader.line_num}: {len(values)} values for "
                                 f"{len(columns)} columns")
            rows.append((reader.line_num, dict(zip(columns, values, strict=True))))
    except _csv.Error as exc:
        raise UsageError(f"{table} line {reader.line_num}: not valid CSV ({exc})") from None
    return columns, rows


def _read_parquet(table: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"reading {table} needs pyarrow: pip install 'tlreg[hf]'") from None
    try:
        data: Any = pq.read_table(table)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid family
        raise UsageError(f"{table} is not a readable Parquet file: {exc}") from None
    columns = list(data.column_names)
    rows = [(i + 1, {c: "" if v is None else str(v) for c, v in row.items()})
            for i, row in enumerate(data.to_pylist())]
    return columns, rows


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
