"""Decode each image once: a size-bounded cache of pre-resized uint8 tensors.

JPEG decoding and PIL resizing dominate a CPU data pipeline. With `--decoded-cache memory`
(or `disk`) each image is decoded once, resized so its shorter side is `short_side` (the size
timm's eval transform resizes to before its centre crop), and kept as a uint8 CHW tensor.
Later epochs cut crops from those tensors and augment whole batches at once.

Evaluation from the cache is exact: the stored tensor is the eval transform's resize, so the
centre crop and normalisation give the same input as timm's PIL pipeline. Training
augmentation (random resized crop, flip, colour jitter, random erasing) runs on the stored
tensor, so a crop is sampled from the pre-resized image rather than the original file; each
sample's random parameters come from (epoch seed, sample index), so the augmentation does not
depend on batch composition, worker or rank. RandAugment is per-image PIL work: with it the
training images take timm's per-image path (`tlreg.data.batched.batch_unsupported`).

`disk` streams the tensors into a memory-mapped file under the cache directory as they are
decoded (one image in memory at a time), keyed by the file list (paths, sizes, mtimes) and the
resize, so the next run skips decoding too. `stream` keeps nothing: every epoch decodes again in
worker processes, a few images ahead, and the batches are those of the cache (`stream`), so a
run too large for memory and disk trains exactly as a `memory` run would. `auto` chooses before
it starts, from the decoded size read off the image headers: memory within `--decoded-cache-gb`,
else disk where it takes at most half the free space, else stream (`choose_mode`).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import atomic_path, atomic_write_json
from tlreg.data.sources import identity, image_file

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tlreg.data.batched import BatchAugment, BatchEval
    from tlreg.data.sources import Sample

MODES = ("off", "memory", "disk", "stream")


def short_side_for(data_config: dict[str, Any]) -> int:
    """The eval transform's resize target: floor(img_size / crop_pct), as timm computes it."""
    size = data_config["input_size"][-1]
    return math.floor(size / data_config.get("crop_pct", 0.875))


def unsupported(data_config: dict[str, Any]) -> str | None:
    """Why the cache cannot reproduce this data config's eval transform exactly, or None.

    The cache stores the eval transform's short-side resize; timm's `squash` and `border` crop
    modes resize differently (84 pretrained configs in timm 1.0 use them).
    """
    mode = data_config.get("crop_mode") or "center"
    if mode != "center":
        return f"crop_mode {mode!r} (the decoded-image cache reproduces only 'center')"
    return None


def estimate_bytes(samples: Sequence[Sample], short_side: int) -> int:
    """Decoded size from image headers alone (no pixel is decoded)."""
    from PIL import Image

    total = 0
    for s in samples:
        try:
            with Image.open(image_file(s)) as img:
                w, h = img.size
        except Exception:
            continue
        rw, rh = resized_size(w, h, short_side)
        total += 3 * rw * rh
    return total


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: the short side to `short_side`, the long side truncated."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


class _DecodeDataset:
    """Item k: (uint8 CHW array or None, i) for sample i = order[k] (every sample by default)."""

    def __init__(self, samples: Sequence[Sample], short_side: int, interpolation: str,
                 order: Sequence[int] | None = None) -> None:
        self.samples, self.short_side, self.interpolation = samples, short_side, interpolation
        self.order = order

    def __len__(self) -> int:
        return len(self.samples if self.order is None else self.order)

    def __getitem__(self, k: int) -> tuple[Any, int]:
        import numpy as np
        from PIL import Image

        from tlreg.data.images import load_sample

        i = k if self.order is None else self.order[k]
        try:
            img = load_sample(self.samples[i])
        except Exception:
            return None, i
        size = resized_size(*img.size, self.short_side)
        method = {"bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST}.get(self.interpolation,
                                                           Image.Resampling.BICUBIC)
        img = img.resize(size, method)
        # a numpy array travels back pickled through the worker's pipe; a tensor would go
        # through shared memory and a file descriptor per image, 3x slower for 400 images
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)), i


def _first(batch: list[Any]) -> Any:
    return batch[0]


@dataclass
class DecodedImages:
    """uint8 CHW tensors for `samples`, in memory or in a memory-mapped file."""

    samples: Sequence[Sample]
    short_side: int
    images: list[torch.Tensor | None]

    @property
    def failed(self) -> list[int]:
        return [i for i, t in enumerate(self.images) if t is None]


def _key(samples: Sequence[Sample], short_side: int, interpolation: str) -> str:
    h = hashlib.sha256(f"{short_side}|{interpolation}".encode())
    for s in samples:
        name, (size, stamp) = identity(s)
        h.update(f"{name}|{size}|{stamp}\n".encode())
    return h.hexdigest()[:24]


DISK_SHARE = 0.5  # `auto` puts the decoded images on disk only where they take half the free space


def choose_mode(need: int, memory_budget: int, disk_free: int) -> str:
    """`--decoded-cache auto` for a data set whose decoded images take `need` bytes: in memory
    within the budget, else memory-mapped on disk where it leaves room, else `stream`.

    `stream` rather than timm's per-image pipeline: it trains the weights a `memory` run gives
    (the same batches and augmentation), so a data set's size does not change its result, and
    fine-tuning epochs ran as fast (0.95x on 2 cores, within the rounds' spread), though the
    pipeline alone runs 0.71x (figure 3 of docs/benchmarks.md)."""
    if need <= memory_budget:
        return "memory"
    if need <= DISK_SHARE * disk_free:
        return "disk"
    return "stream"


def stream(samples: Sequence[Sample], order: Sequence[int], data_config: dict[str, Any], *,
           workers: int) -> Iterator[tuple[int, torch.Tensor | None]]:
    """(i, uint8 CHW tensor or None) for each sample i of `order`, in that order, decoded and
    resized as the cache stores them by `workers` processes while the caller uses the last.

    `stream` mode: the data set fits neither the memory budget nor the disk, so each epoch
    decodes again, a few images ahead of the training step, and keeps the batched augmentation;
    the tensors, and so the batches, are those `memory` mode would give.
    """
    import torch
    from torch.utils.data import DataLoader

    dataset = _DecodeDataset(samples, short_side_for(data_config),
                             data_config.get("interpolation", "bicubic"), order)
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=_first,
                        prefetch_factor=8 if workers else None)
    for array, i in loader:
        yield i, None if array is None else torch.from_numpy(array)


def stream_batches(samples: Sequence[Sample], order: Sequence[int], data_config: dict[str, Any],
                   transform: BatchAugment | BatchEval, *, batch_size: int, seed: int,
                   workers: int, failed: set[int]) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """`stream`'s batches: (transformed images, their sample indices), `batch_size` decodable
    images each, as `memory` mode cuts them from the same order; adds undecodable ones to
    `failed`."""
    images: list[torch.Tensor] = []
    idx: list[int] = []
    for i, image in stream(samples, order, data_config, workers=workers):
        if image is None:
            failed.add(i)
            continue
        images.append(image)
        idx.append(i)
        if len(idx) == batch_size:
            yield transform(images, idx, seed), idx
            images, idx = [], []
    if idx:
        yield transform(images, idx, seed), idx


def disk_folder(samples: Sequence[Sample], data_config: dict[str, Any],
                cache_dir: str | Path | None) -> Path:
    """Where `disk` mode keeps these samples' decoded images."""
    from tlreg.data.features import cache_root

    short = short_side_for(data_config)
    interpolation = data_config.get("interpolation", "bicubic")
    return cache_root(cache_dir) / "decoded" / _key(samples, short, interpolation)


def free_bytes(folder: Path) -> int:
    """Free space where `folder` is (or would be) created."""
    import shutil

    for parent in (folder, *folder.parents):
        if parent.exists():
            return shutil.disk_usage(parent).free
    return 0


def decode_all(samples: Sequence[Sample], data_config: dict[str, Any], *, mode: str,
               workers: int, max_bytes: int, cache_dir: str | Path | None = None,
               need: int | None = None) -> DecodedImages | None:
    """Decode every sample once (in `workers` processes); None when it does not fit.

    `memory` must fit `max_bytes`; `disk` writes each image to the memory-mapped file as it
    arrives, so it needs free disk space, not memory, and serves the images from the map.
    `need`: the decoded size if the caller already estimated it.
    """
    import torch
    from torch.utils.data import DataLoader

    short = short_side_for(data_config)
    interpolation = data_config.get("interpolation", "bicubic")
    need = estimate_bytes(samples, short) if need is None else need
    disk_dir = disk_folder(samples, data_config, cache_dir) if mode == "disk" else None
    if disk_dir is None and need > max_bytes:
        warnings.warn(f"decoded-image cache needs about {need / 2**30:.2f} GiB for "
                      f"{len(samples)} images, over its budget of {max_bytes / 2**30:.2f} GiB; "
                      "decoding in the DataLoader instead (raise --decoded-cache-gb, or "
                      "--decoded-cache disk)", stacklevel=2)
        return None
    loader = DataLoader(_DecodeDataset(samples, short, interpolation), batch_size=1,
                        num_workers=workers, collate_fn=_first)
    if disk_dir is not None:
        loaded = _load_disk(disk_dir, samples, short)
        if loaded is not None:
            return loaded
        if need > free_bytes(disk_dir):
            warnings.warn(f"decoded-image cache needs about {need / 2**30:.2f} GiB of disk "
                          f"under {disk_dir}, more than is free; decoding in the DataLoader "
                          "instead", stacklevel=2)
            return None
        try:
            _save_disk(disk_dir, short, len(samples), loader)
        except OSError as exc:  # a full or read-only cache folder: the cache is optional
            warnings.warn(f"decoded-image cache off: cannot write {disk_dir} ({exc.strerror}); "
                          "decoding in the DataLoader instead", stacklevel=2)
            return None
        return _load_disk(disk_dir, samples, short, verify=False)  # just written
    images: list[torch.Tensor | None] = [None] * len(samples)
    for array, i in loader:
        images[i] = None if array is None else torch.from_numpy(array)
    return DecodedImages(samples, short, images)


def _save_disk(folder: Path, short_side: int, count: int, loader: Any) -> None:
    """Stream the decoded images into `data.bin` (one image in memory at a time), then its
    index; both written aside and renamed, the index last, so a reader sees all or nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes: list[list[int] | None] = [None] * count
    offsets = [0] * count
    digest = hashlib.sha256()
    offset = 0
    with atomic_path(folder / "data.bin") as tmp, open(tmp, "wb") as f:
        for array, i in loader:
            offsets[i] = offset
            if array is not None:
                shapes[i] = list(array.shape)
                raw = memoryview(array).cast("B")
                f.write(raw)
                digest.update(raw)
                offset += array.size
        if offset == 0:  # np.memmap cannot map an empty file
            f.write(b"\0")
            digest.update(b"\0")
            offset = 1
    atomic_write_json(folder / "index.json", {"short_side": short_side, "shapes": shapes,
                                              "offsets": offsets, "bytes": offset,
                                              "sha256": digest.hexdigest()})


def _load_disk(folder: Path, samples: Sequence[Sample], short: int,
               verify: bool = True) -> DecodedImages | None:
    """The entry as a memory map, or None (with one warning if it exists but is damaged).

    Verified like the feature cache: the SHA-256 of the bytes, and shapes and offsets that
    stay inside them; pixels are never trusted unchecked.
    """
    import numpy as np
    import torch

    index_path, data_path = folder / "index.json", folder / "data.bin"
    if not (index_path.is_file() and data_path.is_file()):
        return None
    try:
        index = json.loads(index_path.read_text())
        data: np.ndarray = np.memmap(data_path, dtype=np.uint8, mode="c")  # never writes
        _check_entry(index, data, len(samples), verify)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"decoded-image cache entry {folder} is damaged ({exc}); decoding the "
                      "images again", stacklevel=2)
        return None
    flat = torch.from_numpy(data)
    images: list[torch.Tensor | None] = []
    for shape, off in zip(index["shapes"], index["offsets"], strict=True):
        if shape is None:
            images.append(None)
        else:
            images.append(flat[off:off + math.prod(shape)].view(*shape))
    return DecodedImages(samples, short, images)


def _check_entry(index: dict[str, Any], data: Any, count: int, verify: bool) -> None:
    shapes, offsets = index["shapes"], index["offsets"]
    if len(shapes) != count or len(offsets) != count:
        raise ValueError(f"{len(shapes)} images recorded, {count} expected")
    if data.ndim != 1 or data.shape[0] != index.get("bytes"):
        raise ValueError("data size does not match its index")
    for shape, off in zip(shapes, offsets, strict=True):
        if shape is not None and not (off >= 0 and off + math.prod(shape) <= data.shape[0]):
            raise ValueError("an image lies outside the data")
    if verify and hashlib.sha256(memoryview(data)).hexdigest() != index.get("sha256"):
        raise ValueError("checksum mismatch" if index.get("sha256") else
                         "no checksum (written by an older tlreg)")


def benchmark_pipeline(data_dir: str | Path, data_config: dict[str, Any], *, epochs: int = 3,
                       batch_size: int = 32, workers: int = 2, decoded_cache: bool = True,
                       augment: bool = True, streamed: bool = False) -> list[float]:
    """Images/s of tlreg's training data pipeline alone (no model), per epoch.

    With `decoded_cache` the first epoch includes the one decode pass; later epochs only crop
    and augment tensors. `streamed`: `stream` mode, every epoch decodes in the workers and
    augments batches. Without either, every epoch runs the DataLoader over the files.
    """
    import time

    import torch

    from tlreg.data.batched import BatchAugment, BatchEval
    from tlreg.data.folder import folder
    from tlreg.data.images import build_transform, make_loader

    samples = folder(data_dir).train
    speeds = []
    decoded = None
    for epoch in range(epochs):
        t0 = time.perf_counter()
        n = 0
        if streamed:
            tf = BatchAugment(data_config) if augment else BatchEval(data_config)
            for batch, _ in stream_batches(samples, torch.randperm(len(samples)).tolist(),
                                           data_config, tf, batch_size=batch_size, seed=epoch,
                                           workers=workers, failed=set()):
                n += len(batch)
        elif decoded_cache:
            if decoded is None:
                decoded = decode_all(samples, data_config, mode="memory", workers=workers,
                                     max_bytes=2**40)
                assert decoded is not None
                tf = BatchAugment(data_config) if augment else BatchEval(data_config)
            order = [i for i in torch.randperm(len(samples)).tolist()
                     if decoded.images[i] is not None]
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                n += len(tf([decoded.images[j] for j in idx], idx, epoch))
        else:
            loader = make_loader(samples, build_transform(data_config, train=augment),
                                 batch_size=batch_size, shuffle=True, seed=epoch,
                                 workers=workers)
            for batch in loader:
                n += len(batch.labels)
        speeds.append(n / (time.perf_counter() - t0))
    return speeds
