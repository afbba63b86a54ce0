"""How strongly to augment when the backbone trains: measured on the data, not assumed.

timm's training transform (random-resized crops down to 8% of the image, horizontal flips,
colour jitter 0.4) is tuned for ImageNet from scratch. On other data it can destroy the label:
an 8% crop of an upscaled 8x8 digit is a blob, and a mirrored "3" is no digit at all. After
the linear probe of LP-FT, tlreg can ask the data: it shows the probe views of a stratified
sample of training images (crops of a fixed area, and mirror images) and keeps an augmentation
only if the frozen features and the probe still recognise most of those views, alone and as
training combines them (each knob passing alone let digits-imbalanced train on crops, flips and
jitter together that the probe labelled 81% right). Fine-tuning
then learns invariances the pretrained features nearly have, instead of being pushed, in a
few epochs, towards ones that cost the label. (On the digits set the probe, right on every
whole image, labelled 9% of 8% crops, 88% of whole images merely resized instead of
centre-cropped, and 73% of colour-jittered ones right.) The thresholds are round numbers set
before the accuracy suite ran (docs/training.md has what it measured).

On top of what the probe measures, `--augment` names a preset (`AUGMENTS`: none, light,
standard, strong) and timm's own knobs (`--auto-augment`, `--reprob`) add RandAugment and random
erasing; every training transform is built by timm's `create_transform` (tlreg.data.images).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["AUGMENTS", "CROP_SCALES", "JITTERS", "TIMM", "Augment", "Preset", "check_auto_augment",
           "choose", "keeps", "measure", "of_config", "preset_name", "settle", "weaker"]

#: Candidate smallest crop areas, strongest first; 0 (no random crop: the eval transform's
#: centre crop) when every one loses the label. A floor of 1 is no candidate: it varies
#: nothing but the aspect ratio (on a square image nothing at all: the whole image every
#: time) and trains on another framing than the eval transform's centre crop. On
#: digits-imbalanced it was kept on 2 of 3 seeds and those two fine-tuned 0.838 and 0.890
#: against the probe's 0.896 (docs/training.md). `--crop-scale 1` still asks for it.
CROP_SCALES = (0.08, 0.25, 0.5)
#: Candidate colour-jitter strengths, strongest first; 0 when both lose the label.
JITTERS = (0.4, 0.2)
#: A crop scale is kept when the probe labels at least this share of what it labels right on
#: whole images ...
KEEP_CROPS = 0.9
#: ... and flips when mirror images keep this share (flips are all-or-nothing: a class that
#: is not mirror-symmetric loses far more than a little).
KEEP_FLIPS = 0.95
#: Together, the views training shows (crops, flips and jitter at once) keep KEEP_CROPS too.
KNOBS = ("crop_scale", "hflip", "color_jitter")


@dataclass(frozen=True)
class Augment:
    """Training augmentation: timm's RandomResizedCrop scale floor, flip and jitter (what the
    probe measures), and timm's RandAugment and random erasing on top.

    `crop_scale` 0 means no random crop: the eval transform's resize and centre crop, then
    the flip and the jitter. timm drops the jitter under an `auto_augment` (but for `3a`).
    """

    crop_scale: float = 0.08
    hflip: float = 0.5
    color_jitter: float = 0.4
    reason: str = "timm's defaults"
    measured: dict[str, Any] = field(default_factory=dict)
    auto_augment: str | None = None  # timm's RandAugment / AutoAugment / AugMix string
    reprob: float = 0.0  # random erasing (timm's RandomErasing, per pixel, after normalising)

    def record(self) -> dict[str, Any]:
        """As summary.json keeps it: RandAugment and erasing only when on (older runs' keys)."""
        out = asdict(self)
        if self.auto_augment is None:
            del out["auto_augment"]
        if not self.reprob:
            del out["reprob"]
        return out

    def timm_args(self) -> dict[str, Any]:
        """timm's `create_transform(is_training=True, ...)` arguments for this augmentation."""
        return {"scale": (self.crop_scale, 1.0), "hflip": self.hflip,
                "color_jitter": self.color_jitter, "auto_augment": self.auto_augment,
                "re_prob": self.reprob, "re_mode": RE_MODE}


TIMM = Augment()

#: timm's train.py erases with per-pixel normal noise (`--remode pixel`), tlreg too.
RE_MODE = "pixel"
#: timm's RandAugment of its ImageNet recipes: 2 ops at magnitude 9 (std 0.5), increasing.
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class Preset:
    """An `--augment` name: on or off, and the knobs it sets (None: the probe's or timm's)."""

    on: bool
    summary: str
    color_jitter: float | None = None
    auto_augment: str | None = None
    reprob: float | None = None


#: `--augment` presets. `standard` is what tlreg always did (crops, flips and jitter, measured
#: by the probe under LP-FT); a knob set explicitly wins over its preset.
AUGMENTS: dict[str, Preset] = {
    "none": Preset(False, "no augmentation: the eval transform (a frozen backbone's features "
                          "are then cached)"),
    "light": Preset(True, "random-resized crops and flips, no colour jitter", color_jitter=0.0),
    "standard": Preset(True, "crops, flips and colour jitter (measured by the probe; else "
                             "timm's 0.08, 0.5, 0.4)"),
    "strong": Preset(True, f"standard plus RandAugment {RAND_AUGMENT} and random erasing 0.25 "
                           "(timm's ImageNet recipes)", auto_augment=RAND_AUGMENT, reprob=0.25),
}


def preset_name(augment: bool | str | None) -> str | None:
    """The preset a config's `augment` is: True is standard, False none (None: not decided)."""
    if augment is None or isinstance(augment, str):
        return augment
    return "standard" if augment else "none"


def settle(cfg: Any) -> dict[str, Any]:
    """A config's augmentation fields with its preset applied; one UsageError for a bad one.

    `augment` is stored as older configs had it where it can be (False for none, True for
    standard; light and strong by name). A knob that acts on training images (RandAugment,
    erasing, mixup, cutmix) with `augment` unset turns it on, so a frozen backbone trains on
    images instead of cached features; with `augment: none` RandAugment and erasing are errors.
    """
    augment = cfg.augment
    if isinstance(augment, str):
        if augment not in AUGMENTS:
            raise UsageError(f"augment must be one of {', '.join(AUGMENTS)} (or true / false); "
                             f"got {augment!r}")
        preset = AUGMENTS[augment]
        augment = True if augment == "standard" else augment if preset.on else False
    auto = cfg.auto_augment
    if auto is not None:
        auto = auto.strip()
        if auto.lower() in ("", "none"):
            auto = "none"  # off, whatever the preset says
        else:
            check_auto_augment(auto)
    transforms = []  # what only an augmented image pipeline can do
    if auto not in (None, "none"):
        transforms.append(f"auto_augment {auto}")
    if cfg.reprob:
        transforms.append(f"reprob {cfg.reprob:g}")
    if augment is False and transforms:
        raise UsageError(f"augment none turns training augmentation off, and {transforms[0]} is "
                         "augmentation: drop it, or choose augment light, standard or strong")
    if augment is None and (transforms or cfg.mixup or cfg.cutmix):
        augment = True
    preset = AUGMENTS[preset_name(augment)] if augment is not None else None
    jitter, reprob = cfg.color_jitter, cfg.reprob
    if preset is not None:
        jitter = preset.color_jitter if jitter is None else jitter
        auto = preset.auto_augment if auto is None else auto
        reprob = preset.reprob if reprob is None else reprob
    return {"augment": augment, "color_jitter": jitter, "auto_augment": auto, "reprob": reprob}


@functools.lru_cache(maxsize=32)
def check_auto_augment(spec: str) -> None:
    """timm's own parser decides: the transform is built once for a 32-pixel image."""
    from tlreg.models import _timm

    try:
        _timm.create_transform(32, is_training=True, auto_augment=spec)
    except Exception as exc:  # timm asserts (AssertionError), or fails to parse a number
        detail = f": {exc}" if str(exc) else ""
        raise UsageError(f"auto_augment {spec!r} is not a timm augmentation{detail} (e.g. "
                         f"{RAND_AUGMENT} for RandAugment, augmix-m5-w4-d2, or v0 for "
                         "AutoAugment; none turns it off)") from None


def of_config(cfg: Any) -> Augment:
    """The training augmentation a config asks for: its values, timm's where it has none."""
    auto = cfg.auto_augment
    return Augment(TIMM.crop_scale if cfg.crop_scale is None else cfg.crop_scale,
                   TIMM.hflip if cfg.hflip is None else cfg.hflip,
                   TIMM.color_jitter if cfg.color_jitter is None else cfg.color_jitter,
                   auto_augment=None if auto in (None, "none") else auto,
                   reprob=cfg.reprob or 0.0)


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
    return _explained(Augment(scale, hflip, jitter, measured=measured))


def _explained(a: Augment, together: float | None = None) -> Augment:
    """`a` with its reason in words, from what `a.measured` holds."""
    m = a.measured
    scale = a.crop_scale
    crop = ("no random crops" if not scale else f"crops down to {scale:.0%} of the image"
            if scale < 1 else "crops of the whole image (aspect-ratio jitter only)")
    kept = [crop, "flips" if a.hflip else "no flips",
            f"colour jitter {a.color_jitter:g}" if a.color_jitter else "no colour jitter"]
    reason = (f"{', '.join(kept)}: the views the probe still labels right (>= "
              f"{KEEP_CROPS:.0%} of its {m['clean_accuracy']:.3f} on {m['images']} whole "
              f"training images; flips >= {KEEP_FLIPS:.0%}: {m['flipped_accuracy']:.3f}")
    if together is not None:
        reason += f"; together: {together:.3f}"
    return replace(a, reason=reason + ")")


def _at(accuracy: dict[str, float], value: float, strongest_first: Sequence[float]) -> float:
    """The probe's accuracy on a view, or a bound: that of the nearest stronger one measured."""
    stronger = [accuracy[str(v)] for v in strongest_first[:list(strongest_first).index(value)]
                if str(v) in accuracy] if value in strongest_first else []
    return accuracy.get(str(value), stronger[-1] if stronger else 1.0)


def weaker(a: Augment) -> Augment | None:
    """`a` one step weaker where it costs the most: None when nothing is left to weaken.

    The knob whose view alone the probe labels worst (`a.measured`) steps down: a crop floor
    to the next larger area (then no random crop), jitter to the next smaller strength (then
    none), flips off. Ties go to jitter, then crops, then flips.
    """
    m = a.measured
    costs = []
    if a.crop_scale:
        costs.append((_at(m["crop_accuracy"], a.crop_scale, CROP_SCALES), "crop_scale"))
    if a.hflip:
        costs.append((m["flipped_accuracy"], "hflip"))
    if a.color_jitter:
        costs.append((_at(m["jitter_accuracy"], a.color_jitter, JITTERS), "color_jitter"))
    if not costs:
        return None
    knob = min(costs)[1]
    if knob == "crop_scale":
        larger = [s for s in CROP_SCALES if s > a.crop_scale]
        return replace(a, crop_scale=larger[0] if larger else 0.0)
    if knob == "color_jitter":
        smaller = [j for j in JITTERS if j < a.color_jitter]
        return replace(a, color_jitter=smaller[0] if smaller else 0.0)
    return replace(a, hflip=0.0)


def measure(images: Sequence[torch.Tensor], labels: torch.Tensor,
            predict: Callable[[torch.Tensor], torch.Tensor], data_config: dict[str, Any], *,
            batch_size: int, seed: int, given: dict[str, float] | None = None) -> Augment:
    """Show `predict` (a normalised batch -> class ids) each candidate view, then `choose`.

    `images` are decoded uint8 tensors (tlreg.data.decoded), `labels` their classes. Candidates
    are tried strongest first and the first one kept ends its list; views are seeded, so the
    same images give the same answer. Then the views as training draws them (crops over
    [floor, 1], flips at their rate, jitter, all at once) must keep KEEP_CROPS too, else
    `weaker` steps down until they do. `given` (what the user set) is kept as it is.
    """
    from tlreg.data.batched import BatchAugment, BatchEval

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
    given = given or {}
    a = replace(choose(clean=clean, crops=crops, flipped=flipped, jitters=jitters,
                       images=len(images)), **given)
    steps: list[dict[str, float]] = []
    together = None
    while sum(bool(getattr(a, k)) for k in KNOBS) > 1:  # one knob alone is measured above
        view = BatchAugment(data_config, scale=(a.crop_scale, 1.0) if a.crop_scale else None,
                            jitter=a.color_jitter, hflip=a.hflip)
        together = accuracy(view)
        steps.append({k: getattr(a, k) for k in KNOBS} | {"accuracy": together})
        step = None if keeps(clean, together) else weaker(replace(a, **dict.fromkeys(given, 0.0)))
        if step is None:  # kept, or nothing left to weaken but what the user set
            break
        a, together = replace(step, **given), None
        m = a.measured  # the next step's choice is by what each knob alone costs: measure it
        if a.crop_scale and str(a.crop_scale) not in m["crop_accuracy"]:
            m["crop_accuracy"][str(a.crop_scale)] = accuracy(BatchAugment(
                data_config, scale=(a.crop_scale, a.crop_scale), jitter=0.0, hflip=0.0))
        if a.color_jitter and str(a.color_jitter) not in m["jitter_accuracy"]:
            m["jitter_accuracy"][str(a.color_jitter)] = accuracy(BatchAugment(
                data_config, scale=None, jitter=a.color_jitter, hflip=0.0))
    if steps:
        a.measured["together"] = steps
    return _explained(a, together)
