"""The accuracy suite's data sets, built from real images that ship offline.

Each is written once as `ROOT/NAME/{train,val}/<class>/*.png` (a seeded, stratified 70/30 split
for the sets that have none), so every method in `bench.accuracy` trains and evaluates on the
very same files.

| name | source | classes | images | near ImageNet? | balance |
| --- | --- | ---: | ---: | --- | --- |
| hymenoptera | ../shared/data (ImageNet photos) | 2 | 397 | yes | even |
| patches | 64-112 px crops of 10 scikit-image photos, by photo | 10 | 2,200 | yes | even |
| digits | scikit-learn's 8x8 handwritten digits | 10 | 1,797 | no | even |
| faces | scikit-image's LFW subset, face vs not | 2 | 200 | no (25 px grey) | even |
| digits-imbalanced | digits, class c keeps 180 * 0.7^c images | 10 | 582 | no | 26:1 |
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bench._report import HYMENOPTERA

Sample = tuple[np.ndarray, str]  # (uint8 image HxW or HxWx3, class name)

PATCH_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass",
                "gravel", "rocket", "hubble_deep_field")


def _digits() -> Iterator[Sample]:
    from sklearn.datasets import load_digits

    d = load_digits()
    for img, y in zip(d.images, d.target, strict=True):
        yield (img * (255 / 16)).round().astype(np.uint8), str(int(y))


def _digits_imbalanced() -> Iterator[Sample]:
    left = {str(c): round(180 * 0.7 ** c) for c in range(10)}
    for img, label in _digits():
        if left[label] > 0:
            left[label] -= 1
            yield img, label


def _faces() -> Iterator[Sample]:
    from skimage.data import lfw_subset

    for i, img in enumerate(lfw_subset()):  # the first 100 are faces, the rest are not
        yield (img * 255).round().astype(np.uint8), "face" if i < 100 else "other"


def _patches() -> Iterator[Sample]:
    import skimage.data

    rng = random.Random(0)
    for name in PATCH_PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        h, w = photo.shape[:2]
        for _ in range(220):
            size = rng.randint(64, 112)
            top, left = rng.randint(0, h - size), rng.randint(0, w - size)
            crop = photo[top:top + size, left:left + size]
            yield (crop[:, ::-1] if rng.random() < 0.5 else crop).copy(), name


SOURCES: dict[str, Callable[[], Iterator[Sample]] | None] = {
    "hymenoptera": None,  # already split into train/ and val/
    "patches": _patches,
    "digits": _digits,
    "faces": _faces,
    "digits-imbalanced": _digits_imbalanced,
}
NEAR_IMAGENET = {"hymenoptera": True, "patches": True, "digits": False, "faces": False,
                 "digits-imbalanced": False}


def build(name: str, root: Path, val_fraction: float = 0.3) -> Path:
    """The data set's folder under `root`, written if missing (deterministic)."""
    if name == "hymenoptera":
        return HYMENOPTERA
    out = root / name
    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    by_class: dict[str, list[np.ndarray]] = {}
    source = SOURCES[name]
    assert source is not None
    for img, label in source():
        by_class.setdefault(label, []).append(img)
    rng = random.Random(1234)
    for label, images in by_class.items():
        order = list(range(len(images)))
        rng.shuffle(order)
        n_val = max(1, round(len(images) * val_fraction))
        for rank, i in enumerate(order):
            split = "val" if rank < n_val else "train"
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    (out / ".complete").write_text("")
    return out
