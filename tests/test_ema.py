"""Model EMA (`--ema DECAY`): the formula after k steps, evaluated and checkpointed beside the
model, the better of the two as `best`, and `--resume` restoring the average exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from images import colour_folder

from tlreg._io import read_checkpoint
from tlreg.engine.callbacks import Callback
from tlreg.engine.config import TrainConfig
from tlreg.engine.ema import EMA
from tlreg.engine.trainer import Interrupted, fit
from tlreg.errors import UsageError

DECAY = 0.8


def test_the_average_is_the_formula_after_k_updates() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(layer, DECAY)
    want = {k: v.clone() for k, v in layer.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p))
        layer.train()(torch.randn(8, 4))  # moves BatchNorm's running statistics
        ema.update()
        for k, v in layer.state_dict().items():
            want[k] = (DECAY * want[k] + (1 - DECAY) * v if v.is_floating_point()
                       else v.clone())  # num_batches_tracked is copied
    got = ema.average.module.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)
    assert ema.updates == 5


def test_swapped_puts_the_average_in_and_the_weights_back() -> None:
    layer = torch.nn.Linear(3, 2)
    ema = EMA(layer, DECAY)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update()
    trained = layer.weight.detach().clone()
    with ema.swapped():
        torch.testing.assert_close(layer.weight, ema.average.module.weight, atol=0, rtol=0)
    assert torch.equal(layer.weight, trained)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("ema") / "data", classes=("red", "green",
                         "blue"), per_class=10, val_per_class=4, size=24)


def config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_vit", pretrained=False,
                img_size=32, policy="feature-extract", epochs=4, lr=0.5, batch_size=4,
                ema=DECAY, monitor="val_loss", workers=0, quiet=True, device="cpu",
                cache=False)
    return TrainConfig(**(base | kw))


class Trace(Callback):
    """The head after every optimizer step, and the average at the end of every epoch."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.steps: list[dict[str, torch.Tensor]] = []
        self.averages: list[dict[str, torch.Tensor]] = []

    def on_run_start(self, trainer: Any) -> None:
        self.start = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}

    def on_train_step_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        self.steps.append({k: v.clone() for k, v in trainer.model.head.state_dict().items()})

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        self.averages.append({k: v.clone() for k, v in
                              trainer.ema.average.module.state_dict().items()})


def test_a_run_averages_every_step_and_keeps_the_better_weights(data: Path,
                                                                tmp_path: Path) -> None:
    trace = Trace()
    result = fit(config(data, tmp_path / "run"), callbacks=[trace])
    # --ema on a frozen backbone trains the head by steps (no convex solve): 30 images / 4
    run = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run["solver"] == "sgd" and len(trace.steps) == 4 * 8
    # the average is the formula over the steps the head took, from its starting weights
    want = trace.start
    for step in trace.steps:
        want = {k: DECAY * want[k] + (1 - DECAY) * step[k] for k in want}
    for k, v in want.items():
        torch.testing.assert_close(trace.averages[-1][k], v, atol=1e-6, rtol=0, msg=k)

    rows = result.history
    assert all({"ema_val_loss", "ema_val_accuracy", "ema_val_balanced_accuracy"} <= set(r)
               for r in rows)
    # each epoch's candidate is the better of the two; best is the best candidate
    candidates = [min(r["val_loss"], r["ema_val_loss"]) for r in rows]
    best = min(range(len(rows)), key=candidates.__getitem__)
    s = result.summary
    assert s["best_epoch"] == best + 1 and s["best_score"] == pytest.approx(candidates[best])
    source = "ema" if rows[best]["ema_val_loss"] < rows[best]["val_loss"] else "model"
    assert s["best_weights"] == source and s["ema"] == DECAY
    tensors, meta, _ = read_checkpoint(tmp_path / "run" / "checkpoints" / "best")
    assert meta["weights"] == source
    if source == "ema":  # the file holds the average of that epoch, and its accuracy
        for k, v in trace.averages[best].items():
            assert torch.equal(tensors[f"head.{k}"], v), k
        assert s["best_val_accuracy"] == rows[best]["ema_val_accuracy"]
    # the run's model keeps the trained weights (the average only went in to be evaluated)
    for k, v in trace.steps[-1].items():
        assert torch.equal(result.model.head.state_dict()[k], v), k


def test_the_average_wins_where_the_weights_oscillate(data: Path, tmp_path: Path) -> None:
    """A rate far too large makes the head jump about; the average is the better one."""
    trace = Trace()
    result = fit(config(data, tmp_path / "run", lr=50.0, optimizer="sgd", momentum=0.0,
                        scheduler="constant", warmup_epochs=0), callbacks=[trace])
    s = result.summary
    assert s["best_weights"] == "ema"
    # checkpoints/best (what `tlreg export` ships) holds that epoch's average
    tensors, meta, _ = read_checkpoint(tmp_path / "run" / "checkpoints" / "best")
    assert meta["weights"] == "ema"
    for k, v in trace.averages[s["best_epoch"] - 1].items():
        assert torch.equal(tensors[f"head.{k}"], v), k
    row = result.history[s["best_epoch"] - 1]
    assert s["best_val_accuracy"] == row["ema_val_accuracy"]


def test_resume_restores_the_average_exactly(data: Path, tmp_path: Path) -> None:
    """Ctrl-C after epoch 2, then --resume: the same epochs and the same average, bitwise."""

    def interrupt(trainer: Any, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    whole = fit(config(data, tmp_path / "whole"))
    with pytest.raises(Interrupted):
        fit(config(data, tmp_path / "half"), callbacks=[interrupt])
    resumed = fit(resume=tmp_path / "half")
    timing = {"seconds", "images_per_second"}
    assert ([{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
            == [{k: v for k, v in r.items() if k not in timing} for r in whole.history])
    _, _, a = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last")
    _, _, b = read_checkpoint(tmp_path / "half" / "checkpoints" / "last")
    ema = [k for k in a if k.startswith("extra.ema.")]
    assert ema and all(torch.equal(a[k], b[k]) for k in ema)
    assert resumed.summary["best_weights"] == whole.summary["best_weights"]


@pytest.mark.parametrize("bad", [{"ema": 1.0}, {"ema": 0.0}, {"ema": -0.5}, {"ema": "high"}])
def test_bad_decays_are_one_clear_error(bad: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="ema"):
        TrainConfig(data="d", out="o", **bad)


def test_ema_with_a_convex_solve_is_refused_before_training(data: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--ema averages the weights over gradient steps"):
        fit(config(data, tmp_path / "run", solver="cv"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_takes_ema(cli: Any, data: Path, tmp_path: Path) -> None:
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "bad"), "--ema", "2")
    assert code == 2 and "ema must be in (0, 1), got 2.0" in err
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "run"), "--ema", "0.9",
                         "--backbone", "timm:test_vit", "--no-pretrained", "--img-size", "32",
                         "--policy", "feature-extract", "--epochs", "2", "--workers", "0",
                         "--device", "cpu", "--quiet")
    assert code == 0, err
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["ema"] == 0.9 and summary["best_weights"] in ("model", "ema")


def test_fine_tuning_averages_the_whole_model(data: Path, tmp_path: Path) -> None:
    """On the image path the average covers the backbone too (BatchNorm statistics included)."""
    trace = Trace()
    fit(config(data, tmp_path / "run", backbone="timm:test_resnet", policy="finetune",
               epochs=1, lr=1e-3, augment=False, lp_ft=False), callbacks=[trace])
    average = trace.averages[0]
    assert any(k.startswith("backbone.") and "running_mean" in k for k in average)
    assert any(k.startswith("backbone.") for k in average if "conv" in k or "weight" in k)
