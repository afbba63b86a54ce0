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
    """Where the batches come from: cached features or images (tlreg.engine.trainer).

    A feed may also have `mix`: a callable `(x, y, seed, step) -> (x, soft targets)` (Mixup /
    CutMix, tlreg.data.mixup) that the loop applies to each training batch; None or absent:
    no mixing.
    """

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
                 class_weight: torch.Tensor | None = None, accumulate: int = 1,
                 clip_grad: float | None = None) -> None:
        import torch

        self.feed, self.optimizer, self.scheduler = feed, optimizer, scheduler
        self.per_step, self.runtime, self.on_step = per_step, runtime, on_step
        self.epochs, self.smoothing, self.class_weight = epochs, label_smoothing, class_weight
        self.accumulate, self.clip_grad = accumulate, clip_grad
        fp16 = runtime is not None and runtime.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(enabled=fp16)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _autocast(self) -> Any:
        return self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext()

    def train_epoch(self, epoch: int, seed: int, progress: Any) -> EpochStats:
        import torch

        forward = self.feed.forward(epoch)
        self.feed.train_mode()
        total, batches = self.feed.train_batches(epoch, seed)
        mix = getattr(self.feed, "mix", None)
        soft = mix is not None  # mixed batches carry soft targets (class probabilities)
        device = None
        loss_sum = correct = None
        seen = 0
        task = progress.start(f"epoch {epoch + 1}/{self.epochs}", total)
        group = steps = 0  # images in the optimizer step being accumulated; steps taken
        group_loss: Any = None
        self.optimizer.zero_grad(set_to_none=True)
        for step, (x, y) in enumerate(batches):
            if mix is not None:  # seeded by (epoch seed, batch): --resume mixes the same
                x, y = mix(x, y, seed, step)
            n = len(y)
            group += n
            last = (step + 1) % self.accumulate == 0 or step + 1 == total
            # DDP reduces gradients only on the micro-batch that ends a step.
            sync = (forward.no_sync() if not last and hasattr(forward, "no_sync")
                    else contextlib.nullcontext())
            with sync:
                with self._autocast():
                    logits = forward(x)
                    loss = objective.loss(logits, y, self.smoothing, weight=self.class_weight,
                                          soft=soft)
                # The sum over the step's images, divided by their count before the step: the
                # gradient of the mean over all of them, as one batch that large would give.
                self.scaler.scale(loss * n if self.accumulate > 1 else loss).backward()
            if device is None:
                device = loss.device
                loss_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
            batch_loss = loss.detach()
            loss_sum += batch_loss * n
            correct += objective.correct(logits.detach(), y, soft=soft)
            seen += n
            if self.accumulate > 1:  # the step's loss so far, summed over its images
                group_loss = batch_loss * n if group_loss is None else group_loss + batch_loss * n
            if last:
                self._step(group)
                if self.on_step is not None:  # once per optimizer step, with its mean loss
                    self.on_step(steps, batch_loss if group_loss is None else group_loss / group)
                steps, group, group_loss = steps + 1, 0, None
            # The loss is read (a device sync) only when the bar refreshes.
            progress.advance(task, n, lambda s=loss_sum, k=seen: s.item() / k)
        if group:  # a feed that gave fewer batches than it said
            self._step(group)
            if self.on_step is not None:
                self.on_step(steps, batch_loss if group_loss is None else group_loss / group)
        progress.finish(task)
        loss_total = loss_sum.item() if loss_sum is not None else 0.0
        n_correct = correct.item() if correct is not None else 0
        if self.feed.sharded:
            seen, loss_total, n_correct = distributed.sum_all(seen, loss_total, n_correct)
        return EpochStats(loss_total / max(1, seen), n_correct / max(1, seen), int(seen))

    def _step(self, images: int) -> None:
        """One optimizer step: gradients unscaled, averaged over an accumulated step, clipped."""
        import torch

        if self.accumulate > 1 or self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad for p in self.params if p.grad is not None]
            if self.accumulate > 1 and grads:
                torch._foreach_div_(grads, float(images))
            if self.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step:
            self.scheduler.step()

    def evaluate(self) -> Evaluation:
        return self.feed.evaluate()
