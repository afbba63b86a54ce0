"""Small image folders for tests: synthetic classes and copies of real photos."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 190, 40)}


def colour_folder(root: Path, classes: tuple[str, ...] = ("red", "blue"), per_class: int = 12,
                  val_per_class: int = 6, size: int = 40, seed: int = 0) -> Path:
    """DATA/{train,val}/<colour>/*.png: noisy solid colours, linearly separable in any features."""
    rng = random.Random(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = COLOURS[name]
            for i in range(n):
                img = Image.new("RGB", (size, size))
                img.putdata([tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in base)
                             for _ in range(size * size)])
                img.save(folder / f"{name}_{i:03d}.png")
    return root


def photo_files(root: Path, per_class: int, size: int) -> list[str]:
    """`per_class` ant and bee photos (downscaled) where the shared data is, else synthetic
    colour images: a few real image files for export and prediction tests."""
    if HYMENOPTERA.is_dir():
        hymenoptera_subset(root, per_class=per_class, val_per_class=0, size=size)
    else:
        colour_folder(root, ("red", "blue"), per_class=per_class, val_per_class=0,
                      size=max(8, size // 2))
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def hymenoptera_subset(root: Path, per_class: int = 8, val_per_class: int = 4,
                       size: int = 64) -> Path:
    """A few real ant and bee photos, downscaled so tiny models train in seconds."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name in ("ants", "bees"):
            src = sorted((HYMENOPTERA / split / name).glob("*.jpg"))[:n]
            dst = root / split / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in src:
                with Image.open(f) as img:
                    img = img.convert("RGB")
                    img.thumbnail((size * 2, size * 2))
                    img.save(dst / f.name, quality=90)
    return root


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def count_backbone_images(monkeypatch: Any) -> list[int]:
    """Record the batch size of every backbone pass: `TransferModel.forward_features` and the
    feature pass's `inference_features()` copy."""
    from tlreg.models.transfer import TransferModel

    seen: list[int] = []
    original = TransferModel.forward_features
    original_inference = TransferModel.inference_features

    def counting(self: TransferModel, x: Any) -> Any:
        seen.append(x.shape[0])
        return original(self, x)

    def counting_inference(self: TransferModel) -> Any:
        extract = original_inference(self)
        extract.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
        return extract

    monkeypatch.setattr(TransferModel, "forward_features", counting)
    monkeypatch.setattr(TransferModel, "inference_features", counting_inference)
    return seen
