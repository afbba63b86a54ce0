"""The training engine: feature extraction, fine-tuning and scheduled unfreezing.

`fit(config)` is the whole job; the CLI's `tlreg train` only builds the config. When the
backbone stays frozen for the whole run and the transforms are deterministic, pooled features
are computed once (and cached on disk) and only the head trains on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import (
    atomic_write_json,
    atomic_write_text,
    read_checkpoint,
    save_checkpoint,
    save_tensors,
)
from tlreg.engine import distributed
from tlreg.engine.config import TrainConfig
from tlreg.errors import TlregError, UsageError
from tlreg.runs.checkpoint import write_model_json

if TYPE_CHECKING:
    import torch

    from tlreg.data.augment import Augment
    from tlreg.data.decoded import DecodedImages
    from tlreg.data.images import DataSplit, Sample
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


Callback = Callable[["Trainer", int], None]


def fit(config: TrainConfig | None = None, *, resume: str | Path | None = None,
        callbacks: Sequence[Callback] = (), **options: Any) -> RunResult:
    """Train a TransferModel; `resume=RUN_DIR` continues an interrupted run exactly.

    Options are TrainConfig fields: `fit(data="imgs", out="runs/a", backbone="resnet18")`.
    Each callback is called as `callback(trainer, epoch)` after every epoch is saved.
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"cannot resume: {run_dir} is not a tlreg run (no config.yaml)")
        from tlreg._io import checkpoint_dir

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


def _run(trainer: Trainer) -> RunResult:
    # Under torchrun, join the process group for this run (a no-op for one process).
    with distributed.session(trainer.config.device), trainer.locked():
        return trainer.run()


def _resume_batch_size(run_dir: Path, batch_size: int) -> int:
    """The per-process batch that keeps the run's global batch with this many processes.

    So a run resumed on another number of processes keeps its global batch, LR schedule and
    data order; when the global batch does not divide, the user must choose.
    """
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return batch_size
    global_batch = int(run.get("global_batch_size") or batch_size)
    world = distributed.planned_world()
    if global_batch % world:
        raise UsageError(f"cannot resume {run_dir} on {world} processes: its global batch of "
                         f"{global_batch} does not divide by {world}; pass --batch-size B to "
                         "choose the per-process batch (the global batch then changes)")
    return global_batch // world


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_DECODE_CHUNK = 1024  # images decoded at a time by the CPU feature pass
AUGMENT_SAMPLE = 256  # training images the augmentation check shows the probe


def _epoch_seed(seed: int, epoch: int) -> int:
    # Each epoch's randomness depends only on (seed, epoch): a resumed run replays it exactly.
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available here")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32. `auto` is bf16 on CUDA that supports it, fp32 on CPU (slower there)."""
    import torch

    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 autocast needs CUDA; use --precision bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """One run: resolve the config, build data and model, train, evaluate, save."""

    def __init__(self, config: TrainConfig, resume: bool = False,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.config = config
        self.resume = resume
        self.callbacks = list(callbacks)
        self.run_dir = Path(config.out)
        self.history: list[dict[str, Any]] = []
        self.skipped: set[str] = set()
        self.best_acc = -1.0
        self.start_epoch = 0
        self.decoded_train = self.decoded_val = None
        self._extract: torch.nn.Module | None = None  # the feature pass's folded backbone
        self._said_off = False  # an explicit --decoded-cache that cannot apply, said once
        self.feature_seconds: float | None = None
        self.head_fit: HeadFit | None = None  # the CV fit that is the run (--solver cv)
        self.lp_fit: HeadFit | None = None  # LP-FT's first phase
        self.decision: Any = None  # what --policy auto chose (tlreg.engine.auto.Decision)
        self.augment: Augment | None = None  # the training augmentation the probe measured
        self._probe_xy: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- set-up -----------------------------------------------------------------------------

    def _unstarted(self) -> bool:
        """A run folder killed before its first epoch was saved: nothing in it to keep."""
        from tlreg.lock import LOCK_NAME

        if not (self.run_dir / "config.yaml").is_file():
            return False
        if (self.run_dir / "checkpoints" / "last").exists() or (
                self.run_dir / "checkpoints" / ".last.old").exists():
            return False
        return all(p.name in _RUN_FILES or p.name == LOCK_NAME or p.name.startswith(".")
                   for p in self.run_dir.iterdir())

    def _clean_stale(self) -> None:
        """Under the lock, nobody else writes here: leftovers of killed writers go."""
        if not self.run_dir.is_dir():
            return
        if not self.resume and self._unstarted():
            _say(self.config, f"note: {self.run_dir} holds a run killed before its first "
                              "epoch; starting it again")
            _remove(self.run_dir / name for name in _RUN_FILES)
        for folder in (self.run_dir, self.run_dir / "checkpoints"):
            _remove(folder.glob(".*.tmp*") if folder.is_dir() else [])

    def _check_out_dir(self) -> None:
        from tlreg.lock import LOCK_NAME

        if self.resume:
            return
        if self.run_dir.exists() and self.run_dir.is_dir() and self._unstarted():
            return  # cleaned under the lock (_clean_stale)
        if self.run_dir.exists() and (not self.run_dir.is_dir() or any(
                p.name != LOCK_NAME and not _leftover(p.name) for p in self.run_dir.iterdir())):
            raise UsageError(f"output folder {self.run_dir} already exists and is not empty; "
                             f"choose another --out, or continue it with --resume {self.run_dir}")

    def locked(self) -> Any:
        """One writer per run folder (rank 0 under DDP): a second `tlreg train` with the same
        --out (or --resume) is refused with the other process's pid (tlreg.lock)."""
        from tlreg.lock import exclusive

        if not distributed.is_main():
            return contextlib.nullcontext()
        self._check_out_dir()  # before creating anything in a folder that is not ours
        if self.resume and not self.run_dir.is_dir():
            return contextlib.nullcontext()  # run() says it is not a run
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self._guarded(exclusive(self.run_dir, created=created), created)

    @contextlib.contextmanager
    def _guarded(self, lock: Any, created: bool) -> Iterator[None]:
        """A new run that fails before its first epoch is saved leaves no folder behind.

        Otherwise the user would be stuck: --out is not empty, and --resume has no epoch to
        continue from.
        """
        with lock:
            self._clean_stale()
            try:
                yield
            except BaseException:
                if created and not (self.run_dir / "checkpoints" / "last").exists():
                    _remove(self.run_dir / name for name in _RUN_FILES)
                raise

    def _resolve(self, data: DataSplit) -> None:
        from tlreg.models.backbones import get_backbone
        from tlreg.models.transfer import build_from_info, create_model

        cfg = self.config
        self.spec = get_backbone(cfg.backbone)
        cfg = cfg.replace(head=cfg.head or self.spec.head, policy=cfg.policy or self.spec.policy,
                          layer_decay=cfg.layer_decay or self.spec.layer_decay)
        if not self.resume:
            cfg = cfg.replace(policy_args=_lp_ft_args(cfg, cfg.policy, cfg.policy_args))
        self.requested = cfg  # what the user asked for; _plan() fills in the rest from it
        if self.resume:
            from tlreg._io import read_json
            from tlreg.runs.checkpoint import info_from_dict

            meta = read_json(self.run_dir / "model.json")
            self.model = build_from_info(info_from_dict(meta["info"]), pretrained=False)
            self.pretrained_sha256 = meta.get("pretrained_sha256")
        else:
            self.model = create_model(
                cfg.backbone, len(data.classes), head=cfg.head, head_args=cfg.head_args,
                policy=cfg.policy, policy_args=cfg.policy_args, pretrained=cfg.pretrained,
                weights=cfg.weights, label_names=data.classes)
            self.pretrained_sha256 = None
        self.data_config = _data_config(self.model, cfg.img_size)
        if cfg.img_size and not self.resume:
            from dataclasses import replace

            self.model.info = replace(self.model.info, data_config=self.data_config)
        self._plan(len(data.train))

    def _plan(self, train_images: int) -> None:
        """Features or images, solver, epochs, rate and warm-up, from the policy and the data.

        Called again after `--policy auto` has decided. Values the user set are kept as they
        are; the rest follow the rules in tlreg.engine.auto (docs/training.md).
        """
        from tlreg.engine.auto import finetune_defaults

        cfg, model = self.requested, self.model
        self.auto = model.policy.name == "auto" and not self.resume
        horizon = cfg.epochs or 10
        frozen_run = all(model.policy.plan(model.num_stages, e).backbone_frozen
                         for e in range(horizon))
        augment = cfg.augment if cfg.augment is not None else not frozen_run
        if augment and frozen_run and cfg.cache:
            _say(cfg, "note: --augment makes the transforms random, so feature caching is off")
        use_features = frozen_run and not augment
        solver = cfg.solver
        if solver == "auto":
            solver = "cv" if use_features and cfg.epochs is None else "sgd"
        if solver in ("cv", "lbfgs") and not use_features:
            raise UsageError(f"--solver {solver} fits the head on cached features; it needs a "
                             "frozen backbone (policy feature-extract) and no --augment")
        if solver == "lbfgs" and cfg.head != "linear":
            raise UsageError(f"--solver lbfgs fits a linear head, not {cfg.head!r}")
        lr, epochs, warmup = cfg.lr, cfg.epochs, cfg.warmup_epochs
        self.defaults_rule = None
        if solver == "cv":
            epochs = epochs or 1  # one fit to the optimum: it is the whole run
        elif not frozen_run:
            rule = finetune_defaults(train_images=train_images,
                                     global_batch=cfg.batch_size * distributed.planned_world(),
                                     head_lr=self.spec.lr, probed=cfg.lp_ft,
                                     epochs=cfg.epochs)
            self.defaults_rule = rule.record()
            epochs = epochs or rule.epochs
            lr = lr or rule.lr
            if warmup is None:
                warmup = rule.warmup_epochs if cfg.scheduler in ("cosine", "constant") else 0.0
        self.config = cfg.replace(augment=augment, solver=solver, epochs=epochs or 10,
                                  lr=lr or self.spec.lr,
                                  warmup_epochs=0.0 if warmup is None else warmup)
        self.use_features = use_features
        self.frozen_run = frozen_run

    def run(self) -> RunResult:
        import torch

        from tlreg.data.images import discover

        cfg = self.config
        self._check_out_dir()
        data = discover(cfg.data, cfg.val_split, cfg.seed)
        seed_everything(cfg.seed)
        self._resolve(data)
        cfg = self.config
        self.device = distributed.device_for(resolve_device(cfg.device))
        self.amp_dtype = autocast_dtype(cfg.precision, self.device)
        self._set_threads(loader_workers=cfg.workers)
        model = self.model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        # Under DDP: batch_size is per process; the global batch (and lr, with --lr-scaling
        # linear) scale with the number of processes, and run.json records both.
        self.world = distributed.world()
        self.global_batch = cfg.batch_size * self.world
        self.lr_scale = self.world if cfg.lr_scaling == "linear" else 1
        if cfg.sync_bn and not distributed.convert_sync_batchnorm(model, self.device):
            _say(cfg, "note: --sync-bn changes nothing here (one process, or no BatchNorm)")
        if not self.resume:
            self._probe_phase(data)  # --policy auto decides here; LP of LP-FT
            cfg = self.config
        from tlreg.engine.optim import build_optimizer, build_scheduler

        self.optimizer = build_optimizer(
            model, cfg.optimizer, lr=cfg.lr * self.lr_scale, layer_decay=cfg.layer_decay,
            weight_decay=cfg.weight_decay, backbone_lr_mult=cfg.backbone_lr_mult,
            min_lr=cfg.min_lr * self.lr_scale, momentum=cfg.momentum)
        steps = distributed.steps_per_epoch(len(data.train), cfg.batch_size,
                                            features=self.use_features)
        self.scheduler, self.interval = build_scheduler(
            self.optimizer, cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=steps,
            warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size, gamma=cfg.gamma,
            min_lr=cfg.min_lr * self.lr_scale)
        distributed.barrier()  # every rank checked --out before rank 0 creates it
        if self.resume:
            self._check_resume(data)
            self._load_last()
        else:
            self._start_run_dir(data)
        self.data = data
        started = time.perf_counter()
        status = "completed"
        try:
            if self.use_features:
                self._fit_features(data)
            else:
                self._fit_images(data)
        except KeyboardInterrupt:
            status = "interrupted"
        wall = time.perf_counter() - started + self._previous_wall
        summary = self._finish(data, wall, status)
        if status == "interrupted":
            raise Interrupted(f"interrupted; epochs 1-{len(self.history)} are saved. Continue "
                              f"with: tlreg train --resume {self.run_dir}")
        return RunResult(self.run_dir, summary, self.history, model)

    def _start_run_dir(self, data: DataSplit) -> None:
        import timm
        import torch

        from tlreg import __version__
        from tlreg.models.backbones import weights_sha256

        self._previous_wall = 0.0
        if not distributed.is_main():  # rank 0 writes every file of the run
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", self.config.to_yaml())
        if self.config.pretrained:
            self.pretrained_sha256 = weights_sha256(self.model.backbone.state_dict())
        write_model_json(self.run_dir, self.model, {"pretrained_sha256": self.pretrained_sha256})
        atomic_write_json(self.run_dir / "run.json", {
            "tlreg": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": sys.version.split()[0], "command": sys.argv, "seed": self.config.seed,
            "device": str(self.device), "threads": torch.get_num_threads(),
            "workers": self.config.workers, "train_images": len(data.train),
            "val_images": len(data.val), "classes": list(data.classes),
            "feature_cache": self.use_features,
            "world_size": self.world, "global_batch_size": self.global_batch,
            "backend": distributed.backend(), "lr_scaling": self.config.lr_scaling,
            "lr_scale": self.lr_scale,
            **self._choices(),  # what auto, LP-FT and the defaults chose: kept for --resume
            "fingerprint": self._fingerprint(data),
        })

    # -- what a run was started on, and --resume's check of it ------------------------------

    def _fingerprint(self, data: DataSplit) -> dict[str, Any]:
        """What the run's numbers depend on: data, classes, model, policy, input, loss."""
        import hashlib

        cfg = self.config
        listing = "\n".join(f"{s.path}\t{s.label}" for s in (*data.train, *data.val))
        fp = {"classes": list(data.classes),
              "samples_sha256": hashlib.sha256(listing.encode()).hexdigest(),
              "train_images": len(data.train), "val_images": len(data.val),
              "data_config": self.data_config, "backbone": cfg.backbone,
              "pretrained": cfg.pretrained, "weights": cfg.weights, "head": cfg.head,
              "head_args": cfg.head_args, "policy": cfg.policy, "policy_args": cfg.policy_args,
              "optimizer": cfg.optimizer, "scheduler": cfg.scheduler,
              "label_smoothing": cfg.label_smoothing}
        return json.loads(json.dumps(fp, default=str))  # as run.json holds it

    def _check_resume(self, data: DataSplit) -> None:
        """Refuse to continue a run on a changed world, with a one-line diff.

        Classes, inputs, model and loss must match; a changed file list (added or removed
        images) is refused unless --resume-anyway.
        """
        try:
            stored = json.loads((self.run_dir / "run.json").read_text()).get("fingerprint")
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            return  # a run from a tlreg without fingerprints: nothing to compare
        now = self._fingerprint(data)
        soft = {"samples_sha256", "train_images", "val_images"}
        diff = [k for k in now if stored.get(k) != now[k]]
        hard = [k for k in diff if k not in soft]

        def show(k: str) -> str:
            if k == "samples_sha256":
                return "the file list changed"
            was, new = (json.dumps(v)[:80] for v in (stored.get(k), now[k]))
            return f"{k} {was} -> {new}"

        if hard:
            raise UsageError(f"cannot resume {self.run_dir}: it was started on something else: "
                             + "; ".join(show(k) for k in hard)
                             + ". Start a new run (another --out) instead")
        if diff and not self.config.resume_anyway:
            raise UsageError(f"cannot resume {self.run_dir}: "
                             + "; ".join(show(k) for k in diff)
                             + ". Pass --resume-anyway to continue on the current files")
        if diff:
            _say(self.config, "note: resuming on a changed file list (--resume-anyway): "
                 + "; ".join(show(k) for k in diff))

    # -- the head fitted on frozen features: auto's measurement, LP-FT's first phase ---------

    def _feature_cache(self) -> Any:
        from tlreg.data.features import FeatureCache, FeatureKey, cache_root
        from tlreg.data.images import build_transform

        cfg = self.config
        if not cfg.cache:
            return None
        from tlreg.models.backbones import weights_sha256

        # The backbone is frozen while features are computed: its hash, taken now, holds.
        sha = self.pretrained_sha256 or weights_sha256(self.model.backbone.state_dict())
        key = FeatureKey.of(cfg.backbone, sha, self.data_config,
                            build_transform(self.data_config, train=False))
        return FeatureCache(cache_root(cfg.cache_dir), key)

    def _fit_head(self, x: torch.Tensor, y: torch.Tensor) -> HeadFit:
        """The head fitted in place to its CV-chosen optimum on (x, y) (tlreg.engine.solver)."""
        from tlreg.engine.solver import fit_head
        from tlreg.models.transfer import build_head

        cfg, info = self.config, self.model.info
        dim = self.model.feature_dim

        def make_head() -> torch.nn.Module:
            return build_head(info.head, dim, info.num_classes, info.head_args).to(x.device)

        fit = fit_head(self.model.head, make_head, x, y, info.num_classes,
                       lr=cfg.lr * self.lr_scale, batch=self.global_batch, seed=cfg.seed,
                       label_smoothing=cfg.label_smoothing, folds=cfg.cv_folds)
        _say(cfg, f"head fitted on {len(x)} cached features in {fit.seconds:.1f}s: {fit.reason}")
        return fit

    def _probe_phase(self, data: DataSplit) -> None:
        """Fit the head on frozen features first, when `auto` must measure or LP-FT is on.

        The linear probe is `--policy auto`'s measure of how close the data are to the
        pretraining data, and the first phase of LP-FT (Kumar et al. 2022): the backbone then
        starts training under a head at its optimum, not a random one whose gradients would
        distort the pretrained features.
        """
        cfg = self.config
        if not (self.auto or (not self.use_features and cfg.lp_ft)):
            return
        import torch

        t0 = time.perf_counter()
        x, y = self._probe_xy = self._features(list(data.train), self._feature_cache())
        self.feature_seconds = time.perf_counter() - t0
        initial = {k: v.clone() for k, v in self.model.head.state_dict().items()}
        fit = self._fit_head(x, y)
        if self.auto:
            self._decide(data, torch.bincount(y, minlength=len(data.classes)), fit)
        if self.use_features and self.config.solver == "cv":
            self.head_fit = fit  # auto chose feature extraction: this fit is the run's
        elif not self.use_features and self.config.lp_ft:
            self.lp_fit = fit
            if self.config.augment:
                self._measure_augment(data)
        else:  # an SGD run (--epochs given), or no LP-FT: the head starts from its usual init
            self.model.head.load_state_dict(initial)

    def _measure_augment(self, data: DataSplit) -> None:
        """The crops, flips and jitter the fitted probe still labels right (tlreg/augment.py).

        Shown to the probe: a class-stratified sample of training images (AUGMENT_SAMPLE at
        most), decoded once; what the user set is kept, and all three set skips the check.
        """
        from dataclasses import replace

        import torch

        from tlreg.data.augment import measure
        from tlreg.data.decoded import unsupported

        cfg = self.config
        user = {k: getattr(cfg, k) for k in ("crop_scale", "hflip", "color_jitter")
                if getattr(cfg, k) is not None}
        cannot = unsupported(self.data_config)
        why = "as set" if len(user) == 3 else cannot and f"not measured: {cannot}"
        positions = _spread([s.label for s in data.train], AUGMENT_SAMPLE, cfg.seed)
        decoded = None if why else self._decode_images([data.train[i] for i in positions],
                                                       "memory")
        if decoded is None:  # the config's values, timm's where it has none
            a = replace(self._augment(),
                        reason=why or "timm's defaults (not measured: over budget)")
        else:
            ok = [j for j, t in enumerate(decoded.images) if t is not None]
            extract, head = self._inference_features(), self.model.head.eval()

            def predict(images: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode(), self._autocast():
                    return head(extract(self._to_device(images)).float()).argmax(1).cpu()

            a = measure([decoded.images[j] for j in ok],
                        torch.tensor([data.train[positions[j]].label for j in ok]), predict,
                        self.data_config, batch_size=cfg.batch_size, seed=cfg.seed)
            if user:
                a = replace(a, **user, reason=a.reason + "; as set: " + ", ".join(
                    f"{k}={v:g}" for k, v in user.items()))
        self.augment = a
        self.config = cfg.replace(crop_scale=a.crop_scale, hflip=a.hflip,
                                  color_jitter=a.color_jitter)
        _say(cfg, f"augmentation: {a.reason}")

    def _decide(self, data: DataSplit, counts: torch.Tensor, fit: HeadFit) -> None:
        from dataclasses import replace

        from tlreg.engine.auto import decide
        from tlreg.models.transfer import resolve_policy

        model = self.model
        d = decide(train_images=int(counts.sum()), smallest_class=int(counts.min()),
                   probe_accuracy=fit.cv_accuracy, num_stages=model.num_stages)
        args = _lp_ft_args(self.requested, d.policy, {
            **d.policy_args,
            **{k: v for k, v in self.requested.policy_args.items() if k in ("frozen_bn",)}})
        model.policy = resolve_policy(d.policy, args)
        model.info = replace(model.info, policy=d.policy, policy_args=args)
        model.apply_policy(0)
        self.decision = d
        self.requested = self.requested.replace(policy=d.policy, policy_args=args)
        self._plan(len(data.train))
        self.lr_scale = self.world if self.config.lr_scaling == "linear" else 1
        _say(self.config, f"policy auto -> {d.reason}")

    # -- training on cached features --------------------------------------------------------

    def _features(self, samples: list[Sample], cache: Any) -> tuple[torch.Tensor,
                                                                   torch.Tensor]:
        """Features and labels of the decodable samples (cache hits cost no forward pass)."""
        import torch

        from tlreg.data.decoded import BatchEval
        from tlreg.data.features import cached_features
        from tlreg.data.images import build_transform, make_loader

        transform = build_transform(self.data_config, train=False)
        to_tensor = BatchEval(self.data_config)
        model, cfg = self.model, self.config

        # CPU: decode a chunk in the workers, then run the backbone over it on every core.
        # Decoding while the forward pass runs would leave it fewer threads (OpenMP threads
        # spin-wait against busy workers); two phases that each use the whole machine made a
        # 2-core ResNet-18 feature pass 1.5x faster. Chunks bound memory (about 270 MB of uint8
        # at 256 px); the decoded tensors are the eval transform's exact input, so features and
        # their cache key are unchanged. On a GPU the loader's overlap with the device wins.
        mode = self._decoded_mode() if self.device.type == "cpu" else "off"
        chunk = _DECODE_CHUNK if mode != "off" else None

        def batches(subset: list[Sample]) -> Iterator[tuple[torch.Tensor | None, list[int]]]:
            """(eval-transformed images or None, positions in `subset` that failed to decode)."""
            step = chunk or max(1, len(subset))
            for start in range(0, len(subset), step):
                part = subset[start:start + step]
                decoded = self._decode_images(part, mode) if chunk else None
                if decoded is None:
                    self._set_threads(loader_workers=cfg.workers)
                    loader = make_loader(part, transform, batch_size=cfg.batch_size,
                                         shuffle=False, seed=cfg.seed, workers=cfg.workers,
                                         pin_memory=self.device.type == "cuda")
                    for batch in loader:
                        yield ((batch.images if len(batch.labels) else None),
                               [start + i for i in batch.bad])
                    continue
                self._set_threads(loader_workers=0)  # no worker decodes beside the backbone
                yield None, [start + i for i in decoded.failed]
                ok = [i for i, t in enumerate(decoded.images) if t is not None]
                for i in range(0, len(ok), cfg.batch_size):
                    yield to_tensor([decoded.images[j] for j in ok[i:i + cfg.batch_size]]), []

        def compute(positions: list[int]) -> tuple[torch.Tensor, list[int]]:
            out, failed = [], []
            model.eval()
            extract = self._inference_features()
            with torch.inference_mode(), self._autocast():
                for images, bad in batches([samples[i] for i in positions]):
                    failed += [positions[i] for i in bad]
                    if images is not None:
                        out.append(extract(self._to_device(images)).float())
            feats = torch.cat(out) if out else torch.empty(0, model.feature_dim)
            return feats.cpu(), failed

        if self.world > 1:  # each rank computes its shard; every rank gets all features
            feats, failed = distributed.shard_features(samples, compute, cache,
                                                       model.feature_dim)
        else:
            feats, failed = cached_features(samples, compute, cache)
        self._note_skipped([samples[i].path for i in failed])
        _require_readable(samples, len(failed))
        bad = set(failed)
        labels = torch.tensor([s.label for i, s in enumerate(samples) if i not in bad])
        return feats.to(self.device), labels.to(self.device)

    def _inference_features(self) -> torch.nn.Module:
        """The frozen backbone with BatchNorm folded in, built once per run."""
        import torch

        if self._extract is None:
            self._extract = self.model.inference_features()
            if self.config.channels_last:
                self._extract.to(memory_format=torch.channels_last)
        return self._extract

    def _decode_images(self, samples: Sequence[Sample], mode: str) -> DecodedImages | None:
        """`decode_all` with this run's budget, workers and cache folder; None over budget."""
        from tlreg.data.decoded import decode_all

        cfg = self.config
        return decode_all(samples, self.data_config, mode=mode, workers=cfg.workers,
                          max_bytes=int(cfg.decoded_cache_gb * 2**30), cache_dir=cfg.cache_dir)

    def _fit_features(self, data: DataSplit) -> None:
        import torch

        cfg = self.config
        cache = self._feature_cache()
        t0 = time.perf_counter()
        x_train, y_train = self._probe_xy or self._features(list(data.train), cache)
        x_val, y_val = self._features(list(data.val), cache)
        self.feature_seconds = time.perf_counter() - t0 + (self.feature_seconds or 0.0)
        _say(cfg, f"features: {len(x_train)} train + {len(x_val)} val images "
                  f"in {self.feature_seconds:.1f}s")
        if cfg.solver == "cv":
            self._fit_cv(x_train, y_train, x_val, y_val)
            return
        head = self.model.head
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        for epoch in range(self.start_epoch, cfg.epochs):
            t = time.perf_counter()
            self.model.apply_policy(epoch)
            torch.manual_seed(_epoch_seed(cfg.seed, epoch))
            head.train()
            if cfg.solver == "lbfgs":
                train_loss, train_acc = self._lbfgs_epoch(x_train, y_train)
            else:
                gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
                order = torch.randperm(len(x_train), generator=gen).to(self.device)
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), device=self.device, dtype=torch.long)
                # Every rank holds all features and trains the same head on global batches.
                for i in range(0, len(order), self.global_batch):
                    idx = order[i:i + self.global_batch]
                    logits = head(x_train[idx])
                    loss = loss_fn(logits, y_train[idx])
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    if self.interval == "step":
                        self.scheduler.step()
                    loss_sum += loss.detach() * len(idx)
                    correct += (logits.argmax(1) == y_train[idx]).sum()
                train_loss = loss_sum.item() / max(1, len(order))
                train_acc = correct.item() / max(1, len(order))
            if self.interval == "epoch" and cfg.solver != "lbfgs":
                self.scheduler.step()
            head.eval()
            with torch.inference_mode():
                logits = head(x_val)
                val_loss = loss_fn(logits, y_val).item()
                preds = logits.argmax(1).tolist()
            self._end_epoch(epoch, train_loss, train_acc, val_loss, y_val.tolist(), preds,
                            len(x_train), time.perf_counter() - t)

    def _fit_cv(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                y_val: torch.Tensor) -> None:
        """The whole run as one 'epoch': the head at its CV-chosen optimum, then evaluated."""
        import torch

        if self.start_epoch >= 1:
            return
        t = time.perf_counter()
        self.model.apply_policy(0)
        earlier = 0.0  # a fit made by the probe phase (auto) counts in this epoch's time
        if self.head_fit is None:
            self.head_fit = self._fit_head(x_train, y_train)
        else:
            earlier = self.head_fit.seconds
        head = self.model.head
        head.eval()
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        with torch.inference_mode():
            train_logits, val_logits = head(x_train), head(x_val)
            train_loss = loss_fn(train_logits, y_train).item()
            train_acc = (train_logits.argmax(1) == y_train).float().mean().item()
            val_loss = loss_fn(val_logits, y_val).item() if len(y_val) else float("nan")
        self._end_epoch(0, train_loss, train_acc, val_loss, y_val.tolist(),
                        val_logits.argmax(1).tolist(), len(x_train),
                        time.perf_counter() - t + earlier)

    def _lbfgs_epoch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One L-BFGS solve step (20 iterations) of L2-regularised logistic regression."""
        import torch
        import torch.nn.functional as F

        head, cfg = self.model.head, self.config
        params = [p for p in head.parameters()]
        if not hasattr(self, "_lbfgs"):
            self._lbfgs = torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=20,
                                            line_search_fn="strong_wolfe")
        weight = next(p for p in params if p.dim() == 2)

        def closure() -> torch.Tensor:
            self._lbfgs.zero_grad()
            loss = F.cross_entropy(head(x), y, label_smoothing=cfg.label_smoothing)
            loss = loss + 0.5 * cfg.weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        self._lbfgs.step(closure)
        with torch.no_grad():
            logits = head(x)
            return (F.cross_entropy(logits, y).item(),
                    (logits.argmax(1) == y).float().mean().item())

    # -- training on images -----------------------------------------------------------------

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        images = images.to(self.device, non_blocking=True)
        if self.config.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _set_threads(self, loader_workers: int) -> None:
        """On the CPU, leave a core to each DataLoader worker.

        OpenMP threads spin-wait for each other; when a worker holds one of their cores, every
        op waits for it (on 2 cores, 2 threads + 1 worker ran a feature pass 2.6x slower than
        1 thread + 1 worker). An explicit OMP_NUM_THREADS (torchrun sets one) wins.
        """
        import torch

        if self.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - loader_workers))

    def _decode(self, data: DataSplit) -> None:
        """Fill the decoded-image caches (`--decoded-cache`), or leave them None."""
        from tlreg.data.decoded import BatchAugment, BatchEval

        cfg = self.config
        self.decoded_train = self.decoded_val = None
        # Only the image path gets here: the backbone trains (or --augment is on), so decoding
        # every epoch is the cost to avoid; `auto` (the default) keeps it in memory.
        mode = self._decoded_mode()
        if mode == "off":
            return
        t0 = time.perf_counter()
        train = self._decode_images(data.train, mode)
        val = self._decode_images(data.val, mode) if train is not None else None
        if train is None or val is None:
            return
        self.decoded_train, self.decoded_val = train, val
        self._set_threads(loader_workers=0)  # from here on no worker process decodes
        self._note_skipped([data.train[i].path for i in train.failed]
                           + [data.val[i].path for i in val.failed])
        a = self._augment()
        self.train_batch_tf = BatchAugment(
            self.data_config, scale=(a.crop_scale, 1.0) if a.crop_scale else None,
            hflip=a.hflip, jitter=a.color_jitter,
        ) if cfg.augment else BatchEval(self.data_config)
        self.eval_batch_tf = BatchEval(self.data_config)
        _say(cfg, f"decoded {len(data.train) + len(data.val)} images once "
                  f"in {time.perf_counter() - t0:.1f}s ({mode})")

    def _decoded_mode(self) -> str:
        """`--decoded-cache` resolved: off when the cache cannot give exact eval inputs."""
        from tlreg.data.decoded import unsupported

        mode = "memory" if self.config.decoded_cache == "auto" else self.config.decoded_cache
        why = unsupported(self.data_config) if mode != "off" else None
        if why is not None:
            if self.config.decoded_cache != "auto" and not self._said_off:
                _say(self.config, f"note: --decoded-cache {mode} is off for {why}")
                self._said_off = True
            return "off"
        return mode

    def _batches(self, samples: tuple[Sample, ...], *, train: bool, seed: int,
                 epoch: int = 0) -> tuple[int, Iterator[tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]]]:
        """(number of batches, iterator of CPU (images, labels, sample indices)) for one pass.

        From the decoded cache when there is one (batched tensor transforms), else from a
        DataLoader over the files. Either way the order and augmentation depend only on seed.
        Under DDP this rank's shard only: the DistributedSampler's order, the same on every
        rank, with each sample's augmentation seeded from (seed, its index).
        """
        import torch

        from tlreg.data.images import make_loader

        cfg = self.config
        sampler = distributed.sampler(len(samples), shuffle=train, seed=seed, epoch=epoch)
        decoded = self.decoded_train if train else self.decoded_val
        if decoded is not None:
            order = [i for i in sampler if decoded.images[i] is not None]
            transform = self.train_batch_tf if train else self.eval_batch_tf
            labels = torch.tensor([s.label for s in samples])

            def from_cache() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    yield (transform([decoded.images[j] for j in idx], idx, seed), labels[idx],
                           torch.tensor(idx))

            return math.ceil(len(order) / cfg.batch_size), from_cache()
        tf = self.train_tf if train else self.val_tf
        loader = make_loader(samples, tf, batch_size=cfg.batch_size, shuffle=train, seed=seed,
                             workers=cfg.workers, pin_memory=self.device.type == "cuda",
                             sampler=sampler, per_sample_seed=seed if train else None)

        def from_files() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for batch in loader:
                self._note_skipped([samples[i].path for i in batch.bad])
                if len(batch.labels):
                    yield batch.images, batch.labels, batch.indices

        return len(loader), from_files()

    def _fit_images(self, data: DataSplit) -> None:
        import torch

        from tlreg.data.images import build_transform
        from tlreg.progress import Progress

        cfg, model = self.config, self.model
        self.train_tf = build_transform(self.data_config, train=cfg.augment,
                                        augment=self._augment())
        self.val_tf = build_transform(self.data_config, train=False)
        self._decode(data)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        forward = self._compiled() if cfg.compile else model
        replicas = distributed.Replicas(model, self.device) if self.world > 1 else None
        with Progress(quiet=cfg.quiet or not distributed.is_main()) as progress:
            for epoch in range(self.start_epoch, cfg.epochs):
                t = time.perf_counter()
                compiled_before = compile_seconds() if cfg.compile else 0.0
                model.apply_policy(epoch)
                if replicas is not None and replicas.stale():
                    # Freeze first, then wrap: DDP syncs only what trained when it was built.
                    forward = model  # drop the old wrapper (and its gradient hooks) first
                    forward = replicas.module()
                    if cfg.compile:
                        forward = torch.compile(forward)
                seed = _epoch_seed(cfg.seed, epoch)
                torch.manual_seed(seed)
                random.seed(seed)
                model.train()
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), device=self.device, dtype=torch.long)
                seen = 0
                total, batches = self._batches(data.train, train=True, seed=seed, epoch=epoch)
                task = progress.start(f"epoch {epoch + 1}/{cfg.epochs}", total)
                for images, labels, _ in batches:
                    x = self._to_device(images)
                    y = labels.to(self.device, non_blocking=True)
                    with self._autocast():
                        logits = forward(x)
                        loss = loss_fn(logits, y)
                    self.optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(self.optimizer)
                    scaler.update()
                    if self.interval == "step":
                        self.scheduler.step()
                    n = len(labels)
                    loss_sum += loss.detach() * n
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += n
                    # The loss is read (a device sync) only when the bar refreshes.
                    progress.advance(task, n, lambda s=loss_sum, k=seen: s.item() / k)
                progress.finish(task)
                if epoch == self.start_epoch and distributed.sum_all(seen)[0] == 0:
                    _require_readable(data.train, len(data.train))
                if self.interval == "epoch":
                    self.scheduler.step()
                val_loss, labels_val, preds = self._evaluate_images(data.val, loss_fn)
                seen, loss_total, n_correct = distributed.sum_all(seen, loss_sum.item(),
                                                                  correct.item())
                compiling = (compile_seconds() - compiled_before) if cfg.compile else None
                self._end_epoch(epoch, loss_total / max(1, seen), n_correct / max(1, seen),
                                val_loss, labels_val, preds, int(seen), time.perf_counter() - t,
                                compiling)

    def _augment(self) -> Augment:
        """The training augmentation: the config's values, timm's where it has none."""
        from tlreg.data.augment import TIMM, Augment

        cfg = self.config
        return Augment(*(TIMM.crop_scale if cfg.crop_scale is None else cfg.crop_scale,
                         TIMM.hflip if cfg.hflip is None else cfg.hflip,
                         TIMM.color_jitter if cfg.color_jitter is None else cfg.color_jitter))

    def _compiled(self) -> Any:
        """torch.compile (opt-in): lazy, so its cost lands in the steps that trigger it."""
        import torch

        return torch.compile(self.model)

    def _evaluate_images(self, samples: tuple[Sample, ...],
                         loss_fn: Any) -> tuple[float, list[int], list[int]]:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        rows: list[torch.Tensor] = []  # (sample index, label, prediction)
        losses: list[torch.Tensor] = []
        smoothing = getattr(loss_fn, "label_smoothing", 0.0)
        _, batches = self._batches(samples, train=False, seed=self.config.seed)
        with torch.inference_mode(), self._autocast():
            for images, y_cpu, idx in batches:
                y = y_cpu.to(self.device)
                logits = self.model(self._to_device(images)).float()
                losses.append(F.cross_entropy(logits, y, reduction="none",
                                              label_smoothing=smoothing))
                rows.append(torch.stack([idx.to(self.device), y, logits.argmax(1)], 1))
        table = torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long,
                                                         device=self.device)
        loss = torch.cat(losses) if losses else torch.empty(0, device=self.device)
        # Under DDP each rank saw its padded shard: one row per sample index, from all ranks.
        _, table, loss = distributed.gather_by_index(table[:, 0], table, loss)
        if len(table) == 0:
            _require_readable(samples, len(samples))
        return (loss.sum().item() / max(1, len(loss)), table[:, 1].tolist(),
                table[:, 2].tolist())

    # -- bookkeeping ------------------------------------------------------------------------

    def _note_skipped(self, paths: list[str]) -> None:
        import warnings

        for path in paths:
            if path not in self.skipped:
                self.skipped.add(path)
                warnings.warn(f"skipped unreadable image {path}", stacklevel=2)

    def _end_epoch(self, epoch: int, train_loss: float, train_acc: float, val_loss: float,
                   labels: list[int], preds: list[int], images: int, seconds: float,
                   compiling: float | None = None) -> None:
        from tlreg.engine.optim import layer_lrs
        from tlreg.metrics import classification_report

        if self.world > 1:  # each rank met the unreadable files of its own shard
            self.skipped = set().union(*distributed.all_gather_object(sorted(self.skipped)))
        report = classification_report(labels, preds, self.data.classes)
        row = {
            "epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
            "val_loss": val_loss, "val_accuracy": report["accuracy"],
            "lr": layer_lrs(self.optimizer),
            "trainable_params": self.model.num_trainable(), "seconds": seconds,
            "images_per_second": images / seconds if seconds > 0 else None,
        }
        if compiling is not None:  # torch.compile's share of `seconds`
            row["compile_seconds"] = compiling
        self.history.append(row)
        is_best = report["accuracy"] > self.best_acc
        if is_best:
            self.best_acc = report["accuracy"]
        if distributed.is_main():  # every rank holds the same state; rank 0 saves it
            if is_best:
                tensors, frozen = self._checkpoint_tensors()
                save_checkpoint(self.run_dir / "checkpoints" / "best", tensors,
                                {"epoch": epoch + 1, "val_accuracy": report["accuracy"],
                                 "report": report}, frozen=frozen)
            self._save_last(epoch)
            atomic_write_json(self.run_dir / "history.json", self.history)
        distributed.barrier()  # the epoch's files exist before any rank goes on
        _say(self.config, f"epoch {epoch + 1}/{self.config.epochs}  loss {train_loss:.4f}  "
                          f"train acc {train_acc:.3f}  val loss {val_loss:.4f}  "
                          f"val acc {report['accuracy']:.3f}  ({seconds:.1f}s"
                          + (f", {compiling:.1f}s compiling)" if compiling else ")"))
        for callback in self.callbacks:
            callback(self, epoch)

    def _save_last(self, epoch: int) -> None:
        import numpy as np
        import torch

        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        opt_state: dict[str, dict[str, Any]] = {}
        for pid, st in opt["state"].items():
            opt_state[str(pid)] = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{pid}.{k}"] = v
                else:
                    opt_state[str(pid)][k] = v
        np_state = np.random.get_state()
        state = {
            "epoch": epoch + 1, "best_val_accuracy": self.best_acc, "history": self.history,
            "skipped": sorted(self.skipped), "optimizer": {"param_groups": opt["param_groups"],
                                                           "state": opt_state},
            "scheduler": self.scheduler.state_dict(),
            "rng": {"python": random.getstate(),
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "wall_seconds": sum(h["seconds"] for h in self.history),
        }
        model_tensors, frozen = self._checkpoint_tensors()
        save_checkpoint(self.run_dir / "checkpoints" / "last", model_tensors, state,
                        train_state=tensors, frozen=frozen)

    def _checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], Path | None]:
        """The model tensors a checkpoint writes, and the run's frozen-weights file if any.

        A backbone frozen for the whole run (the feature-cache path) is written once, to
        checkpoints/frozen.safetensors, and hard-linked into each checkpoint instead of being
        rewritten every epoch (44 MB per epoch for a ResNet-18).
        """
        state = self.model.state_dict()
        if not self.use_features:
            return state, None
        path = self.run_dir / "checkpoints" / "frozen.safetensors"
        if not path.is_file():  # written once; a resumed run finds it
            save_tensors(path, {k: v for k, v in state.items() if k.startswith("backbone.")})
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}, path

    def _load_last(self) -> None:
        import numpy as np
        import torch

        last = self.run_dir / "checkpoints" / "last"
        from tlreg._io import checkpoint_dir

        if checkpoint_dir(last) is None:
            raise UsageError(f"cannot resume {self.run_dir}: no completed epoch was saved; "
                             "start it again")
        model_state, state, tensors = read_checkpoint(last)
        from tlreg.runs.checkpoint import TRAIN_STATE_SCHEMA

        bad = [k for k, t in TRAIN_STATE_SCHEMA.items() if not isinstance(state.get(k), t)]
        if bad or not tensors or "rng.torch" not in tensors:
            raise UsageError(f"cannot resume {self.run_dir}: its last checkpoint is damaged "
                             f"({', '.join(bad) or 'no training state'}); start a new run")
        self.model.load_state_dict(model_state, strict=True)
        tensors = tensors or {}
        opt_state: dict[int, dict[str, Any]] = {
            int(pid): dict(st) for pid, st in state["optimizer"]["state"].items()}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": opt_state,
                                        "param_groups": state["optimizer"]["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        py = state["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["rng"]["numpy"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
        self.start_epoch = state["epoch"]
        self.history = state["history"]
        self.best_acc = state["best_val_accuracy"]
        self.skipped = set(state["skipped"])
        self._previous_wall = state.get("wall_seconds", 0.0)
        if self.start_epoch >= self.config.epochs:
            _say(self.config, f"{self.run_dir} already finished {self.start_epoch} epochs")

    def _finish(self, data: DataSplit, wall: float, status: str) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary = {
            "status": status,
            "val_accuracy": last.get("val_accuracy"),
            "best_val_accuracy": self.best_acc if self.history else None,
            "best_epoch": (max(range(len(self.history)),
                               key=lambda i: self.history[i]["val_accuracy"]) + 1
                           if self.history else None),
            "epochs": len(self.history),
            "train_images": len(data.train), "val_images": len(data.val),
            "skipped_files": len(self.skipped), "skipped": sorted(self.skipped),
            "feature_cache": self.use_features,
            "feature_seconds": getattr(self, "feature_seconds", None),
            "wall_seconds": wall,
        }
        summary.update(self._choices())
        if self.config.compile:
            summary["compile_seconds"] = sum(h.get("compile_seconds", 0.0) for h in self.history)
        if self.world > 1:
            summary["world_size"] = self.world
            if status == "completed":  # frozen and trained weights alike, bitwise
                summary["replicas_identical"] = distributed.replicas_agree(self.model)
        if distributed.is_main():
            atomic_write_json(self.run_dir / "summary.json", summary)
            if self.history:
                from tlreg.runs.plots import plot_history

                plot_history(self.history, self.run_dir / "training.png")
        if status == "completed":
            distributed.barrier()
        return summary


    def _choices(self) -> dict[str, Any]:
        """What the run chose for the user: the CV fit, the probe, auto's decision, defaults.

        A resumed run made its choices before the interruption; run.json kept them.
        """
        if self.resume:
            try:
                run = json.loads((self.run_dir / "run.json").read_text())
            except (OSError, ValueError):
                run = {}
            kept = {k: run[k] for k in ("linear_probe", "policy_auto", "finetune_defaults",
                                        "augment")
                    if k in run}
            return kept | ({"head_fit": self.head_fit.record()} if self.head_fit else {})
        out: dict[str, Any] = {}
        if self.head_fit is not None:
            out["head_fit"] = self.head_fit.record()
        if self.lp_fit is not None:
            out["linear_probe"] = self.lp_fit.record()
        if self.decision is not None:
            out["policy_auto"] = self.decision.record()
        if self.defaults_rule is not None:
            out["finetune_defaults"] = self.defaults_rule
        if self.augment is not None:
            out["augment"] = self.augment.record()
        return out


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (forward and backward graphs).

    torch has no public counter for it; this is the total dynamo's own timing report prints.
    """
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


#: What a run writes in its folder (a folder holding only these and no saved epoch is a run
#: killed before it started).
_RUN_FILES = ("config.yaml", "model.json", "run.json", "history.json", "summary.json",
              "training.png", "checkpoints")


def _spread(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """At most n positions, as many from each class as it can give (seeded, sorted)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    for members in by_class.values():
        rng.shuffle(members)
    picked: list[int] = []
    queues = [by_class[k] for k in sorted(by_class)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return sorted(picked)


def _leftover(name: str) -> bool:
    """A killed writer's temporary file (`.NAME.XXXX.tmp`, `.NAME.tmp-XXXX`): not a user's."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def _remove(paths: Iterable[Path]) -> None:
    """Files and folders, whichever each is; missing ones are fine."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _require_readable(samples: Sequence[Sample], failed: int) -> None:
    """A split none of whose images decodes is an error, not a run that 'trains' on nothing."""
    if samples and failed >= len(samples):
        folder = os.path.dirname(os.path.dirname(samples[0].path))
        raise UsageError(f"none of the {len(samples)} images under {folder} could be read "
                         f"(first: {samples[0].path}); nothing to train or evaluate on")


def _lp_ft_args(cfg: TrainConfig, policy: str, args: dict[str, Any]) -> dict[str, Any]:
    """With LP-FT, trainable stages keep BatchNorm in eval mode unless the user chose.

    The probe head was fitted on eval-mode features; training-mode BatchNorm would normalise
    every batch by its own statistics and move the running ones, so the features under the
    fitted head change at the first step (Keras's fine-tuning guide gives the same advice: keep
    BatchNorm in inference mode when unfreezing). Affine parameters still train.
    """
    import inspect

    from tlreg.registry import get_policy

    if not cfg.lp_ft or "trainable_bn" in args:
        return dict(args)
    try:
        accepts = "trainable_bn" in inspect.signature(get_policy(policy)).parameters
    except (TypeError, ValueError):
        accepts = False
    return {**args, "trainable_bn": "eval"} if accepts else dict(args)


def _data_config(model: TransferModel, img_size: int | None) -> dict[str, Any]:
    from tlreg.data.images import data_config_for

    return data_config_for(model.data_config, img_size)


def _say(config: TrainConfig, message: str) -> None:
    if not config.quiet and distributed.is_main():
        print(message, file=sys.stderr if os.environ.get("TLREG_LOG_STDERR") else sys.stdout,
              flush=True)
