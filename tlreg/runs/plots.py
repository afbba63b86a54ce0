"""training.png (loss and accuracy per epoch) and lr_find.png (matplotlib, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlreg._io import atomic_path


def plot_history(history: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float],
                 suggestions: dict[str, float | None], path: Path) -> None:
    """The smoothed loss against the rate (log scale), the suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(lrs, losses)
    for (name, lr), colour in zip(suggestions.items(), ("tab:red", "tab:green"), strict=False):
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", label=f"{name} {lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate (head)", ylabel="loss (smoothed)",
           title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    """The figure as a PNG, written atomically; the figure is closed either way."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
