"""The two feeds of the training loop: cached features (the head alone trains) and images."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tlreg.engine import distributed, objective, replicas

if TYPE_CHECKING:
    import torch

    from tlreg.data.mixup import BatchMix
    from tlreg.data.sources import DataSplit
    from tlreg.engine.inputs import Inputs
    from tlreg.engine.objective import Evaluation
    from tlreg.models.transfer import TransferModel


class FeatureFeed:
    """Pooled features computed once: every rank holds all of them and trains the same head
    on global batches, so nothing is sharded and no gradient is reduced."""

    sharded = False
    mix = None  # pooled features are not images: Mixup is refused before training

    def __init__(self, head: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_val: torch.Tensor, y_val: torch.Tensor, *, global_batch: int,
                 label_smoothing: float, balanced: bool = False) -> None:
        self.head, self.global_batch, self.smoothing = head, global_batch, label_smoothing
        self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val
        # --sampler balanced: draws weighted by 1 / class size, computed once for every epoch
        self.weights = None
        if balanced and len(y_train):
            import torch

            labels = y_train.cpu().tolist()
            self.weights = torch.tensor(
                objective.balanced_sample_weights(labels, max(labels) + 1), dtype=torch.float64)

    def forward(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.head

    def train_mode(self) -> None:
        self.head.train()

    def train_batches(self, epoch: int, seed: int) -> tuple[int, Iterator[Any]]:
        import torch

        gen = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        order = order.to(self.x_train.device)
        step = self.global_batch

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(0, len(order), step):
                idx = order[i:i + step]
                yield self.x_train[idx], self.y_train[idx]

        return -(-len(order) // step), batches()

    def evaluate(self) -> Evaluation:
        import torch

        self.head.eval()
        with torch.inference_mode():
            logits, y = self.head(self.x_val), self.y_val
            loss = (objective.loss(logits, y, self.smoothing).item() if len(y)
                    else float("nan"))
            return objective.Evaluation(
                loss, y.tolist(), objective.outputs(logits, y).tolist(),
                None if objective.is_multi_label(y) else logits.float().cpu())


class ImageFeed:
    """Image batches through the whole model: this rank's shard, augmented, on the device;
    `mix` is the run's Mixup / CutMix (None without), applied by the loop to each batch."""

    sharded = True

    def __init__(self, model: TransferModel, inputs: Inputs, data: DataSplit, *,
                 compile: bool, label_smoothing: float) -> None:
        self.model, self.inputs, self.data = model, inputs, data
        self.compile, self.smoothing = compile, label_smoothing
        cfg = inputs.config
        self.mix: BatchMix | None = None
        if cfg.mixup or cfg.cutmix:  # the smoothing goes into the mixed targets
            from tlreg.data.mixup import BatchMix

            self.mix = BatchMix(cfg.mixup, cfg.cutmix, len(data.classes),
                                label_smoothing=label_smoothing, rank=distributed.rank())
        self.replicas = (replicas.Replicas(model, inputs.runtime.device)
                         if distributed.world() > 1 else None)
        self._forward: Any = self._compiled(model) if compile else model

    @staticmethod
    def _compiled(module: Any) -> Any:
        """torch.compile (opt-in): lazy, so its cost lands in the steps that trigger it."""
        import torch

        return torch.compile(module)

    def release(self) -> None:
        """Drop the DDP wrapper while the process group still exists (see Replicas.release)."""
        if self.replicas is not None:
            self._forward = self.model
            self.replicas.release()

    def forward(self, epoch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.replicas is not None and self.replicas.stale():
            # Freeze first, then wrap: DDP syncs only what trained when it was built.
            self._forward = self.model  # drop the old wrapper (and its gradient hooks) first
            self._forward = self.replicas.module()
            if self.compile:
                self._forward = self._compiled(self._forward)
        return self._forward

    def train_mode(self) -> None:
        self.model.train()

    def train_batches(self, epoch: int, seed: int) -> tuple[int, Iterator[Any]]:
        rt = self.inputs.runtime
        total, batches = self.inputs.batches(self.data.train, train=True, seed=seed,
                                             epoch=epoch)

        def on_device() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for images, labels, _ in batches:
                yield rt.to_device(images), labels.to(rt.device, non_blocking=True)

        return total, on_device()

    def evaluate(self) -> Evaluation:
        return self.inputs.evaluate(self.model, self.data.val, self.smoothing)
