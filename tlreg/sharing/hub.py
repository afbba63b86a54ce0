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

import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import (
    ArtifactError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    TlregError,
    UnsafeUploadError,
    UsageError,
)
from tlreg.sharing.format import (
    ARTIFACT_FILES,
    CARD_FILE,
    CONFIG_FILE,
    REPO_ID_PLACEHOLDER,
    check_no_pickles,
    read_config,
    verify_files,
)
from tlreg.sharing.load import load_artifact_dir
from tlreg.sharing.save import write_folder_atomically

if TYPE_CHECKING:
    from huggingface_hub import HfApi


# -- repo ids and revisions ---------------------------------------------------------------------


def split_revision(repo: str) -> tuple[str, str | None]:
    """'user/name@rev' -> ('user/name', 'rev'); the id by huggingface_hub's own rule, the
    revision by git's ref rules (it names a file in the cache's refs/ folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, sep, rev = repo.partition("@")
    try:
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id) or (sep and not rev):
            raise HFValidationError("expected 'user/name' or 'user/name@rev'")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"invalid Hub repo id {repo!r}: {exc}") from None
    if rev:
        check_revision(rev)
    return repo_id, rev or None


def check_revision(rev: str) -> str:
    """A branch, tag or commit name that is safe as a path under refs/ (git's ref rules)."""
    parts = rev.split("/")
    if (len(rev) > 255 or not rev.strip() or rev != rev.strip() or ".." in rev
            or "\\" in rev or any(ord(c) < 32 or c in " ~^:?*[" for c in rev)
            or any(not p or p.startswith(".") or p.endswith(".lock") for p in parts)
            or rev.endswith(".") or "@{" in rev):
        raise UsageError(f"invalid revision {rev!r}: expected a branch, tag or commit name")
    return rev


# -- push ---------------------------------------------------------------------------------------


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str = "main",
                message: str | None = None, token: str | None = None,
                endpoint: str | None = None) -> str:
    """Push a verified artifact folder as one commit on `revision`; returns the commit URL.

    Files a previous push left that the new artifact lacks (an old backbone delta, say) are
    deleted in the same commit, which is made on top of the revision just read.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_no_pickles([p.name for p in folder.iterdir()], str(folder))
    config = read_config(folder)
    verify_files(folder, config)  # never publish a corrupt artifact
    names = [n for n in ARTIFACT_FILES if (folder / n).is_file()]
    payload = {n: (folder / n).read_bytes() for n in names}
    if CARD_FILE in payload:
        payload[CARD_FILE] = payload[CARD_FILE].replace(REPO_ID_PLACEHOLDER.encode(),
                                                        repo_id.encode())
    check_publishable(payload, folder, token)
    api = hf_api(endpoint, token)
    summary = message or (f"Upload tlreg artifact ({config['backbone']['name']}, "
                          f"{config['head']['name']} head, {config['num_classes']} classes)")
    with hub_errors(repo_id, revision, api.endpoint, token=token, writing=True):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        current = api.repo_info(repo_id, revision=revision)
        existing = {s.rfilename for s in current.siblings or []}
        ops: list[Any] = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=data)
                          for n, data in payload.items()]
        ops += [CommitOperationDelete(path_in_repo=n) for n in ARTIFACT_FILES
                if n in existing and n not in payload]
        info = api.create_commit(repo_id, ops, commit_message=summary, revision=revision,
                                 parent_commit=current.sha, repo_type="model")
    return str(info.commit_url)


_TOKEN_RE = re.compile(rb"hf_[A-Za-z0-9]{20,}")
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def check_publishable(payload: Mapping[str, bytes], folder: Path, token: str | None) -> None:
    """Refuse to upload tokens or absolute local paths (lesson: never push local state)."""
    import json

    from huggingface_hub import get_token

    secrets = [t.encode() for t in (token, _safe_get_token(get_token)) if t]
    home = os.path.expanduser("~")
    local = [p.encode() for p in {home, str(folder.resolve()), os.getcwd()} if len(p) > 1]
    for name, data in payload.items():
        text = name.endswith((".json", ".md"))
        if any(s in data for s in secrets) or (text and _TOKEN_RE.search(data)):
            raise UnsafeUploadError(f"{name} contains a Hub token; refusing to push it")
        if text and any(p in data for p in local):
            raise UnsafeUploadError(f"{name} contains a local path; refusing to push it")
    config = json.loads(payload[CONFIG_FILE])
    for where, value in _strings(config):
        if _ABS_PATH.match(value):
            raise UnsafeUploadError(f"{CONFIG_FILE} has an absolute local path at {where} "
                                    f"({value!r}); refusing to push it")


def _safe_get_token(get_token: Any) -> str | None:
    try:
        return get_token()
    except Exception:  # an unreadable token file must not block the safety check
        return None


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
        _remember_ref(path, revision, info.sha)
    return path


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record branch -> commit in the cache, as hf_hub_download does, for offline pulls."""
    ref = snapshot.parent.parent / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != sha:
            ref.write_text(sha)
    except OSError:  # a read-only cache only loses the offline fallback
        pass


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


# -- the client and its errors -------------------------------------------------------------------


def hf_api(endpoint: str | None, token: str | None) -> HfApi:
    """A client that names tlreg (and its version) in its user agent."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="tlreg",
                 library_version=_version())


def _version() -> str:
    from tlreg import __version__

    return __version__


_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException",
                   "ReadTimeout", "NetworkError", "TransportError", "ProxyError",
                   "RemoteProtocolError", "Timeout"}


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str, *, token: str | None = None,
               writing: bool = False) -> Iterator[None]:
    """Translate huggingface_hub / HTTP failures into one clear `HubError` line."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    host = endpoint.rstrip("/")
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except TlregError:
        raise
    except RevisionNotFoundError as exc:
        raise HubNotFoundError(f"revision {revision!r} not found in {repo_id} on {host}") from exc
    except GatedRepoError as exc:
        raise HubAuthError(f"{repo_id} on {host} is gated: request access on its page, then "
                           f"use a token that has it") from exc
    except RepositoryNotFoundError as exc:
        raise HubNotFoundError(
            f"repository {repo_id} not found on {host} (if it is private, use a token that can "
            f"read it: --token, HF_TOKEN or `hf auth login`)") from exc
    except LocalEntryNotFoundError as exc:
        raise HubConnectionError(f"cannot reach the Hub at {host} and {where} is not "
                                 f"cached") from exc
    except EntryNotFoundError as exc:
        name = _filename(exc, revision)
        raise HubNotFoundError(f"file {name} not found in {where} on {host}") from exc
    except OfflineModeIsEnabled as exc:
        raise HubConnectionError(f"HF_HUB_OFFLINE is set, so the Hub at {host} cannot be "
                                 f"reached for {where}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        detail = exc.server_message or _first_line(exc)
        if status == 401:
            if not token and not _have_token():
                raise HubAuthError(f"the Hub at {host} needs a token for "
                                   f"{'pushing to ' if writing else ''}{repo_id} (401); pass "
                                   f"--token, set HF_TOKEN or run `hf auth login`") from exc
            raise HubAuthError(f"the Hub at {host} rejected the token (401 Unauthorized: "
                               f"{detail}); check --token, HF_TOKEN or `hf auth login`") from exc
        if status == 403:
            raise HubAuthError(f"permission denied (403) for {repo_id} on {host}: the token "
                               f"cannot {'write to' if writing else 'read'} it ({detail})") from exc
        if status == 412:
            raise HubError(f"{where} changed while pushing (another commit landed first); "
                           f"nothing was committed, run the push again") from exc
        raise HubError(f"the Hub at {host} answered {status} for {where}: {detail}") from exc
    except Exception as exc:
        if _is_network_error(exc):
            raise HubConnectionError(f"cannot reach the Hub at {host}: "
                                     f"{type(exc).__name__}: {_first_line(exc)}") from exc
        raise


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def _have_token() -> bool:
    from huggingface_hub import get_token

    return bool(_safe_get_token(get_token))


def _filename(exc: BaseException, revision: str | None) -> str:
    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    marker = f"/resolve/{revision}/" if revision else "/resolve/"
    if marker in url:
        return url.split(marker, 1)[1]
    return url.rsplit("/", 1)[-1] or "?"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]

