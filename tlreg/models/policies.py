"""Freezing policies: for each epoch, which stages train and how BatchNorm behaves.

Policies are pure and import nothing heavy: `plan(num_stages, epoch)` returns a `FreezePlan`,
which `TransferModel.apply_plan` turns into `requires_grad` flags and BN modes. A policy plugin
is any callable `(**args) -> Policy`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from tlreg.errors import UsageError

BNRule = Literal["frozen", "eval", "train"]
BN_RULES: tuple[str, ...] = ("frozen", "eval", "train")


@dataclass(frozen=True)
class FreezePlan:
    """Which backbone stages train this epoch, and each stage's BatchNorm rule.

    BN rules: `frozen` (eval mode, affine parameters frozen), `eval` (eval mode, affine
    parameters follow their stage), `train` (ordinary training mode).
    """

    trainable: frozenset[int]
    bn: tuple[BNRule, ...]

    @property
    def backbone_frozen(self) -> bool:
        """True when no backbone parameter trains and BN statistics never move."""
        return not self.trainable and all(r != "train" for r in self.bn)


@runtime_checkable
class Policy(Protocol):
    name: str

    def plan(self, num_stages: int, epoch: int) -> FreezePlan: ...


def _check_rule(rule: str) -> BNRule:
    if rule not in BN_RULES:
        raise UsageError(f"unknown BatchNorm rule {rule!r}; choose from {', '.join(BN_RULES)}")
    return rule  # type: ignore[return-value]


@dataclass(frozen=True)
class StagePolicy:
    """Trains the last `train_last(epoch)` stages; the shared shape of every built-in."""

    name: str
    frozen_bn: BNRule = "frozen"
    trainable_bn: BNRule = "train"

    def __post_init__(self) -> None:
        _check_rule(self.frozen_bn)
        _check_rule(self.trainable_bn)

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        raise NotImplementedError

    def plan(self, num_stages: int, epoch: int) -> FreezePlan:
        n = max(0, min(num_stages, self.trainable_count(num_stages, epoch)))
        trainable = frozenset(range(num_stages - n, num_stages))
        bn = tuple(self.trainable_bn if s in trainable else self.frozen_bn
                   for s in range(num_stages))
        return FreezePlan(trainable, bn)


@dataclass(frozen=True)
class FeatureExtract(StagePolicy):
    name: str = "feature-extract"

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        return 0


@dataclass(frozen=True)
class Finetune(StagePolicy):
    name: str = "finetune"

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        return num_stages


@dataclass(frozen=True)
class Partial(StagePolicy):
    name: str = "partial"
    freeze_first: int | None = None
    train_last: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.freeze_first is None) == (self.train_last is None):
            raise UsageError("policy 'partial' needs exactly one of freeze_first=N or train_last=K")
        if (self.freeze_first or 0) < 0 or (self.train_last or 0) < 0:
            raise UsageError("policy 'partial': stage counts must be >= 0")

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        if self.train_last is not None:
            return self.train_last
        return num_stages - (self.freeze_first or 0)


@dataclass(frozen=True)
class Gradual(StagePolicy):
    """Head first, then more stages from the top: `every` k epochs one more, or a `schedule`.

    `schedule` maps an epoch to how many of the last stages train from then on,
    e.g. `{0: 0, 2: 1, 4: 3}`; it replaces `every` when given.
    """

    name: str = "gradual"
    every: int = 1
    schedule: Mapping[int, int] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every < 1:
            raise UsageError("policy 'gradual': every must be >= 1")
        if self.schedule is not None:
            bad = {e: n for e, n in self.schedule.items() if int(e) < 0 or int(n) < 0}
            if bad:
                raise UsageError(f"policy 'gradual': schedule entries must be >= 0, got {bad}")

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        if self.schedule is None:
            return epoch // self.every
        started = [int(e) for e in self.schedule if int(e) <= epoch]
        return int(self.schedule[_key(self.schedule, max(started))]) if started else 0


@dataclass(frozen=True)
class Auto(StagePolicy):
    """Chosen by the trainer from the data (`tlreg.engine.auto.decide`); frozen until it decides.

    A model built with `auto` outside a training run acts as a feature extractor. The run
    replaces it with the policy it chose, which is what its model.json and config.yaml record.
    """

    name: str = "auto"

    def trainable_count(self, num_stages: int, epoch: int) -> int:
        return 0


def _key(schedule: Mapping[int, int], epoch: int) -> int:
    # YAML and JSON give string keys; accept both.
    return next(k for k in schedule if int(k) == epoch)


def auto(frozen_bn: BNRule = "frozen") -> Policy:
    """Measure the data, then feature-extract or fine-tune part or all of the backbone."""
    return Auto(frozen_bn=frozen_bn)


def feature_extract(frozen_bn: BNRule = "frozen") -> Policy:
    """Whole backbone frozen; only the head trains (a fixed feature extractor)."""
    return FeatureExtract(frozen_bn=frozen_bn)


def finetune(trainable_bn: BNRule = "train") -> Policy:
    """Everything trains."""
    return Finetune(trainable_bn=trainable_bn)


def partial(freeze_first: int | None = None, train_last: int | None = None,
            frozen_bn: BNRule = "frozen", trainable_bn: BNRule = "train") -> Policy:
    """Freeze the first N stages, or all but the last K."""
    return Partial(freeze_first=freeze_first, train_last=train_last, frozen_bn=frozen_bn,
                   trainable_bn=trainable_bn)


def gradual(every: int = 1, schedule: Mapping[int, int] | None = None,
            frozen_bn: BNRule = "frozen", trainable_bn: BNRule = "train") -> Policy:
    """Head first, then one more stage every `every` epochs (or as `schedule` says)."""
    return Gradual(every=every, schedule=schedule, frozen_bn=frozen_bn, trainable_bn=trainable_bn)
