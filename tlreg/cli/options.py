"""Flags several commands share, declared once: the data source's, --tta, key=value lists.

Every command that opens a data source (`train`, `eval`, `predict`, `rank`, `audit`) takes a
table or `hf:` data set the same way through `with_source_flags`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

import typer

from tlreg.data.tta import TTA
from tlreg.errors import UsageError

#: Options of the built-in sources that have their own flags; they go to `source_args`.
SOURCE_OPTIONS = ("path_column", "label_column", "split_column", "image_column", "root",
                  "label_delimiter", "multi_label")

# Declared once: `train` names them, `with_source_flags` adds them to every other command
# that opens a source.
PathColumn = Annotated[str | None, typer.Option(
    "--path-column", help="Table column of image paths (csv; default 'path').")]
LabelColumn = Annotated[str | None, typer.Option(
    "--label-column", help="Column of labels (csv default 'label'; hf: a ClassLabel).")]
SplitColumn = Annotated[str | None, typer.Option(
    "--split-column", help="Table column of train / val / test (csv; 'split' if there).")]
ImageColumn = Annotated[str | None, typer.Option(
    "--image-column", help="Column of images (hf; default: the first Image column).")]
Root = Annotated[str | None, typer.Option(
    "--root", help="Folder the table's paths are relative to (default: the table's).")]
LabelDelimiter = Annotated[str | None, typer.Option(
    "--label-delimiter", help="Separator of several labels in one cell (csv): multi-label.")]
MultiLabel = Annotated[bool | None, typer.Option(
    "--multi-label/--single-label",
    help="Several labels per image: sigmoid outputs, BCE, thresholds tuned on val (default: "
    "detected from the labels; csv and hf).")]
SourceArg = Annotated[list[str] | None, typer.Option(
    "--source-arg", help="key=value for the data source (a plugin's options).")]
# `eval` and `predict`: test-time augmentation, the mean logits of several views per image.
Tta = Annotated[str, typer.Option(
    "--tta", help=f"Test-time augmentation: {' | '.join(TTA)} (mean logits of the views).")]


#: The flags of every command that opens a data source, in the order help lists them.
SOURCE_FLAGS: dict[str, Any] = {
    "path_column": PathColumn, "label_column": LabelColumn, "split_column": SplitColumn,
    "image_column": ImageColumn, "root": Root, "label_delimiter": LabelDelimiter,
    "multi_label": MultiLabel, "source_arg": SourceArg,
}


def with_source_flags(command: Any) -> Any:
    """`command` with the data-source flags (SOURCE_FLAGS) added after its own; it receives
    them as one keyword argument, `sources` (the source's keyword arguments).

    Declared once here, so `eval`, `rank` and `audit` take a table or `hf:` data set as
    `train` does."""
    sig = inspect.signature(command, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != "sources"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                               default=None) for name, kind in SOURCE_FLAGS.items()]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        flags = {name: kwargs.pop(name, None) for name in SOURCE_FLAGS}
        return command(*args, sources=source_args(flags, flags.pop("source_arg")), **kwargs)

    run.__signature__ = sig.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    return run


def source_args(values: dict[str, Any], source_arg: list[str] | None) -> dict[str, Any]:
    """The source's keyword arguments: the flags in SOURCE_OPTIONS that were given, then
    `--source-arg key=value` pairs."""
    given = {k: v for k, v in values.items() if k in SOURCE_OPTIONS and v is not None}
    return given | parse_kv(source_arg, "source-arg")


def parse_kv(items: list[str] | None, what: str) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML (numbers, lists, booleans, null)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--{what} takes key=value, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out
