"""CLI command: `report`, one self-contained HTML page about a run (docs/report.md).

matplotlib and Pillow are imported inside the command body, by tlreg.runs.report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command to the `tlreg` app."""
    app.command("report")(report)


def report(
    run: Annotated[Path, typer.Argument(help="A run directory (from `tlreg train`).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="The HTML file to write (default RUN/report.html; a folder gets "
                            "report.html inside). Written atomically.")] = None,
    audit: Annotated[Path | None, typer.Option(
        "--audit", help="An audit.json from `tlreg audit` (or its folder) to show "
                        "(default: RUN/audit.json when there is one).")] = None,
    open_page: Annotated[bool, typer.Option(
        "--open", help="Open the page in the default web browser.")] = False,
) -> None:
    """Write one self-contained HTML page about a run: curves, learning rates, confusion
    matrix, per-class metrics, the worst val errors, calibration and the audit's findings."""
    from tlreg.runs.report import write_report

    path = write_report(run, out, audit=audit)
    print(f"wrote {path}")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
