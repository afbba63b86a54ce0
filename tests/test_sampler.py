"""`--sampler balanced`: draws weighted by 1 / class size, deterministic, sharded like DDP's.

The 2-process gloo run that draws what one process draws is in tests/test_distributed.py.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from images import colour_folder

from tlreg.engine.config import TrainConfig
from tlreg.engine.objective import balanced_sample_weights
from tlreg.engine.sharding import WeightedShard
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError

LABELS = [0] * 90 + [1] * 9 + [2] * 3  # 102 images, 30:3:1


def test_weights_draw_every_class_equally_often() -> None:
    weights = balanced_sample_weights(LABELS, 3)
    assert weights[0] == pytest.approx(1 / 90) and weights[-1] == pytest.approx(1 / 3)
    drawn = Counter(LABELS[i] for epoch in range(40)
                    for i in WeightedShard(weights, seed=7, epoch=epoch, replicas=1, rank=0))
    total = sum(drawn.values())
    assert total == 40 * len(LABELS)
    for c in range(3):  # 1/3 each: the 3-image class is drawn as often as the 90-image one
        assert drawn[c] / total == pytest.approx(1 / 3, abs=0.03), drawn


def test_the_draw_depends_on_seed_and_epoch_only() -> None:
    weights = balanced_sample_weights(LABELS, 3)

    def draw(seed: int, epoch: int) -> list[int]:
        return WeightedShard(weights, seed=seed, epoch=epoch, replicas=1, rank=0).draws()

    assert draw(1, 0) == draw(1, 0)
    assert draw(1, 0) != draw(1, 1) and draw(1, 0) != draw(2, 0)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_shards_together_are_the_one_process_draw(replicas: int) -> None:
    """Rank r keeps positions r, r + N, ... of the global draw (padded like
    DistributedSampler by repeating the first draws): together the one-process multiset."""
    weights = balanced_sample_weights(LABELS, 3)
    one = WeightedShard(weights, seed=5, epoch=2, replicas=1, rank=0).draws()
    shards = [list(WeightedShard(weights, seed=5, epoch=2, replicas=replicas, rank=r))
              for r in range(replicas)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    union = Counter(i for s in shards for i in s)
    pad = -len(LABELS) % replicas
    assert union == Counter(one) + Counter(one[:pad])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = colour_folder(tmp_path_factory.mktemp("s") / "data", per_class=24, val_per_class=3,
                         size=24)
    for extra in sorted((root / "train" / "blue").glob("*.png"))[1:]:
        extra.unlink()  # 24 red : 1 blue, under 5%
    return root


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_vit", pretrained=False,
                img_size=32, policy="feature-extract", batch_size=4, sampler="balanced",
                workers=0, quiet=True, device="cpu", cache=False)
    return TrainConfig(**(base | kw))


def test_a_balanced_run_trains_by_steps_and_does_not_warn(data: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the small-class warning: addressed, so not raised
        result = fit(config(data, tmp_path / "run", epochs=2))
    assert result.summary["epochs"] == 2 and len(result.history) == 2
    assert "sampler: balanced" in (tmp_path / "run" / "config.yaml").read_text()
    # the plain run with the same data does warn
    with pytest.warns(UserWarning, match="--sampler balanced draws every class"):
        fit(config(data, tmp_path / "plain", epochs=1, sampler="random"))


def test_balanced_draws_change_the_feature_batches(data: Path, tmp_path: Path) -> None:
    a = fit(config(data, tmp_path / "a", epochs=1, solver="sgd"))
    b = fit(config(data, tmp_path / "b", epochs=1, solver="sgd", sampler="random"))
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]
    again = fit(config(data, tmp_path / "c", epochs=1, solver="sgd"))
    assert again.history[0]["train_loss"] == a.history[0]["train_loss"]  # per seed


def test_bad_sampler_and_combinations_are_clear_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="sampler must be one of random, balanced"):
        TrainConfig(data="d", out="o", sampler="weighted")
    with pytest.raises(UsageError, match="--sampler balanced draws the batches"):
        fit(config(data, tmp_path / "cv", solver="cv"))


def test_multi_label_data_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    rows = ["path,tags"]
    for i in range(8):
        Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'a b' if i % 2 else 'a'}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UsageError, match="a multi-label image has several"):
        fit(config(str(tmp_path / "tags.csv"), tmp_path / "run", epochs=1, val_split=0.25,
                   source_args={"label_column": "tags", "label_delimiter": " "}))


def test_cli_sampler(cli: Any, data: Path, tmp_path: Path) -> None:
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "run"), "--sampler", "nope")
    assert code == 2 and "sampler must be one of random, balanced; got 'nope'" in err
