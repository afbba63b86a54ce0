"""CLI command: `rank`, which backbone to train (tlreg.analysis.rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tlreg.cli._output import print_json, print_table
from tlreg.cli.options import with_source_flags


def register(app: typer.Typer) -> None:
    app.command("rank")(with_source_flags(rank))


def rank(
    data: str = typer.Argument(
        ..., help="What tlreg train takes: an image folder, a table, or NAME:LOCATION."),
    backbones: str = typer.Option(
        ..., "--backbones", "-b", metavar="PATTERNS",
        help="Comma-separated names and glob patterns over the registered backbones "
        "('efficientnet_lite*,resnet50'; tlreg backbones list), timm:<name>, random:<name> "
        "(a random-init control)."),
    random_init: bool = typer.Option(
        False, "--random-init", help="Add a random-init control of the first backbone."),
    folds: int = typer.Option(5, "--folds", help="Folds of the probe's cross-validation."),
    budget: float | None = typer.Option(
        None, "--budget", metavar="SECONDS",
        help="Skip a backbone whose feature pass is estimated to take longer (cached features "
        "cost nothing)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write DIR/rank.json (for --backbone best-of:DIR) and "
        "DIR/rank.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranking as JSON."),
    pretrained: bool = typer.Option(
        True, "--pretrained/--no-pretrained", help="Score the backbones' pretrained weights."),
    img_size: int | None = typer.Option(None, "--img-size"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Use the feature cache."),
    cache_dir: str | None = typer.Option(None, "--cache-dir"),
    feature_dtype: str = typer.Option(
        "float32", "--feature-dtype", help="How cached features are stored (as tlreg train)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    seed: int = typer.Option(0, "--seed", help="Folds, val split and random-init weights."),
    val_split: float | None = typer.Option(
        None, "--val-split", help="Hold out this fraction of each class (data without a val "
        "split)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    sources: dict[str, Any] | None = None,
) -> None:
    """Rank backbones on DATA before training: LogME and a cross-validated linear probe on
    each one's cached frozen features, best first, with a recommendation."""
    from tlreg.analysis.rank import rank as run_rank
    from tlreg.analysis.rank import write_rank
    from tlreg.engine.config import check_device

    check_device(device)

    def say(message: str) -> None:
        if not quiet:
            typer.echo(message, err=True)  # stdout is the table (or the JSON) alone

    ranking = run_rank(data, backbones, random_init=random_init, folds=folds, seed=seed,
                       budget=budget, pretrained=pretrained, img_size=img_size, cache=cache,
                       cache_dir=cache_dir, feature_dtype=feature_dtype, device=device,
                       batch_size=batch_size, workers=workers, val_split=val_split,
                       source_args=sources, say=say)
    written = write_rank(ranking, out) if out is not None else None
    if as_json:
        print_json(ranking.to_dict())
        return
    from rich.markup import escape  # a reason may hold brackets: pip install 'pkg[extra]'

    print_table(
        ["#", "backbone", "probe CV acc", "LogME", "val acc", "params", "features s",
         "probe+LogME s", "note"],
        [(i + 1 if r.status == "ranked" else "-", escape(r.name), _acc(r.cv_accuracy, r.cv_std),
          _num(r.logme), _num(r.val_accuracy),
          "-" if r.params is None else f"{r.params / 1e6:.1f}M",
          _secs(r.feature_seconds, r.computed_images), _num(r.score_seconds, ".1f"),
          escape(f"{r.status}: {r.reason}") if r.status != "ranked"
          else ("control" if r.control else ""))
         for i, r in enumerate(ranking.rows)],
        title=f"{ranking.data}: {ranking.train_images} train / {ranking.val_images} val "
        f"images, sorted by probe CV accuracy, then LogME",
    )
    typer.echo(f"recommended: {ranking.recommendation}")
    if written is not None:
        typer.echo(f"-> {written[0]}, {written[1]}; tlreg train {data} --backbone "
                   f"best-of:{out} trains it")


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _acc(acc: float | None, std: float | None) -> str:
    return _num(acc) + ("" if std is None else f" ± {std:.3f}")


def _secs(seconds: float | None, computed: int | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}" + (" (cached)" if computed == 0 else "")
