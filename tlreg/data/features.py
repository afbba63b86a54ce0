"""Feature cache: pooled backbone features computed once per image and reused across runs.

Only valid while the backbone is frozen for the whole run, its BN layers are in eval mode and
the transforms are deterministic (the trainer checks all three). Entries are keyed by backbone,
weights hash, data config and transform; inside an entry each image is keyed by
`tlreg.data.sources.identity` (a file's path, size and modification time, so touching one file
recomputes only that one; an in-memory image's content hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import atomic_write_json, read_checkpoint, save_checkpoint

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import Sample

CACHE_ENV = "TLREG_CACHE_DIR"


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """`override`, else $TLREG_CACHE_DIR, else the user's cache dir (XDG) / tlreg."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "tlreg"


@dataclass(frozen=True)
class FeatureKey:
    """What the features depend on; its digest names the cache entry."""

    backbone: str
    weights_sha256: str
    data_config: tuple[tuple[str, str], ...]
    transform: str

    @classmethod
    def of(cls, backbone: str, weights_sha256: str, data_config: dict[str, Any],
           transform: Any) -> FeatureKey:
        cfg = tuple(sorted((k, repr(v)) for k, v in data_config.items()))
        return cls(backbone, weights_sha256, cfg, repr(transform))

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:24]


class FeatureCache:
    """One cache entry: a features tensor plus a JSON index of path -> (size, mtime, row)."""

    def __init__(self, root: Path, key: FeatureKey) -> None:
        self.key = key
        self.dir = root / "features" / key.digest()
        self.index: dict[str, list[int]] = {}
        self.features: torch.Tensor | None = None
        self.read_only = False  # set when writing failed: kept in memory only
        found = self.dir / "entry"
        if (found / "state.json").exists() or found.with_name(".entry.old").exists():
            try:
                tensors, state, _ = read_checkpoint(found)
                self.features, self.index = _verified(tensors["features"], state)
            except Exception as exc:  # a damaged cache is recomputed, never trusted
                import warnings

                warnings.warn(f"feature cache entry {self.dir} is damaged ({exc}); its "
                              "features are computed again", stacklevel=2)
                self.features, self.index = None, {}

    def lookup(self, samples: Sequence[Sample]) -> tuple[dict[int, int], list[int]]:
        """(position -> cached row) for fresh entries, and positions that need computing."""
        from tlreg.data.sources import identity

        hits: dict[int, int] = {}
        missing: list[int] = []
        for i, sample in enumerate(samples):
            name, stamp = identity(sample)
            entry = self.index.get(name)
            if entry is not None and self.features is not None and entry[:2] == stamp:
                hits[i] = entry[2]
            else:
                missing.append(i)
        return hits, missing

    def update(self, samples: Sequence[Sample], features: torch.Tensor) -> None:
        """Add or replace rows for `samples` and write the entry atomically."""
        import torch

        from tlreg.data.sources import identity

        rows = self.features if self.features is not None else features.new_empty(
            (0, features.shape[1]))
        start = rows.shape[0]
        self.features = torch.cat([rows, features.detach().cpu().float()])
        for j, sample in enumerate(samples):
            name, stamp = identity(sample)
            self.index[name] = [*stamp, start + j]
        self._compact()
        if self.read_only:
            return
        from tlreg.lock import FolderLocked, exclusive

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with exclusive(self.dir):  # one writer per entry: two swaps must not interleave
                self._write()
        except FolderLocked:
            pass  # another run is writing this entry now; ours stays in memory this time
        except OSError as exc:  # full or read-only: the cache is optional, the run goes on
            import warnings

            self.read_only = True
            warnings.warn(f"feature cache off: cannot write {self.dir} ({exc.strerror}); "
                          "features stay in memory for this run", stacklevel=2)

    def _write(self) -> None:
        assert self.features is not None
        save_checkpoint(self.dir / "entry", {"features": self.features},
                        {"index": self.index, "sha256": _digest(self.features),
                         "shape": list(self.features.shape)})
        atomic_write_json(self.dir / "meta.json", {
            "backbone": self.key.backbone, "weights_sha256": self.key.weights_sha256,
            "data_config": dict(self.key.data_config), "entries": len(self.index),
        })

    def _compact(self) -> None:
        """Drop rows no index entry points to (replaced files)."""
        assert self.features is not None
        live = sorted({e[2] for e in self.index.values()})
        if len(live) == self.features.shape[0]:
            return
        remap = {old: new for new, old in enumerate(live)}
        self.features = self.features[live]
        self.index = {p: [e[0], e[1], remap[e[2]]] for p, e in self.index.items()}


def _digest(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().numpy().tobytes()).hexdigest()


def _verified(features: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor,
                                                                      dict[str, list[int]]]:
    """The entry's features and index, or ValueError saying what is wrong with them.

    The checksum catches flipped bytes that safetensors reads without complaint; the shape,
    finiteness and index checks catch an entry whose parts do not belong together.
    """
    import torch

    if state.get("sha256") is None:
        raise ValueError("no checksum (written by an older tlreg)")
    if features.dim() != 2 or list(features.shape) != state.get("shape"):
        raise ValueError(f"shape {list(features.shape)}, recorded {state.get('shape')}")
    if _digest(features) != state["sha256"]:
        raise ValueError("checksum mismatch")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("non-finite features")
    index = state.get("index")
    rows = features.shape[0]
    if not isinstance(index, dict) or not all(
            isinstance(e, list) and len(e) == 3 and all(isinstance(v, int) for v in e)
            and 0 <= e[2] < rows for e in index.values()):
        raise ValueError("index does not match the features")
    return features, index


def cached_features(samples: Sequence[Sample], compute: Callable[[list[int]], tuple[
        torch.Tensor, list[int]]], cache: FeatureCache | None) -> tuple[torch.Tensor, list[int]]:
    """Features for every sample (rows follow `samples`) and the positions that failed to decode.

    `compute(positions)` runs the backbone on those samples and returns their features (in
    order, undecodable ones left out) and the failed positions. Failed files are not cached.
    """
    hits, missing = cache.lookup(samples) if cache is not None else ({}, list(range(len(samples))))
    failed: list[int] = []
    if missing:
        new, failed = compute(missing)
        if cache is None:  # everything was computed, in order
            return new.float(), failed
        bad = set(failed)
        ok = [i for i in missing if i not in bad]
        if ok:
            cache.update([samples[i] for i in ok], new)
        hits, _ = cache.lookup(samples)
    assert cache is not None
    if cache.features is None:  # nothing cached and nothing decodable
        return new.float(), failed
    return cache.features[[hits[i] for i in range(len(samples)) if i in hits]], failed


def list_entries(root: Path | None = None) -> list[dict[str, Any]]:
    """For `tlreg cache ls`: every entry of both caches tlreg writes, with its size on disk.

    `kind` is `features` (this module) or `decoded` (tlreg.data.decoded's disk cache).
    """
    rows = []
    for kind in ("features", "decoded"):
        base = cache_root(root) / kind
        for d in sorted(base.glob("*")) if base.is_dir() else []:
            meta = _read_json(d / ("meta.json" if kind == "features" else "index.json"))
            entries = meta.get("entries") if kind == "features" else (
                len(meta["shapes"]) if isinstance(meta.get("shapes"), list) else None)
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            rows.append({"kind": kind, "key": d.name, "backbone": meta.get("backbone"),
                         "entries": entries, "bytes": size, "path": str(d)})
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def clear(root: Path | None = None) -> int:
    """Remove every entry of both caches; returns how many were removed."""
    entries = list_entries(root)
    for kind in ("features", "decoded"):
        shutil.rmtree(cache_root(root) / kind, ignore_errors=True)
    return len(entries)
