"""Loggers: RUN/log.csv always; TensorBoard and MLflow runs read back with their own readers.

TensorBoard through `tensorboard`'s EventAccumulator, MLflow through `MlflowClient`: every
epoch metric of the history at its epoch, the per-step loss and lr, the config as
hyperparameters, training.png; a Ctrl-C and `--resume` continue the same MLflow run and leave
TensorBoard one value per step. The extras are optional: their tests skip without them.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from images import colour_folder

from tlreg.engine import loggers
from tlreg.engine.callbacks import Callback
from tlreg.engine.config import TrainConfig
from tlreg.engine.loggers import TensorBoardLog, epoch_scalars
from tlreg.engine.trainer import Interrupted, fit
from tlreg.errors import UsageError

STEPS = 2  # 16 training images in batches of 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("log") / "data", per_class=8, val_per_class=3,
                         size=24)


def tiny(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, epochs=2, workers=0, quiet=True, device="cpu",
                cache=False, policy="feature-extract", solver="sgd", lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def epoch_metrics(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """name -> [(epoch, value)]: what every logger must hold."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for name, value in epoch_scalars(row).items():
            out.setdefault(name, []).append((row["epoch"], value))
    return out


class Interrupt(Callback):
    """Ctrl-C on the given epoch's last step."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_step_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        if len(trainer.history) == self.epoch and step == STEPS - 1:
            raise KeyboardInterrupt


def test_csv_log_has_one_row_per_epoch_with_the_history_values(data: Path,
                                                               tmp_path: Path) -> None:
    result = fit(tiny(data, tmp_path / "run"))
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert "lr/head" in rows[0] and "val_accuracy" in rows[0]
    for row, h in zip(rows, result.history, strict=True):
        assert {k: float(v) for k, v in row.items() if k != "epoch"} == epoch_scalars(h)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert float(rows[-1]["val_accuracy"]) == history[-1]["val_accuracy"]


def test_tensorboard_run_holds_every_epoch_metric_steps_and_hparams(data: Path,
                                                                    tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    result = fit(tiny(data, tmp_path / "run", log=["tensorboard"]))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    for name, points in epoch_metrics(result.history).items():
        got = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name
    losses = [e.value for e in acc.Scalars("step/train_loss")]
    assert [e.step for e in acc.Scalars("step/train_loss")] == [1, 2, 3, 4]
    for epoch, row in enumerate(result.history):  # equal batches: the mean is the epoch's
        mean = sum(losses[epoch * STEPS:(epoch + 1) * STEPS]) / STEPS
        assert mean == pytest.approx(row["train_loss"], rel=1e-5)
    assert [e.step for e in acc.Scalars("step/lr/head")] == [1, 2, 3, 4]
    assert acc.Scalars("step/lr/head")[0].value == pytest.approx(0.05, rel=1e-6)  # no warm-up
    assert "training" in acc.Tags()["images"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert hp["lr"].number_value == config["lr"] == 0.05
    assert hp["backbone"].string_value == "timm:test_resnet"
    assert hp["policy"].string_value == "feature-extract"


def test_mlflow_run_in_the_local_default_store_on_the_image_path(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's own default store is in the working folder
    result = fit(tiny(data, tmp_path / "run", log=["mlflow"], policy="finetune", solver="auto",
                      augment=False))
    assert (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=_default_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("tlreg").experiment_id])
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run")
    assert run.data.params["policy"] == "finetune" and run.data.params["lr"] == "0.05"
    assert run.data.params["backbone"] == "timm:test_resnet"
    for name, points in epoch_metrics(result.history).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert got == points, name
    assert len(client.get_metric_history(run.info.run_id, "step/train_loss")) == 2 * STEPS
    assert any(k.startswith("step/lr/") and k != "step/lr/head" for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training.png", "summary.json", "config.yaml", "log.csv"} <= artifacts


def _default_uri(folder: Path) -> str:
    """Where MLflow's default store is: ./mlflow.db (MLflow 3) or ./mlruns (MLflow 2)."""
    db = folder / "mlflow.db"
    return f"sqlite:///{db}" if db.is_file() else (folder / "mlruns").as_uri()


def test_ctrl_c_then_resume_continues_the_same_runs(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resumed")
    run_dir = tmp_path / "run"
    cfg = tiny(data, run_dir, epochs=3, log=["tensorboard", "mlflow"])
    with pytest.raises(Interrupted):
        fit(cfg, callbacks=[Interrupt(epoch=1)])  # epoch 2's last step: epoch 1 is saved
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("resumed").experiment_id
    (killed,) = client.search_runs([exp])
    assert killed.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "val_accuracy")] == [1]

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # resumed from elsewhere: the run's own store
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = fit(resume=run_dir)
    assert not any((tmp_path / "elsewhere").iterdir())
    (run,) = client.search_runs([exp])
    assert (run.info.run_id, run.info.status) == (killed.info.run_id, "FINISHED")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for name, points in epoch_metrics(result.history).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert got == points, name
        tb = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in tb] == [1, 2, 3], name
        assert [v for _, v in tb] == pytest.approx([v for _, v in points], rel=1e-6), name
    # The interrupted epoch's steps were logged, then purged when the resumed run logged it.
    assert [e.step for e in acc.Scalars("step/train_loss")] == list(range(1, 3 * STEPS + 1))
    # MLflow cannot purge: it got each step once, with its saved epoch.
    steps = client.get_metric_history(run.info.run_id, "step/train_loss")
    assert sorted(m.step for m in steps) == list(range(1, 3 * STEPS + 1))
    with open(run_dir / "log.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_a_bad_log_name_is_one_error_before_anything_runs(data: Path, tmp_path: Path,
                                                          cli: Any) -> None:
    code, _, err = cli("train", str(data), "--out", str(tmp_path / "run"), "--log", "bogus")
    assert code == 2
    assert "log must be one of csv, tensorboard, mlflow; got 'bogus'" in err
    assert not (tmp_path / "run").exists()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": str(data), "out": str(tmp_path / "run"),
                                      "log": ["tensorboard", "wandb"]}))
    code, _, err = cli("train", "--config", str(config))
    assert code == 2 and "got 'wandb'" in err
    assert TrainConfig.from_yaml(config, log="csv,tensorboard").log == ["csv", "tensorboard"]
    code, out, _ = cli("train", "--help")
    assert "--log" in out and "tensorboard" in out


def test_mlflow_failures_a_bad_store_before_training_and_an_error_ends_the_run_failed(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a database store's artifacts in ./mlruns
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/x")
    with pytest.raises(UsageError, match="--log mlflow cannot open the tracking store "
                                         "nosuchscheme://host/x"):
        fit(tiny(data, tmp_path / "run", log=["mlflow"]))
    assert not (tmp_path / "run").exists()

    class Broken(Callback):
        def on_epoch_saved(self, trainer: Any, epoch: int) -> None:
            raise RuntimeError("disk on fire")

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RuntimeError, match="disk on fire"):
        fit(tiny(data, tmp_path / "run", log=["mlflow"]), callbacks=[Broken()])
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tlreg").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]


@pytest.mark.parametrize("name,module", [("tensorboard", "torch.utils.tensorboard"),
                                         ("mlflow", "mlflow")])
def test_a_missing_extra_names_its_install_before_training(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
        module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if not installed
    with pytest.raises(UsageError, match=rf"pip install 'tlreg\[{name}\]'"):
        fit(tiny(data, tmp_path / "run", log=[name]))
    assert not (tmp_path / "run").exists()


def test_only_rank_0_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(loggers.distributed, "is_main", lambda: False)
    log = TensorBoardLog()
    log.on_run_start(object())  # a rank > 0 never touches the trainer or the run folder
    log.on_train_step_end(object(), 0, torch.tensor(1.0))
    log.on_run_end(object(), {})
    assert (log.writer, log.active, log.global_step, log._pending) == (None, False, 1, [])
    assert log.state_dict() == {"global_step": 1}  # the same state as rank 0's
