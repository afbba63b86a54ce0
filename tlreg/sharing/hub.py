"""The Hub transport: push a folder, pull a repo, map every Hub failure to one error line.

Everything goes through `huggingface_hub`, with its own endpoint and token (`HF_ENDPOINT`,
`HF_TOKEN`, the stored login), overridable per call. A push is one commit holding every file,
so a failed push leaves nothing half-committed and can simply be retried. A pull lists the repo
first (a repo with pickles is refused before anything is downloaded), then downloads into the
`huggingface_hub` cache, whose files only appear once complete, so an interrupted download never
leaves a corrupt artifact. Every Hub failure becomes one `HubError` line with its own exit code.
What is pushed (a model, a run, a folder) is decided above, in `tlreg.sharing.api`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tlreg.errors import (
    ArtifactError,
    HubConnectionError,
    UnsafeUploadError,
    UsageError,
)
from tlreg.hubclient import (
    check_revision,
    hf_api,
    hub_errors,
    remember_ref,
    safe_get_token,
    split_revision,
)
from tlreg.preprocess import MODEL_FILE, PREPROCESS_FILE
from tlreg.sharing.format import (
    ARTIFACT_FILES,
    CARD_FILE,
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    REPO_ID_PLACEHOLDER,
    TIMM_WEIGHTS,
    check_no_pickles,
    read_config,
    verify_files,
)
from tlreg.sharing.load import load_artifact_dir
from tlreg.sharing.save import write_folder_atomically

# -- push ---------------------------------------------------------------------------------------


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str = "main",
                message: str | None = None, token: str | None = None,
                endpoint: str | None = None) -> str:
    """Push a verified export folder as one commit on `revision`; returns the commit URL.

    The folder is a tlreg artifact, a `timm` export or an `onnx` export (`publishable`).
    Files a previous push left that the new one lacks (an old backbone delta, or the files of
    another format) are deleted in the same commit, which is made on top of the revision
    just read.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    names, summary = publishable(folder)
    payload = {n: (folder / n).read_bytes() for n in names}
    if CARD_FILE in payload:
        payload[CARD_FILE] = payload[CARD_FILE].replace(REPO_ID_PLACEHOLDER.encode(),
                                                        repo_id.encode())
    check_publishable(payload, folder, token)
    api = hf_api(endpoint, token)
    summary = message or summary
    with hub_errors(repo_id, revision, api.endpoint, token=token, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        current = api.repo_info(repo_id, revision=revision)
        existing = {s.rfilename for s in current.siblings or []}
        ops: list[Any] = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=data)
                          for n, data in payload.items()]
        ops += [CommitOperationDelete(path_in_repo=n) for n in PUSHED_FILES
                if n in existing and n not in payload]
        info = api.create_commit(repo_id, ops, commit_message=summary, revision=revision,
                                 parent_commit=current.sha, repo_type="model")
    return str(info.commit_url)


# Every file a push of any format writes (and may delete again): never a user's own file.
PUSHED_FILES = (*ARTIFACT_FILES, TIMM_WEIGHTS, MODEL_FILE, PREPROCESS_FILE)


def publishable(folder: Path) -> tuple[list[str], str]:
    """The files to push from `folder` and a commit message; refuses what it cannot verify.

    A tlreg artifact is checked against its own checksums; a `timm` export must open as
    safetensors with a timm config; an `onnx` export must load in onnxruntime with a valid
    preprocess.json (or metadata). Anything else, or a pickle anywhere, is an error: never
    publish a corrupt or unsafe folder.
    """
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder")
    check_no_pickles([p.name for p in folder.iterdir()], str(folder))
    present = [n for n in PUSHED_FILES if (folder / n).is_file()]
    if (folder / MODEL_FILE).is_file() or (folder / PREPROCESS_FILE).is_file():
        cfg = _check_onnx_folder(folder)
        return ([n for n in (MODEL_FILE, PREPROCESS_FILE, CARD_FILE) if n in present],
                f"Upload ONNX model ({cfg.get('backbone')}, {cfg.get('head')} head, "
                f"{len(cfg['label_names'])} classes)")
    if (folder / TIMM_WEIGHTS).is_file():
        cfg = _check_timm_folder(folder)
        return ([n for n in (CONFIG_FILE, TIMM_WEIGHTS, CARD_FILE) if n in present],
                f"Upload timm model ({cfg['architecture']}, {cfg['num_classes']} classes)")
    config = read_config(folder)
    verify_files(folder, config)
    return ([n for n in ARTIFACT_FILES if n in present],
            f"Upload tlreg artifact ({config['backbone']['name']}, "
            f"{config['head']['name']} head, {config['num_classes']} classes)")


def _check_timm_folder(folder: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        if (folder / CONFIG_FILE).stat().st_size > MAX_CONFIG_BYTES:  # never parse a bomb
            raise ValueError(f"larger than the {MAX_CONFIG_BYTES:,} bytes a config may have")
        cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{folder} has a {TIMM_WEIGHTS} but no readable timm "
                            f"{CONFIG_FILE}: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str) or not (
            isinstance(cfg.get("num_classes"), int)):
        raise ArtifactError(f"{folder / CONFIG_FILE} is not a timm config (it needs "
                            f"\"architecture\" and \"num_classes\")")
    try:
        with safe_open(str(folder / TIMM_WEIGHTS), framework="numpy") as f:
            if not list(f.keys()):
                raise ArtifactError(f"{folder / TIMM_WEIGHTS} holds no tensors")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{folder / TIMM_WEIGHTS} is not a valid safetensors file: "
                            f"{exc}") from None
    return cfg


def _check_onnx_folder(folder: Path) -> dict[str, Any]:
    from tlreg.onnx_predict import load_onnx

    try:
        # The folder's preprocess.json when it has one, else the model's own metadata.
        model = load_onnx(folder if (folder / PREPROCESS_FILE).is_file() else folder / MODEL_FILE)
    except UsageError as exc:
        raise ArtifactError(f"not pushing {folder}: {exc}") from None
    return model.config


_TOKEN_RE = re.compile(rb"hf_[A-Za-z0-9]{20,}")
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def check_publishable(payload: Mapping[str, bytes], folder: Path, token: str | None) -> None:
    """Refuse to upload tokens or absolute local paths (lesson: never push local state)."""
    from huggingface_hub import get_token

    secrets = [t.encode() for t in (token, safe_get_token(get_token)) if t]
    home = os.path.expanduser("~")
    local = [p.encode() for p in {home, str(folder.resolve()), os.getcwd()} if len(p) > 1]
    for name, data in payload.items():
        text = name.endswith((".json", ".md"))
        if any(s in data for s in secrets) or (text and _TOKEN_RE.search(data)):
            raise UnsafeUploadError(f"{name} contains a Hub token; refusing to push it")
        if text and any(p in data for p in local):
            raise UnsafeUploadError(f"{name} contains a local path; refusing to push it")
    for name in (CONFIG_FILE, PREPROCESS_FILE):
        if name not in payload:
            continue
        for where, value in _strings(json.loads(payload[name])):
            if _ABS_PATH.match(value):
                raise UnsafeUploadError(f"{name} has an absolute local path at {where} "
                                        f"({value!r}); refusing to push it")



def _strings(obj: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(obj, str):
        yield where or "(root)", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{where}[{i}]")


# -- pull ---------------------------------------------------------------------------------------


def pull(repo_id: str, revision: str | None = None, dir: str | os.PathLike[str] | None = None,
         token: str | None = None, endpoint: str | None = None,
         cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = True,
         allow_backbone_mismatch: bool = False) -> Path:
    """Download an artifact (`user/name[@rev]`) into the HF cache; returns its folder.

    The config and checksums are always checked; `verify` also rebuilds the model (backbone
    available, pretrained weights hash, strict tensor shapes). `dir` copies the verified files
    there, swapped in atomically.
    """
    repo_id, rev = split_revision(repo_id.removeprefix("hf:"))
    if rev and revision and rev != revision:
        raise UsageError(f"two revisions given: {rev!r} and {revision!r}")
    revision = check_revision(revision or rev or "main")
    folder = _download(repo_id, revision, token, endpoint, cache_dir)
    where = f"{repo_id}@{revision}"
    config = read_config(folder)
    verify_files(folder, config)
    if verify:
        load_artifact_dir(folder, allow_backbone_mismatch=allow_backbone_mismatch)
    if dir is None:
        return folder
    target = Path(dir)

    def copy(tmp: Path) -> None:
        for name in ARTIFACT_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, tmp / name)  # follows the cache's symlinks

    try:
        write_folder_atomically(target, copy)
    except UsageError as exc:
        raise UsageError(f"cannot write {where} to {target}: {exc}") from exc
    return target


def _download(repo_id: str, revision: str, token: str | None, endpoint: str | None,
              cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    api = hf_api(endpoint, token)
    where = f"{repo_id}@{revision}"
    try:
        with hub_errors(repo_id, revision, api.endpoint, token=token):
            info = api.repo_info(repo_id, revision=revision, repo_type="model")
    except HubConnectionError as exc:
        cached = _cached_snapshot(repo_id, revision, token, cache_dir)
        if cached is None:
            raise HubConnectionError(f"{exc}; {where} is not in the local cache either") from exc
        warnings.warn(f"{exc}; using the cached copy of {where} ({cached.name[:12]})",
                      stacklevel=3)
        return cached
    names = [s.rfilename for s in info.siblings or []]
    check_no_pickles(names, where)
    if CONFIG_FILE not in names:
        raise ArtifactError(f"{where} is not a tlreg artifact: it has no {CONFIG_FILE} "
                            f"(files: {', '.join(sorted(names)) or 'none'})")
    with hub_errors(repo_id, revision, api.endpoint, token=token):
        # Pin the commit just listed, so what is downloaded is what was checked.
        path = Path(snapshot_download(
            repo_id, revision=info.sha, allow_patterns=list(ARTIFACT_FILES), token=token,
            endpoint=api.endpoint, cache_dir=cache_dir, repo_type="model"))
    if revision != info.sha:
        remember_ref(path, revision, info.sha)
    return path



def _cached_snapshot(repo_id: str, revision: str, token: str | None,
                     cache_dir: str | os.PathLike[str] | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=list(ARTIFACT_FILES), token=token,
                                      cache_dir=cache_dir, repo_type="model"))
    except Exception:  # not cached, partially cached: either way unusable
        return None
    return path if (path / CONFIG_FILE).is_file() else None
