"""Training progress: a rich bar on a terminal, nothing extra elsewhere.

The bar refreshes a few times a second; the running loss is read from the device only then,
so there is no host-device sync on every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Progress:
    """Context manager over rich.progress; a no-op when quiet or not on a terminal."""

    refresh_seconds = 0.5

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._rich: Any = None
        self._last = 0.0
        self._images = 0
        self._t0 = 0.0

    def __enter__(self) -> Progress:
        if self.quiet:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                refresh_per_second=1 / self.refresh_seconds, transient=True)
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def start(self, description: str, total: int) -> Any:
        self._images, self._t0, self._last = 0, time.perf_counter(), 0.0
        if self._rich is None:
            return None
        return self._rich.add_task(description, total=total, loss="-", speed="")

    def advance(self, task: Any, images: int, loss: Callable[[], float] | None) -> None:
        self._images += images
        if self._rich is None:
            return
        now = time.perf_counter()
        fields: dict[str, str] = {}
        if loss is not None and now - self._last >= self.refresh_seconds:
            self._last = now
            fields = {"loss": f"{loss():.4f}",
                      "speed": f"{self._images / max(now - self._t0, 1e-9):.0f} img/s"}
        self._rich.update(task, advance=1, **fields)

    def finish(self, task: Any) -> None:
        if self._rich is not None:
            self._rich.remove_task(task)
