"""CLI commands: `eval` and `predict` (tlreg/predict.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tlreg.cli._output import print_json, print_table
from tlreg.cli.options import Tta, with_source_flags
from tlreg.data.tta import get_tta


def register(app: typer.Typer) -> None:
    app.command("eval")(with_source_flags(evaluate))
    app.command("predict")(predict)


RejectBelow = typer.Option(
    None, "--reject-below", metavar="P", min=0.0, max=1.0,
    help="Answer 'unknown' when the top (calibrated) probability is under P; eval reports "
    "the share of images kept and their accuracy.")
RejectUnfamiliar = typer.Option(
    None, "--reject-unfamiliar", metavar="Q", min=0.0, max=1.0,
    help="Answer 'unknown' when fewer than a share Q of val images look less like the training "
    "images (k-NN in feature space; runs with a frozen backbone). Q=0.05 turns away about 5% "
    "of images like val's.")


def evaluate(
    source: str = typer.Argument(..., help="Run directory, artifact folder or Hub id."),
    data: str = typer.Argument(..., help="Folder of <class>/ image folders, or a source whose "
                               "val split to score (a table with a split column, hf:...)."),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last (run directories)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json"),
    tta: Tta = "none",
    reject_below: float | None = RejectBelow,
    reject_unfamiliar: float | None = RejectUnfamiliar,
    sources: dict[str, Any] | None = None,
) -> None:
    """Accuracy, expected calibration error, per-class precision / recall, confusion matrix."""
    from tlreg.predict import evaluate as run_eval
    from tlreg.predict import load_model

    get_tta(tta)  # before the model loads
    report = run_eval(
        load_model(source, checkpoint=checkpoint), data, batch_size=batch_size, device=device,
        source_args=sources, tta=tta, reject_below=reject_below,
        reject_unfamiliar=reject_unfamiliar,
    )
    with_tta = "" if tta == "none" else f" (TTA {tta})"
    if as_json:
        print_json(report)
        return
    if "map" in report:  # multi-label
        typer.echo(f"mAP {report['map']:.4f}, F1 micro {report['micro_f1']:.4f} / macro "
                   f"{report['macro_f1']:.4f}, exact match {report['accuracy']:.4f} on "
                   f"{report['images']} images{with_tta}")
        print_table(
            ["class", "precision", "recall", "AP", "threshold", "support"],
            [(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}",
              "-" if m["ap"] is None else f"{m['ap']:.3f}", f"{m['threshold']:.3f}",
              m["support"]) for c, m in report["per_class"].items()],
        )
        return
    ece = "" if report.get("ece") is None else f", ECE {report['ece']:.4f}"
    if report.get("ece_calibrated") is not None:
        ece += (f" (calibrated {report['ece_calibrated']:.4f}, temperature "
                f"{report['temperature']:.3g})")
    typer.echo(f"accuracy {report['accuracy']:.4f}{ece} on {report['images']} images{with_tta}")
    if report.get("coverage") is not None:
        kept = report["accuracy_kept"]
        rules = [f"probability >= {report['reject_below']:g}"] * (
            report["reject_below"] is not None) + [
            f"familiarity >= {report['reject_unfamiliar']:g}"] * ("reject_unfamiliar" in report)
        typer.echo(f"{' and '.join(rules)}: {report['coverage']:.1%} of the images answered, "
                   f"accuracy {'-' if kept is None else f'{kept:.4f}'} on them; the rest "
                   "'unknown'")
    print_table(
        ["class", "precision", "recall", "support"],
        [
            (c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", m["support"])
            for c, m in report["per_class"].items()
        ],
    )
    classes = report["classes"]
    print_table(
        ["true \\ predicted", *classes],
        [(c, *row) for c, row in zip(classes, report["confusion_matrix"], strict=True)],
        title="confusion matrix",
    )


def predict(
    source: str = typer.Argument(..., help="Run directory, artifact folder, Hub id, or a "
                                 "model.onnx (or its folder): onnxruntime, no torch."),
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders, or tables (.csv, .tsv, .parquet) listing files."
    ),
    top_k: int = typer.Option(1, "--top-k", "-k"),
    checkpoint: str = typer.Option("best", "--checkpoint"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    revision: str | None = typer.Option(None, "--revision"),
    token: str | None = typer.Option(None, "--token", help="Hub token (never stored)."),
    allow_backbone_mismatch: bool = typer.Option(False, "--allow-backbone-mismatch"),
    as_json: bool = typer.Option(False, "--json"),
    csv: Path | None = typer.Option(None, "--csv", help="Also write the predictions as CSV."),
    path_column: str = typer.Option(
        "path", "--path-column", help="Column of image paths in a table input."
    ),
    tta: Tta = "none",
    reject_below: float | None = RejectBelow,
    reject_unfamiliar: float | None = RejectUnfamiliar,
    calibrated: bool = typer.Option(
        True, "--calibrated/--uncalibrated",
        help="Probabilities with the temperature fitted on val (when the model has one)."),
) -> None:
    """Top-k predictions for images, folders and tables of image paths."""
    from tlreg.predict import load_model
    from tlreg.predict import predict as run_predict

    get_tta(tta)  # before the model loads
    hub = {k: v for k, v in {"revision": revision, "token": token}.items() if v is not None}
    if allow_backbone_mismatch:
        hub["allow_backbone_mismatch"] = True
    model = load_model(source, checkpoint=checkpoint, device=device, **hub)
    results = run_predict(model, inputs, top_k=top_k, batch_size=batch_size, device=device,
                          path_column=path_column, tta=tta, reject_below=reject_below,
                          calibrated=calibrated, reject_unfamiliar=reject_unfamiliar)
    if csv is not None:
        _write_csv(csv, results, top_k)
    if as_json:
        print_json(results)
        return
    if any("labels" in r for r in results):  # multi-label: every label over its threshold
        print_table(
            ["file", "labels", f"top {top_k}", "probability"],
            [(r["file"], "error: " + r["error"], "", "") if "error" in r else (
                r["file"], ", ".join(r["labels"]) or "-",
                ", ".join(p["label"] for p in r["predictions"]),
                ", ".join(f"{p['probability']:.3f}" for p in r["predictions"]))
             for r in results],
        )
        return
    print_table(
        ["file", "label", "probability"],
        [
            (
                r["file"],
                *(
                    ("error: " + r["error"], "")
                    if "error" in r
                    else (
                        ", ".join(["unknown"] * r.get("rejected", False)
                                  + [p["label"] for p in r["predictions"]]),
                        ", ".join(f"{p['probability']:.3f}" for p in r["predictions"]),
                    )
                ),
            )
            for r in results
        ],
    )


def _write_csv(path: Path, results: list[dict[str, Any]], top_k: int) -> None:
    import csv as csv_mod
    import io

    from tlreg._io import atomic_write_text

    buf = io.StringIO()
    writer = csv_mod.writer(buf)
    multi = any("labels" in r for r in results)  # and whether each label is over its threshold
    writer.writerow(["file", "rank", "label", "probability", "error"] + (["selected"] * multi))
    for r in results:
        if "error" in r:
            writer.writerow([r["file"], "", "", "", r["error"]] + ([""] * multi))
            continue
        for rank, p in enumerate(r["predictions"], 1):
            selected = [int(p["label"] in r["labels"])] if multi else []
            writer.writerow([r["file"], rank, p["label"], f"{p['probability']:.6f}", "",
                             *selected])
    atomic_write_text(path, buf.getvalue())
