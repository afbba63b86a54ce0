"""CLI command `audit`: label issues, duplicates, leaks, outliers, unreadable and tiny files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tlreg.analysis.audit import KINDS, MIN_SIDE
from tlreg.analysis.duplicates import DUPLICATE_THRESHOLD, OUTLIER_Z
from tlreg.cli._output import print_json, print_table
from tlreg.cli.options import with_source_flags

if TYPE_CHECKING:
    from tlreg.analysis.audit import AuditReport


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tlreg` app."""
    app.command("audit")(with_source_flags(audit))


def audit(
    data: str = typer.Argument(
        ..., help="Image folder, a table of paths and labels, or NAME:LOCATION (as tlreg train)."),
    backbone: str | None = typer.Option(
        None, "--backbone", "-b", help="Whose features to audit with (default: tlreg train's)."),
    val_split: float | None = typer.Option(
        None, "--val-split", help="Hold out this fraction of each class (data without a val "
        "split): which images count as val for leaks."),
    folds: int = typer.Option(5, "--folds", help="Folds of the out-of-fold probe."),
    duplicate_threshold: float = typer.Option(
        DUPLICATE_THRESHOLD, "--duplicate-threshold", metavar="COSINE",
        help="Centred cosine similarity of features from which two images are near-copies "
        "(docs/audit.md: how it was measured)."),
    outlier_z: float = typer.Option(
        OUTLIER_Z, "--outlier-z", help="Robust z-score below the median image's typicality "
        "from which an image is an outlier."),
    min_side: int = typer.Option(MIN_SIDE, "--min-side", help="Images with a shorter side "
                                 "below this many pixels are tiny."),
    label_issues: bool | None = typer.Option(
        None, "--label-issues/--no-label-issues",
        help="Find likely label errors with cleanlab (default: when it is installed, "
        "pip install 'tlreg[audit]')."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    weights: str | None = typer.Option(
        None, "--weights", help="Backbone weights from a .safetensors file."),
    img_size: int | None = typer.Option(None, "--img-size"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Use the feature cache."),
    cache_dir: str | None = typer.Option(None, "--cache-dir"),
    feature_dtype: str = typer.Option(
        "float32", "--feature-dtype", help="How cached features are stored (as tlreg train)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    seed: int = typer.Option(0, "--seed", help="Folds and the --val-split hold-out."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    csv: Path | None = typer.Option(None, "--csv", help="Also write the findings as CSV."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write OUT/audit.json "
                                    "(tlreg report shows it)."),
    limit: int = typer.Option(30, "--limit", help="Findings shown in the table (all go to "
                              "--json, --csv and --out)."),
    sources: dict[str, Any] | None = None,
) -> None:
    """What to fix in a data set: likely label errors, duplicates, train/val leaks, outliers,
    unreadable and tiny images, class balance; a ranked list of files with reasons."""
    from tlreg.analysis.audit import audit as run_audit
    from tlreg.analysis.audit import write_audit, write_csv

    report = run_audit(
        data, backbone=backbone, val_split=val_split, seed=seed,
        source_args=sources, folds=folds,
        duplicate_threshold=duplicate_threshold, outlier_z=outlier_z, min_side=min_side,
        label_issues=label_issues, pretrained=pretrained, weights=weights, img_size=img_size,
        cache=cache, cache_dir=cache_dir, feature_dtype=feature_dtype, device=device,
        batch_size=batch_size, workers=workers, say=lambda m: typer.echo(m, err=True))
    written = []
    if csv is not None:
        written.append(str(write_csv(report, csv)))
    if out is not None:
        written.append(str(write_audit(report, out)))
    if as_json:
        print_json(report.to_dict())
        return
    _show(report, limit)
    if written:
        typer.echo(f"-> {', '.join(written)}")


def _relative(path: str, data: str) -> str:
    """A file under the data folder, as a path inside it (the JSON and CSV keep it whole)."""
    import os

    if data and os.path.isdir(data):
        rel = os.path.relpath(path, data)
        if not rel.startswith(os.pardir):
            return rel
    return path


def _show(report: AuditReport, limit: int) -> None:
    s = report.summary
    images, counts = s["images"], s["counts"]
    found = ", ".join(f"{n} {k.replace('_', ' ')}{'s' if n != 1 else ''}"
                      for k, n in counts.items() if n) or "nothing to report"
    typer.echo(f"{report.data}: {images['train']} train + {images['val']} val images through "
               f"{report.backbone} ({s['features']['seconds']:.1f}s feature pass): {found}")
    b = s["balance"]
    if b:
        typer.echo(f"class balance: smallest / largest {b['ratio']:.2f} ({b['smallest']} "
                   f"{b['smallest_count']}, {b['largest']} {b['largest_count']} in train)")
    print_table(["class", "train", "val"],
                [(c, n["train"], n["val"]) for c, n in s["classes"].items()])
    probe = s["label_issues"]
    if not probe["checked"]:
        typer.echo(f"label issues not checked: {probe['reason']}", err=True)
    else:
        typer.echo(f"label issues: out-of-fold probe ({probe['folds']} folds, C "
                   f"{probe['C']:.3g}) accuracy {probe['oof_accuracy']:.3f}; cleanlab "
                   f"{probe['cleanlab']} flags {probe['candidates']}")
    if not report.findings:
        return
    shown = report.findings[:limit] if limit > 0 else report.findings
    print_table(["#", "kind", "score", "file", "label", "reason"],
                [(i, f.kind, f"{f.score:.3f}", _relative(f.file, report.data), f.label,
                  f.reason)
                 for i, f in enumerate(shown, 1)],
                title=f"findings, most severe first ({' > '.join(KINDS)})")
    if len(shown) < len(report.findings):
        typer.echo(f"... {len(report.findings) - len(shown)} more: --limit 0, --json, --csv "
                   "or --out for all")
