"""The `tlreg` command: a thin typer layer over the Python API.

Importing this module must stay cheap: command modules import torch and timm inside the
command bodies, so `tlreg --help` and the list commands start instantly.
"""

from __future__ import annotations

import errno
import sys
import warnings
from importlib import import_module

import typer

from tlreg import __version__
from tlreg.errors import TlregError

# The click that typer uses: since typer 0.2x its own vendored copy (typer no longer depends
# on click at all), before that click itself. typer re-exports its BadParameter in both cases.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="tlreg",
    help="Transfer learning for image classification on any timm backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module defines `register(app)`; one per area so a newcomer finds a command by its name.
_COMMAND_MODULES = ("registry", "train", "cache", "predict", "rank", "audit", "report", "optim",
                    "hub", "demo")

_state = {"debug": False}


def _version(value: bool) -> None:
    """tlreg's version, then torch's and timm's and every plugin package's (metadata only:
    nothing is imported, so this stays instant)."""
    if not value:
        return
    from importlib import metadata

    from tlreg.plugins import distributions

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    typer.echo(f"tlreg {__version__} (torch {installed('torch')}, timm {installed('timm')}, "
               f"huggingface_hub {installed('huggingface-hub')})")
    for dist, version, kinds in distributions():
        if dist != "tlreg":
            entries = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in kinds.items())
            typer.echo(f"  {dist} {version}: {entries}")
    raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the versions of tlreg and its plugins, and exit."),
) -> None:
    _state["debug"] = debug


for _name in _COMMAND_MODULES:
    import_module(f"tlreg.cli.{_name}").register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _bare_augment(args: list[str]) -> list[str]:
    """`--augment` followed by nothing, an option or an existing path (tlreg before the presets)
    means `standard`; any other word is a preset name, checked as such.

    typer has no option with an optional value, so scripts that pass the old bare flag are
    given the preset it always meant here."""
    import os

    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        after = args[i + 1] if i + 1 < len(args) else None
        if arg == "--augment" and (after is None or after.startswith("-")
                                   or os.path.exists(after)):  # an option or DATA follows
            out.append("standard")
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line per error (tracebacks only with --debug)."""
    args = _bare_augment(list(sys.argv[1:] if argv is None else argv))
    _state["debug"] = "--debug" in args
    if not _state["debug"]:
        warnings.showwarning = _show_warning
    try:
        rv = app(args=args, prog_name="tlreg", standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except _ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except TlregError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if _state["debug"] or exc.errno not in _FS_ERRORS:
            raise
        # Every write is aside-then-rename: what was saved before the failure is intact.
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror}; nothing already saved was changed",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


# Faults of the file system, not of tlreg: one line naming the path, never a traceback.
_FS_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
