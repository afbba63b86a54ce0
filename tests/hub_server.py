"""A Hugging Face Hub-compatible HTTP server for the test suite.

Push and pull are tested through the real, unpatched ``huggingface_hub`` client over real HTTP,
against 127.0.0.1, so the suite needs no network and no Hub account. Standard library only.
Protocol notes: ``shared/reference/hub-http-protocol.md``.

The store is a small in-memory git: a repo has branches that point at commits, and every commit
is a full ``{path: bytes}`` snapshot with a parent. Simplifications the client never notices:

- Every file is uploaded in "regular" mode (base64 inside the commit NDJSON), so no LFS or Xet
  storage service is needed. Files named like weights (``LFS_SUFFIXES``) are still *described*
  as LFS files (``lfs`` block in tree listings, sha256 ``ETag``), as the real Hub describes them.
- Files are served directly from ``/resolve/``, without the Hub's CDN redirect.
- Any valid token may read and write every repo: there are no per-namespace permissions.
- Like the Hub, ``create_repo`` makes an initial commit holding ``.gitattributes``
  (``LocalHub(gitattributes=False)`` makes it an empty commit instead).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

TEST_TOKEN = "hf_test_token"
TEST_USER = "alice"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_KIND = {"models": "model", "datasets": "dataset", "spaces": "space"}
_COMMIT_ID = re.compile(r"[0-9a-f]{40}")

# Suffixes the Hub's default .gitattributes routes to LFS: their metadata looks like LFS metadata.
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib", ".mlmodel",
    ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb", ".pickle", ".pkl",
    ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip",
    ".zst",
)  # fmt: skip


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: what the client compares to decide that a regular file is unchanged."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs_path(path: str) -> bool:
    return path.lower().endswith(LFS_SUFFIXES)


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer the Hub keeps in git for an LFS file; its blob id is the tree ``oid``."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256_hex(data)}\n"
        f"size {len(data)}\n"
    ).encode()


def etag_of(path: str, data: bytes) -> str:
    """The unquoted ETag the Hub sends: sha256 for LFS files, the git blob id otherwise."""
    return sha256_hex(data) if is_lfs_path(path) else git_blob_sha1(data)


def _now() -> str:
    """Hub timestamp format, the only one ``huggingface_hub.utils.parse_datetime`` accepts."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _gitattributes() -> bytes:
    lines = [f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES]
    return ("\n".join(lines) + "\n").encode()


class HubError(Exception):
    """An error answer; ``code`` goes out as ``X-Error-Code``, which typed client errors need."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more JSON body fields


def _repo_not_found(user: str | None) -> HubError:
    # Anonymous callers get 401 for missing and private repos alike, as on the Hub: existence of
    # a private repo must not leak. The client maps both to RepositoryNotFoundError.
    return HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")


def _entry_not_found(message: str, commit: str | None = None) -> HubError:
    # X-Repo-Commit lets the client cache the file's absence under `.no_exist/<commit>/`.
    return HubError(404, message, "EntryNotFound", {"X-Repo-Commit": commit} if commit else None)


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    files: Mapping[str, bytes]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    # A gated repo: its info is public, its files only for the users in `granted`.
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)  # name (or refs/pr/N) -> commit id
    commits: dict[str, Commit] = field(default_factory=dict)
    next_pr: int = 1

    def resolve(self, rev: str) -> Commit:
        """A branch name or a full commit id; anything else is RevisionNotFound."""
        oid = self.branches.get(rev)
        if oid is None and _COMMIT_ID.fullmatch(rev) and rev in self.commits:
            oid = rev
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return self.commits[oid]

    def history(self, commit: Commit) -> Iterator[Commit]:
        current: Commit | None = commit
        while current is not None:
            yield current
            current = self.commits[current.parent] if current.parent else None


# A commit operation: ("add", path, data), ("delete", path, b"") or ("delete_folder", path, b"").
Op = tuple[str, str, bytes]


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class _Store:
    """Repos, commits and a sha256 blob index; callers hold ``lock`` around every use."""

    def __init__(self, gitattributes: bool) -> None:
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, for `lfsFile` lines (server copies)
        self._gitattributes = gitattributes
        self._counter = 0

    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        namespace, _, name = repo_id.partition("/")
        if not namespace or not name or "/" in name:
            raise HubError(400, f"Invalid repo id: {repo_id!r}")
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
        repo = Repo(repo_type, repo_id, private, created_at=_now())
        self.repos[(repo_type, repo_id)] = repo
        ops: list[Op] = [("add", ".gitattributes", _gitattributes())] if self._gitattributes else []
        self.commit(repo, "main", ops, title="initial commit", author=namespace, new_branch=True)
        return repo

    def commit(
        self,
        repo: Repo,
        branch: str,
        ops: list[Op],
        *,
        title: str,
        author: str,
        message: str = "",
        parent_commit: str | None = None,
        new_branch: bool = False,
    ) -> Commit:
        """Apply ``ops`` on top of ``branch``; ``new_branch`` creates it from main (or empty)."""
        head = repo.branches.get(branch)
        if head is None and not new_branch:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if head is None:
            head = repo.branches.get("main")
        if parent_commit is not None and parent_commit != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files) if head else {}
        for kind, path, data in ops:
            folder = kind == "delete_folder" and isinstance(path, str)
            _check_path(path.rstrip("/") if folder else path)
            if kind == "add":
                files[path] = data
                self.blobs[sha256_hex(data)] = data
            elif kind == "delete":
                if files.pop(path, None) is None:
                    raise _entry_not_found(f"A file with this name doesn't exist: {path}")
            elif kind == "delete_folder":
                prefix = path.rstrip("/") + "/"  # the client sends folders with a trailing "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise _entry_not_found(f"A folder with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown operation: {kind!r}")
        self._counter += 1
        digest = hashlib.sha1(
            f"{repo.repo_type}/{repo.repo_id}\n{head}\n{self._counter}\n{title}\n".encode()
        )
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
        commit = Commit(digest.hexdigest(), head, files, title, message, author, _now())
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


# ---------------------------------------------------------------------------------------------
# JSON shapes, as `huggingface_hub.hf_api` parses them.


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    if not is_lfs_path(path):
        return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
    pointer = lfs_pointer(data)
    return {
        "type": "file",
        "oid": git_blob_sha1(pointer),
        "size": len(data),
        "path": path,
        "lfs": {"oid": sha256_hex(data), "size": len(data), "pointerSize": len(pointer)},
    }


def _subtree(files: Mapping[str, bytes], directory: str) -> dict[str, bytes]:
    prefix = directory + "/"
    return {p: d for p, d in files.items() if p.startswith(prefix)}


def _dir_entry(path: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    # Not git's tree hash, but stable and content-derived, which is all the client relies on.
    digest = hashlib.sha1(b"tree\0")
    for p, d in sorted(_subtree(files, path).items()):
        digest.update(f"{p}\0{git_blob_sha1(d)}\n".encode())
    return {"type": "directory", "oid": digest.hexdigest(), "path": path}


def _last_change(repo: Repo, commit: Commit, path: str, is_dir: bool) -> dict[str, Any]:
    """``lastCommit`` for ``expand=true``: the oldest commit since which ``path`` is unchanged."""

    def state(c: Commit) -> object:
        return _subtree(c.files, path) if is_dir else c.files.get(path)

    found, wanted = commit, state(commit)
    for older in repo.history(commit):
        if state(older) != wanted:
            break
        found = older
    return {"id": found.oid, "title": found.title, "date": found.date}


def _entries(
    repo: Repo, commit: Commit, paths: list[str], dirs: set[str], expand: bool
) -> list[dict[str, Any]]:
    out = []
    for path in sorted(dirs):
        entry = _dir_entry(path, commit.files)
        if expand:
            entry["lastCommit"] = _last_change(repo, commit, path, is_dir=True)
        out.append(entry)
    for path in sorted(paths):
        entry = _file_entry(path, commit.files[path])
        if expand:
            entry["lastCommit"] = _last_change(repo, commit, path, is_dir=False)
        out.append(entry)
    return out


def _directories(files: Mapping[str, bytes]) -> set[str]:
    dirs = set()
    for path in files:
        parts = path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return dirs


def _tree(repo: Repo, commit: Commit, base: str, recursive: bool, expand: bool) -> list[Any]:
    if base and base not in _directories(commit.files):
        raise _entry_not_found(f"{base} does not exist on {commit.oid}", commit.oid)
    prefix = base + "/" if base else ""
    paths, dirs = [], set()
    for path in commit.files:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if len(parts) == 1 or recursive:
            paths.append(path)
        depth = len(parts) - 1 if recursive else min(1, len(parts) - 1)
        dirs.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
    return _entries(repo, commit, paths, dirs, expand)


def _repo_info(repo: Repo, commit: Commit) -> dict[str, Any]:
    siblings = []
    for path in sorted(commit.files):
        entry = _file_entry(path, commit.files[path])
        sibling: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if "lfs" in entry:
            lfs = entry["lfs"]
            sibling["lfs"] = {
                "size": lfs["size"],
                "sha256": lfs["oid"],
                "pointerSize": lfs["pointerSize"],
            }
        siblings.append(sibling)
    info: dict[str, Any] = {
        "id": repo.repo_id,
        "author": repo.repo_id.split("/")[0],
        "sha": commit.oid,
        "lastModified": commit.date,
        "createdAt": repo.created_at,
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(len(d) for d in commit.files.values()),
    }
    if repo.repo_type == "model":
        info["modelId"] = repo.repo_id
    return info


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of a single ``bytes=`` range; None serves the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes=") :].strip().partition("-")
    try:
        if first:
            start, end = int(first), int(last) if last else size - 1
        else:
            start, end = max(size - int(last), 0), size - 1
    except ValueError:
        return None
    end = min(end, size - 1)
    if start > end:
        raise HubError(
            416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


# ---------------------------------------------------------------------------------------------
# HTTP


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    download: bool = False  # a file body served from /resolve/: counted by LocalHub.downloads()


def _json(obj: Any, status: int = 200) -> _Reply:
    body = json.dumps(obj).encode()
    return _Reply(status, body, {"Content-Type": "application/json; charset=utf-8"})


def _error_reply(err: HubError) -> _Reply:
    reply = _json({**err.extra, "error": err.message}, err.status)
    reply.headers["X-Error-Message"] = err.message.encode("ascii", "backslashreplace").decode()
    if err.code:
        reply.headers["X-Error-Code"] = err.code
    reply.headers.update(err.headers)
    return reply


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError as err:
        raise HubError(400, f"Invalid JSON body: {err}") from err
    if not isinstance(value, dict):
        raise HubError(400, "Expected a JSON object")
    return value


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return query.get(name, [""])[-1].lower() in ("1", "true")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, hub: LocalHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.connections: set[socket.socket] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping kept-alive connections is normal; anything else is a server bug.
        error = traceback.format_exc()
        if "ConnectionResetError" not in error and "BrokenPipeError" not in error:
            self.hub._note_error(error)


class _Handler(BaseHTTPRequestHandler):
    """Parses HTTP, routes under the store lock, then sends the reply outside it."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # TCP_NODELAY: avoids ~40 ms stalls per kept-alive request
    timeout = 60
    server: _Server
    user: str | None = None

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean; hub.log records requests instead

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing --------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        hub._record(method, unquote(url.path))
        body = self._read_body()  # always drain it, or the kept-alive connection desyncs
        self.user = None  # one handler serves every request of a kept-alive connection
        try:
            self.user = self._authenticate()
            with hub._store.lock:
                reply = self._route(method, url.path, parse_qs(url.query), body)
        except HubError as err:
            reply = _error_reply(err)
        except Exception:
            hub._note_error(traceback.format_exc())
            reply = _json({"error": "Internal server error (see LocalHub.errors)"}, 500)
        if reply.download and method == "GET":
            hub._record_download(unquote(url.path))
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.server.hub.tokens.get(token.strip())
        if scheme.lower() != "bearer" or user is None:
            # The Hub rejects a bad token on every route, public repos included.
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def _require_user(self) -> str:
        if self.user is None:
            raise HubError(401, "You must be authenticated to do this (no token sent)")
        return self.user

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        if write:
            self._require_user()
        repo = self.server.hub._store.get(repo_type, repo_id)
        if repo is None or (repo.private and self.user is None):
            raise _repo_not_found(self.user)
        return repo

    def _url(self, repo: Repo, suffix: str = "") -> str:
        return f"{self.server.hub.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}{suffix}"

    # -- routing ---------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: Mapping[str, list[str]], body: bytes) -> _Reply:
        method = "GET" if method == "HEAD" else method  # HEAD: same headers, no body
        segs = path.strip("/").split("/")
        if segs[0] == "api":
            return self._route_api(method, segs[1:], query, body)
        repo_type = "model"
        if segs[0] in ("datasets", "spaces"):
            repo_type, segs = _API_KIND[segs[0]], segs[1:]
        if method == "GET" and len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
            return self._resolve(repo_type, repo_id, unquote(segs[3]), unquote("/".join(segs[4:])))
        raise HubError(404, f"Not found: {method} {path}")

    def _route_api(
        self, method: str, segs: list[str], query: Mapping[str, list[str]], body: bytes
    ) -> _Reply:
        simple: dict[tuple[str, str], Callable[[bytes], _Reply]] = {
            ("GET", "whoami-v2"): self._whoami,
            ("POST", "validate-yaml"): lambda _: _json({"errors": [], "warnings": []}),
            ("POST", "repos/create"): self._create_repo,
            ("DELETE", "repos/delete"): self._delete_repo,
        }
        handler = simple.get((method, "/".join(segs)))
        if handler is not None:
            return handler(body)
        if len(segs) < 3 or segs[0] not in _API_KIND:
            raise HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")
        repo_type, repo_id = _API_KIND[segs[0]], f"{unquote(segs[1])}/{unquote(segs[2])}"
        action, rest = (segs[3], segs[4:]) if len(segs) > 3 else ("", [])
        rev = unquote(rest[0]) if rest else "main"
        if method == "GET" and action in ("", "revision"):
            repo = self._repo(repo_type, repo_id)
            return _json(_repo_info(repo, repo.resolve(rev)))
        if method == "GET" and action == "tree":
            repo = self._repo(repo_type, repo_id)
            sub = unquote("/".join(rest[1:])).strip("/")
            tree = _tree(
                repo, repo.resolve(rev), sub, _flag(query, "recursive"), _flag(query, "expand")
            )
            return _json(tree)
        if method == "GET" and action == "commits":
            repo = self._repo(repo_type, repo_id)
            return _json([self._commit_json(c) for c in repo.history(repo.resolve(rev))])
        if method == "GET" and action == "refs":
            return self._refs(self._repo(repo_type, repo_id), _flag(query, "include_prs"))
        if method == "POST" and action == "preupload":
            return self._preupload(self._repo(repo_type, repo_id, write=True), rev, query, body)
        if method == "POST" and action == "commit":
            return self._commit(self._repo(repo_type, repo_id, write=True), rev, query, body)
        if method == "POST" and action == "paths-info":
            return self._paths_info(self._repo(repo_type, repo_id), rev, body)
        if method in ("POST", "DELETE") and action == "branch" and rest:
            repo = self._repo(repo_type, repo_id, write=True)
            return self._branch(repo, method, unquote("/".join(rest)), body)
        if method == "PUT" and action == "settings":
            repo = self._repo(repo_type, repo_id, write=True)
            return self._settings(repo, body)
        raise HubError(404, f"Not found: {method} /api/{'/'.join(segs)}")

    # -- endpoints -------------------------------------------------------------------------

    def _whoami(self, _: bytes) -> _Reply:
        if self.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        token = {"displayName": "test", "role": "write"}
        return _json(
            {
                "type": "user",
                "id": self.user,
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _create_repo(self, body: bytes) -> _Reply:
        user = self._require_user()
        payload = _json_body(body)
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility", "private" if payload.get("private") else "public")
        repo_id = f"{payload.get('organization') or user}/{payload.get('name') or ''}"
        store = self.server.hub._store
        existing = store.get(repo_type, repo_id)
        if existing is not None:
            # `create_repo(exist_ok=True)` reads the url from this 409 answer.
            message = f"You already created this {repo_type} repo: {repo_id}"
            raise HubError(409, message, extra={"url": self._url(existing)})
        repo = store.create(repo_type, repo_id, private == "private")
        return _json({"url": self._url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> _Reply:
        user = self._require_user()
        payload = _json_body(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name') or ''}"
        if self.server.hub._store.repos.pop((repo_type, repo_id), None) is None:
            raise _repo_not_found(user)
        return _json({})

    def _settings(self, repo: Repo, body: bytes) -> _Reply:
        payload = _json_body(body)
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        return _json({})

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> _Reply:
        repo = self._repo(repo_type, repo_id)
        if repo.gated and self.user not in repo.granted:  # as the Hub answers: typed GatedRepo
            raise HubError(401 if self.user is None else 403,
                           f"Access to {repo_type} {repo_id} is restricted and you are not in "
                           "the authorized list. Visit its page to ask for access.", "GatedRepo")
        commit = repo.resolve(rev)
        data = commit.files.get(path)
        if data is None:
            raise _entry_not_found(f"Entry not found: {path}", commit.oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{etag_of(path, data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        span = _byte_range(self.headers.get("Range"), len(data))
        if span is None:
            return _Reply(200, data, headers, download=True)
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Reply(206, data[start : end + 1], headers, download=True)

    def _refs(self, repo: Repo, include_prs: bool) -> _Reply:
        def ref(name: str, oid: str) -> dict[str, str]:
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name, "ref": full, "targetCommit": oid}

        refs = sorted(repo.branches.items())
        out: dict[str, Any] = {
            "branches": [ref(n, o) for n, o in refs if not n.startswith("refs/pr/")],
            "converts": [],
            "tags": [],
        }
        if include_prs:
            out["pullRequests"] = [ref(n, o) for n, o in refs if n.startswith("refs/pr/")]
        return _json(out)

    def _commit_json(self, commit: Commit) -> dict[str, Any]:
        return {
            "id": commit.oid,
            "title": commit.title,
            "message": commit.message,
            "date": commit.date,
            "authors": [{"user": commit.author, "avatar": None}],
        }

    def _preupload(
        self, repo: Repo, rev: str, query: Mapping[str, list[str]], body: bytes
    ) -> _Reply:
        # Always "regular": "lfs" would send the client to a Xet/LFS service we do not run.
        base = "main" if _flag(query, "create_pr") else rev
        oid = repo.branches.get(base)
        if oid is None and base != "main":
            raise HubError(404, f"Invalid rev id: {base}", "RevisionNotFound")
        current = repo.commits[oid].files if oid else {}
        files = []
        for item in _json_body(body).get("files", []):
            path = _check_path(item.get("path"))
            data = current.get(path)
            oid = git_blob_sha1(data) if data is not None else None
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _json({"files": files, "commitOid": oid})

    def _commit(self, repo: Repo, rev: str, query: Mapping[str, list[str]], body: bytes) -> _Reply:
        store = self.server.hub._store
        header: dict[str, Any] | None = None
        ops: list[Op] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = _json_body(line)
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                if value.get("encoding", "base64") != "base64":
                    ops.append(("add", path, content.encode()))
                    continue
                try:
                    ops.append(("add", path, base64.b64decode(content, validate=True)))
                except ValueError as err:
                    raise HubError(400, f"Invalid base64 content for {path!r}") from err
            elif key == "lfsFile":
                data = store.blobs.get(value.get("oid", ""))
                if data is None:
                    raise HubError(400, f"LFS object {value.get('oid')} was never uploaded")
                ops.append(("add", path, data))
            elif key == "deletedFile":
                ops.append(("delete", path, b""))
            elif key == "deletedFolder":
                ops.append(("delete_folder", path, b""))
            else:
                raise HubError(400, f"Unknown commit line key: {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit payload needs a header line with a summary")
        branch, pr_num = rev, None
        if _flag(query, "create_pr"):
            base = repo.resolve(rev)
            pr_num, branch = repo.next_pr, f"refs/pr/{repo.next_pr}"
            repo.branches[branch] = base.oid
        try:
            commit = store.commit(
                repo,
                branch,
                ops,
                title=header["summary"],
                message=header.get("description") or "",
                author=self._require_user(),
                parent_commit=header.get("parentCommit"),
                new_branch=branch == "main",
            )
        except HubError:
            if pr_num is not None:
                del repo.branches[branch]  # a failed commit opens no pull request
            raise
        if pr_num is not None:
            repo.next_pr += 1
        reply: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": self._url(repo, f"/commit/{commit.oid}"),
            "hookOutput": "",
        }
        if pr_num is not None:
            reply["pullRequestUrl"] = self._url(repo, f"/discussions/{pr_num}")
        return _json(reply)

    def _paths_info(self, repo: Repo, rev: str, body: bytes) -> _Reply:
        commit = repo.resolve(rev)
        form = parse_qs(body.decode())
        wanted = [p.strip("/") for p in form.get("paths", [])]
        dirs = _directories(commit.files)
        files = [p for p in wanted if p in commit.files]
        folders = {p for p in wanted if p in dirs}
        return _json(_entries(repo, commit, files, folders, _flag(form, "expand")))

    def _branch(self, repo: Repo, method: str, branch: str, body: bytes) -> _Reply:
        if method == "DELETE":
            if repo.branches.pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return _json({})
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = _json_body(body).get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start).oid
        return _json({})


class LocalHub:
    """A Hub on 127.0.0.1 with an in-memory store, for tests; see the module docstring.

    ``tokens`` maps token -> user name (default ``{TEST_TOKEN: TEST_USER}``). Use as a context
    manager, or call ``start()``/``stop()``.
    """

    def __init__(self, tokens: Mapping[str, str] | None = None, *, gitattributes: bool = True):
        self.tokens: dict[str, str] = dict({TEST_TOKEN: TEST_USER} if tokens is None else tokens)
        self._store = _Store(gitattributes)
        self._log_lock = threading.Lock()
        self._log: list[tuple[str, str]] = []
        self._downloads: list[str] = []
        self._errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalHub:
        if self._server is None:
            self._server = _Server(self)
            # A short poll interval keeps stop() (and so every fixture teardown) fast.
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.02,), name="local-hub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for conn in list(server.connections):  # wake handler threads parked on keep-alive reads
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``; pass it as ``endpoint=`` (HF_ENDPOINT is read at import)."""
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- request log -------------------------------------------------------------------------

    @property
    def log(self) -> list[tuple[str, str]]:
        """Every request as ``(method, url-decoded path)``, oldest first (a copy)."""
        with self._log_lock:
            return list(self._log)

    def downloads(self) -> list[str]:
        """URL paths of file bodies served by ``GET .../resolve/...``: proof of a real download."""
        with self._log_lock:
            return list(self._downloads)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of server-side bugs (answered 500); tests can assert this stays empty."""
        with self._log_lock:
            return list(self._errors)

    def clear_log(self) -> None:
        with self._log_lock:
            self._log.clear()
            self._downloads.clear()

    def _record(self, method: str, path: str) -> None:
        with self._log_lock:
            self._log.append((method, path))

    def _record_download(self, path: str) -> None:
        with self._log_lock:
            self._downloads.append(path)

    def _note_error(self, error: str) -> None:
        with self._log_lock:
            self._errors.append(error)

    # -- direct store access for tests ---------------------------------------------------------

    def create_repo(self, repo_id: str, private: bool = False, *, repo_type: str = "model",
                    gated: bool = False, granted: tuple[str, ...] = ()) -> str:
        """Create ``namespace/name`` without HTTP; returns the initial commit id. A `gated` repo
        serves its files only to the users in `granted`."""
        with self._store.lock:
            repo = self._store.create(repo_type, repo_id, private)
            repo.gated, repo.granted = gated, set(granted)
            return repo.branches["main"]

    def put_file(
        self,
        repo_id: str,
        path: str,
        data: bytes,
        branch: str = "main",
        *,
        repo_type: str = "model",
        message: str | None = None,
    ) -> str:
        """Commit ``data`` at ``path`` bypassing the client (e.g. a pickle or a tampered tensor).

        A missing ``branch`` is created from main. Returns the new commit id.
        """
        with self._store.lock:
            repo = self._existing(repo_type, repo_id)
            commit = self._store.commit(
                repo,
                branch,
                [("add", path, data)],
                title=message or f"Upload {path}",
                author=repo_id.split("/")[0],
                new_branch=True,
            )
            return commit.oid

    def files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """The full snapshot at ``revision`` (branch or commit id)."""
        with self._store.lock:
            return dict(self._existing(repo_type, repo_id).resolve(revision).files)

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        """Commit id ``branch`` points at."""
        with self._store.lock:
            return self._existing(repo_type, repo_id).resolve(branch).oid

    def commits(
        self, repo_id: str, branch: str = "main", *, repo_type: str = "model"
    ) -> list[Commit]:
        """History of ``branch``, newest first."""
        with self._store.lock:
            repo = self._existing(repo_type, repo_id)
            return list(repo.history(repo.resolve(branch)))

    def _existing(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on this LocalHub")
        return repo


@contextmanager
def running_hub(
    tokens: Mapping[str, str] | None = None, *, gitattributes: bool = True
) -> Iterator[LocalHub]:
    """A started ``LocalHub`` for the ``with`` block; wrap it in a fixture where needed."""
    with LocalHub(tokens, gitattributes=gitattributes) as hub:
        yield hub
