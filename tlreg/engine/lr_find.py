"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

One batch per step, the rate growing exponentially from `start_lr` to `end_lr` over `num_it`
steps; the loss is smoothed (an exponential average with bias correction, beta 0.98) and the
sweep stops early once it exceeds 4x the best smoothed loss (it diverged). Two suggestions,
as fastai computes them on the sweep without its first 10% and last 5 points:

* `valley`: about halfway down the longest run of decreasing losses (fastai's default);
* `steep`: where the loss falls fastest per unit of log(lr).

Layer-wise rates keep their ratios: every parameter group is scaled by the same factor, and the
rates reported are the head's. Everything the sweep touches (every model tensor, buffers too,
the optimizer's state and hyperparameters, and the RNGs) is put back bitwise afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tlreg.engine import objective

if TYPE_CHECKING:
    import torch

    from tlreg.engine.loop import Feed
    from tlreg.engine.runtime import Runtime

START_LR, END_LR, NUM_IT = 1e-7, 10.0, 100  # fastai's defaults
SUGGESTIONS = ("valley", "steep")
BETA, DIVERGED = 0.98, 4.0


@dataclass(frozen=True)
class Sweep:
    """What a sweep measured and suggests (`lr_find.json`)."""

    lrs: tuple[float, ...]  # the head's rate at each step
    losses: tuple[float, ...]  # smoothed
    raw_losses: tuple[float, ...]
    suggestions: dict[str, float | None]  # valley, steep (None: too few points)
    stopped: str  # "diverged" or "end"
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rates(start_lr: float, end_lr: float, num_it: int) -> list[float]:
    """The exponential schedule: start_lr x (end_lr / start_lr) ** (i / (num_it - 1))."""
    return [start_lr * (end_lr / start_lr) ** (i / max(1, num_it - 1)) for i in range(num_it)]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's `valley`: in the longest strictly decreasing run of losses (L steps from its
    start), the point start + L//3 + L//6, about halfway down."""
    n = len(losses)
    if n < 2:
        return None
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    third = (end - start) / 3
    return float(lrs[start + int(third) + int(third / 2)])


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's `steep`: the rate where d loss / d log(lr) is most negative."""
    if len(losses) < 2:
        return None
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(len(losses) - 1)]
    return float(lrs[min(range(len(slopes)), key=slopes.__getitem__)])


def suggest(lrs: Sequence[float], losses: Sequence[float]) -> dict[str, float | None]:
    """Both suggestions, on the sweep without its first 10% and last 5 points (fastai)."""
    skip = len(lrs) // 10
    lrs, losses = list(lrs)[skip:-5 or None], list(losses)[skip:-5 or None]
    return {"valley": valley(lrs, losses), "steep": steep(lrs, losses)}


@contextlib.contextmanager
def restored(module: torch.nn.Module, optimizer: Any) -> Iterator[None]:
    """Put `module`'s tensors, `optimizer`'s state and every RNG back as they were."""
    import torch

    from tlreg.runs.checkpoint import capture_rng, restore_rng

    tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}
    opt = copy.deepcopy(optimizer.state_dict())
    rng = capture_rng()
    try:
        yield
    finally:
        with torch.no_grad():
            module.load_state_dict(tensors)
        optimizer.load_state_dict(opt)
        restore_rng(rng)


def sweep(feed: Feed, optimizer: Any, module: torch.nn.Module, *, seed: int,
          runtime: Runtime | None, label_smoothing: float = 0.0,
          class_weight: torch.Tensor | None = None, start_lr: float = START_LR,
          end_lr: float = END_LR, num_it: int = NUM_IT, head_group: str = "head",
          progress: Callable[[int, int], None] | None = None) -> Sweep:
    """Run the range test on `feed`'s training batches; `module` (what trains) and `optimizer`
    are restored afterwards. The batches cycle through epochs when one is shorter than num_it.

    The step is the loop's (tlreg.engine.loop.SGD) without accumulation or a scheduler: one
    batch, one optimizer step at the swept rate.
    """
    import torch

    groups = optimizer.param_groups
    head = next((g for g in groups if g.get("name") == head_group), groups[-1])
    # each group's rate relative to the head's, before any warm-up scaled them
    base = [g.get("initial_lr", g["lr"]) / head.get("initial_lr", head["lr"]) for g in groups]
    fp16 = runtime is not None and runtime.amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(enabled=fp16)
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext
    t0 = time.perf_counter()
    lrs, raw, smooth = [], [], []
    avg, best, stopped = 0.0, math.inf, "end"
    with restored(module, optimizer):
        feed.train_mode()
        forward = feed.forward(0)
        for i, ((x, y), lr) in enumerate(zip(_cycle(feed, seed), rates(start_lr, end_lr,
                                                                        num_it), strict=False)):
            for g, ratio in zip(groups, base, strict=True):
                g["lr"] = lr * ratio
            with autocast():
                loss = objective.loss(forward(x), y, label_smoothing, weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = float(loss.detach())
            avg = BETA * avg + (1 - BETA) * value
            smoothed = avg / (1 - BETA ** (i + 1))
            lrs.append(lr)
            raw.append(value)
            smooth.append(smoothed)
            if progress is not None:
                progress(i + 1, num_it)
            # not within the first tenth, which the suggestions skip too: a near-zero loss
            # (a head already fitted by LP-FT) would otherwise "diverge" on noise
            if not math.isfinite(smoothed) or (i >= num_it // 10 and smoothed > DIVERGED * best):
                stopped = "diverged"
                break
            best = min(best, smoothed)
        optimizer.zero_grad(set_to_none=True)
    return Sweep(tuple(lrs), tuple(smooth), tuple(raw), suggest(lrs, smooth), stopped,
                 time.perf_counter() - t0)


def _cycle(feed: Feed, seed: int) -> Iterator[Any]:
    epoch = 0
    while True:
        _, batches = feed.train_batches(epoch, seed + epoch)
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return
        epoch += 1
