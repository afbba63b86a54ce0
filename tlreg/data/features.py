"""Feature cache: pooled backbone features computed once per image and reused across runs.

Only valid while the backbone is frozen for the whole run, its BN layers are in eval mode and
the transforms are deterministic (the trainer checks all three). Entries are keyed by backbone,
weights hash, data config and transform; inside an entry each image is keyed by
`tlreg.data.sources.identity` (a file's path, size and modification time, so touching one file
recomputes only that one; an in-memory image's content hash).

An entry is a folder of chunk files (`FeatureCache`), so a 50,000-image entry is read a chunk
at a time and one new image costs one small file, not a rewrite of the other 49,999.
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

from tlreg._io import atomic_path, atomic_write_json, save_file
from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import Sample

CACHE_ENV = "TLREG_CACHE_DIR"
MAX_HEADER_BYTES = 64 << 20  # 50,000 names and stamps take about 5 MB


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


CHUNK_ROWS = 4096  # rows per chunk file: 20 MB of float32 at 1,280 features
# How an entry stores its rows (--feature-dtype): float16 halves the bytes on disk and read
# (docs/cache.md: its accuracy effect, measured by bench/feature_dtype.py); rows are float32
# in memory either way, because the solver and the head train in float32.
FEATURE_DTYPES = ("float32", "float16")
_SAFETENSORS_DTYPES = {"F32": 4, "F16": 2}
FP16_MAX = 65504.0
MAX_CHUNKS = 64  # more files than this are merged (many small appends)
CHUNK_FORMAT = "tlreg-features/2"
CHUNK_GLOB = "chunk-*.safetensors"


class FeatureCache:
    """One cache entry: append-only chunk files of features, each naming its own images.

    A chunk is a safetensors file of at most `CHUNK_ROWS` rows whose metadata lists the images
    (identity and stamp) of its rows and the SHA-256 of its tensor. Adding images writes new
    chunks and never touches the old ones; when a name appears in several chunks the newest
    (by file name) wins, so a crash between two writes leaves a readable entry. Rows are read
    a chunk at a time (safetensors memory-maps the file), verified before use, and a damaged or
    truncated chunk is dropped, so only its images are computed again.
    """

    def __init__(self, root: Path, key: FeatureKey, dtype: str = "float32") -> None:
        if dtype not in FEATURE_DTYPES:
            raise UsageError(f"--feature-dtype {dtype!r}: choose from {', '.join(FEATURE_DTYPES)}")
        self.key = key
        self.dtype = dtype
        # float16 rows are another entry: a float32 run never reads rounded features
        self.dir = root / "features" / (key.digest() + ("-f16" if dtype == "float16" else ""))
        self.read_only = False  # set when writing failed: new rows stay in this run's memory
        self.index: dict[str, tuple[list[int], str, int]] = {}  # name -> (stamp, chunk, row)
        self.chunks: dict[str, int] = {}  # chunk file name -> rows
        self.dim: int | None = None  # features per row (of the newest chunk)
        self._scan()

    def _scan(self) -> None:
        """Read every chunk's header (not its rows); a chunk whose header is bad is skipped."""
        self.index, self.chunks = {}, {}
        for path in sorted(self.dir.glob(CHUNK_GLOB)):
            try:
                names, stamps, self.dim = _chunk_header(path)
            except (OSError, ValueError) as exc:
                _damaged(path, exc)
                continue
            self.chunks[path.name] = len(names)
            for row, (name, stamp) in enumerate(zip(names, stamps, strict=True)):
                self.index[name] = (stamp, path.name, row)

    def lookup(self, samples: Sequence[Sample]) -> tuple[dict[int, tuple[str, int]], list[int]]:
        """(position -> (chunk, row)) for fresh entries, and positions that need computing."""
        from tlreg.data.sources import identity

        hits: dict[int, tuple[str, int]] = {}
        missing: list[int] = []
        for i, sample in enumerate(samples):
            name, stamp = identity(sample)
            entry = self.index.get(name)
            if entry is not None and entry[0] == stamp:
                hits[i] = (entry[1], entry[2])
            else:
                missing.append(i)
        return hits, missing

    def read(self, hits: dict[int, tuple[str, int]], out: torch.Tensor) -> list[int]:
        """Copy the hit rows into `out` (rows follow positions), one verified chunk at a time;
        returns the positions whose chunk turned out damaged or gone, to be computed again."""
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for pos, (chunk, row) in hits.items():
            by_chunk.setdefault(chunk, []).append((pos, row))
        lost: list[int] = []
        for chunk, pairs in sorted(by_chunk.items()):
            try:
                rows = _read_chunk(self.dir / chunk, self.chunks.get(chunk))
                if rows.shape[1] != out.shape[1]:
                    raise ValueError(f"{rows.shape[1]} features, the entry has {out.shape[1]}")
            except (OSError, ValueError) as exc:
                _damaged(self.dir / chunk, exc)
                lost += [p for p, _ in pairs]
                continue
            out[[p for p, _ in pairs]] = rows[[r for _, r in pairs]]
            del rows  # one chunk in memory at a time
        return sorted(lost)

    def as_stored(self, features: torch.Tensor) -> torch.Tensor:
        """`features` as this entry stores them: float16 rounds, unless a value is beyond
        float16's range (the rows then stay float32, exactly: never an inf in the cache)."""
        import torch

        if self.dtype == "float16" and features.dtype == torch.float16:
            return features.detach().cpu()  # stored already: cached_features, then update
        rows = features.detach().cpu().float()
        if self.dtype == "float16" and (rows.numel() == 0 or float(rows.abs().max()) <= FP16_MAX):
            return rows.half()
        return rows

    def update(self, samples: Sequence[Sample], features: torch.Tensor) -> None:
        """Add (or replace) the rows of `samples` as new chunks; existing chunks are untouched.
        Pass rows through `as_stored` first to use in this run exactly what later runs read."""
        if self.read_only or not samples:
            return
        from tlreg.data.sources import identity
        from tlreg.lock import FolderLocked, exclusive

        keys = [identity(s) for s in samples]
        rows = self.as_stored(features).contiguous()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with exclusive(self.dir):  # one writer per entry: clean-ups must not race appends
                self._clean_leftovers()
                for start in range(0, len(keys), CHUNK_ROWS):
                    part = keys[start:start + CHUNK_ROWS]
                    self._write_chunk([n for n, _ in part], [s for _, s in part],
                                      rows[start:start + CHUNK_ROWS])
                self._scan()  # what other runs added since we looked counts too
                self._compact()
                atomic_write_json(self.dir / "meta.json", {
                    "backbone": self.key.backbone, "weights_sha256": self.key.weights_sha256,
                    "data_config": dict(self.key.data_config), "entries": len(self.index),
                    "dtype": self.dtype,
                })
        except FolderLocked:
            pass  # another run is writing this entry now; ours stays in memory this time
        except OSError as exc:  # full or read-only: the cache is optional, the run goes on
            import warnings

            self.read_only = True
            warnings.warn(f"feature cache off: cannot write {self.dir} ({exc.strerror}); "
                          "features stay in memory for this run", stacklevel=2)

    def _write_chunk(self, names: list[str], stamps: list[list[int]],
                     rows: torch.Tensor) -> None:
        import time

        meta = {"format": CHUNK_FORMAT, "names": json.dumps(names),
                "stamps": json.dumps(stamps), "sha256": _digest(rows)}
        # named by time: the newest chunk sorts last and wins
        path = self.dir / f"chunk-{time.time_ns():020d}-{os.getpid()}.safetensors"
        with atomic_path(path) as tmp:
            save_file({"features": rows.contiguous()}, tmp, metadata=meta)
        self.chunks[path.name] = len(names)

    def _compact(self) -> None:
        """Merge chunks when stale rows (replaced images) outnumber live ones, or past
        `MAX_CHUNKS` files; otherwise only drop chunks with no live row.

        The merged chunks are written before the old ones are removed, so a crash in between
        leaves duplicates (identical rows; the newer file wins), never a gap.
        """
        import torch

        live: dict[str, list[tuple[str, list[int], int]]] = {c: [] for c in self.chunks}
        for name, (stamp, chunk, row) in self.index.items():
            live[chunk].append((name, stamp, row))
        stale = sum(self.chunks.values()) - len(self.index)
        old = sorted(self.chunks)
        if stale > len(self.index) or len(self.chunks) > MAX_CHUNKS:
            pending: list[tuple[str, list[int], torch.Tensor]] = []

            def flush(count: int) -> None:
                part = pending[:count]
                del pending[:count]
                self._write_chunk([n for n, _, _ in part], [s for _, s, _ in part],
                                  self.as_stored(torch.stack([t for _, _, t in part])))

            for chunk in old:
                if not live[chunk]:
                    continue
                try:
                    rows = _read_chunk(self.dir / chunk, self.chunks[chunk])
                except (OSError, ValueError) as exc:
                    _damaged(self.dir / chunk, exc)
                    continue
                pending += [(n, s, rows[r]) for n, s, r in live[chunk]]
                while len(pending) >= CHUNK_ROWS:
                    flush(CHUNK_ROWS)
            if pending:
                flush(len(pending))
        else:
            old = [c for c in old if not live[c]]
        for chunk in old:
            (self.dir / chunk).unlink(missing_ok=True)
        self._scan()

    def _clean_leftovers(self) -> None:
        """Under the lock nobody else writes here: temporary files are a killed writer's, and
        the single-file entry of earlier tlreg versions is superseded."""
        for tmp in self.dir.glob(".chunk-*.tmp"):
            tmp.unlink(missing_ok=True)
        for old in ("entry", ".entry.old"):
            if (self.dir / old).is_dir():
                shutil.rmtree(self.dir / old, ignore_errors=True)


def _digest(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().numpy().tobytes()).hexdigest()


def _damaged(path: Path, exc: Exception) -> None:
    import warnings

    warnings.warn(f"feature cache chunk {path} is damaged ({exc}); its images' features are "
                  "computed again", stacklevel=3)


def _chunk_header(path: Path) -> tuple[list[str], list[list[int]], int]:
    """(names, stamps, features per row) of a chunk from its header alone, or ValueError.

    The file's size must be exactly what the header describes: a truncated chunk (a full disk,
    a copy cut short) is caught here, before any of its rows is counted as cached.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("truncated header")
        size = int.from_bytes(head, "little")
        if not 2 <= size <= MAX_HEADER_BYTES:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(f.read(size))
    meta, spec = header.get("__metadata__") or {}, header.get("features")
    if meta.get("format") != CHUNK_FORMAT or not isinstance(spec, dict):
        raise ValueError(f"not a {CHUNK_FORMAT} chunk")
    names, stamps = json.loads(meta["names"]), json.loads(meta["stamps"])
    shape, (begin, end) = spec["shape"], spec["data_offsets"]
    width = _SAFETENSORS_DTYPES.get(spec.get("dtype"))
    if width is None or len(shape) != 2 or shape[0] != len(names) or not names:
        raise ValueError(f"{spec.get('dtype')} rows of shape {shape} for {len(names)} images")
    if len(stamps) != len(names) or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s)
            for s in stamps) or not all(isinstance(n, str) for n in names):
        raise ValueError("its image list does not match its rows")
    if end - begin != width * shape[0] * shape[1] or path.stat().st_size != 8 + size + end:
        raise ValueError(f"{path.stat().st_size} bytes on disk, the header describes "
                         f"{8 + size + end} (truncated?)")
    return names, stamps, shape[1]


def _read_chunk(path: Path, rows: int | None) -> torch.Tensor:
    """A chunk's features as float32, or ValueError: the checksum (of the stored bytes)
    catches flipped bytes that safetensors reads without complaint, the finiteness check a
    chunk written from a diverged model."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        features = f.get_tensor("features")
    if features.dim() != 2 or (rows is not None and features.shape[0] != rows):
        raise ValueError(f"shape {list(features.shape)}, {rows} rows recorded")
    if _digest(features) != meta.get("sha256"):
        raise ValueError("checksum mismatch")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("non-finite features")
    return features.float()


def cached_features(samples: Sequence[Sample], compute: Callable[[list[int]], tuple[
        torch.Tensor, list[int]]], cache: FeatureCache | None) -> tuple[torch.Tensor, list[int]]:
    """Features for every sample (rows follow `samples`) and the positions that failed to decode.

    `compute(positions)` runs the backbone on those samples and returns their features (in
    order, undecodable ones left out) and the failed positions. Failed files are not cached.
    """
    import torch

    if cache is None or not samples:
        new, failed = compute(list(range(len(samples))))
        return new.float(), failed
    hits, missing = cache.lookup(samples)
    out = torch.empty(len(samples), cache.dim) if hits and cache.dim else None
    if out is not None:
        missing = sorted(missing + cache.read(hits, out))
    failed: list[int] = []
    if missing:
        new, failed = compute(missing)
        bad = set(failed)
        ok = [i for i in missing if i not in bad]
        if not ok and out is None:  # nothing cached and nothing decodable
            return new.float(), failed
        if ok:
            new = cache.as_stored(new)  # this run uses what a later run will read
            cache.update([samples[i] for i in ok], new)
            if out is None:
                out = torch.empty(len(samples), new.shape[1])
            out[ok] = new.float()
    assert out is not None
    if failed:
        bad = set(failed)
        out = out[[i for i in range(len(samples)) if i not in bad]]
    return out, failed


def chunk_entries(folder: Path) -> dict[str, list[int]]:
    """name -> stamp of every image a feature-cache entry folder holds (newest chunk wins)."""
    found: dict[str, list[int]] = {}
    for path in sorted(Path(folder).glob(CHUNK_GLOB)):
        try:
            names, stamps, _ = _chunk_header(path)
        except (OSError, ValueError):
            continue
        found.update(zip(names, stamps, strict=True))
    return found


def load_entry(folder: Path) -> tuple[list[str], torch.Tensor]:
    """Every image of an entry folder and its features (rows follow names; newest chunk wins),
    for tools that read a cache outside a run (the accuracy suite's scikit-learn reference)."""
    import torch

    rows: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob(CHUNK_GLOB)):
        try:
            names, _, _ = _chunk_header(path)
            features = _read_chunk(path, len(names))
        except (OSError, ValueError):
            continue
        rows.update(zip(names, features, strict=True))
    names = list(rows)
    return names, torch.stack([rows[n] for n in names]) if rows else torch.empty(0, 0)


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
