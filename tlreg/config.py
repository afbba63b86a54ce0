"""`TrainConfig`: every option of a training run, from the CLI, a YAML file or Python.

The run directory keeps the resolved config (defaults filled in from the backbone's spec), so
a run can be repeated exactly with `tlreg train --config RUN/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlreg.errors import UsageError

SCHEDULERS = ("cosine", "step", "onecycle", "constant")
SOLVERS = ("auto", "cv", "sgd", "lbfgs")
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
    optimizer: str = "adamw"  # any torch.optim class, by name (checked when built)
    lr: float | None = None
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
    solver: str = "auto"  # auto: cv when the head fits on cached features and epochs is unset
    lp_ft: bool = True  # fit the head on frozen features before the backbone trains
    cv_folds: int = 5
    val_split: float | None = None
    img_size: int | None = None
    augment: bool | None = None
    cache: bool = True
    cache_dir: str | None = None
    decoded_cache: str = "auto"  # auto: memory when the backbone trains and it fits
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

    def __post_init__(self) -> None:
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("solver", self.solver, SOLVERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _choice("decoded_cache", self.decoded_cache, ("auto", "off", "memory", "disk"))
        if self.epochs is not None and self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr is not None and self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise UsageError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.val_split is not None and not 0 < self.val_split < 1:
            raise UsageError(f"val_split must be in (0, 1), got {self.val_split}")
        if self.cv_folds < 2:
            raise UsageError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.workers < 0:
            raise UsageError(f"workers must be >= 0, got {self.workers}")

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


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
