"""What a run decides from its config and data before the first epoch.

Functions of the Trainer (tlreg.engine.trainer), as tlreg.engine.probe's are: the monitored
metric and early stopping (`watch`), the backbone spec and model, new or resumed (`resolve`),
the loss's class weights (`weigh`) and `--lr find`'s rate (`find_lr`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlreg.engine import distributed, probe
from tlreg.engine.callbacks import EarlyStopping, Monitor
from tlreg.errors import UsageError

if TYPE_CHECKING:
    from tlreg.data.sources import DataSplit
    from tlreg.engine.trainer import Trainer
    from tlreg.models.transfer import TransferModel

#: A class under this share of the training images (positives, for multi-label) is small.
SMALL_CLASS = 0.05


def resolve(t: Trainer, data: DataSplit) -> None:
    """The backbone spec, the model (new, or rebuilt from model.json on --resume), the data
    config, then the run's plan."""
    from tlreg.models.backbones import get_backbone
    from tlreg.models.transfer import build_from_info, create_model

    cfg = t.config
    t.spec = get_backbone(cfg.backbone)
    cfg = cfg.replace(head=cfg.head or t.spec.head, policy=cfg.policy or t.spec.policy,
                      layer_decay=cfg.layer_decay or t.spec.layer_decay)
    if not t.resume:
        cfg = cfg.replace(policy_args=probe.lp_ft_args(cfg, cfg.policy, cfg.policy_args))
    t.requested = cfg  # what the user asked for; plan() fills in the rest from it
    if t.resume:
        from tlreg._io import read_json
        from tlreg.runs.checkpoint import info_from_dict

        meta = read_json(t.run_dir / "model.json")
        t.model = build_from_info(info_from_dict(meta["info"]), pretrained=False,
                                  drop_path=cfg.drop_path)
        t.pretrained_sha256 = meta.get("pretrained_sha256")
    else:
        t.model = create_model(
            cfg.backbone, len(data.classes), head=cfg.head, head_args=cfg.head_args,
            policy=cfg.policy, policy_args=cfg.policy_args, pretrained=cfg.pretrained,
            weights=cfg.weights, label_names=data.classes, drop_path=cfg.drop_path)
        t.pretrained_sha256 = None
    t.data_config = _data_config(t.model, cfg.img_size)
    if not t.resume:
        from dataclasses import replace

        from tlreg.engine.objective import MULTI_LABEL

        if cfg.img_size:
            t.model.info = replace(t.model.info, data_config=t.data_config)
        if data.multi_label:
            t.model.info = replace(t.model.info, problem_type=MULTI_LABEL)
    t.plan(len(data.train))


def watch(t: Trainer, data: DataSplit) -> None:
    """The monitored metric (val_map by default for multi-label) and early stopping."""
    from tlreg.engine.callbacks import MULTI_LABEL_MONITORS

    cfg = t.config
    name = cfg.monitor or ("val_map" if data.multi_label else "val_accuracy")
    if name in MULTI_LABEL_MONITORS and not data.multi_label:
        raise UsageError(f"--monitor {name} is a multi-label metric, and {cfg.data} has one "
                         "label per image; use val_accuracy or val_loss")
    t.config = cfg.replace(monitor=name)
    t.monitor = Monitor(name, cfg.min_delta)
    if cfg.early_stopping is not None:
        t.callbacks.named.insert(0, ("early-stopping", EarlyStopping(
            cfg.early_stopping, name, cfg.min_delta)))
    if data.multi_label:
        from tlreg.metrics import require_multilabel

        require_multilabel()  # the extra's error before any work, not after an epoch


def weigh(t: Trainer, data: DataSplit, device: Any) -> None:
    """--class-weights as a tensor; a warning when a small class is left unweighted."""
    import warnings

    import torch

    from tlreg.engine.objective import class_counts, class_weights

    if t.config.sampler == "balanced" and data.multi_label:
        raise UsageError("--sampler balanced draws images by their class, and a multi-label "
                         "image has several; use --class-weights auto (pos_weight) instead")
    labels = [s.label for s in data.train]
    weights = class_weights(t.config.class_weights, labels, data.classes)
    t.class_weight = (None if weights is None else
                      torch.tensor(weights, dtype=torch.float32, device=device))
    counts = class_counts(labels, len(data.classes))
    small = [c for c, n in zip(data.classes, counts, strict=True)
             if n < SMALL_CLASS * len(labels)]
    if small and weights is None and t.config.sampler != "balanced":
        warnings.warn(f"class{'es' if len(small) > 1 else ''} {', '.join(map(repr, small))} "
                      f"{'are' if len(small) > 1 else 'is'} under {SMALL_CLASS:.0%} of the "
                      "training images; --class-weights auto weighs the loss against the "
                      "imbalance, --sampler balanced draws every class equally often (and "
                      "--monitor val_balanced_accuracy picks the best epoch by it)",
                      stacklevel=2)


def find_lr(t: Trainer, data: DataSplit) -> None:
    """`--lr find`: the range test at the epoch-0 policy, then the suggested head rate.

    The sweep leaves every weight, the optimizer and the RNGs as they were, so the run
    that follows is exactly the run with `--lr` set to the rate it chose."""
    from tlreg.engine import lr_find

    cfg = t.config
    t.model.apply_policy(0)
    feed, runtime = t.feed(data)
    result = lr_find.sweep(feed, t.optimizer,
                           t.model.head if t.use_features else t.model,
                           seed=cfg.seed, runtime=runtime,
                           label_smoothing=cfg.label_smoothing,
                           class_weight=t.class_weight)
    found = distributed.broadcast_object(result)  # rank 0's sweep decides for every rank
    chosen = found.suggestions.get("valley") or found.suggestions.get("steep")
    if chosen is None:
        raise UsageError(f"the learning-rate sweep stopped after {len(found.lrs)} steps, "
                         "too few to suggest a rate; set --lr")
    t.lr_sweep = found
    t.config = cfg.replace(lr=chosen / t.lr_scale, lr_find=False)
    t.requested = t.requested.replace(lr=t.config.lr, lr_find=False)
    steep = found.suggestions.get("steep")
    t.say(f"lr find: {len(found.lrs)} steps in {found.seconds:.1f}s ({found.stopped}); "
          f"valley {found.suggestions['valley']:.3g}"
          + (f", steep {steep:.3g}" if steep else "") + f": --lr {t.config.lr:.3g}")
    t.build_optimizer(data)


def _data_config(model: TransferModel, img_size: int | None) -> dict[str, Any]:
    """The model's timm data config, at `img_size` when one was asked for."""
    from tlreg.data.images import data_config_for

    return data_config_for(model.data_config, img_size)
