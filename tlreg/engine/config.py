"""`TrainConfig`: every option of a training run, from the CLI, a YAML file or Python.

The run directory keeps the resolved config (defaults filled in from the backbone's spec), so
a run can be repeated exactly with `tlreg train --config RUN/config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlreg.data.augment import settle as settle_augment
from tlreg.data.features import FEATURE_DTYPES
from tlreg.engine.callbacks import MONITORS
from tlreg.engine.loggers import LOGGERS
from tlreg.engine.schedulers import SCHEDULERS
from tlreg.errors import UsageError
from tlreg.models.backbones import resolve_best_of

SOLVERS = ("auto", "cv", "sgd", "lbfgs")
SAMPLERS = ("random", "balanced")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCALINGS = ("none", "linear")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `None` means "the backbone's or the policy's default"."""

    data: str
    out: str
    backbone: str = "resnet18"
    head: str | None = None
    head_args: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    policy_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    weights: str | None = None
    epochs: int | None = None  # None: one CV fit on cached features, or the data-aware rule
    batch_size: int = 32
    accumulate: int = 1  # batches per optimizer step: the step of a batch_size x N batch
    clip_grad: float | None = None  # clip the gradients' global L2 norm to this
    ema: float | None = None  # decay of a moving average of the weights (timm's ModelEmaV3)
    optimizer: str = "adamw"  # any torch.optim class, by name (checked when built)
    lr: float | None = None  # "find" (CLI / YAML): lr_find, the range test picks it
    lr_find: bool = False  # run the LR range test first and train at its suggestion
    layer_decay: float | None = None
    backbone_lr_mult: float = 1.0
    min_lr: float = 0.0
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_epochs: float | None = None
    step_size: int = 7
    gamma: float = 0.1
    label_smoothing: float = 0.0
    sampler: str = "random"  # balanced: draw images with probability 1 / their class's size
    class_weights: str = "none"  # none, auto (balanced), or a YAML / JSON file class: weight
    solver: str = "auto"  # auto: cv when the head fits on cached features and epochs is unset
    lp_ft: bool = True  # fit the head on frozen features before the backbone trains
    cv_folds: int = 5
    val_split: float | None = None
    # The data source's own options (tlreg.data.sources), e.g. csv's path_column, label_column
    source_args: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    # none, light, standard (true), strong (false: none; tlreg.data.augment.AUGMENTS); None:
    # the policy's default (on when the backbone trains)
    augment: bool | str | None = None
    # Training augmentation (None: the preset's, else measured by the probe when LP-FT runs,
    # else timm's 0.08, 0.5, 0.4; tlreg/data/augment.py)
    crop_scale: float | None = None  # RandomResizedCrop's smallest area; 0: no random crop
    hflip: float | None = None
    color_jitter: float | None = None
    auto_augment: str | None = None  # timm's RandAugment string (none: off; None: the preset's)
    reprob: float | None = None  # random-erasing probability (None: the preset's)
    mixup: float = 0.0  # Mixup alpha (timm's Mixup; 0: off)
    cutmix: float = 0.0  # CutMix alpha (with mixup too: one of the two per batch)
    drop_path: float | None = None  # the backbone's stochastic depth while it trains
    cache: bool = True
    cache_dir: str | None = None
    feature_dtype: str = "float32"  # how cached features are stored (float16: half the bytes)
    decoded_cache: str = "auto"  # auto: memory within the budget, else disk, else off
    decoded_cache_gb: float = 4.0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    lr_scaling: str = "none"  # linear: lr (and min_lr) x number of processes
    workers: int = 2
    seed: int = 0
    quiet: bool = False
    resume_anyway: bool = False  # --resume on a changed file list (never on changed classes)
    # Which epoch is best (checkpoints/best, what `tlreg export` ships) and when to stop
    monitor: str | None = None  # None: val_accuracy (val_map for a multi-label data set)
    min_delta: float = 0.0  # an epoch is better only by more than this
    early_stopping: int | None = None  # patience in epochs; None: run every epoch
    calibrate: bool = True  # fit a temperature on val for the best epoch's probabilities
    callbacks: list[str] = field(default_factory=list)  # tlreg.callbacks entry points
    callback_args: dict[str, Any] = field(default_factory=dict)  # name -> {arg: value}
    # Loggers beside RUN/log.csv (always written): tensorboard, mlflow (tlreg.engine.loggers)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One validation layer for the CLI, YAML and Python: typed parsing, then ranges.
        if isinstance(self.lr, str) and self.lr.strip().lower() == "find":
            object.__setattr__(self, "lr", None)
            object.__setattr__(self, "lr_find", True)
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _parse(f.name, getattr(self, f.name), f.type))
        # best-of:RANK_DIR -> the name `tlreg rank` recommended: what the run records
        object.__setattr__(self, "backbone", resolve_best_of(self.backbone))
        for name, (low, high, closed) in _RANGES.items():
            _in_range(name, getattr(self, name), low, high, closed)
        for name, value in settle_augment(self).items():  # the preset, and its checks
            object.__setattr__(self, name, value)
        _choice("scheduler", self.scheduler, tuple(SCHEDULERS))
        if self.monitor is not None:
            _choice("monitor", self.monitor, tuple(MONITORS))
        _choice("solver", self.solver, SOLVERS)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _choice("feature_dtype", self.feature_dtype, FEATURE_DTYPES)
        _choice("decoded_cache", self.decoded_cache, ("auto", "off", "memory", "disk", "stream"))
        check_device(self.device)
        for name in self.log:
            _choice("log", name, tuple(LOGGERS))
        for name, args in self.callback_args.items():
            if name not in self.callbacks:
                raise UsageError(f"callback_args names {name!r}, which is not in callbacks "
                                 f"({', '.join(self.callbacks) or 'none'})")
            if not isinstance(args, Mapping):
                raise UsageError(f"callback_args[{name!r}] must be a mapping of arg: value")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown config keys: {', '.join(unknown)}")
        missing = [k for k in ("data", "out") if data.get(k) in (None, "")]
        if missing:
            raise UsageError(f"config needs {' and '.join(missing)}")
        return cls(**dict(data))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise UsageError(f"config {path} must be a mapping of option: value")
        return cls.from_dict({**data, **overrides})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# name -> (low, high, closed): the value must lie in [low, high] (closed ends) or (low, high)
# on the open side given by `closed` ("both", "low", "high", "none"); None is always allowed
# for the optional fields, meaning "the default".
_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "epochs": (1, None, "both"),
    "batch_size": (1, None, "both"),
    "accumulate": (1, None, "both"),
    "clip_grad": (0, None, "none"),
    "ema": (0, 1, "none"),
    "lr": (0, None, "none"),
    "layer_decay": (0, 1, "high"),
    "backbone_lr_mult": (0, None, "none"),
    "min_lr": (0, None, "both"),
    "weight_decay": (0, None, "both"),
    "momentum": (0, 1, "low"),
    "warmup_epochs": (0, None, "both"),
    "step_size": (1, None, "both"),
    "gamma": (0, None, "none"),
    "label_smoothing": (0, 1, "low"),
    "cv_folds": (2, None, "both"),
    "val_split": (0, 1, "none"),
    "img_size": (16, 4096, "both"),
    "crop_scale": (0, 1, "both"),
    "hflip": (0, 1, "both"),
    "color_jitter": (0, None, "both"),
    "reprob": (0, 1, "both"),
    "mixup": (0, None, "both"),
    "cutmix": (0, None, "both"),
    "drop_path": (0, 1, "low"),
    "decoded_cache_gb": (0, None, "both"),
    "workers": (0, None, "both"),
    "seed": (0, None, "both"),
    "min_delta": (0, None, "both"),
    "early_stopping": (1, None, "both"),
}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    if not _DEVICE.match(device):
        raise UsageError(f"device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")


def _parse(name: str, value: Any, annotation: Any) -> Any:
    """`value` as the field's type: '1e-3' is a float, '10' an int, 'ten' an error."""
    text = str(annotation)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} needs a value")
    kind = text.replace("| None", "").strip()
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if kind == "bool | str":  # a switch or a name (augment: true, or strong)
            if isinstance(value, bool):
                return value
            if not isinstance(value, str):
                raise ValueError
            word = value.strip().lower()
            return word in _TRUE if word in _TRUE | _FALSE else word
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, int) else int(str(value).strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value.strip() if isinstance(value, str) else value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
            return out
        if kind == "str":
            if isinstance(value, os.PathLike):  # Path objects from Python
                return os.fspath(value)
            if not isinstance(value, str):
                raise ValueError
            return value
        if kind.startswith("list"):  # of names: a list, or one comma-separated string
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
        if kind.startswith("dict"):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        word = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "list[str]": "a list of names",
                "bool | str": "true, false or a name"}.get(kind,
                                                                   "a mapping of key: value")
        raise UsageError(f"{name} must be {word}, got {value!r}") from None
    return value


def _in_range(name: str, value: float | None, low: float | None, high: float | None,
              closed: str) -> None:
    if value is None:
        return
    lo_ok = low is None or (value >= low if closed in ("both", "low") else value > low)
    hi_ok = high is None or (value <= high if closed in ("both", "high") else value < high)
    if not (lo_ok and hi_ok):
        left = "[" if closed in ("both", "low") else "("
        right = "]" if closed in ("both", "high") else ")"
        span = (f">= {low}" if closed in ("both", "low") else f"> {low}") if high is None \
            else f"in {left}{low}, {high}{right}"
        raise UsageError(f"{name} must be {span}, got {value}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
