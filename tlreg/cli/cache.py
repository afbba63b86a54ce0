"""CLI commands: `cache ls`, `cache clear`."""

from __future__ import annotations

import typer

from tlreg.cli._output import print_json, print_table

cache_app = typer.Typer(help="Inspect or clear the feature and decoded-image caches.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """Feature- and decoded-image-cache entries: backbone, images, size."""
    from tlreg.data.features import cache_root, list_entries

    rows = list_entries()
    if as_json:
        print_json(rows)
        return
    print_table(
        ["kind", "key", "backbone", "images", "MB"],
        [(r["kind"], r["key"], r["backbone"] or "-", r["entries"], f"{r['bytes'] / 1e6:.2f}")
         for r in rows],
        title=f"caches in {cache_root()}",
    )


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every entry of the feature and decoded-image caches."""
    from tlreg.data.features import cache_root, clear

    n = clear()
    typer.echo(f"removed {n} cache entries from {cache_root()}")
