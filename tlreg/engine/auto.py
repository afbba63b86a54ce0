"""Data-aware defaults and the `auto` policy's decision: pure functions of what a run measured.

Both follow the classic transfer-learning table ("small data: a linear classifier on the CNN
outputs; large and similar: fine-tune; large and different: fine-tune more layers") with numbers
in place of words. *Size* is the number of training images and of the smallest class; *similar*
is the cross-validated accuracy of the linear probe on the frozen features, which tlreg computes
anyway (it is the first phase of every run that trains the backbone). The thresholds and the
measurements behind them are in docs/training.md; `bench.accuracy` checks them on several data
sets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Decision", "FinetuneDefaults", "decide", "finetune_defaults"]

#: Below these, fine-tuning over-fits more than it adapts: keep the backbone frozen. (At 100
#: images, the suite's 140-image faces set lost 4 of 60 val images to fine-tuning in one seed
#: of three; docs/training.md.)
MIN_TRAIN_IMAGES = 500
MIN_CLASS_IMAGES = 20
#: A probe this good leaves nothing for fine-tuning to win.
SEPARATED = 0.99
#: Below this the data are far from the pretraining data: every stage adapts.
FAR = 0.90
#: Optimiser steps the fine-tuning phase aims for, and the bounds on its epochs.
TARGET_STEPS = 200
#: After the probe phase the backbone trains at the head rate / this (LP-FT).
LP_FT_RATE_DIVISOR = 10
MIN_EPOCHS, MAX_EPOCHS = 3, 10


@dataclass(frozen=True)
class Decision:
    """What `--policy auto` chose, and the one line that says why."""

    policy: str
    policy_args: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def decide(*, train_images: int, smallest_class: int, probe_accuracy: float | None,
           num_stages: int, multi_label: bool = False) -> Decision:
    """Feature extraction, the top half of the stages, or all of them."""
    measured = {"train_images": train_images, "smallest_class": smallest_class,
                "probe_cv_accuracy": probe_accuracy, "num_stages": num_stages}
    if multi_label:  # the thresholds below are single-label accuracies; none was measured here
        return Decision("feature-extract", {}, (
            "feature-extract: multi-label data (auto's rules were measured on single-label "
            "accuracy); pass --policy finetune or partial to train the backbone"), measured)
    probe = "no CV" if probe_accuracy is None else f"{probe_accuracy:.3f}"
    if train_images < MIN_TRAIN_IMAGES or smallest_class < MIN_CLASS_IMAGES:
        return Decision("feature-extract", {}, (
            f"feature-extract: {train_images} training images, smallest class "
            f"{smallest_class} (fine-tuning needs >= {MIN_TRAIN_IMAGES} and "
            f">= {MIN_CLASS_IMAGES}); the linear probe is the answer"), measured)
    if probe_accuracy is None or probe_accuracy >= SEPARATED:
        return Decision("feature-extract", {}, (
            f"feature-extract: the frozen features already separate the classes "
            f"(CV probe accuracy {probe} >= {SEPARATED})"), measured)
    if probe_accuracy >= FAR:
        top = max(1, math.ceil(num_stages / 2))
        return Decision("partial", {"train_last": top}, (
            f"partial (last {top} of {num_stages} stages): close to the pretraining data "
            f"(CV probe accuracy {probe}), {train_images} training images"), measured)
    return Decision("finetune", {}, (
        f"finetune (every stage): far from the pretraining data (CV probe accuracy {probe} "
        f"< {FAR}), {train_images} training images"), measured)


@dataclass(frozen=True)
class FinetuneDefaults:
    epochs: int
    lr: float
    warmup_epochs: float
    reason: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def finetune_defaults(*, train_images: int, global_batch: int, head_lr: float,
                      probed: bool, epochs: int | None = None) -> FinetuneDefaults:
    """Epochs, head rate and warm-up for a run that trains the backbone.

    Epochs (unless given) give about TARGET_STEPS optimiser steps (3 to 10 epochs): a few
    epochs over a large set, more passes over a small one. After the linear-probe phase the
    head is already at its optimum, so the rate is a tenth of the backbone's head rate
    (LP-FT: large rates distort the features the probe found; on the suite's digits set a
    third of it dipped from the probe's 0.957 to 0.781 in epoch 1) and the warm-up is short;
    without the probe phase the head starts random, and the rate and a one-epoch warm-up are
    the backbone's usual ones.
    """
    steps = max(1, math.ceil(train_images / max(1, global_batch)))
    epochs = epochs or min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps)))
    lr = head_lr / LP_FT_RATE_DIVISOR if probed else head_lr
    warmup = round(min(1.0, 0.1 * epochs), 3) if probed else min(1.0, epochs / 5)
    reason = (f"{epochs} epochs of {steps} steps (aiming at {TARGET_STEPS} steps, "
              f"{MIN_EPOCHS}-{MAX_EPOCHS} epochs), head lr {lr:.3g}"
              + (" (a tenth of the backbone's: the head starts from the probe)" if probed
                 else "") + f", warm-up {warmup:g} epochs")
    return FinetuneDefaults(epochs, lr, warmup, reason)
