"""Test-time augmentation by name: each image seen as several views, their logits averaged.

Adding one is one entry in `TTA`; `predict`, `evaluate` and the `--tta` help read the names
from it. Logits are averaged, not probabilities: one rule for softmax and multi-label (sigmoid)
models alike, and the average is still a logit, so thresholds, top-k and the metrics apply
unchanged. The views of a batch go through the model as one batch of `views * B` images (one
large forward keeps an accelerator busy; under `inference_mode` activations are freed layer by
layer, so the cost is a batch `views` times larger, and a smaller `--batch-size` answers it).
torch is imported inside the builders, so the table costs nothing at start-up.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TTA", "Views", "five_crop", "flip", "get_tta", "none", "resized_transform",
           "tta_logits"]


@dataclass(frozen=True)
class Views:
    """One TTA for one data config: how an image becomes its views, and how a batch of
    them is laid out for one forward pass.

    `transform` maps a PIL image to a (C, H, W) tensor, or to (count, C, H, W) when the views
    differ in their pixels (crops); `expand` maps the collated batch to (count * B, C, H, W),
    view-major (all first views, then all second views, ...).
    """

    name: str
    count: int
    transform: Callable[[Any], Any]
    expand: Callable[[torch.Tensor], torch.Tensor]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _with_flip(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([x, x.flip(-1)])


def _views_first(x: torch.Tensor) -> torch.Tensor:
    """(B, V, C, H, W) -> (V * B, C, H, W), view-major."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def _eval_transform(data_config: dict[str, Any]) -> Callable[[Any], Any]:
    from tlreg.data.images import build_transform

    return build_transform(data_config, train=False)


def none(data_config: dict[str, Any]) -> Views:
    """The eval transform alone: exactly the path without TTA."""
    return Views("none", 1, _eval_transform(data_config), _same)


def flip(data_config: dict[str, Any]) -> Views:
    """The eval view and its mirror image. The flip happens on the batch, on the device."""
    return Views("flip", 2, _eval_transform(data_config), _with_flip)


def resized_transform(data_config: dict[str, Any]) -> Callable[[Any], Any]:
    """timm's eval transform without its final crop: the image resized to input_size /
    crop_pct (the usual eval resize), as a normalised tensor, for crops to be taken from.

    crop_mode "border" pads to the resized square instead of cropping (what timm pads, it pads
    with the mean colour), so every crop fits.
    """
    tf = _eval_transform(data_config)
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    if crop_pct > 1:
        raise UsageError(f"five-crop needs crop_pct <= 1 (a resize larger than the crop), "
                         f"got {crop_pct}")
    at = next((i for i, t in enumerate(tf.transforms) if "CenterCrop" in type(t).__name__), None)
    if at is None:
        raise UsageError(f"five-crop: the eval transform has no centre crop to replace: {tf}")
    step = tf.transforms[at]
    if type(step).__name__ == "CenterCropOrPad":  # crop_mode "border"
        step = copy.copy(step)
        step.size = tuple(math.floor(s / crop_pct) for s in data_config["input_size"][1:])
        tf.transforms[at] = step
    else:
        del tf.transforms[at]
    return tf


@dataclass(frozen=True)
class _FiveCrops:
    """torchvision's five_crop of a tensor (corners, then centre), stacked: (5, C, H, W)."""

    size: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        from torchvision.transforms.functional import five_crop as crops

        return torch.stack(crops(x, list(self.size)))


def five_crop(data_config: dict[str, Any]) -> Views:
    """Four corners and the centre, each input_size, of the image resized to
    input_size / crop_pct: the centre crop of eval plus the four it leaves out."""
    from torchvision import transforms as T

    size = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
    tf = resized_transform(data_config)
    return Views("five-crop", 5, T.Compose([tf, _FiveCrops(size)]), _views_first)


#: name -> builder (data config -> Views). `--tta` help and `get_tta`'s check read it.
TTA: dict[str, Callable[[dict[str, Any]], Views]] = {
    "none": none,
    "flip": flip,
    "five-crop": five_crop,
}


def get_tta(name: str) -> Callable[[dict[str, Any]], Views]:
    """The builder for `name`; a UsageError naming the choices for any other."""
    builder = TTA.get(name) if isinstance(name, str) else None
    if builder is None:
        raise UsageError(f"unknown tta {name!r}; choose from {', '.join(TTA)}")
    return builder


def tta_logits(model: nn.Module, images: torch.Tensor, views: Views) -> torch.Tensor:
    """The mean of the views' logits (float32) for a collated batch, in one forward pass."""
    if views.count == 1:
        return model(views.expand(images)).float()
    n = images.shape[0]
    out = model(views.expand(images)).float()
    return out.reshape(views.count, n, *out.shape[1:]).mean(0)
