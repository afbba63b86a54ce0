"""The Hugging Face Hub client as tlreg uses it: repo ids, revisions, and one error line.

Below every layer that talks to the Hub (pulling a model in `tlreg.sharing`, a data set in
`tlreg.data.hf`), so each maps `huggingface_hub`'s failures the same way: not found, gated,
401 without a token, a bad token, offline, unreachable. `huggingface_hub` is imported when a
function runs, never at import.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubNotFoundError,
    TlregError,
    UsageError,
    first_line,
)

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

def remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Record branch -> commit in the cache, as hf_hub_download does, for offline pulls."""
    ref = snapshot.parent.parent / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != sha:
            ref.write_text(sha)
    except OSError:  # a read-only cache only loses the offline fallback
        pass


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
        detail = exc.server_message or first_line(exc)
        if status == 401:
            if not token and not have_token():
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
                                     f"{type(exc).__name__}: {first_line(exc)}") from exc
        raise


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return any(cls.__name__ in _NETWORK_ERRORS for cls in type(exc).__mro__)


def have_token() -> bool:
    from huggingface_hub import get_token

    return bool(safe_get_token(get_token))


def _filename(exc: BaseException, revision: str | None) -> str:
    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    marker = f"/resolve/{revision}/" if revision else "/resolve/"
    if marker in url:
        return url.split(marker, 1)[1]
    return url.rsplit("/", 1)[-1] or "?"


def safe_get_token(get_token: Any) -> str | None:
    try:
        return get_token()
    except Exception:  # an unreadable token file must not block the safety check
        return None
