"""The front door: load, push and inspect whatever a user names, a run, a folder or a Hub repo.

This is the one place that tells the three apart (`parse_source`): a path that exists locally
wins (a run directory has model.json, any other folder is an artifact), anything else of the
form `user/name[@revision]` is a Hub repo, and `hf:user/name` forces the Hub. The modules below
each handle one kind and never guess.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from tlreg._io import MODEL_JSON
from tlreg.errors import UsageError
from tlreg.hubclient import check_revision, split_revision
from tlreg.runs.checkpoint import load_run_model
from tlreg.sharing.exporters import export_run, get_exporter
from tlreg.sharing.hub import pull, push_folder
from tlreg.sharing.inspect import inspect_folder, inspect_hub, inspect_run
from tlreg.sharing.load import load_artifact_dir
from tlreg.sharing.save import save_artifact

if TYPE_CHECKING:
    from tlreg.models.transfer import TransferModel

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


class Source(NamedTuple):
    """What a source string names; a plain tuple, so `kind, location, revision = ...` works."""

    kind: Literal["run", "artifact", "hub"]
    location: str  # a local path, or the Hub repo id
    revision: str | None  # Hub sources only


def parse_source(source: str | os.PathLike[str]) -> Source:
    """('run' | 'artifact', path, None) or ('hub', repo_id, revision or None)."""
    text = os.fspath(source)
    if text.startswith("hf:"):
        repo_id, rev = split_revision(text.removeprefix("hf:"))
        return Source("hub", repo_id, rev)
    path = Path(text).expanduser()
    if not path.exists() and path.with_name(f".{path.name}.old").is_dir():
        return Source("artifact", str(path), None)  # a swap killed between its renames
    if path.exists():
        if (path / MODEL_JSON).is_file():
            return Source("run", str(path), None)
        if path.is_dir():
            return Source("artifact", str(path), None)
        raise UsageError(f"{path} is a file; give an artifact folder, a run directory or a Hub id")
    if _HUB_ID.fullmatch(text):
        repo_id, rev = split_revision(text)
        return Source("hub", repo_id, rev)
    raise UsageError(f"{text!r} is neither an existing local path nor a Hub repo id "
                     f"('user/name[@revision]'; 'hf:user/name' forces the Hub)")


# -- load ---------------------------------------------------------------------------------------


def load_artifact(source: str | os.PathLike[str], *, revision: str | None = None,
                  token: str | None = None, allow_backbone_mismatch: bool = False,
                  cache_dir: str | os.PathLike[str] | None = None, endpoint: str | None = None,
                  checkpoint: str = "best") -> TransferModel:
    """A ready-to-use model (eval mode, labels and preprocessing in `.info`) from any source.

    `source` is an artifact folder, a run directory (`checkpoint` picks best or last), or a Hub
    repo id `user/name[@revision]`; a path that exists locally wins, `hf:user/name` forces the
    Hub.
    """
    kind, value, rev = parse_source(source)
    if kind == "run":
        if revision:
            raise UsageError("revision= only applies to Hub sources")
        return load_run_model(Path(value), checkpoint)
    if kind == "artifact":
        if revision:
            raise UsageError("revision= only applies to Hub sources")
        return load_artifact_dir(Path(value), allow_backbone_mismatch=allow_backbone_mismatch)
    if rev and revision and rev != revision:
        raise UsageError(f"two revisions given: {rev!r} in {str(source)!r} and {revision!r}")
    folder = pull(value, revision=revision or rev, token=token, endpoint=endpoint,
                  cache_dir=cache_dir, verify=False)
    return load_artifact_dir(folder, allow_backbone_mismatch=allow_backbone_mismatch)


# -- push ---------------------------------------------------------------------------------------


def push_model(model_or_artifact_dir: TransferModel | str | os.PathLike[str], repo_id: str, *,
               private: bool = False, revision: str | None = None, message: str | None = None,
               token: str | None = None, endpoint: str | None = None, checkpoint: str = "best",
               format: str = "tlreg", options: Mapping[str, Any] | None = None,
               **save_kwargs: Any) -> str:
    """Push a model, an export folder or a run directory as one commit; returns its URL.

    A model or a run is exported first with the exporter named `format` (`tlreg`, `timm`,
    `onnx`; `options` are its own keywords, as for `export_run`); a folder is pushed as it is,
    whichever of the three it holds. The repo is created if needed (`private` only applies
    then); `revision` is a branch, created from main if missing. Files a previous push left that
    the new one lacks (an old backbone delta, another format's files) are deleted in the same
    commit.
    """
    split_revision(repo_id)  # checks its shape
    if revision is not None:
        check_revision(revision)
    if "@" in repo_id:
        raise UsageError(f"push takes a plain repo id, not {repo_id!r}; use --revision BRANCH")
    with tempfile.TemporaryDirectory(prefix="tlreg-push-") as tmp:
        folder = _artifact_folder(model_or_artifact_dir, Path(tmp) / "artifact", checkpoint,
                                  format, dict(options or {}), save_kwargs)
        return push_folder(folder, repo_id, private=private, revision=revision or "main",
                           message=message, token=token, endpoint=endpoint)


def push_run(run_dir: str | os.PathLike[str], repo_id: str, checkpoint: str = "best",
             **kwargs: Any) -> str:
    """Export a run's `best` (or `last`) checkpoint and push it; see `push_model`."""
    if not (Path(run_dir) / MODEL_JSON).is_file():
        raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON})")
    return push_model(Path(run_dir), repo_id, checkpoint=checkpoint, **kwargs)


def _artifact_folder(obj: Any, tmp: Path, checkpoint: str, format: str,
                     options: dict[str, Any], save_kwargs: Mapping[str, Any]) -> Path:
    """The folder to push: exported to `tmp` for a model or a run, else `obj` itself."""
    if not isinstance(obj, str | os.PathLike):
        if format == "tlreg" and not options:
            return save_artifact(obj, tmp, **save_kwargs)
        return Path(get_exporter(format)(obj, tmp, **dict(save_kwargs), **options))
    kind, path, _ = parse_source(obj)
    if kind == "hub" or not Path(path).is_dir():
        raise UsageError(f"{os.fspath(obj)} is not a local artifact folder or run directory")
    if kind == "run":
        return export_run(path, tmp, checkpoint, format=format, options=options, **save_kwargs)
    given = [*save_kwargs, *options] + (["format"] if format != "tlreg" else [])
    if given:
        raise UsageError(f"{', '.join(given)} only apply when pushing a model or a run; a "
                         f"folder is pushed as it is")
    return Path(path)


# -- inspect ------------------------------------------------------------------------------------


def inspect(source: str | os.PathLike[str], *, revision: str | None = None,
            token: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    """What an artifact holds: config, files (size, SHA-256, verified), card metadata.

    A Hub source downloads only config.json and README.md; weight files are checked against
    the SHA-256 the Hub reports for them.
    """
    kind, value, rev = parse_source(source)
    if kind == "run":
        return inspect_run(Path(value))
    if kind == "artifact":
        return inspect_folder(Path(value))
    return inspect_hub(value, revision or rev or "main", token, endpoint)
