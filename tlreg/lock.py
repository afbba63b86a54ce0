"""One writer per folder: an exclusive POSIX record lock (`lockf`) on `FOLDER/.tlreg.lock`.

The kernel releases it when its process dies, however it dies, so a lock left by a killed run
is never stale: the next run takes it. A record lock, not `flock`: `flock` locks are shared
with forked children, so DataLoader workers orphaned by a SIGKILL would hold the run's lock.
The file holds the holder's pid and host, for the message the second writer gets. On systems
without `fcntl` (Windows) there is no lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from tlreg.errors import UsageError

LOCK_NAME = ".tlreg.lock"

__all__ = ["LOCK_NAME", "FolderLocked", "exclusive"]


class FolderLocked(UsageError):
    """Another process holds the folder's lock."""

    exit_code = 7


@contextlib.contextmanager
def exclusive(folder: Path, *, created: bool = False) -> Iterator[None]:
    """Hold the folder's lock for the block; `created`: remove the folder again if the block
    leaves nothing in it but the lock (a run that failed before writing anything)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise FolderLocked(f"{folder} is being written by another tlreg process "
                           f"(pid and host: {holder}); wait for it to end, or choose another "
                           "--out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            path.unlink(missing_ok=True)  # still locked by us: no other writer can be inside
            with contextlib.suppress(OSError):
                folder.rmdir()
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
