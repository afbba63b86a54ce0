"""The one training loop: cached features and images are both just batches.

`SGD` is a fitter: each epoch it runs the batches a `Feed` gives through `forward`, with AMP,
gradient scaling and per-step scheduling, and keeps its metrics on the device (read once per
epoch, and by the progress bar only when it redraws). The convex fits (`tlreg.engine.fitters`)
are other fitters behind the same two methods; the Trainer's epoch loop drives any of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tlreg.engine import distributed, objective
from tlreg.engine.objective import Evaluation

if TYPE_CHECKING:
    import torch

    from tlreg.engine.runtime import Runtime

Batches = Iterator[tuple["torch.Tensor", "torch.Tensor"]]


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training side: mean loss, accuracy, images seen (all ranks)."""

    loss: float
    accuracy: float
    images: int
    extra_seconds: float = 0.0  # work done before the epoch that counts in it (a probe's fit)
    compile_seconds: float | None = None


class Fitter(Protocol):
    """Updates the trainable part for one epoch, and evaluates it."""

    steps_scheduler: bool  # whether the run's LR scheduler steps with it
    epochs: int | None  # the most epochs it can use (None: the run's)

    def train_epoch(self, epoch: int, seed: int, progress: Any) -> EpochStats: ...

    def evaluate(self) -> Evaluation: ...


class Feed(Protocol):
    """Where the batches come from: cached features or images (tlreg.engine.trainer)."""

    sharded: bool  # each rank sees its shard: metrics are summed across ranks

    def forward(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def train_mode(self) -> None: ...

    def train_batches(self, epoch: int, seed: int) -> tuple[int, Batches]: ...

    def evaluate(self) -> Evaluation: ...


class SGD:
    """Gradient steps over a feed's batches: features, fine-tuning and gradual unfreezing."""

    steps_scheduler = True
    epochs = None

    def __init__(self, feed: Feed, *, optimizer: Any, scheduler: Any, per_step: bool,
                 epochs: int, label_smoothing: float, runtime: Runtime | None,
                 on_step: Callable[[int, torch.Tensor], None] | None = None,
                 class_weight: torch.Tensor | None = None) -> None:
        import torch

        self.feed, self.optimizer, self.scheduler = feed, optimizer, scheduler
        self.per_step, self.runtime, self.on_step = per_step, runtime, on_step
        self.epochs, self.smoothing, self.class_weight = epochs, label_smoothing, class_weight
        fp16 = runtime is not None and runtime.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(enabled=fp16)

    def _autocast(self) -> Any:
        return self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext()

    def train_epoch(self, epoch: int, seed: int, progress: Any) -> EpochStats:
        import torch

        forward = self.feed.forward(epoch)
        self.feed.train_mode()
        total, batches = self.feed.train_batches(epoch, seed)
        device = None
        loss_sum = correct = None
        seen = 0
        task = progress.start(f"epoch {epoch + 1}/{self.epochs}", total)
        for step, (x, y) in enumerate(batches):
            with self._autocast():
                logits = forward(x)
                loss = objective.loss(logits, y, self.smoothing, weight=self.class_weight)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.per_step:
                self.scheduler.step()
            if device is None:
                device = loss.device
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
            n = len(y)
            loss_sum += loss.detach() * n
            correct += objective.correct(logits.detach(), y)
            seen += n
            if self.on_step is not None:
                self.on_step(step, loss.detach())
            # The loss is read (a device sync) only when the bar refreshes.
            progress.advance(task, n, lambda s=loss_sum, k=seen: s.item() / k)
        progress.finish(task)
        loss_total = loss_sum.item() if loss_sum is not None else 0.0
        n_correct = correct.item() if correct is not None else 0
        if self.feed.sharded:
            seen, loss_total, n_correct = distributed.sum_all(seen, loss_total, n_correct)
        return EpochStats(loss_total / max(1, seen), n_correct / max(1, seen), int(seen))

    def evaluate(self) -> Evaluation:
        return self.feed.evaluate()
