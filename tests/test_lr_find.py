"""The learning-rate range test: fastai's suggestions, everything restored bitwise after the
sweep, `--lr find` equal to the run at the rate it chose, `tlreg lr-find`'s files."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from images import colour_folder

from tlreg.engine import lr_find
from tlreg.engine.config import TrainConfig
from tlreg.engine.feeds import FeatureFeed
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError


def test_rates_are_exponential_from_start_to_end() -> None:
    r = lr_find.rates(1e-7, 10.0, 100)
    assert r[0] == pytest.approx(1e-7) and r[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in itertools.pairwise(r)]
    assert max(ratios) == pytest.approx(min(ratios))  # one constant factor per step


def test_suggestions_on_a_known_curve() -> None:
    """A loss flat, then falling linearly in log(lr) between 1e-4 and 1e-2, then rising."""
    lrs = lr_find.rates(1e-6, 1.0, 61)  # 10 points per decade
    logs = [math.log10(lr) for lr in lrs]
    losses = [2.0 if x < -4 else (2.0 - (x + 4) * 0.9 if x < -2 else 0.2 + (x + 2) ** 2)
              for x in logs]
    # steep: the fastest fall per log(lr) is anywhere on the linear stretch [1e-4, 1e-2)
    assert 1e-4 <= lr_find.steep(lrs, losses) < 1e-2
    # valley: the longest strictly decreasing run is one flat point and the 20 falling ones
    # down to the minimum at 1e-2 (L = 21 steps); fastai's index is start + L//3 + L//6,
    # about halfway down: 11 steps before the minimum, at 10^-3.1
    end = losses.index(min(losses))
    assert logs[end] == pytest.approx(-2.0)
    assert lr_find.valley(lrs, losses) == pytest.approx(lrs[end - 21 + 7 + 3])
    assert math.log10(lr_find.valley(lrs, losses)) == pytest.approx(-3.1)
    assert lr_find.valley([1.0], [1.0]) is None and lr_find.steep([1.0], [1.0]) is None


def feed_and_optimizer(seed: int = 0) -> tuple[FeatureFeed, torch.nn.Module, Any]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3))
    feed = FeatureFeed(head, x, y, x[:8], y[:8], global_batch=16, label_smoothing=0.0)
    opt = torch.optim.AdamW([{"params": head[:2].parameters(), "lr": 1e-3, "name": "layer0"},
                             {"params": head[3].parameters(), "lr": 1e-2, "name": "head"}])
    for xb, yb in list(feed.train_batches(0, 0)[1])[:2]:  # some optimizer state to keep
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(xb), yb).backward()
        opt.step()
    return feed, head, opt


def test_the_sweep_restores_every_tensor_the_optimizer_and_the_rngs() -> None:
    feed, head, opt = feed_and_optimizer()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    opt_before = opt.state_dict()
    opt_tensors = {(p, k): v.clone() for p, st in opt_before["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_before["param_groups"]]
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    rng = torch.get_rng_state(), random.random(), np.random.rand()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    sweep = lr_find.sweep(feed, opt, head, seed=0, runtime=None, num_it=40)
    assert len(sweep.lrs) > 5 and sweep.seconds < 5  # seconds on cached features
    for k, v in before.items():  # weights and BatchNorm's running statistics
        assert torch.equal(head.state_dict()[k], v), k
    after = opt.state_dict()
    for (p, k), v in opt_tensors.items():
        assert torch.equal(after["state"][p][k], v), (p, k)
    assert [{k: v for k, v in g.items() if k != "params"} for g in after["param_groups"]] \
        == groups
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert (random.random(), np.random.rand()) == rng[1:]


def test_group_rates_keep_their_ratio_during_the_sweep() -> None:
    feed, head, opt = feed_and_optimizer()
    seen: list[tuple[float, float]] = []
    step = opt.step

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return step(*args, **kwargs)

    opt.step = spy  # type: ignore[method-assign]
    sweep = lr_find.sweep(feed, opt, head, seed=0, runtime=None, num_it=20)
    assert [h for _, h in seen] == pytest.approx(list(sweep.lrs))  # the head's rate reported
    assert all(a / h == pytest.approx(0.1) for a, h in seen)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("lrf") / "data", classes=("red", "green",
                         "blue"), per_class=10, val_per_class=3, size=24)


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_vit", pretrained=False,
                img_size=32, batch_size=8, epochs=2, workers=0, quiet=True, device="cpu",
                cache=False)
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("policy", ["feature-extract", "finetune"])
def test_lr_find_trains_exactly_as_the_rate_it_chose(data: Path, tmp_path: Path,
                                                     policy: str) -> None:
    # no LP-FT: the loss starts at ln(3), not at the near zero a fitted head gives
    found = fit(config(data, tmp_path / "found", policy=policy, lr="find", lp_ft=False))
    run = json.loads((tmp_path / "found" / "run.json").read_text())["lr_find"]
    resolved = yaml.safe_load((tmp_path / "found" / "config.yaml").read_text())
    assert resolved["lr"] == run["lr"] == run["suggestions"]["valley"]
    assert resolved["lr_find"] is False  # config.yaml repeats the run at that rate
    assert (tmp_path / "found" / "lr_find.png").stat().st_size > 0
    sweep = json.loads((tmp_path / "found" / "lr_find.json").read_text())
    assert len(sweep["lrs"]) == run["steps"] == len(sweep["losses"])
    plain = fit(config(data, tmp_path / "plain", policy=policy, lr=run["lr"], lp_ft=False))
    assert found.history[-1]["train_loss"] == plain.history[-1]["train_loss"]
    for (k, a), b in zip(found.model.state_dict().items(), plain.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_lr_find_command_writes_the_sweep_and_trains_nothing(cli: Any, data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code, stdout, err = cli("lr-find", str(data), "--out", str(out), "--backbone",
                            "timm:test_vit", "--no-pretrained", "--img-size", "32", "--policy",
                            "feature-extract", "--device", "cpu", "--workers", "0", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result["suggestions"]) == {"valley", "steep"}
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert json.loads((out / "lr_find.json").read_text()) == result


def test_bad_combinations_are_clear_errors(cli: Any, data: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--lr find sweeps the rate of gradient steps"):
        fit(config(data, tmp_path / "cv", policy="feature-extract", epochs=None,
                   solver="cv", lr="find"))
    with pytest.raises(UsageError, match="--lr find chooses the learning rate"):
        fit(config(data, tmp_path / "both", lr=1e-3, lr_find=True))
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "x"), "--lr", "fnd")
    assert code == 2 and "lr must be a number, got 'fnd'" in err
    code, _, err = cli("lr-find", str(data), "--out", str(tmp_path / "y"), "--resume",
                       str(tmp_path))
    assert code == 2 and "--resume and --devices do not apply" in err
    assert not (tmp_path / "cv").exists() and not (tmp_path / "both").exists()
