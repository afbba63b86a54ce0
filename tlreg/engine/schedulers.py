"""Learning-rate schedulers by name: a table of builders that keep every group's own rate.

Adding a scheduler is one entry in `SCHEDULERS`; `TrainConfig`'s check and the CLI help read
the names from it. torch is imported inside the builders, so the table costs nothing at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tlreg.errors import UsageError

if TYPE_CHECKING:
    from torch.optim import Optimizer
    from torch.optim.lr_scheduler import LRScheduler

Interval = Literal["step", "epoch"]


@dataclass(frozen=True)
class Plan:
    """What every builder is given: the run's length and the user's schedule options."""

    epochs: int
    steps_per_epoch: int
    warmup_epochs: float
    step_size: int
    gamma: float
    min_lr: float
    base_lr: float  # the head's rate

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)


@dataclass(frozen=True)
class WarmupFactor:
    """LambdaLR multiplier: linear warmup, then cosine down to `floor` (or constant).

    One multiplier applied to every group's own `initial_lr` keeps the layer ratios exact.
    Plain data, so `LambdaLR.state_dict()` stores it and a resumed run rebuilds it.
    """

    warmup_steps: int
    total_steps: int
    floor: float = 0.0  # final factor (min_lr / base lr)
    anneal: bool = True  # False: constant after warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if not self.anneal:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_warmup(plan: Plan) -> None:
    if plan.warmup >= plan.total and plan.warmup:
        raise UsageError(f"warmup ({plan.warmup_epochs} epochs) must be shorter than the run "
                         f"({plan.epochs} epochs)")


def _step(optimizer: Optimizer, plan: Plan) -> tuple[LRScheduler, Interval]:
    from torch.optim.lr_scheduler import StepLR

    if plan.warmup_epochs:
        raise UsageError("warmup_epochs works with the cosine, onecycle and constant "
                         "schedulers, not step")
    if plan.step_size < 1 or not plan.gamma > 0:
        raise UsageError(f"step scheduler needs step_size >= 1 and gamma > 0, got "
                         f"{plan.step_size} and {plan.gamma}")
    return StepLR(optimizer, step_size=plan.step_size, gamma=plan.gamma), "epoch"


def _cosine(optimizer: Optimizer, plan: Plan) -> tuple[LRScheduler, Interval]:
    from torch.optim.lr_scheduler import LambdaLR

    _check_warmup(plan)
    factor = WarmupFactor(plan.warmup, plan.total, floor=plan.min_lr / plan.base_lr)
    return LambdaLR(optimizer, factor), "step"


def _constant(optimizer: Optimizer, plan: Plan) -> tuple[LRScheduler, Interval]:
    from torch.optim.lr_scheduler import LambdaLR

    _check_warmup(plan)
    return LambdaLR(optimizer, WarmupFactor(plan.warmup, plan.total, anneal=False)), (
        "step" if plan.warmup else "epoch")


def _onecycle(optimizer: Optimizer, plan: Plan) -> tuple[LRScheduler, Interval]:
    from torch.optim.lr_scheduler import OneCycleLR

    pct_start = plan.warmup_epochs / plan.epochs if plan.warmup_epochs else 0.3
    if not 0 < pct_start < 1:
        raise UsageError(f"onecycle: warmup_epochs must be less than epochs ({plan.epochs}), "
                         f"got {plan.warmup_epochs}")
    div_factor = 25.0
    final_div = plan.base_lr / (plan.min_lr * div_factor) if plan.min_lr > 0 else 1e4
    defaults = optimizer.defaults
    cycle_momentum = "betas" in defaults or defaults.get("momentum", 0) > 0
    max_lr = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=plan.total, pct_start=pct_start,
                      div_factor=div_factor, final_div_factor=final_div,
                      cycle_momentum=cycle_momentum), "step"


@dataclass(frozen=True)
class Scheduler:
    build: Callable[[Optimizer, Plan], tuple[LRScheduler, Interval]]
    help: str


#: name -> builder. `--scheduler` help and TrainConfig's check read it (default: cosine).
SCHEDULERS: dict[str, Scheduler] = {
    "step": Scheduler(_step, "StepLR(step_size, gamma), per epoch (the classic tutorial's)"),
    "cosine": Scheduler(_cosine, "linear warmup over warmup_epochs, then cosine to min_lr "
                                 "(every group ends at the same fraction of its rate); per step"),
    "onecycle": Scheduler(_onecycle, "OneCycleLR with each group's rate as its max_lr; "
                                     "warmup_epochs sets the rising phase (default 30%)"),
    "constant": Scheduler(_constant, "the groups' rates, after an optional linear warmup"),
}


def _base_lr(optimizer: Optimizer) -> float:
    """The head's rate: `initial_lr / lr_mult` of a tlreg group, else the largest rate."""
    for g in optimizer.param_groups:
        if g.get("lr_mult"):
            return g.get("initial_lr", g["lr"]) / g["lr_mult"]
    return max(g.get("initial_lr", g["lr"]) for g in optimizer.param_groups)


def build_scheduler(optimizer: Optimizer, name: str, *, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0.0, step_size: int = 7, gamma: float = 0.1,
                    min_lr: float = 0.0) -> tuple[LRScheduler, Interval]:
    """A torch scheduler from `SCHEDULERS`, and when to call its `.step()` ("step"/"epoch").

    Call it once per optimizer, before loading a saved optimizer or scheduler state
    (OneCycleLR rewrites the groups' `initial_lr`).
    """
    entry = SCHEDULERS.get(name.lower())
    if entry is None:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise UsageError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and "
                         f"{steps_per_epoch}")
    if warmup_epochs < 0:
        raise UsageError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    base = _base_lr(optimizer)
    if not 0 <= min_lr <= base:
        raise UsageError(f"min_lr must be in [0, lr={base}], got {min_lr}")
    return entry.build(optimizer, Plan(epochs, steps_per_epoch, warmup_epochs, step_size, gamma,
                                       min_lr, base))
