"""Gradient accumulation (`--accumulate N`) and clipping (`--clip-grad NORM`) in the one loop.

Accumulating N batches of B must be one step on a batch of N x B: checked on a ViT (no
BatchNorm, so train mode is the same function of each image whatever the batch) against the
big batch to 1e-6, and through `fit` on cached features, where the scheduler must count
optimizer steps, not batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from images import colour_folder

from tlreg.engine.config import TrainConfig
from tlreg.engine.loop import SGD
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError
from tlreg.progress import Progress

IMAGES = 72  # 2 full steps of 32 and a last step of 8: the short group is averaged right too


class Fixed:
    """A feed of fixed batches in a fixed order (the Feed protocol of tlreg.engine.loop)."""

    sharded = False

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 batch: int) -> None:
        self.model, self.x, self.y, self.batch = model, x, y, batch

    def forward(self, epoch: int) -> Any:
        return self.model

    def train_mode(self) -> None:
        self.model.train()

    def train_batches(self, epoch: int, seed: int) -> tuple[int, Iterator[Any]]:
        starts = range(0, len(self.x), self.batch)
        return len(starts), ((self.x[i:i + self.batch], self.y[i:i + self.batch])
                             for i in starts)

    def evaluate(self) -> Any:
        raise AssertionError("not used")


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)


def one_epoch(batch: int, accumulate: int, *, clip_grad: float | None = None,
              optimizer: str = "sgd", dtype: torch.dtype = torch.float32,
              ) -> tuple[torch.nn.Module, Any, Any]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(IMAGES, 3, 32, 32, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (IMAGES,), generator=gen)
    model = vit().to(dtype)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1.0 if clip_grad else 0.1,
                                momentum=0.0 if clip_grad else 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    loop = SGD(Fixed(model, x, y, batch), optimizer=opt, scheduler=sched, per_step=True,
               epochs=1, label_smoothing=0.0, runtime=None, accumulate=accumulate,
               clip_grad=clip_grad)
    with Progress(quiet=True) as progress:
        stats = loop.train_epoch(0, 0, progress)
    return model, sched, stats


@pytest.mark.parametrize("optimizer, dtype", [("sgd", torch.float32),
                                              ("adamw", torch.float64)])
def test_accumulating_4_batches_of_8_is_one_batch_of_32(optimizer: str,
                                                        dtype: torch.dtype) -> None:
    """SGD with momentum in fp32; AdamW in fp64, since Adam's first steps divide each gradient
    by its own magnitude and so blow fp32 rounding of near-zero gradients up to ~lr x 1e-2."""
    big, big_sched, big_stats = one_epoch(32, 1, optimizer=optimizer, dtype=dtype)
    small, small_sched, small_stats = one_epoch(8, 4, optimizer=optimizer, dtype=dtype)
    assert big_sched.last_epoch == small_sched.last_epoch == 3  # optimizer steps, not batches
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert small_stats.loss == pytest.approx(big_stats.loss, abs=1e-6)
    assert small_stats.images == big_stats.images == IMAGES
    # ... and it is not the same as 9 steps on batches of 8: the test can fail
    plain, _, _ = one_epoch(8, 1, optimizer=optimizer, dtype=dtype)
    assert not torch.allclose(plain.head.weight, big.head.weight, atol=1e-4)


def test_clip_grad_bounds_the_global_norm_of_the_step() -> None:
    """Plain SGD with lr 1 moves the weights by exactly the clipped gradient."""
    before = vit().state_dict()
    clipped, _, _ = one_epoch(IMAGES, 1, clip_grad=0.01)
    step = torch.cat([(a - before[k]).flatten() for k, a in clipped.state_dict().items()])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)
    unclipped, _, _ = one_epoch(IMAGES, 1, clip_grad=1e9)
    free = torch.cat([(a - before[k]).flatten() for k, a in unclipped.state_dict().items()])
    assert free.norm().item() > 0.1  # the clip did something


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("acc") / "data", classes=("red", "green",
                         "blue"), per_class=12, val_per_class=3, size=24)


def run(data: Path, out: Path, **kw: Any) -> Any:
    return fit(TrainConfig(data=str(data), out=str(out), backbone="timm:test_vit",
                           pretrained=False, img_size=32, policy="feature-extract",
                           solver="sgd", epochs=3, lr=0.05, workers=0, quiet=True,
                           device="cpu", cache=False, **kw))


def test_fit_with_accumulation_matches_the_larger_batch(data: Path, tmp_path: Path) -> None:
    """36 cached features: batch 16 (3 steps an epoch) = 4 x 4 accumulated, cosine per step."""
    big = run(data, tmp_path / "big", batch_size=16)
    small = run(data, tmp_path / "small", batch_size=4, accumulate=4)
    for a, b in zip(big.history, small.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)  # the schedule counts steps
    for (name, a), b in zip(big.model.head.state_dict().items(),
                            small.model.head.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert (tmp_path / "small" / "config.yaml").read_text().count("accumulate: 4") == 1


@pytest.mark.parametrize("bad", [{"accumulate": 0}, {"accumulate": "two"},
                                 {"clip_grad": 0}, {"clip_grad": -1.0}])
def test_bad_values_are_one_clear_error(bad: dict[str, Any]) -> None:
    name = next(iter(bad))
    with pytest.raises(UsageError, match=name):
        TrainConfig(data="d", out="o", **bad)


def test_cli_refuses_accumulate_0_before_training(cli: Any, data: Path, tmp_path: Path) -> None:
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "run"), "--accumulate", "0",
                       "--backbone", "timm:test_vit", "--no-pretrained")
    assert code == 2 and "accumulate must be >= 1, got 0" in err
    assert not (tmp_path / "run").exists()
