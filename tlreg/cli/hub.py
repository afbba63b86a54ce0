"""CLI commands for sharing: `export`, `push`, `pull`, `inspect`.

Heavy imports (torch, timm, huggingface_hub) happen inside the command bodies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from tlreg.cli._output import print_json, print_table

TOKEN = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the stored login). "
                                           "Never printed or saved.")
CHECKPOINT = typer.Option("best", "--checkpoint", help="Which checkpoint of a run: best or last.")
ALLOW_MISMATCH = typer.Option(False, "--allow-backbone-mismatch",
                              help="Load even if the local pretrained weights differ from the "
                                   "ones the head was trained on (with a warning).")


FORMAT_HELP = ("Exporter, one of: {names}. tlreg: head-only artifact; timm: full model folder "
               "for timm.create_model('local-dir:OUT', pretrained=True); onnx: model.onnx + "
               "preprocess.json (docs/deploy.md); plugins add more (entry-point group "
               "tlreg.exporters).")


class _ExportCommand(TyperCommand):
    """`tlreg export`: its --format help names the registered exporters when it is shown.

    Read from package metadata then, not when the app is built, so starting `tlreg` costs no
    entry-point scan (and never imports an exporter).
    """

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from tlreg.plugins import find_plugins

        names = ", ".join(sorted({p.name for p in find_plugins("exporter")})) or "none"
        for param in self.params:
            if param.name == "fmt":
                param.help = FORMAT_HELP.format(names=names)
        super().format_help(ctx, formatter)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `tlreg` app."""
    app.command("export", cls=_ExportCommand)(export)
    app.command("push")(push)
    app.command("pull")(pull)
    app.command("inspect")(inspect)


def export(
    run: Path = typer.Argument(..., help="A run directory (from `tlreg train`)."),
    out: Path = typer.Argument(..., help="Folder to write (replaced atomically if an artifact)."),
    checkpoint: str = CHECKPOINT,
    fmt: str = typer.Option("tlreg", "--format",
                            help=FORMAT_HELP.format(names="those `tlreg plugins` lists")),
    dataset: str | None = typer.Option(None, "--dataset",
                                       help="Hub dataset id for the model card's metadata."),
    opset: int | None = typer.Option(None, "--opset",
                                     help="onnx: the ONNX opset (default 17)."),
    dynamic_batch: bool | None = typer.Option(
        None, "--dynamic-batch/--no-dynamic-batch",
        help="onnx: a dynamic batch axis (default) or batches of one."),
    fp16: bool = typer.Option(False, "--fp16", help="onnx: half-precision weights and inputs."),
    familiarity: bool | None = typer.Option(
        None, "--familiarity/--no-familiarity",
        help="onnx: a second output, each image's familiarity, for predict "
             "--reject-unfamiliar (default: when the run is frozen; --no-familiarity writes a "
             "file any tlreg reads)."),
    check_images: list[str] | None = typer.Option(
        None, "--check-images", help="onnx: images (files or folders) the export is checked "
                                     "on against PyTorch (default: synthetic ones)."),
) -> None:
    """Write a run's model as a shareable folder (see docs/format.md, docs/deploy.md)."""
    from tlreg.sharing.exporters import export_run

    # An exporter's own options, passed only when given (exporters ignore what they do not use).
    options: dict[str, Any] = {k: v for k, v in {
        "opset": opset, "dynamic_batch": dynamic_batch, "fp16": fp16 or None,
        "familiarity": familiarity}.items()
        if v is not None}
    if check_images:
        from tlreg.predict import expand_inputs

        options["check_images"] = expand_inputs(check_images)[:7]
    path = export_run(run, out, checkpoint, format=fmt, dataset=dataset, options=options)
    print(f"wrote {path} ({_size(path)})")


def push(
    source: Path = typer.Argument(..., help="A run directory or an artifact folder."),
    repo_id: str = typer.Argument(..., help="Hub repo, user/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: str = typer.Option("main", "--revision", help="Branch to commit to."),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    token: str | None = TOKEN,
    checkpoint: str = CHECKPOINT,
    dataset: str | None = typer.Option(None, "--dataset",
                                       help="Hub dataset id for the card (runs only)."),
    fmt: str = typer.Option("tlreg", "--format", help=(
        "What a run is pushed as: tlreg (head-only artifact), timm (loads in timm and "
        "transformers without tlreg; linear heads), onnx, or a plugin's exporter. A folder "
        "is pushed as it is.")),
) -> None:
    """Push a run or an export folder to the Hub as one commit (repo created if needed)."""
    from tlreg.sharing.api import push_model

    kwargs: dict[str, Any] = {"dataset": dataset} if dataset else {}
    url = push_model(source, repo_id, private=private, revision=revision, message=message,
                     token=token, checkpoint=checkpoint, format=fmt, **kwargs)
    print(f"pushed {repo_id}@{revision}: {url}")


def pull(
    repo: str = typer.Argument(..., help="user/name or user/name@REVISION (branch or commit)."),
    dir: Path | None = typer.Option(None, "--dir", help="Also copy the verified files here."),
    token: str | None = TOKEN,
    allow_backbone_mismatch: bool = ALLOW_MISMATCH,
    no_verify: bool = typer.Option(False, "--no-verify",
                                   help="Check config and checksums only; do not rebuild the "
                                        "model (no backbone download)."),
) -> None:
    """Download and verify an artifact (into the Hugging Face cache)."""
    from tlreg.sharing.hub import pull as pull_artifact

    path = pull_artifact(repo, dir=dir, token=token, verify=not no_verify,
                         allow_backbone_mismatch=allow_backbone_mismatch)
    print(path)


def inspect(
    source: str = typer.Argument(..., help="Artifact folder, run directory or Hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    token: str | None = TOKEN,
) -> None:
    """Show an artifact's config, files, checksums and card metadata (no weights downloaded)."""
    from tlreg.sharing.api import inspect as inspect_source

    report = inspect_source(source, token=token)
    if as_json:
        print_json(report)
        return
    if report["kind"] == "run":
        info = report.get("info") or {}
        print(f"run {report['source']}: {info.get('backbone')} + {info.get('head')} head, "
              f"{info.get('num_classes')} classes; checkpoints: "
              f"{', '.join(report['checkpoints']) or 'none'}")
        for k, v in sorted(report["metrics"].items()):
            print(f"  {k}: {v}")
        return
    cfg = report["config"]
    bb = cfg["backbone"]
    commit = f" (commit {report['commit'][:12]})" if report.get("commit") else ""
    where = report["source"] + commit
    print(f"{where}: tlreg artifact, format version {cfg['format_version']}, "
          f"tlreg {cfg.get('tlreg_version')}")
    tag = f".{bb['tag']}" if bb.get("tag") else ""
    print(f"  backbone  {bb['name']} ({bb['timm_name']}{tag}, from {bb.get('provider')}, "
          f"weights {bb['weights_source']}, stored: {bb['weights']})")
    print(f"  weights   sha256 {bb.get('weights_sha256')}")
    print(f"  head      {cfg['head']['name']} {cfg['head']['args'] or ''}".rstrip())
    print(f"  policy    {cfg['policy'].get('name')}")
    print(f"  classes   {cfg['num_classes']}: {', '.join(map(str, cfg['label_names']))}")
    dc = cfg["data_config"]
    print(f"  input     {dc.get('input_size')} mean {dc.get('mean')} std {dc.get('std')} "
          f"{dc.get('interpolation')} crop {dc.get('crop_mode')} {dc.get('crop_pct')}")
    for k, v in sorted((cfg.get("metrics") or {}).items()):
        print(f"  metric    {k} = {v}")
    card = report.get("card") or {}
    if card:
        print("  card      " + ", ".join(f"{k}: {card[k]}" for k in
                                          ("library_name", "pipeline_tag", "base_model")
                                          if card.get(k)))
    print_table(["file", "size", "sha256", "check"],
                [(f["name"], _human(f["size"]), (f["sha256"] or "")[:16], f["status"])
                 for f in report["files"]])
    if report.get("unsafe_files"):
        print(f"warning: pickle files present (never loaded): {', '.join(report['unsafe_files'])}")


def _size(path: Path) -> str:
    return _human(sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()))


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
