"""A run's plan: features or images, solver, epochs, rate and warm-up, from policy and data.

Values the user set are kept as they are; the rest follow the rules in tlreg.engine.auto
(docs/training.md). Pure: the same request, model policy and data size give the same plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlreg.engine import distributed
from tlreg.errors import UsageError

if TYPE_CHECKING:
    from tlreg.engine.config import TrainConfig
    from tlreg.models.transfer import TransferModel
    from tlreg.specs import BackboneSpec


@dataclass(frozen=True)
class Plan:
    config: TrainConfig  # every None the user left resolved
    use_features: bool  # the head trains alone on cached features
    frozen_run: bool  # the backbone stays frozen for every epoch
    auto: bool  # `--policy auto` must still decide (after the probe)
    defaults_rule: dict[str, Any] | None  # the data-aware fine-tuning defaults applied


def plan_run(cfg: TrainConfig, model: TransferModel, spec: BackboneSpec, *, train_images: int,
             resume: bool, say: Callable[[str], None]) -> Plan:
    from tlreg.engine.auto import finetune_defaults

    if cfg.lr_find and cfg.lr is not None:
        raise UsageError(f"--lr find chooses the learning rate, and lr is set too ({cfg.lr:g}): "
                         "drop one of them")
    auto = model.policy.name == "auto" and not resume
    horizon = cfg.epochs or 10
    frozen_run = all(model.policy.plan(model.num_stages, e).backbone_frozen
                     for e in range(horizon))
    augment = cfg.augment if cfg.augment is not None else not frozen_run
    if augment and frozen_run and cfg.cache:
        say("note: --augment makes the transforms random, so feature caching is off")
    use_features = frozen_run and not augment
    solver = cfg.solver
    if solver == "auto":
        # --ema and --sampler balanced act on steps: such a head trains by steps
        by_steps = cfg.ema is not None or cfg.sampler == "balanced" or cfg.lr_find
        solver = "cv" if use_features and cfg.epochs is None and not by_steps else "sgd"
    if solver in ("cv", "lbfgs") and not use_features:
        raise UsageError(f"--solver {solver} fits the head on cached features; it needs a "
                         "frozen backbone (policy feature-extract) and no --augment")
    if cfg.lr_find and solver in ("cv", "lbfgs"):
        raise UsageError(f"--lr find sweeps the rate of gradient steps, but this head is fitted "
                         f"in one solve with no learning rate (--solver {solver}); train it by "
                         "steps (--epochs N or --solver sgd), or drop --lr find")
    if cfg.sampler == "balanced" and solver in ("cv", "lbfgs"):
        raise UsageError(f"--sampler balanced draws the batches of gradient steps, but this "
                         f"head is fitted in one solve on every image (--solver {solver}); "
                         "use --class-weights auto there, or train by steps (--epochs N)")
    if cfg.ema is not None and solver in ("cv", "lbfgs"):
        raise UsageError(f"--ema averages the weights over gradient steps, but this head is "
                         f"fitted in one convex solve (--solver {solver}); train it by steps "
                         "with --epochs N (or --solver sgd), or drop --ema")
    if solver == "lbfgs" and cfg.head != "linear":
        raise UsageError(f"--solver lbfgs fits a linear head, not {cfg.head!r}")
    lr, epochs, warmup = cfg.lr, cfg.epochs, cfg.warmup_epochs
    defaults_rule = None
    if solver == "cv":
        epochs = epochs or 1  # one fit to the optimum: it is the whole run
    elif not frozen_run:
        step_batch = cfg.batch_size * cfg.accumulate * distributed.planned_world()
        rule = finetune_defaults(train_images=train_images, global_batch=step_batch,
                                 head_lr=spec.lr, probed=cfg.lp_ft, epochs=cfg.epochs)
        defaults_rule = rule.record()
        epochs = epochs or rule.epochs
        lr = lr or rule.lr
        if warmup is None:
            warmup = rule.warmup_epochs if cfg.scheduler in ("cosine", "constant") else 0.0
    config = cfg.replace(augment=augment, solver=solver, epochs=epochs or 10, lr=lr or spec.lr,
                         warmup_epochs=0.0 if warmup is None else warmup)
    return Plan(config, use_features, frozen_run, auto, defaults_rule)
