"""Loggers: a run's numbers as it trains, to `RUN/log.csv` always, TensorBoard or MLflow.

Each logger is a Callback (tlreg.engine.callbacks) built from `TrainConfig.log` through the
name -> builder table `LOGGERS`; `csv` is always on. What they log:

* per epoch, once the epoch is saved (so an epoch killed before its checkpoint is never logged
  twice): every number of the history row under its history name (`val_accuracy`, ...; the lr
  of each parameter group as `lr/<group>`), at step = the epoch (1, 2, ...);
* per step (TensorBoard and MLflow): `step/train_loss` and `step/lr/<group>` (the lr that step
  trained with) at the run's global step (optimizer steps: 1, 2, ..., across epochs and
  `--resume`; with `--accumulate N`, one per N batches). The loss stays on the device: pending
  values are read in one sync every `FLUSH_STEPS` steps and at each epoch's end, never once a step;
* at the start, the resolved config as hyperparameters; at the end, training.png.

Only rank 0 logs (under DDP, `step/train_loss` is rank 0's shard). The optional packages are
imported when a logger is built, before any work, so a missing one is one UsageError naming
the extra; `import tlreg.engine.loggers` itself stays light (the CLI reads `LOGGERS`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import atomic_write_text
from tlreg.engine import distributed
from tlreg.engine.callbacks import Callback
from tlreg.errors import UsageError, first_line

if TYPE_CHECKING:
    import torch

#: Pending step losses are read (one device sync) this often, and at each epoch's end.
FLUSH_STEPS = 50
CSV_FILE = "log.csv"
TENSORBOARD_DIR = "tensorboard"
#: The MLflow experiment when MLFLOW_EXPERIMENT_NAME is unset.
EXPERIMENT = "tlreg"
#: Files of the run folder an MLflow run keeps as artifacts (those that exist at the end).
ARTIFACTS = ("config.yaml", "training.png", "summary.json", "history.json", CSV_FILE)


def require(module: str, extra: str) -> Any:
    """Import `module`, or raise the one-line UsageError naming tlreg's extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--log {extra} needs the `{extra}` package: "
                         f"pip install 'tlreg[{extra}]'") from None


def epoch_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A history row's numbers by name (None left out); the lr per group as `lr/<group>`."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "epoch":
            continue
        if isinstance(value, Mapping):
            out |= {f"{key}/{k}": v for k, v in value.items() if _number(v)}
        elif _number(value):
            out[key] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_params(config: Any) -> dict[str, str | int | float | bool]:
    """The config as flat hyperparameters: `policy_args.train_last`; lists and None as text."""
    out: dict[str, str | int | float | bool] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        elif isinstance(value, bool | int | float | str):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    for key, value in config.to_dict().items():
        add(key, value)
    return out


class Logger(Callback):
    """What every logger shares: rank 0 only, the global step, the loss read in batches.

    A logger implements `start`, `write_steps`, `write_epoch` and `finish`; `steps = False`
    skips the per-step values (nothing is kept or read for it).
    """

    steps = True

    def __init__(self) -> None:
        self.global_step = 0  # optimizer steps (on_train_step_end), across epochs and resumes
        self.active = False  # rank 0, between start and finish
        self._pending: list[tuple[int, torch.Tensor, dict[str, float]]] = []
        self._lr: dict[str, float] = {}

    # -- what a logger writes ---------------------------------------------------------------

    def start(self, trainer: Any) -> None:
        """The run starts (`trainer.resume`: it continues a saved one)."""

    def write_steps(self, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        """(global step, {name: value}) for the steps since the last call."""

    def write_epoch(self, trainer: Any, epoch: int, scalars: Mapping[str, float]) -> None:
        """One saved epoch (1-based), its history row as `epoch_scalars`."""

    def finish(self, trainer: Any, status: str) -> None:
        """The run ended: FINISHED, KILLED (Ctrl-C) or FAILED (an error)."""

    # -- the hooks --------------------------------------------------------------------------

    def on_run_start(self, trainer: Any) -> None:
        if distributed.is_main():
            self.start(trainer)
            self.active = True

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.active and self.steps:
            self._lr = _lrs(trainer)

    def on_train_step_end(self, trainer: Any, step: int, loss: torch.Tensor) -> None:
        self.global_step += 1  # on every rank: the state of each rank stays the same
        if not (self.active and self.steps):
            return
        self._pending.append((self.global_step, loss, self._lr))
        self._lr = _lrs(trainer)  # after the step (and a per-step scheduler): the next one's
        if len(self._pending) >= FLUSH_STEPS:
            self._flush()

    def on_epoch_saved(self, trainer: Any, epoch: int) -> None:
        if self.active:
            self._flush()
            self.write_epoch(trainer, epoch + 1, epoch_scalars(trainer.history[-1]))

    def on_run_end(self, trainer: Any, summary: Mapping[str, Any]) -> None:
        self._end(trainer, "FINISHED")

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        # The run's own error must not be hidden by one from a logger while it is closed.
        with contextlib.suppress(Exception):
            self._end(trainer, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state.get("global_step", 0))

    def _end(self, trainer: Any, status: str) -> None:
        if not self.active:
            return
        self.active = False
        try:
            self._flush()
        finally:
            self.finish(trainer, status)

    def _flush(self) -> None:
        """Every pending step's loss, read in one device sync."""
        if not self._pending:
            return
        import torch

        pending, self._pending = self._pending, []
        losses = torch.stack([loss.float() for _, loss, _ in pending]).tolist()
        self.write_steps([
            (step, {"step/train_loss": value, **{f"step/lr/{k}": v for k, v in lr.items()}})
            for (step, _, lr), value in zip(pending, losses, strict=True)])


def _lrs(trainer: Any) -> dict[str, float]:
    from tlreg.engine.optim import layer_lrs

    return layer_lrs(trainer.optimizer)


class CSVLog(Logger):
    """RUN/log.csv: one row per saved epoch, the history's numbers (lr per group as columns).

    Rewritten whole from the history (atomically) after each saved epoch, so after a kill or
    a `--resume` it holds exactly the saved epochs.
    """

    steps = False

    def write_epoch(self, trainer: Any, epoch: int, scalars: Mapping[str, float]) -> None:
        rows = [{"epoch": row["epoch"], **epoch_scalars(row)} for row in trainer.history]
        columns = list(dict.fromkeys(k for row in rows for k in row))  # new keys at the end
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # floats as repr: they read back exactly
        atomic_write_text(Path(trainer.run_dir) / CSV_FILE, buf.getvalue())


class TensorBoardLog(Logger):
    """RUN/tensorboard/: torch.utils.tensorboard's SummaryWriter (`tensorboard --logdir runs`).

    The config goes to the HParams tab and as text; training.png as an image at the end.
    """

    def __init__(self) -> None:
        super().__init__()
        require("torch.utils.tensorboard", "tensorboard")
        self.writer: Any = None

    def start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops what an epoch killed mid-way had logged past the last saved step.
        # Epoch scalars sit at steps 1..epochs <= global_step, below the purge; a run with no
        # steps (a CV-fitted head) has nothing to drop.
        purge = self.global_step + 1 if trainer.resume and self.global_step else None
        self.writer = SummaryWriter(str(Path(trainer.run_dir) / TENSORBOARD_DIR),
                                    purge_step=purge)
        if not trainer.resume:
            self._hparams(trainer)

    def _hparams(self, trainer: Any) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = config_params(trainer.config)
        metrics = dict.fromkeys(("val_accuracy", "val_loss", "train_accuracy", "train_loss",
                                 trainer.monitor.name), 0.0)
        # What add_hparams writes, but into this run (add_hparams makes a run of its own and
        # logs the metric values it is given as scalars).
        file_writer = self.writer._get_file_writer()
        for summary in hparams(params, metrics):
            file_writer.add_summary(summary)
        text = trainer.config.to_yaml()
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))

    def write_steps(self, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        for step, values in rows:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def write_epoch(self, trainer: Any, epoch: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def finish(self, trainer: Any, status: str) -> None:
        try:
            png = Path(trainer.run_dir) / "training.png"
            if status != "FAILED" and png.is_file():  # summary.json's plot of this run
                import numpy as np
                from PIL import Image

                with Image.open(png) as img:
                    pixels = np.asarray(img.convert("RGB"))
                self.writer.add_image("training", pixels, len(trainer.history),
                                      dataformats="HWC")
        finally:
            self.writer.close()


class MLflowLog(Logger):
    """An MLflow run through MLflow's own client, in MLflow's tracking store.

    The store is MLFLOW_TRACKING_URI's; else, for `--resume`, the one the run was started in
    (from any folder); else MLflow's local default in the working folder (MLflow 3:
    `mlflow.db`, artifacts in `mlruns/`; MLflow 2: `mlruns/`). The experiment is
    MLFLOW_EXPERIMENT_NAME's, else `tlreg`. `--resume` continues the same MLflow run (its id
    and store are in the callback state), or starts a new one where the store lacks it.

    An epoch's step values are sent with the epoch, once it is saved: MLflow cannot take a
    point back (TensorBoard's `purge_step`), and a run killed mid-epoch redoes that epoch's
    steps when resumed, so sending them earlier logged them twice. A run that ends before its
    epoch is saved drops them, as its history does.
    """

    def __init__(self, resume: bool = False) -> None:
        super().__init__()
        require("mlflow", "mlflow")
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self.client: Any = None
        self._stored_uri: str | None = None
        self._unsaved: list[tuple[int, dict[str, float]]] = []  # steps of the epoch under way
        # A bad store is one error before any work: here, or for a resumed run (which has no
        # probe phase) when it starts, once its state has said which store it is in.
        if distributed.is_main() and not (resume and not _env_uri()):
            self.client = self._client(_env_uri())

    def _client(self, uri: str | None) -> Any:
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = uri or mlflow.get_tracking_uri()
        try:
            client = MlflowClient(tracking_uri=uri)
        except Exception as exc:  # MLflow raises its own exceptions, and ImportErrors
            raise UsageError(f"--log mlflow cannot open the tracking store {uri}: "
                             f"{first_line(exc)}") from None
        self.tracking_uri = uri
        return client

    def start(self, trainer: Any) -> None:
        from mlflow.entities import Param

        uri = _env_uri() or self.tracking_uri or self._stored_uri
        if self.client is None or uri != self.tracking_uri:
            self.client = self._client(uri)
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                return
            except Exception:  # the store lost it: a new MLflow run for the rest
                trainer.say(f"note: MLflow run {self.run_id} is not in {self.tracking_uri}; "
                            "logging the rest of this run to a new one")
        run_dir = Path(trainer.run_dir)
        run = self.client.create_run(self._experiment(), run_name=run_dir.name, tags={
            "tlreg.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:500]) for k, v in config_params(trainer.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # another run created it first
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return str(found.experiment_id)

    def _log(self, points: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for step, values in points for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def write_steps(self, rows: Sequence[tuple[int, dict[str, float]]]) -> None:
        self._unsaved.extend(rows)

    def write_epoch(self, trainer: Any, epoch: int, scalars: Mapping[str, float]) -> None:
        rows, self._unsaved = self._unsaved, []
        self._log([*rows, (epoch, scalars)])

    def finish(self, trainer: Any, status: str) -> None:
        rows, self._unsaved = self._unsaved, []
        if status == "FINISHED":  # steps after the last saved epoch (none in tlreg's loop)
            self._log(rows)
        try:
            for name in ARTIFACTS:
                path = Path(trainer.run_dir) / name
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
        finally:
            self.client.set_terminated(self.run_id, status)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id,
                "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")
        self._stored_uri = state.get("tracking_uri")


def _env_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or None


#: name -> builder `(resume) -> Logger`: what `--log NAME` (TrainConfig.log) can name; `csv`
#: is always on.
LOGGERS: dict[str, Callable[[bool], Logger]] = {
    "csv": lambda resume: CSVLog(),
    "tensorboard": lambda resume: TensorBoardLog(),
    "mlflow": MLflowLog,
}


def build_loggers(names: Sequence[str], resume: bool = False) -> list[tuple[str, Logger]]:
    """The run's loggers, named `log:NAME` in the callback states: csv, then `names`."""
    return [(f"log:{name}", LOGGERS[name](resume)) for name in dict.fromkeys(("csv", *names))]
