"""Model EMA (`--ema DECAY`): a moving average of the trained weights, timm's `ModelEmaV3`.

After every optimizer step, ema = decay * ema + (1 - decay) * weights (buffers such as
BatchNorm's running statistics are averaged too, integer ones copied), with no warm-up, so the
weights after k steps are the formula's. Only what trains is averaged: the head when it trains
on cached features, else the whole model. Each epoch the Trainer evaluates the average by
swapping it into the live module (so every feed, DDP wrapper and TTA sees it unchanged) and
keeps whichever of the two did better on val as the epoch's candidate for `best`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIX = "ema."  # the average's tensors in a `last` checkpoint's training state


class EMA:
    """The average of `target`'s weights, updated by `update()` after each optimizer step."""

    def __init__(self, target: nn.Module, decay: float) -> None:
        from timm.utils import ModelEmaV3

        self.target, self.decay = target, decay
        self.average = ModelEmaV3(target, decay=decay, use_warmup=False)
        self.updates = 0

    def update(self) -> None:
        self.average.update(self.target)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the live module for the block, the trained weights back after it."""
        import torch

        with torch.no_grad():
            kept = {k: v.clone() for k, v in self.target.state_dict().items()}
            self.target.load_state_dict(self.average.module.state_dict())
        try:
            yield
        finally:
            with torch.no_grad():
                self.target.load_state_dict(kept)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.average.module.state_dict().items()}

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore a checkpoint's average (`--resume`); a missing one is a damaged checkpoint."""
        from tlreg.errors import UsageError

        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        if not state:
            raise UsageError("cannot resume: the run used --ema but its last checkpoint has no "
                             "averaged weights; start a new run")
        self.average.module.load_state_dict(state, strict=True)
        self.updates = updates
