"""Training augmentation and the eval transform on whole batches of decoded uint8 tensors.

The decoded-image cache (tlreg.data.decoded) keeps each image as a pre-resized uint8 tensor;
these transforms cut each sample's crop from it and augment the batch at once. Each sample's
random parameters come from (epoch seed, sample index), so a batch does not depend on its
composition, worker or rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tlreg.data.augment import Augment


def _params(seed: int, index: int, height: int, width: int, scale: tuple[float, float],
            ratio: tuple[float, float],
            hflip: float = 0.5) -> tuple[int, int, int, int, bool, list[float]]:
    """RandomResizedCrop box, flip and jitter factors for one sample, from (seed, index)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            box = (int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w)
            break
    if box is None:  # fall back to a centre crop, as torchvision does
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    rest = torch.rand(4, generator=g).tolist()
    return (*box, rest[0] < hflip, rest[1:])


_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class BatchAugment:
    """timm-style training augmentation on uint8 tensors, normalised per batch.

    Per sample: RandomResizedCrop(scale, ratio) + horizontal flip (probability `hflip`), as a
    uint8 crop and one antialiased bilinear resize (torch's vectorised uint8 kernel, as
    torchvision v2 uses); `scale=None` takes the eval transform's centre crop instead.
    Per batch: colour jitter and normalisation. Brightness, contrast and saturation are each
    affine in RGB, so together with the normalisation they fold into one 3x3 matrix and shift
    per sample, applied with a single batched matmul and a clamp (3-4x faster than one
    elementwise pass per operation). The clamp to [0, 255] happens once, after all three.
    Then, with `reprob`, timm's RandomErasing on each normalised image, as timm's pipeline
    applies it, seeded from (seed, index) too. RandAugment is not batched (`batch_unsupported`).
    """

    def __init__(self, data_config: dict[str, Any], *,
                 scale: tuple[float, float] | None = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4,
                 hflip: float = 0.5, reprob: float = 0.0) -> None:
        import torch

        self.size = data_config["input_size"][-1]
        self.scale, self.ratio, self.jitter, self.hflip = scale, ratio, jitter, hflip
        self.erase = None
        if reprob:
            from tlreg.data.augment import RE_MODE
            from tlreg.models import _timm

            self.erase = _timm.RandomErasing(reprob, mode=RE_MODE, device="cpu")
        self.mean = torch.tensor(data_config["mean"]) * 255
        self.std = torch.tensor(data_config["std"]) * 255
        self.low = (-self.mean / self.std).view(1, 3, 1)  # where 0 and 255 land once normalised
        self.high = ((255 - self.mean) / self.std).view(1, 3, 1)
        # Work buffers reused across batches: a fresh 19 MB tensor per batch is a fresh mmap,
        # and its page faults made some processes run at half speed (bimodal, 1.6k vs 3.1k
        # images/s on 2 cores). The returned batch is always a new tensor.
        self._u8: torch.Tensor | None = None
        self._f32: torch.Tensor | None = None

    def __call__(self, images: Sequence[torch.Tensor], indices: Sequence[int],
                 seed: int) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        n, size = len(images), self.size
        if self._u8 is None or len(self._u8) < n:
            self._u8 = torch.empty(n, 3, size, size, dtype=torch.uint8)
            self._f32 = torch.empty(n, 3, size * size)
        batch, x = self._u8[:n], self._f32[:n]
        factors = torch.empty(n, 3)
        for j, (img, idx) in enumerate(zip(images, indices, strict=True)):
            height, width = img.shape[1:]
            top, left, h, w, flip, jit = _params(seed, idx, height, width,
                                                 self.scale or (1.0, 1.0), self.ratio,
                                                 self.hflip)
            if self.scale is None:  # no random crop: the eval transform's centre crop
                top, left = round((height - size) / 2.0), round((width - size) / 2.0)
                crop = img[:, top:top + size, left:left + size]
            else:
                # channels_last selects torch's AVX uint8 path for the antialiased resize
                crop = img[None, :, top:top + h, left:left + w].contiguous(
                    memory_format=torch.channels_last)
                crop = F.interpolate(crop, size=(size, size), mode="bilinear",
                                     align_corners=False, antialias=True)[0]
            batch[j] = crop.flip(-1) if flip else crop
            factors[j] = torch.tensor(jit)
        x.copy_(batch.view(n, 3, size * size))
        matrix, shift = torch.eye(3).expand(n, 3, 3), torch.zeros(n, 3)
        if self.jitter:
            b, c, s = (factors * 2 * self.jitter + (1 - self.jitter)).unbind(1)  # U(1-j, 1+j)
            grey = torch.tensor(_GREY)
            # brightness x*b; contrast (x - m)*c + m with m the mean grey level of x*b;
            # saturation (x - g)*s + g with g = grey(x) per pixel: M = b*c*(s*I + (1-s)*1 grey^T)
            matrix = (b * c).view(n, 1, 1) * (s.view(n, 1, 1) * matrix
                                                + (1 - s).view(n, 1, 1) * grey.view(1, 1, 3))
            shift = ((1 - c) * b * (x.mean(2) @ grey)).view(n, 1).expand(n, 3)
        # normalisation folded in: (clamp(Mx + t, 0, 255) - mean) / std
        matrix = matrix / self.std.view(1, 3, 1)
        shift = (shift - self.mean) / self.std
        out = torch.baddbmm(shift.unsqueeze(2), matrix, x)
        out = out.clamp_(self.low, self.high).view(n, 3, size, size)
        if self.erase is not None:
            from tlreg.data.images import sample_seed, seeded

            for j, idx in enumerate(indices):  # in place, each image from its own seed
                seeded(self.erase, out[j], sample_seed(seed, idx))
        return out


def batch_unsupported(augment: Augment) -> str | None:
    """The knob `BatchAugment` cannot apply, in words, or None.

    RandAugment, AutoAugment and AugMix are sequences of PIL operations drawn per image; for
    them the training images go through timm's per-image transform instead.
    """
    if augment.auto_augment:
        return (f"--auto-augment {augment.auto_augment} (timm's RandAugment / AutoAugment / "
                "AugMix work on one PIL image at a time)")
    return None


class BatchEval:
    """The eval transform on the cached tensor: centre crop and normalise (exact)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        import torch

        self.size = data_config["input_size"][-1]
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)

    def __call__(self, images: Sequence[torch.Tensor], indices: Sequence[int] = (),
                 seed: int = 0) -> torch.Tensor:
        import torch

        crops = []
        for img in images:
            h, w = img.shape[1:]
            # torchvision's CenterCrop rounds the offsets this way
            top, left = round((h - self.size) / 2.0), round((w - self.size) / 2.0)
            crops.append(img[:, top:top + self.size, left:left + self.size])
        batch = torch.stack(crops).float().div_(255)
        return batch.sub_(self.mean).div_(self.std)
