"""The linear probe: a head fitted on frozen features before anything else trains.

It is `--policy auto`'s measure of how close the data are to the pretraining data, the first
phase of LP-FT (Kumar et al. 2022: the backbone then starts under a head at its optimum, not a
random one whose gradients would distort the pretrained features), and the judge of which
training augmentation still shows the classes (tlreg/data/augment.py).
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tlreg.engine import objective

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import DataSplit
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.solver import HeadFit
    from tlreg.engine.trainer import Trainer

#: Training images the augmentation check shows the probe. Its thresholds sit 1-2 points from
#: what it measures on some data (digits-imbalanced: flips 0.949-0.953 against 0.95 on three
#: seeds' samples of 256), and a sample of n has a standard error of about
#: sqrt(0.05 * 0.95 / n): 1.4 points at 256, 1.0 at 512. So 512, every image of a smaller set.
AUGMENT_SAMPLE = 512


def feature_cache(t: Trainer) -> Any:
    """The on-disk feature cache for this backbone, weights and eval transform (or None)."""
    from tlreg.data.features import FeatureCache, FeatureKey, cache_root
    from tlreg.data.images import build_transform
    from tlreg.models.backbones import weights_sha256

    cfg = t.config
    if not cfg.cache:
        return None
    # The backbone is frozen while features are computed: its hash, taken now, holds.
    sha = t.pretrained_sha256 or weights_sha256(t.model.backbone.state_dict())
    key = FeatureKey.of(cfg.backbone, sha, t.data_config,
                        build_transform(t.data_config, train=False))
    return FeatureCache(cache_root(cfg.cache_dir), key, cfg.feature_dtype)


def fit_head(t: Trainer, x: torch.Tensor, y: torch.Tensor) -> HeadFit:
    """The head fitted in place to its CV-chosen optimum on (x, y) (tlreg.engine.solver)."""
    from tlreg.engine.head_fit import fit_head as solve
    from tlreg.models.transfer import build_head

    cfg, info = t.config, t.model.info
    dim = t.model.feature_dim

    def make_head() -> torch.nn.Module:
        return build_head(info.head, dim, info.num_classes, info.head_args).to(x.device)

    fit = solve(t.model.head, make_head, x, y, info.num_classes,
                lr=cfg.lr * t.lr_scale, batch=t.global_batch, seed=cfg.seed,
                label_smoothing=cfg.label_smoothing, folds=cfg.cv_folds,
                class_weight=t.class_weight)
    t.say(f"head fitted on {len(x)} cached features in {fit.seconds:.1f}s: {fit.reason}")
    return fit


def probe_phase(t: Trainer, data: DataSplit) -> None:
    """Fit the head on frozen features first, when `auto` must measure or LP-FT is on.

    Mixup's checks come first (after `auto` decided, for it): one error before any work.
    """
    from tlreg.data import mixup

    cfg = t.config
    mixup.check(cfg, multi_label=data.multi_label, features=t.use_features and not t.auto)
    if not (t.auto or (not t.use_features and cfg.lp_ft)):
        return
    t0 = time.perf_counter()
    x, y = t.probe_xy = t.inputs.features(t.model, list(data.train), feature_cache(t))
    t.feature_seconds = time.perf_counter() - t0
    initial = {k: v.clone() for k, v in t.model.head.state_dict().items()}
    fit = fit_head(t, x, y)
    if t.auto:
        counts = objective.class_counts([s.label for s in data.train], len(data.classes))
        decide(t, data, min(counts), fit, len(y))
    if t.use_features and t.config.solver == "cv":
        t.head_fit = fit  # auto chose feature extraction: this fit is the run's
    elif not t.use_features and t.config.lp_ft:
        t.lp_fit = fit
        if t.config.augment:
            measure_augment(t, data)
    else:  # an SGD run (--epochs given), or no LP-FT: the head starts from its usual init
        t.model.head.load_state_dict(initial)


def measure_augment(t: Trainer, data: DataSplit) -> None:
    """The crops, flips and jitter the fitted probe still labels right (tlreg/data/augment.py).

    Shown to the probe: a class-stratified sample of training images (AUGMENT_SAMPLE at
    most), decoded once; what the user set is kept, and all three set skips the check.
    """
    import torch

    from tlreg.data.augment import measure
    from tlreg.data.decoded import unsupported

    cfg = t.config
    user = {k: getattr(cfg, k) for k in ("crop_scale", "hflip", "color_jitter")
            if getattr(cfg, k) is not None}
    cannot = unsupported(t.data_config)
    if data.multi_label:  # the check compares top-1 predictions with one label per image
        cannot = cannot or "multi-label data"
    why = "as set" if len(user) == 3 else cannot and f"not measured: {cannot}"
    positions = spread([s.label for s in data.train], AUGMENT_SAMPLE, cfg.seed)
    decoded = None if why else t.inputs.decode_images([data.train[i] for i in positions],
                                                      "memory")
    if decoded is None:  # the config's values, timm's where it has none
        a = replace(t.augment_spec(),
                    reason=why or "timm's defaults (not measured: over budget)")
    else:
        ok = [j for j, img in enumerate(decoded.images) if img is not None]
        extract, head, rt = t.inputs.extractor(t.model), t.model.head.eval(), t.runtime

        def predict(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), rt.autocast():
                return head(extract(rt.to_device(images)).float()).argmax(1).cpu()

        a = measure([decoded.images[j] for j in ok],
                    torch.tensor([data.train[positions[j]].label for j in ok]), predict,
                    t.data_config, batch_size=cfg.batch_size, seed=cfg.seed, given=user)
        if user:
            a = replace(a, **user, reason=a.reason + "; as set: " + ", ".join(
                f"{k}={v:g}" for k, v in user.items()))
    spec = t.augment_spec()  # RandAugment and erasing come from the config, not the probe
    t.augment = a = replace(a, auto_augment=spec.auto_augment, reprob=spec.reprob)
    t.config = cfg.replace(crop_scale=a.crop_scale, hflip=a.hflip, color_jitter=a.color_jitter)
    t.say(f"augmentation: {a.reason}" + "".join(
        f"; {part}" for part in (a.auto_augment and f"auto-augment {a.auto_augment}",
                                 a.reprob and f"random erasing {a.reprob:g}") if part))


def decide(t: Trainer, data: DataSplit, smallest_class: int, fit: HeadFit,
           images: int) -> None:
    """`--policy auto`: the policy from the data's size and the probe, then the plan again."""
    from tlreg.data import mixup
    from tlreg.engine.auto import decide as choose
    from tlreg.models.transfer import resolve_policy

    model = t.model
    d = choose(train_images=images, smallest_class=smallest_class,
               probe_accuracy=fit.cv_accuracy, num_stages=model.num_stages,
               multi_label=data.multi_label)
    args = lp_ft_args(t.requested, d.policy, {
        **d.policy_args,
        **{k: v for k, v in t.requested.policy_args.items() if k in ("frozen_bn",)}})
    model.policy = resolve_policy(d.policy, args)
    model.info = replace(model.info, policy=d.policy, policy_args=args)
    model.apply_policy(0)
    t.decision = d
    t.requested = t.requested.replace(policy=d.policy, policy_args=args)
    t.plan(len(data.train))
    t.lr_scale = t.world if t.config.lr_scaling == "linear" else 1
    t.say(f"policy auto -> {d.reason}")
    mixup.check(t.config, multi_label=data.multi_label, features=t.use_features)


def lp_ft_args(cfg: TrainConfig, policy: str, args: dict[str, Any]) -> dict[str, Any]:
    """With LP-FT, trainable stages keep BatchNorm in eval mode unless the user chose.

    The probe head was fitted on eval-mode features; training-mode BatchNorm would normalise
    every batch by its own statistics and move the running ones, so the features under the
    fitted head change at the first step (Keras's fine-tuning guide gives the same advice: keep
    BatchNorm in inference mode when unfreezing). Affine parameters still train.
    """
    from tlreg.registry import get_policy

    if not cfg.lp_ft or "trainable_bn" in args:
        return dict(args)
    try:
        accepts = "trainable_bn" in inspect.signature(get_policy(policy)).parameters
    except (TypeError, ValueError):
        accepts = False
    return {**args, "trainable_bn": "eval"} if accepts else dict(args)


def spread(labels: Sequence[int], n: int, seed: int) -> list[int]:
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
