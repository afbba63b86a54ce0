"""File I/O every layer shares: atomic writes, checkpoint folders, bounded JSON reads.

A checkpoint folder holds `model.safetensors`, optionally `frozen.safetensors` (a hard link to
tensors written once per run), optionally `train_state.safetensors` and `state.json`. It is
written beside its final place and swapped in with renames, so a reader never sees a
half-written pair: after a crash, either the old or the new folder is there whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
FROZEN_FILE = "frozen.safetensors"
STATE_FILE = "state.json"
MODEL_JSON = "model.json"


def umask_mode(directory: bool = False) -> int:
    """The mode a plain `open` / `mkdir` would give under the current umask.

    tempfile creates 0600 files and 0700 folders whatever the umask; files tlreg writes
    through a temporary sibling get this mode instead, so a shared run or artifact folder stays
    readable to the people the umask allows.
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def temp_dir(parent: Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the umask's mode (see `umask_mode`)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, umask_mode(directory=True))
    return tmp


def save_file(tensors: Mapping[str, Tensor], path: Path,
              metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with its I/O failures raised as the OSError they are.

    safetensors reports a full disk as `SafetensorError: ... (os error 28)`; as an OSError it
    gets the one-line file-system message (and the caches' fallback) every other write gets.
    """
    from safetensors.torch import save_file as _save

    try:
        _save(dict(tensors), path, metadata=metadata)
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def follow_umask(folder: Path) -> None:
    """Give every file under `folder` the umask's mode (safetensors writes 0600 files)."""
    mode = umask_mode()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; synced and moved onto `path` when the block
    ends, removed if it fails, so `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())  # after the write: some writers (safetensors) recreate it
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary sibling and `os.replace` (never half-written)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """One safetensors file, written atomically (aside, then `os.replace`)."""
    with atomic_path(path) as tmp:
        save_file(_plain(tensors), tmp)


def _plain(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What safetensors can write: detached, on the CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_checkpoint(path: Path, model_state: Mapping[str, Tensor], state: Mapping[str, Any],
                    train_state: Mapping[str, Tensor] | None = None,
                    frozen: Path | None = None) -> None:
    """Write a checkpoint directory as one unit (write aside, then swap with renames).

    `frozen`: a safetensors file (from `save_tensors`) holding tensors left out of
    `model_state`; it is hard-linked in (copied where links are not supported).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, prefix=f".{path.name}.tmp-")
    try:
        save_file(_plain(model_state), tmp / MODEL_FILE)
        if frozen is not None:
            try:
                os.link(frozen, tmp / FROZEN_FILE)
            except OSError:
                shutil.copyfile(frozen, tmp / FROZEN_FILE)
        if train_state is not None:
            save_file(_plain(train_state), tmp / TRAIN_STATE_FILE)
        atomic_write_json(tmp / STATE_FILE, dict(state))
        follow_umask(tmp)
        _fsync_dir(tmp)
        old = path.with_name(f".{path.name}.old")
        if not path.exists() and old.exists():  # a swap killed between its renames: the old
            os.replace(old, path)  # copy is the only one; put it back before removing anything
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(path: Path) -> Path | None:
    """The complete checkpoint at `path`, or the previous one if a swap was interrupted."""
    path = Path(path)
    for candidate in (path, path.with_name(f".{path.name}.old")):
        if (candidate / STATE_FILE).is_file() and (candidate / MODEL_FILE).is_file():
            return candidate
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any],
                                          dict[str, Tensor] | None]:
    """(model tensors, JSON state, train-state tensors or None); only safetensors are read."""
    from safetensors.torch import load_file

    found = checkpoint_dir(path)
    if found is None:
        raise UsageError(f"no checkpoint at {path}")
    state = read_json(found / STATE_FILE, what="checkpoint state")
    tensors = load_file(found / MODEL_FILE)
    if (found / FROZEN_FILE).is_file():
        tensors.update(load_file(found / FROZEN_FILE))
    train = found / TRAIN_STATE_FILE
    return tensors, state, load_file(train) if train.is_file() else None


MAX_JSON_BYTES = 64 << 20  # a run's history of thousands of epochs is a few MB

#: The keys (and types) run files must have; checked on every read. (A checkpoint's
#: state.json is checked by its reader: training's and the feature cache's differ.)
RUN_SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    MODEL_JSON: {"info": dict},
}
def read_json(path: Path, schema: Mapping[str, type | tuple[type, ...]] | None = None,
              what: str = "run file") -> dict[str, Any]:
    """A JSON object from a file tlreg wrote, bounded in size and checked against `schema`.

    A damaged or hand-edited file is one UsageError naming it, never a KeyError or TypeError
    deep inside the code that trusted it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(f"{size:,} bytes, over the {MAX_JSON_BYTES:,} allowed")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for key, typ in (schema or RUN_SCHEMAS.get(path.name, {})).items():
            if key not in data:
                raise ValueError(f"no {key!r}")
            if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
                raise ValueError(f"{key!r} is {type(data[key]).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{what} {path} is damaged or not tlreg's ({exc})") from None
    return data
