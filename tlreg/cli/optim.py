"""CLI commands: optim (filled in by the issue that adds them)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tlreg` app."""
