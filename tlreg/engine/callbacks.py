"""Callbacks: named hooks into a run, with state that `--resume` restores, and a way to stop.

A run calls, in this order (Lightning's contract, smaller)::

    on_run_start
    per epoch:  on_epoch_start, on_train_step_end (every optimizer step), on_evaluate_end,
                on_epoch_end, on_save_checkpoint, [the epoch's checkpoint is written],
                on_epoch_saved
    on_run_end, or on_exception when an error or Ctrl-C ends the run (then it is raised)

`state_dict()` (JSON data) is written into each `last` checkpoint at `on_save_checkpoint` time
and handed back to `load_state_dict()` on `--resume`, so a run killed mid-way and resumed sees
the same callback state as one that was not. (What `on_epoch_saved` changes is saved with the
next epoch: keep state changes in the hooks before it.) `trainer.request_stop(reason)` ends the
run after the current epoch is saved: completed, with `stopped_early` and `stop_reason` in
summary.json; under DDP a request on any rank stops every rank at the same epoch.

Third-party callbacks register in the `tlreg.callbacks` entry-point group as a callable
`(**args) -> Callback`; `tlreg train --callback NAME --callback-arg k=v` builds one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

#: What `--monitor` can watch, and whether more is better.
MONITORS: dict[str, str] = {"val_accuracy": "max", "val_loss": "min",
                            "train_accuracy": "max", "train_loss": "min",
                            "val_balanced_accuracy": "max", "val_macro_f1": "max",
                            "val_map": "max"}
#: Monitors only a multi-label run records.
MULTI_LABEL_MONITORS = ("val_map",)


class Callback:
    """Override any hook; `trainer` is the running `tlreg.engine.trainer.Trainer`."""

    def on_run_start(self, trainer: Any) -> None: ...

    def on_epoch_start(self, trainer: Any, epoch: int) -> None: ...

    def on_train_step_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        """After each optimizer step (`--accumulate N`: once per N batches, `loss` their mean).

        `loss` stays on the device: reading it (`.item()`) waits for the step to finish."""

    def on_evaluate_end(self, trainer: Any, epoch: int, metrics: Mapping[str, Any]) -> None:
        """`metrics`: the epoch's history row (losses, accuracies, lr, seconds)."""

    def on_epoch_end(self, trainer: Any, epoch: int) -> None: ...

    def on_save_checkpoint(self, trainer: Any, epoch: int) -> None:
        """The last chance to change state before `state_dict()` is written."""

    def on_epoch_saved(self, trainer: Any, epoch: int) -> None:
        """The epoch's checkpoint and history files exist (tlreg's `fit(callbacks=[fn])`)."""

    def on_run_end(self, trainer: Any, summary: Mapping[str, Any]) -> None: ...

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        """The run ends by `error` (KeyboardInterrupt: Ctrl-C, after summary.json is written)
        instead of `on_run_end`; close what `on_run_start` opened. It is raised afterwards."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class EpochFunction(Callback):
    """A plain `fn(trainer, epoch)`, called after each epoch is saved."""

    def __init__(self, fn: Callable[[Any, int], None]) -> None:
        self.fn = fn

    def on_epoch_saved(self, trainer: Any, epoch: int) -> None:
        self.fn(trainer, epoch)


class Monitor:
    """Which metric decides the best epoch, and by how much it must improve (`min_delta`)."""

    def __init__(self, name: str = "val_accuracy", min_delta: float = 0.0) -> None:
        if name not in MONITORS:
            raise UsageError(f"unknown monitor {name!r}; choose from {', '.join(MONITORS)}")
        if not min_delta >= 0:
            raise UsageError(f"min_delta must be >= 0, got {min_delta}")
        self.name, self.mode, self.min_delta = name, MONITORS[name], float(min_delta)

    def improves(self, value: float | None, best: float | None) -> bool:
        """A finite value better than `best` by more than min_delta (any finite one if none)."""
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return (value > best + self.min_delta if self.mode == "max"
                else value < best - self.min_delta)


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved for `patience` epochs."""

    def __init__(self, patience: int = 3, monitor: str = "val_accuracy",
                 min_delta: float = 0.0) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise UsageError(f"early stopping needs patience >= 1, got {patience!r}")
        self.patience, self.monitor = patience, Monitor(monitor, min_delta)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0

    def on_evaluate_end(self, trainer: Any, epoch: int, metrics: Mapping[str, Any]) -> None:
        value = metrics.get(self.monitor.name)
        if self.monitor.improves(value, self.best):
            self.best, self.best_epoch, self.wait = float(value), epoch + 1, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.request_stop(
                f"{self.monitor.name} did not improve by more than {self.monitor.min_delta:g} "
                f"for {self.patience} epochs (best {self.best} at epoch {self.best_epoch})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch = state.get("best"), state.get("best_epoch")
        self.wait = int(state.get("wait", 0))


def build_callback(name: str, args: Mapping[str, Any] | None = None) -> Callback:
    """The callback registered as `name` (tlreg.callbacks entry points), built with `args`."""
    from tlreg.registry import build

    return build("callback", name, args, Callback, "a tlreg.engine.callbacks.Callback")


class Callbacks:
    """The run's callbacks, called in order; their states keyed by name for checkpoints."""

    def __init__(self, named: Iterable[tuple[str, Callback]]) -> None:
        self.named: list[tuple[str, Callback]] = []
        seen: dict[str, int] = {}
        for name, cb in named:  # the same callback twice keeps two states
            seen[name] = seen.get(name, 0) + 1
            self.named.append((name if seen[name] == 1 else f"{name}#{seen[name]}", cb))

    @classmethod
    def of(cls, names: Sequence[str], args: Mapping[str, Mapping[str, Any]],
           extra: Sequence[Callback | Callable[[Any, int], None]] = ()) -> Callbacks:
        built = [(n, build_callback(n, args.get(n))) for n in names]
        for i, cb in enumerate(extra):  # fit(callbacks=[...]): objects or plain functions
            built.append((f"python#{i}", cb if isinstance(cb, Callback) else EpochFunction(cb)))
        return cls(built)

    def call(self, hook: str, *args: Any) -> None:
        for _, cb in self.named:
            getattr(cb, hook)(*args)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: cb.state_dict() for name, cb in self.named}

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        for name, cb in self.named:
            if name in states:
                cb.load_state_dict(states[name])


def early_stopping(patience: int = 3, monitor: str = "val_accuracy",
                   min_delta: float = 0.0) -> EarlyStopping:
    """The `early-stopping` entry point (the `--early-stopping` flags build the same)."""
    return EarlyStopping(int(patience), monitor, float(min_delta))
