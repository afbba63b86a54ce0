"""How strongly to augment when the backbone trains: measured on the data, not assumed.

timm's training transform (random-resized crops down to 8% of the image, horizontal flips,
colour jitter 0.4) is tuned for ImageNet from scratch. On other data it can destroy the label:
an 8% crop of an upscaled 8x8 digit is a blob, and a mirrored "3" is no digit at all. After
the linear probe of LP-FT, tlreg can ask the data: it shows the probe views of a stratified
sample of training images (crops of a fixed area, and mirror images) and keeps an augmentation
only if the frozen features and the probe still recognise most of those views. Fine-tuning
then learns invariances the pretrained features nearly have, instead of being pushed, in a
few epochs, towards ones that cost the label. (On the digits set the probe, right on every
whole image, labelled 9% of 8% crops, 88% of whole images merely resized instead of
centre-cropped, and 73% of colour-jittered ones right.) The thresholds are round numbers set
before the accuracy suite ran (docs/training.md has what it measured).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CROP_SCALES", "JITTERS", "TIMM", "Augment", "choose", "keeps", "measure"]

#: Candidate smallest crop areas, strongest first (1.0: the whole image, aspect jitter only);
#: 0 (no random crop: the eval transform's centre crop) when every one loses the label.
CROP_SCALES = (0.08, 0.25, 0.5, 1.0)
#: Candidate colour-jitter strengths, strongest first; 0 when both lose the label.
JITTERS = (0.4, 0.2)
#: A crop scale is kept when the probe labels at least this share of what it labels right on
#: whole images ...
KEEP_CROPS = 0.9
#: ... and flips when mirror images keep this share (flips are all-or-nothing: a class that
#: is not mirror-symmetric loses far more than a little).
KEEP_FLIPS = 0.95


@dataclass(frozen=True)
class Augment:
    """Training augmentation: timm's RandomResizedCrop scale floor, flip and jitter.

    `crop_scale` 0 means no random crop: the eval transform's resize and centre crop, then
    the flip and the jitter.
    """

    crop_scale: float = 0.08
    hflip: float = 0.5
    color_jitter: float = 0.4
    reason: str = "timm's defaults"
    measured: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


TIMM = Augment()


def keeps(clean: float, accuracy: float, share: float = KEEP_CROPS) -> bool:
    """Whether a view keeps `share` of the probe's accuracy on whole images."""
    return clean <= 0 or accuracy >= share * clean


def choose(*, clean: float, crops: dict[float, float], flipped: float,
           jitters: dict[float, float], images: int) -> Augment:
    """The strongest crop floor, flip rate and jitter that keep the probe's accuracy.

    `clean` is the probe's accuracy on the sample's whole images (eval transform), `crops[s]`
    on random crops of area fraction s, `flipped` on mirror images and `jitters[j]` on images
    colour-jittered by j (all on the same `images` training images).
    """
    scale = next((s for s in CROP_SCALES if s in crops and keeps(clean, crops[s])), 0.0)
    hflip = TIMM.hflip if keeps(clean, flipped, KEEP_FLIPS) else 0.0
    jitter = next((j for j in JITTERS if j in jitters and keeps(clean, jitters[j])), 0.0)
    measured = {"images": images, "clean_accuracy": clean, "flipped_accuracy": flipped,
                "crop_accuracy": {str(s): a for s, a in crops.items()},
                "jitter_accuracy": {str(j): a for j, a in jitters.items()}}
    kept = [f"crops down to {scale:g} of the image" if scale else "no random crops",
            "flips" if hflip else "no flips", f"colour jitter {jitter:g}" if jitter
            else "no colour jitter"]
    reason = (f"{', '.join(kept)}: the views the probe still labels right (>= "
              f"{KEEP_CROPS:.0%} of its {clean:.3f} on {images} whole training images; flips "
              f">= {KEEP_FLIPS:.0%}: {flipped:.3f})")
    return Augment(scale, hflip, jitter, reason, measured)


def measure(images: Sequence[torch.Tensor], labels: torch.Tensor,
            predict: Callable[[torch.Tensor], torch.Tensor], data_config: dict[str, Any], *,
            batch_size: int, seed: int) -> Augment:
    """Show `predict` (a normalised batch -> class ids) each candidate view, then `choose`.

    `images` are decoded uint8 tensors (tlreg.data.decoded), `labels` their classes. Candidates
    are tried strongest first and the first one kept ends its list; views are seeded, so the
    same images give the same answer.
    """
    from tlreg.data.decoded import BatchAugment, BatchEval

    def accuracy(view: Callable[..., torch.Tensor]) -> float:
        correct = 0
        for i in range(0, len(images), batch_size):
            part = images[i:i + batch_size]
            batch = view(part, list(range(i, i + len(part))), seed)
            correct += int((predict(batch) == labels[i:i + batch_size]).sum())
        return correct / max(1, len(images))

    def strongest(views: dict[float, Callable[..., torch.Tensor]]) -> dict[float, float]:
        out: dict[float, float] = {}
        for strength, view in views.items():
            out[strength] = accuracy(view)
            if keeps(clean, out[strength]):
                break
        return out

    whole = BatchEval(data_config)
    clean = accuracy(whole)
    crops = strongest({s: BatchAugment(data_config, scale=(s, s), jitter=0.0, hflip=0.0)
                       for s in CROP_SCALES})
    jitters = strongest({j: BatchAugment(data_config, scale=None, jitter=j, hflip=0.0)
                         for j in JITTERS})
    flipped = accuracy(lambda ims, idx, s: whole(ims).flip(-1))
    return choose(clean=clean, crops=crops, flipped=flipped, jitters=jitters,
                  images=len(images))
