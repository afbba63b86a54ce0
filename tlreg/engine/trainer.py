"""`fit(config)`: one training run, wired from the engine's parts.

The Trainer resolves the config into a plan, builds the model, runs the probe phase
(tlreg.engine.probe), then drives one epoch loop over a fitter: SGD over cached features or
images (tlreg.engine.loop), or a convex fit (tlreg.engine.fitters). Callbacks
(tlreg.engine.callbacks) hook into it; the run folder is tlreg.runs'. The CLI's `tlreg train`
only builds the config.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import checkpoint_dir
from tlreg.engine import distributed, epoch_end, prepare, probe, record, replicas, sharding
from tlreg.engine.callbacks import Callback, Callbacks, Monitor
from tlreg.engine.config import TrainConfig
from tlreg.engine.loggers import build_loggers
from tlreg.errors import TlregError, UsageError
from tlreg.runs import rundir

if TYPE_CHECKING:
    import torch

    from tlreg.data.augment import Augment
    from tlreg.data.sources import DataSplit
    from tlreg.engine.ema import EMA
    from tlreg.engine.loop import Fitter
    from tlreg.engine.objective import Evaluation
    from tlreg.engine.runtime import Runtime
    from tlreg.engine.solver import HeadFit
    from tlreg.models.transfer import TransferModel


class Interrupted(TlregError):
    """Ctrl-C: the last completed epoch is saved and the run can be resumed."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    model: TransferModel = field(repr=False)


CallbackLike = Callback | Callable[["Trainer", int], None]


def fit(config: TrainConfig | None = None, *, resume: str | Path | None = None,
        callbacks: Sequence[CallbackLike] = (), **options: Any) -> RunResult:
    """Train a TransferModel; `resume=RUN_DIR` continues an interrupted run exactly.

    Options are TrainConfig fields: `fit(data="imgs", out="runs/a", backbone="resnet18")`.
    `callbacks`: `tlreg.engine.callbacks.Callback` objects, or functions called as
    `fn(trainer, epoch)` after each epoch is saved (`config.callbacks` names registered ones).
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} is not a tlreg run (no config.yaml)")
        if checkpoint_dir(run_dir / "checkpoints" / "last") is None:  # before reading the rest
            raise UsageError(f"cannot resume {run_dir}: no completed epoch was saved; start it "
                             f"again (the same --out {run_dir} works)")
        # The folder being resumed is the run, wherever it was first created (or moved to).
        config = TrainConfig.from_yaml(run_dir / "config.yaml", **{**options, "out": str(run_dir)})
        if "batch_size" not in options:
            config = config.replace(batch_size=_resume_batch_size(run_dir, config.batch_size))
        return _run(Trainer(config, resume=True, callbacks=callbacks))
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = config.replace(**options)
    return _run(Trainer(config, callbacks=callbacks))


def lr_find(config: TrainConfig | None = None, **options: Any) -> Any:
    """The learning-rate range test alone (`tlreg lr-find`): the same setup as `fit` (data,
    model, policy, the LP-FT head, cached features when the backbone is frozen), then the
    sweep; writes OUT/lr_find.json and OUT/lr_find.png and returns the
    `tlreg.engine.lr_find.Sweep`. Nothing trains: every weight is as it was."""
    if config is None:
        config = TrainConfig(**options)
    elif options:
        config = config.replace(**options)
    from tlreg.engine.runtime import resolve_device, reuse_freed_memory

    trainer = Trainer(config.replace(lr=None, lr_find=True))
    with distributed.session(config.device), reuse_freed_memory(resolve_device(config.device)):
        try:
            return trainer.sweep_lr()
        finally:
            trainer.leave_group()


def _run(trainer: Trainer) -> RunResult:
    from tlreg.engine.runtime import resolve_device, reuse_freed_memory

    # Under torchrun, join the process group for this run (a no-op for one process).
    with distributed.session(trainer.config.device), trainer.locked(), \
            reuse_freed_memory(resolve_device(trainer.config.device)):
        try:
            return trainer.run()
        finally:
            trainer.leave_group()


def _resume_batch_size(run_dir: Path, batch_size: int) -> int:
    """The per-process batch that keeps the run's global batch with this many processes.

    So a run resumed on another number of processes keeps its global batch, LR schedule and
    data order; when the global batch does not divide, the user must choose.
    """
    global_batch = int(rundir.read_run_json(run_dir).get("global_batch_size") or batch_size)
    world = distributed.planned_world()
    if global_batch % world:
        raise UsageError(f"cannot resume {run_dir} on {world} processes: its global batch of "
                         f"{global_batch} does not divide by {world}; pass --batch-size B to "
                         "choose the per-process batch (the global batch then changes)")
    return global_batch // world


class Trainer:
    """One run: resolve the config, build data and model, train, evaluate, save."""

    def __init__(self, config: TrainConfig, resume: bool = False,
                 callbacks: Sequence[CallbackLike] = ()) -> None:
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.out)
        self.callbacks = Callbacks.of(config.callbacks, config.callback_args, callbacks)
        self.callbacks.named[:0] = build_loggers(config.log, resume)  # log.csv, --log ...
        self.monitor = Monitor(config.monitor or "val_accuracy", config.min_delta)
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None  # the monitored metric of checkpoints/best
        self.best_epoch: int | None = None
        self.start_epoch = 0
        self.stop_reason: str | None = None  # a callback's request_stop, shared by all ranks
        self._stop_asked: str | None = None  # this rank's request, not yet shared
        self.feature_seconds: float | None = None
        self.head_fit: HeadFit | None = None  # the CV fit that is the run (--solver cv)
        self.lp_fit: HeadFit | None = None  # LP-FT's first phase
        self.decision: Any = None  # what --policy auto chose (tlreg.engine.auto.Decision)
        self.augment: Augment | None = None  # the training augmentation the probe measured
        self.probe_xy: tuple[torch.Tensor, torch.Tensor] | None = None
        self.best_thresholds: list[float] | None = None  # multi-label: the best epoch's
        self.best_calibration: dict[str, Any] | None = None  # the best epoch's T, fitted on val
        self.familiarity: dict[str, Any] | None = None  # the feature bank's size (frozen runs)
        self.class_weight: torch.Tensor | None = None  # --class-weights, on the device
        self.ema: EMA | None = None  # --ema: the average of what trains
        self.best_from = "model"  # whose weights checkpoints/best holds: model or ema
        self.lr_sweep: Any = None  # --lr find's range test (tlreg.engine.lr_find.Sweep)
        self._built_feed: tuple[Any, Runtime | None] | None = None

    def say(self, message: str) -> None:
        _say(self.config, message)

    def request_stop(self, reason: str) -> None:
        """End the run after this epoch is saved (status completed, `stop_reason` recorded)."""
        self._stop_asked = self._stop_asked or reason

    def leave_group(self) -> None:
        """Release what holds the process group (the DDP wrapper) before the session ends."""
        if self._built_feed is not None and hasattr(self._built_feed[0], "release"):
            self._built_feed[0].release()

    def locked(self) -> Any:
        """One writer per run folder (rank 0 under DDP; tlreg.runs.rundir.locked)."""
        if not distributed.is_main():
            return contextlib.nullcontext()
        return rundir.locked(self.run_dir, self.resume, self.say)

    # -- set-up -----------------------------------------------------------------------------

    def plan(self, train_images: int) -> None:
        """The run's plan from what was asked (called again after `--policy auto` decided)."""
        from tlreg.engine.plan import plan_run

        p = plan_run(self.requested, self.model, self.spec, train_images=train_images,
                     resume=self.resume, say=self.say)
        self.config, self.use_features, self.frozen_run = p.config, p.use_features, p.frozen_run
        self.auto, self.defaults_rule = p.auto, p.defaults_rule

    def augment_spec(self) -> Augment:
        """The training augmentation: the config's values, timm's where it has none."""
        from tlreg.data.augment import of_config

        return of_config(self.config)

    def _setup(self, check_out: bool = True) -> DataSplit:
        """Everything before the first epoch: data, model on its device, probe, optimizer."""
        import torch

        from tlreg.data.sources import open_source
        from tlreg.engine.inputs import Inputs
        from tlreg.engine.runtime import Runtime, autocast_dtype, resolve_device, seed_everything

        cfg = self.config
        if check_out:
            rundir.check_out_dir(self.run_dir, self.resume)
        data = open_source(cfg.data, cfg.val_split, cfg.seed, cfg.source_args)
        seed_everything(cfg.seed)
        prepare.watch(self, data)
        prepare.resolve(self, data)
        cfg = self.config
        device = distributed.device_for(resolve_device(cfg.device))
        self.runtime = Runtime(device, autocast_dtype(cfg.precision, device), cfg.channels_last)
        self.device = device
        self.runtime.set_threads(loader_workers=cfg.workers)
        self.inputs = Inputs(cfg, self.data_config, self.runtime, self.say)
        prepare.weigh(self, data, device)
        model = self.model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        # Under DDP: batch_size is per process; the global batch (and lr, with --lr-scaling
        # linear) scale with the number of processes, and run.json records both.
        self.world = distributed.world()
        self.global_batch = cfg.batch_size * self.world
        self.lr_scale = self.world if cfg.lr_scaling == "linear" else 1
        if cfg.sync_bn and not replicas.convert_sync_batchnorm(model, device):
            self.say("note: --sync-bn changes nothing here (one process, or no BatchNorm)")
        if not self.resume:
            probe.probe_phase(self, data)  # --policy auto decides here; LP of LP-FT
            cfg = self.config
        self.inputs.config = cfg
        self.build_optimizer(data)
        if cfg.lr_find and not self.resume:
            prepare.find_lr(self, data)
        return data

    def build_optimizer(self, data: DataSplit) -> None:
        """The optimizer (layer-wise rates) and scheduler, built once for the whole run."""
        from tlreg.engine.optim import build_optimizer as layerwise
        from tlreg.engine.schedulers import build_scheduler

        cfg = self.config
        self.optimizer = layerwise(
            self.model, cfg.optimizer, lr=cfg.lr * self.lr_scale, layer_decay=cfg.layer_decay,
            weight_decay=cfg.weight_decay, backbone_lr_mult=cfg.backbone_lr_mult,
            min_lr=cfg.min_lr * self.lr_scale, momentum=cfg.momentum)
        steps = -(-sharding.steps_per_epoch(len(data.train), cfg.batch_size,
                                            features=self.use_features) // cfg.accumulate)
        self.scheduler, self.interval = build_scheduler(
            self.optimizer, cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=steps,
            warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size, gamma=cfg.gamma,
            min_lr=cfg.min_lr * self.lr_scale)

    def sweep_lr(self) -> Any:
        """`tlreg lr-find`: the range test alone, OUT/lr_find.json and .png; trains nothing."""
        self._setup(check_out=False)
        if distributed.is_main():
            record.write_lr_find(self.run_dir, self.lr_sweep)
        return self.lr_sweep

    def run(self) -> RunResult:
        data = self._setup()
        cfg = self.config
        if cfg.ema is not None:  # from the weights training starts at (after LP-FT's fit)
            from tlreg.engine.ema import EMA

            self.ema = EMA(self.model.head if self.use_features else self.model, cfg.ema)
        distributed.barrier()  # every rank checked --out before rank 0 creates it
        if self.resume:
            rundir.check_resume(self.run_dir, self.fingerprint(data), cfg.resume_anyway,
                                self.say)
            record.load_last(self)
        else:
            self._previous_wall = 0.0
            record.write_start(self, data)
        self.data = data
        started = time.perf_counter()
        status = "completed"
        try:
            self.callbacks.call("on_run_start", self)
            self._epochs(self._fitter(data))
        except KeyboardInterrupt as stop:
            status, interrupt = "interrupted", stop
        except BaseException as exc:
            self.callbacks.call("on_exception", self, exc)
            raise
        wall = time.perf_counter() - started + self._previous_wall
        if status == "completed":
            record.write_familiarity(self)
        summary = record.write_summary(self, data, wall, status)
        if status == "interrupted":
            self.callbacks.call("on_exception", self, interrupt)
            raise Interrupted(f"interrupted; epochs 1-{len(self.history)} are saved. Continue "
                              f"with: tlreg train --resume {self.run_dir}")
        self.callbacks.call("on_run_end", self, summary)
        return RunResult(self.run_dir, summary, self.history, self.model)

    def fingerprint(self, data: DataSplit) -> dict[str, Any]:
        return rundir.fingerprint(self.config, (*data.train, *data.val), data.classes,
                                  len(data.train), len(data.val), self.data_config)

    # -- the epoch loop ---------------------------------------------------------------------

    def feed(self, data: DataSplit) -> tuple[Any, Runtime | None]:
        """The loop's batches (cached features, or images) and their runtime; built once."""
        from tlreg.engine.feeds import FeatureFeed, ImageFeed

        if self._built_feed is not None:
            return self._built_feed
        cfg = self.config
        if self.use_features:
            cache = probe.feature_cache(self)
            t0 = time.perf_counter()
            x_train, y_train = self.probe_xy or self.inputs.features(
                self.model, list(data.train), cache)
            x_val, y_val = self.inputs.features(self.model, list(data.val), cache)
            self.feature_seconds = time.perf_counter() - t0 + (self.feature_seconds or 0.0)
            self.say(f"features: {len(x_train)} train + {len(x_val)} val images "
                     f"in {self.feature_seconds:.1f}s")
            feed: Any = FeatureFeed(self.model.head, x_train, y_train, x_val, y_val,
                                    global_batch=self.global_batch,
                                    label_smoothing=cfg.label_smoothing,
                                    balanced=cfg.sampler == "balanced")
            runtime = None  # the head on float features: no autocast (as it always trained)
        else:
            self.inputs.prepare(data, self.augment_spec())
            feed = ImageFeed(self.model, self.inputs, data, compile=cfg.compile,
                             label_smoothing=cfg.label_smoothing)
            runtime = self.runtime
        self._built_feed = feed, runtime
        return self._built_feed

    def _fitter(self, data: DataSplit) -> Fitter:
        """SGD over features or images, or a convex fit of the head (--solver cv / lbfgs)."""
        from tlreg.engine.fitters import LBFGS, CrossValidated
        from tlreg.engine.loop import SGD

        cfg = self.config
        feed, runtime = self.feed(data)
        if self.use_features:
            if cfg.solver == "cv":
                def fit_once(x: torch.Tensor, y: torch.Tensor) -> HeadFit:
                    self.head_fit = probe.fit_head(self, x, y)  # summary.json: head_fit
                    return self.head_fit

                return CrossValidated(feed, fit_once, self.head_fit, cfg.label_smoothing)
            if cfg.solver == "lbfgs":
                return LBFGS(feed, weight_decay=cfg.weight_decay,
                             label_smoothing=cfg.label_smoothing,
                             class_weight=self.class_weight)
        return SGD(feed, optimizer=self.optimizer, scheduler=self.scheduler,
                   per_step=self.interval == "step", epochs=cfg.epochs,
                   label_smoothing=cfg.label_smoothing, runtime=runtime,
                   class_weight=self.class_weight, accumulate=cfg.accumulate,
                   clip_grad=cfg.clip_grad,
                   on_step=self._after_step)

    def _after_step(self, step: int, loss: torch.Tensor) -> None:
        if self.ema is not None:
            self.ema.update()
        self.callbacks.call("on_train_step_end", self, step, loss)

    def _epochs(self, fitter: Fitter) -> None:
        import torch

        from tlreg.engine.inputs import require_readable
        from tlreg.engine.runtime import compile_seconds, epoch_seed
        from tlreg.progress import Progress

        cfg = self.config
        timing = cfg.compile and not self.use_features
        with Progress(quiet=cfg.quiet or not distributed.is_main()) as progress:
            for epoch in range(self.start_epoch, min(cfg.epochs, fitter.epochs or cfg.epochs)):
                if self.stop_reason is not None:  # resumed after a stop was saved
                    break
                t = time.perf_counter()
                compiled_before = compile_seconds() if timing else 0.0
                self.model.apply_policy(epoch)
                seed = epoch_seed(cfg.seed, epoch)
                torch.manual_seed(seed)
                random.seed(seed)
                self.callbacks.call("on_epoch_start", self, epoch)
                stats = fitter.train_epoch(epoch, seed, progress)
                if stats.images == 0:
                    require_readable(self.data.train, len(self.data.train))
                if fitter.steps_scheduler and self.interval == "epoch":
                    self.scheduler.step()
                evaluation = fitter.evaluate()
                averaged = None
                if self.ema is not None:
                    with self.ema.swapped():
                        averaged = fitter.evaluate()
                compiling = (compile_seconds() - compiled_before) if timing else None
                self._end_epoch(epoch, stats.loss, stats.accuracy, evaluation, stats.images,
                                time.perf_counter() - t + stats.extra_seconds,
                                compiling, averaged)
                if self.stop_reason is not None:
                    break

    @property
    def thresholds(self) -> list[float] | None:
        """Multi-label: the thresholds tuned on this epoch's val, which the model carries."""
        return list(self.model.info.thresholds) or None

    def _end_epoch(self, epoch: int, train_loss: float, train_acc: float,
                   evaluation: Evaluation, images: int, seconds: float,
                   compiling: float | None = None, averaged: Evaluation | None = None) -> None:
        epoch_end.end_epoch(self, epoch, train_loss, train_acc, evaluation, images, seconds,
                            compiling, averaged)

    # -- the run's record -------------------------------------------------------------------

    def best_row(self) -> dict[str, Any]:
        """The best epoch's history row, with the average's val metrics when --ema won it."""
        row = self.history[self.best_epoch - 1] if self.best_epoch else {}
        if self.best_from == "ema":
            row = {**row, **{k[4:]: v for k, v in row.items() if k.startswith("ema_")}}
        return row




def _say(config: TrainConfig, message: str) -> None:
    if not config.quiet and distributed.is_main():
        print(message, file=sys.stderr if os.environ.get("TLREG_LOG_STDERR") else sys.stdout,
              flush=True)

