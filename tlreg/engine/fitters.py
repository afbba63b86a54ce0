"""Convex fits of a head on cached features, behind the training loop's Fitter interface.

`CrossValidated` is the whole run as one 'epoch': the head at its CV-chosen optimum
(tlreg.engine.solver). `LBFGS` takes one strong-Wolfe L-BFGS solve step per epoch of
L2-regularised logistic regression (`--solver lbfgs`). Neither steps the LR scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlreg.engine import objective
from tlreg.engine.loop import EpochStats

if TYPE_CHECKING:
    import torch

    from tlreg.engine.feeds import FeatureFeed
    from tlreg.engine.objective import Evaluation
    from tlreg.engine.solver import HeadFit


class CrossValidated:
    """One fit to the CV-chosen optimum; a fit the probe phase already made is reused."""

    steps_scheduler = False
    epochs = 1  # the optimum is the whole run, whatever --epochs says

    def __init__(self, feed: FeatureFeed, fit: Callable[[torch.Tensor, torch.Tensor], HeadFit],
                 done: HeadFit | None, label_smoothing: float) -> None:
        self.feed, self.fit, self.smoothing = feed, fit, label_smoothing
        self.result = done  # --policy auto chose feature extraction: its probe is the run

    def train_epoch(self, epoch: int, seed: int, progress: Any) -> EpochStats:
        import torch

        earlier = 0.0  # a fit made by the probe phase (auto) counts in this epoch's time
        if self.result is None:
            self.result = self.fit(self.feed.x_train, self.feed.y_train)
        else:
            earlier = self.result.seconds
        head, x, y = self.feed.head, self.feed.x_train, self.feed.y_train
        head.eval()
        with torch.inference_mode():
            logits = head(x)
            loss = objective.loss(logits, y, self.smoothing).item()
            accuracy = objective.correct(logits, y).item() / max(1, len(y))
        return EpochStats(loss, accuracy, len(x), extra_seconds=earlier)

    def evaluate(self) -> Evaluation:
        return self.feed.evaluate()


class LBFGS:
    """One L-BFGS solve step (20 iterations) per epoch; the solver's memory spans epochs."""

    steps_scheduler = False
    epochs = None

    def __init__(self, feed: FeatureFeed, *, weight_decay: float,
                 label_smoothing: float, class_weight: torch.Tensor | None = None) -> None:
        import torch

        self.feed, self.weight_decay, self.smoothing = feed, weight_decay, label_smoothing
        self.class_weight = class_weight
        self.params = list(feed.head.parameters())
        self.optimizer = torch.optim.LBFGS(self.params, lr=1.0, max_iter=20, history_size=20,
                                           line_search_fn="strong_wolfe")

    def train_epoch(self, epoch: int, seed: int, progress: Any) -> EpochStats:
        import torch

        head, x, y = self.feed.head, self.feed.x_train, self.feed.y_train
        head.train()
        weight = next(p for p in self.params if p.dim() == 2)

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            loss = objective.loss(head(x), y, self.smoothing, weight=self.class_weight)
            loss = loss + 0.5 * self.weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        self.optimizer.step(closure)
        with torch.no_grad():
            logits = head(x)
            return EpochStats(objective.loss(logits, y).item(),
                              objective.correct(logits, y).item() / max(1, len(y)), len(x))

    def evaluate(self) -> Evaluation:
        return self.feed.evaluate()
