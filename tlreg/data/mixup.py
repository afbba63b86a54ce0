"""Mixup and CutMix of training batches: timm's `Mixup`, seeded per step.

`--mixup ALPHA` blends each batch with itself reversed, `lam * x + (1 - lam) * x.flip(0)`,
`--cutmix ALPHA` pastes a box of the reversed batch instead (lam then the area kept), with lam
drawn from Beta(alpha, alpha); with both, timm picks one per batch (even odds). The targets
become soft rows, `lam * onehot + (1 - lam) * onehot.flip(0)`, label-smoothed by timm
(`--label-smoothing` goes there), and the loss is soft-target cross-entropy
(tlreg.engine.objective, `soft=True`). Only one-label-per-image data mixes.

timm draws lam and the box from numpy's global generator; here that generator is seeded from
(epoch seed, step, rank) for the draw and restored after it, so a batch mixes the same whatever
ran before it, and `--resume` replays an epoch exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch


def check(cfg: Any, *, multi_label: bool, features: bool) -> None:
    """One UsageError before training when mixing cannot apply to this run."""
    asked = [f"{name} {value:g}" for name, value in (("mixup", cfg.mixup),
                                                    ("cutmix", cfg.cutmix)) if value]
    if not asked:
        return
    what = " and ".join(asked)
    if multi_label:
        raise UsageError(f"{what} mixes one-label-per-image targets (a soft row of class "
                         "probabilities), and this data set is multi-label; drop it")
    if features:
        raise UsageError(f"{what} mixes training images, and this head trains on cached "
                         "features (a frozen backbone with augment none); mixing pooled "
                         "features is not mixing images: drop augment none (the head then "
                         f"trains on images), or drop {asked[0].split()[0]}")


def mix_seed(seed: int, step: int, rank: int) -> int:
    """A 32-bit numpy seed for one batch (a hash: no two (seed, step, rank) collide)."""
    digest = hashlib.blake2b(f"mix:{seed}:{step}:{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded for a block, then restored."""
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class BatchMix:
    """timm's `Mixup` (mode 'batch') on a batch of images and class indices -> soft targets.

    timm mixes even batches only; an odd batch mixes all but its last image, which keeps its
    own (smoothed) one-hot target.
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int, *,
                 label_smoothing: float = 0.0, rank: int = 0) -> None:
        from tlreg.models import _timm

        self.num_classes, self.smoothing, self.rank = num_classes, label_smoothing, rank
        self.mixup = _timm.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                 label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets); `x` is mixed in place."""
        import torch

        from tlreg.models._timm import mixup_target

        even = len(y) - len(y) % 2
        parts = []
        if even:
            with numpy_seeded(mix_seed(seed, step, self.rank)):
                _, soft = self.mixup(x[:even], y[:even])  # mixes the view, so x itself
            parts.append(soft)
        if even < len(y):
            parts.append(mixup_target(y[even:], self.num_classes, 1.0, self.smoothing))
        return x, torch.cat(parts)
