"""CLI command: `demo`."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add `tlreg demo` to the app."""
    app.command("demo")(demo)


def demo(
    data: str | None = typer.Option(
        None, "--data", help="Other data: DIR/{train,val}/<class>, a table, NAME:LOCATION."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory to create."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train EfficientNet-Lite0 on ants vs bees, offline, and show what to do next."""
    from tlreg.demo import run_demo

    r = run_demo(data, out, quiet=quiet)
    s, p = r["summary"], r["prediction"]
    top = ", ".join(f"{q['label']} {q['probability']:.2f}" for q in p["predictions"])
    typer.echo(f"""
validation accuracy {s['val_accuracy']:.3f} on {s['val_images']} images \
({s['train_images']} training images, {s['skipped_files']} skipped) in {r['seconds']:.0f}s
prediction for {r['image']}: {top}
run directory: {r['run_dir']}   shareable artifact: {r['artifact']}

next:
  tlreg predict {r['artifact']} path/to/images --top-k 2
  tlreg push {r['run_dir']} your-name/ants-vs-bees        # share the head on the Hub
  tlreg train path/to/your/folder --backbone efficientnet_lite0 --out runs/mine
""")
