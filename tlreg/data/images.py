"""Images of any source's samples: robust decoding, timm's transforms, datasets and loaders.

Where samples come from is `tlreg.data.sources` (class folders: `tlreg.data.folder`). A file
that cannot be decoded is skipped with one warning naming it, never a crash mid-epoch.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from tlreg.data.augment import Augment
    from tlreg.data.sources import Sample

#: The file suffixes taken for images (class folders, `tlreg predict FOLDER`).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


#: Decoded images beyond these are skipped (with the usual warning naming the file): PIL only
#: bounds the pixel count, and a 275-byte 200000x1 PNG is 45 million pixels once its short
#: side is resized to 224.
MAX_PIXELS = 64_000_000
MAX_ASPECT = 20.0


class ImageTooLarge(ValueError):
    """An image whose decoded or resized size would exhaust memory."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (microscopy, medical) scaled to 8 bits; `convert` would clip."""
    import numpy as np
    from PIL import Image

    a = np.asarray(img)
    if img.mode == "F" and a.size and float(np.nanmax(a)) <= 1.0:
        a = a * 255.0  # float images in [0, 1]
    elif img.mode != "F" or (a.size and float(np.nanmax(a)) > 255.0):
        a = a / 257.0  # 16-bit range 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")


def load_rgb(path: str | Path | IO[bytes], name: str | None = None) -> Image.Image:
    """Decode any still image (a file, or an open binary stream) as RGB: grayscale, CMYK,
    palette and alpha (over white) included.

    High-bit-depth grey images are scaled to 8 bits, not clipped to white; images larger than
    MAX_PIXELS or more elongated than MAX_ASPECT raise ImageTooLarge before decoding.
    """
    from PIL import Image

    with Image.open(path) as img:
        w, h = img.size
        if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * max(1, min(w, h)):
            raise ImageTooLarge(f"{name or path}: {w}x{h} pixels is too large or elongated to "
                                f"decode (limits {MAX_PIXELS} pixels, aspect {MAX_ASPECT:g}:1)")
        img.seek(0)  # first frame of a GIF
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            return _to_8bit(img).convert("RGB")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")


def load_sample(sample: Sample) -> Image.Image:
    """`load_rgb` for a sample of any source: its file, or its bytes held in memory."""
    from tlreg.data.sources import image_file

    return load_rgb(image_file(sample), name=sample.path)


def data_config_for(model_config: dict[str, Any], img_size: int | None) -> dict[str, Any]:
    """The backbone's data config, with `img_size` overriding the input size."""
    cfg = dict(model_config)
    if img_size:
        cfg["input_size"] = (3, img_size, img_size)
    return cfg


def build_transform(data_config: dict[str, Any], *, train: bool,
                    augment: Augment | None = None) -> Callable[[Any], Any]:
    """timm's transform for this data config: eval (deterministic) or training augmentation.

    `augment` sets the training transform's crop floor, flip rate, jitter, RandAugment and
    random erasing (timm's defaults when None), all passed to timm's `create_transform`.
    """
    from tlreg.data.augment import TIMM
    from tlreg.models import _timm

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    base = {k: data_config[k] for k in keys if k in data_config}
    a = augment or TIMM
    if not train:
        return _timm.create_transform(**base, is_training=False)
    if a.crop_scale > 0:
        return _timm.create_transform(**base, is_training=True, **a.timm_args())
    # No random crop: timm's eval resize and centre crop, then the rest of its training
    # pipeline: the flip, then jitter or RandAugment, then ToTensor, normalise and erasing.
    tf = _timm.create_transform(**base, is_training=False)
    at = next(i for i, t in enumerate(tf.transforms) if "ToTensor" in type(t).__name__)
    crop, rest, final = _timm.create_transform(
        **base, is_training=True, separate=True,
        **{**a.timm_args(), "color_jitter": a.color_jitter or None})
    tf.transforms[at:] = crop.transforms[1:] + rest.transforms + final.transforms
    return tf


class ImageDataset:
    """A map-style dataset of (image tensor, label, index); undecodable files yield None.

    With `per_sample_seed`, each sample's random transform is seeded from (that seed, its
    index), so an augmented sample is the same whichever worker, batch or rank loads it (the
    global RNGs are restored afterwards).
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Any], Any],
                 per_sample_seed: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.per_sample_seed = per_sample_seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | tuple[None, int, int]:
        sample = self.samples[index]
        try:
            image = load_sample(sample)
            if self.per_sample_seed is None:
                return self.transform(image), sample.label, index
            return (seeded(self.transform, image, sample_seed(self.per_sample_seed, index)),
                    sample.label, index)
        except Exception:  # truncated, corrupt or not an image: skipped and reported
            return None, sample.label, index


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (a hash: no two (seed, index) pairs collide)."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded(transform: Callable[[Any], Any], image: Any, seed: int) -> Any:
    """`transform(image)` with python, numpy and torch RNGs seeded; their states are restored."""
    import numpy as np
    import torch

    py, npst, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # the CPU generator only (not CUDA's)
        return transform(image)
    finally:
        random.setstate(py)
        np.random.set_state(npst)
        torch.set_rng_state(th)


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[int]


def collate(items: list[tuple[Any, int, int]]) -> Batch:
    """Stack decodable samples; report the indices of the ones that failed."""
    import torch

    good = [it for it in items if it[0] is not None]
    bad = [it[2] for it in items if it[0] is None]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), bad)
    return Batch(torch.stack([it[0] for it in good]),
                 torch.tensor([it[1] for it in good], dtype=torch.long),
                 torch.tensor([it[2] for it in good], dtype=torch.long), bad)


def make_loader(samples: Sequence[Sample], transform: Callable[[Any], Any], *, batch_size: int,
                shuffle: bool, seed: int, workers: int, pin_memory: bool = False,
                sampler: Any = None, per_sample_seed: int | None = None) -> Any:
    """A DataLoader whose order and worker seeds depend only on `seed` (resume replays it).

    `per_sample_seed` seeds each sample's transform from (it, sample index) (`ImageDataset`).
    """
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        ImageDataset(samples, transform, per_sample_seed), batch_size=batch_size,
        shuffle=shuffle if sampler is None else False, sampler=sampler, num_workers=workers,
        collate_fn=collate, generator=generator, pin_memory=pin_memory,
        persistent_workers=False, drop_last=False,
    )


class SkipLog:
    """Collects undecodable files and warns once per file."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples
        self.skipped: set[str] = set()

    def add(self, indices: Sequence[int]) -> None:
        for i in indices:
            path = self.samples[i].path
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipped unreadable image {path}", stacklevel=2)
