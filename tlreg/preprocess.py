"""The preprocessing contract of a deployed model (preprocess.json), redone in Pillow and NumPy.

`tlreg export --format onnx` (tlreg.sharing.onnx) writes this beside model.onnx and into its
metadata; `tlreg predict model.onnx` (tlreg.onnx_predict) reads it back. The transform is timm's
eval transform (resize the short side to size / crop_pct, center crop, scale to [0, 1],
normalise), step for step: torchvision resizes a PIL image with Pillow itself, so the pixels
are the same and the tensors agree to float32 rounding (tests/test_onnx.py: 1e-6). Imports
neither torch nor timm, so a deployed model starts in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MODEL_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
FORMAT_NAME = "tlreg-onnx"  # preprocess.json's "format"; tells an export folder apart
FORMAT_VERSION = 2  # the newest this tlreg reads and writes
#: A model.onnx with a second output, each image's familiarity (tlreg.engine.familiarity): a
#: reader that knows only version 1 runs the graph as if it had one output.
FAMILIARITY_VERSION = 2
FAMILIARITY_OUTPUT = "familiarity"
PLAIN_VERSION = 1  # an export without the familiarity output
SINGLE_LABEL = "single_label_classification"  # the names of tlreg.engine.objective
MULTI_LABEL = "multi_label_classification"

#: The range a fitted temperature may have (tlreg.engine.calibration clamps its fits to it).
T_MIN, T_MAX = 0.05, 20.0


def check_temperature(value: Any, where: str,
                      error: type[Exception] = UsageError) -> float | None:
    """A stored temperature (None: not calibrated), or `error` naming `where` when it is not a
    number in [T_MIN, T_MAX]: a damaged or hostile file must not flip or flatten predictions."""
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not T_MIN <= value <= T_MAX):
        raise error(f"{where} must be a number in [{T_MIN}, {T_MAX}], got {value!r}")
    return float(value)


def softmax(logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Softmax over the last axis of float32 logits (divided by `temperature` first), as torch
    computes it."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    if temperature is not None:
        x = x / np.float32(temperature)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


#: timm's interpolation names -> Pillow's resampling filters (what torchvision uses for PIL).
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4,
                  "hamming": 5}
CROP_MODES = ("center", "squash", "border")
DEFAULT_CROP_PCT = 0.875  # timm's, when a config has none


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform for one data config: what an image goes through before the model."""

    input_size: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = "center"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Preprocess:
        """From a timm data config or preprocess.json; a bad value is a UsageError naming it."""
        try:
            size = tuple(int(v) for v in cfg["input_size"])
            mean = tuple(float(v) for v in cfg["mean"])
            std = tuple(float(v) for v in cfg["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"preprocessing config needs input_size, mean and std ({exc})"
                             ) from None
        out = cls(size, mean, std, str(cfg.get("interpolation") or "bilinear"),  # type: ignore[arg-type]
                  float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
                  str(cfg.get("crop_mode") or "center"))
        if len(size) != 3 or min(size) < 1 or len(mean) != size[0] or len(std) != size[0]:
            raise UsageError(f"preprocessing config: input_size {list(size)} does not fit mean "
                             f"{list(mean)} and std {list(std)}")
        if out.interpolation not in INTERPOLATIONS:
            raise UsageError(f"preprocessing config: unknown interpolation "
                             f"{out.interpolation!r} (one of {', '.join(INTERPOLATIONS)})")
        if out.crop_mode not in CROP_MODES:
            raise UsageError(f"preprocessing config: unknown crop_mode {out.crop_mode!r} "
                             f"(one of {', '.join(CROP_MODES)})")
        if not 0 < out.crop_pct <= 4 or min(std) <= 0:
            raise UsageError(f"preprocessing config: crop_pct {out.crop_pct} or std "
                             f"{list(std)} out of range")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"input_size": list(self.input_size), "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def __call__(self, img: Image.Image) -> np.ndarray:
        """An RGB PIL image -> a float32 (C, H, W) array, as timm's eval transform gives."""
        import numpy as np

        h, w = self.input_size[1:]
        resample = INTERPOLATIONS[self.interpolation]
        scale = (math.floor(h / self.crop_pct), math.floor(w / self.crop_pct))
        if self.crop_mode == "squash":
            img = _resize(img, scale, resample)
            img = _crop_or_pad(img, (h, w), 0)
        elif self.crop_mode == "border":
            img = _resize(img, _keep_ratio(img, scale, longest=True), resample)
            img = _crop_or_pad(img, (h, w), tuple(round(255 * v) for v in self.mean))
        else:
            if scale[0] == scale[1]:  # torchvision's Resize(int): the short side
                iw, ih = img.size
                short, long = (iw, ih) if iw <= ih else (ih, iw)
                new_long = int(scale[0] * long / short)
                size = (new_long, scale[0]) if iw <= ih else (scale[0], new_long)
            else:  # timm's ResizeKeepRatio for a non-square input
                size = _keep_ratio(img, scale, longest=False)
            img = _resize(img, size, resample)
            img = _crop_or_pad(img, (h, w), 0)
        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        import numpy as np

        return np.stack([self(img) for img in images]) if images else np.empty(
            (0, *self.input_size), np.float32)


def _keep_ratio(img: Image.Image, target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """(height, width) scaled by the ratio of the short (or long) side to `target`'s."""
    iw, ih = img.size
    ratio_h, ratio_w = ih / target[0], iw / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(ih / ratio), round(iw / ratio)


def _resize(img: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """Resize to (height, width); unchanged when already that size (as torchvision does)."""
    if (img.size[1], img.size[0]) == tuple(size):
        return img
    return img.resize((size[1], size[0]), resample)


def _crop_or_pad(img: Image.Image, size: tuple[int, int], fill: Any) -> Image.Image:
    """torchvision's center crop: pad (with `fill`) where the image is smaller, then crop."""
    from PIL import Image

    ch, cw = size
    iw, ih = img.size
    if cw > iw or ch > ih:
        left, top = max(cw - iw, 0) // 2, max(ch - ih, 0) // 2
        canvas = Image.new(img.mode, (max(iw, cw), max(ih, ch)),
                           fill if isinstance(fill, tuple) else (fill,) * len(img.getbands()))
        canvas.paste(img, (left, top))
        img = canvas
        iw, ih = img.size
        if (iw, ih) == (cw, ch):
            return img
    top, left = round((ih - ch) / 2.0), round((iw - cw) / 2.0)  # torchvision's rounding
    return img.crop((left, top, left + cw, top + ch))


def deploy_config(preprocess: Preprocess, labels: Sequence[str], problem_type: str,
                  thresholds: Sequence[float] | None, temperature: float | None = None,
                  **extra: Any) -> dict[str, Any]:
    """preprocess.json: the transform, the labels and what the outputs mean (+ `extra`)."""
    cfg: dict[str, Any] = {"format": FORMAT_NAME, "format_version": PLAIN_VERSION,
                           **preprocess.to_json(), "label_names": list(labels),
                           "problem_type": problem_type}
    if problem_type == MULTI_LABEL:
        cfg["thresholds"] = [float(t) for t in thresholds or [0.5] * len(labels)]
    elif temperature is not None:  # softmax(logits / T): calibrated probabilities
        cfg["temperature"] = float(temperature)
    return cfg | extra


def check_deploy_config(cfg: Any, where: str) -> dict[str, Any]:
    """A preprocess.json as read back: the fields predict needs, or a UsageError naming `where`."""
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise UsageError(f"{where}: not a tlreg ONNX preprocessing config (no "
                         f"\"format\": {FORMAT_NAME!r})")
    if not isinstance(cfg.get("format_version"), int) or cfg["format_version"] > FORMAT_VERSION:
        raise UsageError(f"{where}: format version {cfg.get('format_version')!r} is newer than "
                         f"this tlreg reads ({FORMAT_VERSION}); upgrade tlreg")
    Preprocess.from_config(cfg)
    labels = cfg.get("label_names")
    if not isinstance(labels, list) or not labels:
        raise UsageError(f"{where}: label_names must be a non-empty list")
    if cfg.get("problem_type", SINGLE_LABEL) not in (SINGLE_LABEL, MULTI_LABEL):
        raise UsageError(f"{where}: unknown problem_type {cfg.get('problem_type')!r}")
    if cfg.get("problem_type") == MULTI_LABEL:
        t = cfg.get("thresholds")
        if not isinstance(t, list) or len(t) != len(labels):
            raise UsageError(f"{where}: a multi-label model needs one threshold per label")
    check_temperature(cfg.get("temperature"), f"{where}: temperature")
    out = cfg.get("familiarity_output")
    if out is not None and (not isinstance(out, str)
                            or cfg["format_version"] < FAMILIARITY_VERSION):
        raise UsageError(f"{where}: familiarity_output must name an output of a format "
                         f"version {FAMILIARITY_VERSION} file, got {out!r}")
    return cfg
