"""CLI commands over the registry: `plugins`, `backbones`, `heads`, `policies`, `sources`."""

from __future__ import annotations

import sys
from typing import Any

import typer

from tlreg.cli._output import print_json, print_table

backbones_app = typer.Typer(help="List and inspect backbones.", no_args_is_help=True)
heads_app = typer.Typer(help="List heads (the new top layer).", no_args_is_help=True)
policies_app = typer.Typer(help="List freezing policies.", no_args_is_help=True)
sources_app = typer.Typer(help="List data sources (where images come from).",
                          no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
    app.add_typer(backbones_app, name="backbones")
    app.add_typer(heads_app, name="heads")
    app.add_typer(policies_app, name="policies")
    app.add_typer(sources_app, name="sources")


def plugins(
    check: bool = typer.Option(False, "--check", help="Load every entry and report failures."),
    as_json: bool = JSON,
) -> None:
    """Every registered backbone, head, policy, callback, data source and exporter, by package."""
    from tlreg.plugins import find_plugins
    from tlreg.registry import check_all

    if check:
        from tlreg.plugins import version_conflicts

        results = check_all()
        ranges = [(dist, version, f"package {dist} {version} supports tlreg {wanted}, but "
                   f"tlreg {have} is installed; install a {dist} release for this tlreg")
                  for dist, version, wanted, have in version_conflicts()]
        failures = [err for _, err in results if err] + [err for _, _, err in ranges]
        if as_json:
            print_json([_plugin_row(p) | {"ok": err is None, "error": err} for p, err in results]
                       + [{"distribution": d, "version": v, "ok": False, "error": err}
                          for d, v, err in ranges])
        else:
            print_table(["group", "name", "package", "version", "status"],
                        [(p.kind, p.name, p.dist, p.version, "ok" if not e else "FAILED")
                         for p, e in results])
            for err in failures:
                print(f"error: {err}", file=sys.stderr)
        if failures:
            raise typer.Exit(1)
        return
    found = find_plugins()
    if as_json:
        print_json({group: [_plugin_row(p) for p in found if p.kind == kind]
                    for kind, group in _groups().items()})
    else:
        print_table(["group", "name", "package", "version"],
                    [(p.kind, p.name, p.dist, p.version) for p in found])


def _groups() -> dict[str, str]:
    from tlreg.plugins import GROUPS

    return GROUPS


def _plugin_row(p: Any) -> dict[str, Any]:
    return {"name": p.name, "distribution": p.dist, "version": p.version, "value": p.value}


@backbones_app.command("list")
def backbones_list(
    pattern: str = typer.Argument("*", help="fnmatch pattern; 'timm:*vit*' searches timm's names."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Only those with weights."),
    as_json: bool = JSON,
) -> None:
    """Registered backbones (and, with a 'timm:' pattern, timm's models)."""
    from tlreg.models.catalog import list_backbones

    rows = list_backbones(pattern, pretrained=pretrained)
    if as_json:
        print_json(rows)
    else:
        print_table(["name", "package", "timm model"],
                    [(r["name"], r["distribution"], r.get("timm_name")) for r in rows])


@backbones_app.command("show")
def backbones_show(name: str = typer.Argument(..., help="Backbone name."),
                   as_json: bool = JSON) -> None:
    """Timm model, parameters, feature width, stages and layers, data config, defaults."""
    from tlreg.models.catalog import describe_backbone

    info = describe_backbone(name)
    if as_json:
        print_json(info)
        return
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{info['name']}[/] ({info['distribution']})  {info['summary']}")
    for key in ("timm_name", "tag", "weights_source", "hub_id", "parameters", "feature_width"):
        console.print(f"  {key:15} {info[key]}")
    console.print(f"  {'data_config':15} {info['data_config']}")
    console.print(f"  {'defaults':15} {info['defaults']}")
    print_table(["stage", "name", "layers", "parameters", "modules"],
                [(s["index"], s["name"], s["layers"], s["parameters"], ", ".join(s["modules"]))
                 for s in info["stages"]], title="stages (freezing) and layers (learning rates)")


def _simple_list(kind: str, as_json: bool) -> None:
    from tlreg.plugins import find_plugins

    found = find_plugins(kind)
    if as_json:
        print_json([_plugin_row(p) for p in found])
    else:
        print_table(["name", "package", "version"], [(p.name, p.dist, p.version) for p in found])


@heads_app.command("list")
def heads_list(as_json: bool = JSON) -> None:
    """Registered heads."""
    _simple_list("head", as_json)


@policies_app.command("list")
def policies_list(as_json: bool = JSON) -> None:
    """Registered freezing policies."""
    _simple_list("policy", as_json)


@sources_app.command("list")
def sources_list(as_json: bool = JSON) -> None:
    """Registered data sources: `tlreg train NAME:LOCATION` (a folder or a table needs none)."""
    _simple_list("source", as_json)
