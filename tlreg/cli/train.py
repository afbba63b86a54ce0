"""CLI commands: `train`, `lr-find`."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import typer

from tlreg.cli._output import print_json, print_table
from tlreg.cli.options import (
    SOURCE_OPTIONS,
    ImageColumn,
    LabelColumn,
    LabelDelimiter,
    MultiLabel,
    PathColumn,
    Root,
    SourceArg,
    SplitColumn,
    parse_kv,
    source_args,
)
from tlreg.data.augment import AUGMENTS
from tlreg.engine.callbacks import MONITORS
from tlreg.engine.loggers import LOGGERS
from tlreg.engine.schedulers import SCHEDULERS
from tlreg.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("lr-find")(_with_json(lr_find))


LOG_HELP = (f"Log the run to {', '.join(LOGGERS)}; repeatable. csv (RUN/log.csv) is always on; "
            "tensorboard and mlflow need pip install 'tlreg[NAME]' (docs/training.md).")


def _with_json(command: Any) -> Any:
    """`command` with one more flag, --json, after the options it shares with train."""
    sig = inspect.signature(command, eval_str=True)
    flag = inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                             default=typer.Option(False, "--json", help="Print the sweep."))
    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), flag])
    command.__annotations__ = {**command.__annotations__, "json_output": bool}
    return command


def callback_args(names: list[str], items: list[str]) -> dict[str, dict[str, Any]]:
    """`--callback-arg k=v` for the one --callback, `NAME:k=v` to pick one of several."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, kv = item.partition(":")
        if not sep or "=" in name:
            if len(names) != 1:
                raise UsageError(f"--callback-arg {item!r}: with {len(names) or 'no'} --callback "
                                 "options, write NAME:key=value")
            name, kv = names[0], item
        if name not in names:
            raise UsageError(f"--callback-arg {item!r} names {name!r}, which is not a "
                             f"--callback ({', '.join(names) or 'none'})")
        out.setdefault(name, {}).update(parse_kv([kv], "callback-arg"))
    return out


def train(
    ctx: typer.Context,
    data: str | None = typer.Argument(
        None, help="Image folder (DATA/train/<class>, DATA/val/<class>), a table of paths and "
        "labels (.csv, .tsv, .parquet), or NAME:LOCATION for a registered data source "
        "(hf:beans; tlreg sources list)."
    ),
    out: str | None = typer.Option(None, "--out", "-o", help="Run directory to create."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML file with any of these options."
    ),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run."),
    resume_anyway: bool | None = typer.Option(
        None, "--resume-anyway", help="With --resume: continue although files were added or "
        "removed (changed classes, inputs or model are always refused).",
    ),
    backbone: str | None = typer.Option(
        None, "--backbone", "-b",
        help="Registered name, timm:<name>, or best-of:RANK_DIR (what tlreg rank picked)."
    ),
    head: str | None = typer.Option(None, "--head", help="Head name (default: the backbone's)."),
    head_arg: list[str] | None = typer.Option(None, "--head-arg", help="key=value for the head."),
    policy: str | None = typer.Option(
        None, "--policy", "-p",
        help="auto (default: measured on the data), feature-extract, finetune, partial, gradual.",
    ),
    policy_arg: list[str] | None = typer.Option(
        None, "--policy-arg", help="key=value for the policy."
    ),
    pretrained: bool | None = typer.Option(
        None, "--pretrained/--no-pretrained", help="Start from pretrained weights."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Backbone weights from a .safetensors file."
    ),
    epochs: int | None = typer.Option(None, "--epochs", "-e"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    accumulate: int | None = typer.Option(
        None, "--accumulate", metavar="N",
        help="Batches per optimizer step: the step of a batch N times larger (default 1).",
    ),
    clip_grad: float | None = typer.Option(
        None, "--clip-grad", metavar="NORM", help="Clip the gradients' global L2 norm."
    ),
    ema: float | None = typer.Option(
        None, "--ema", metavar="DECAY",
        help="Keep a moving average of the weights (e.g. 0.999); best is the better of the two.",
    ),
    optimizer: str | None = typer.Option(
        None, "--optimizer", help="adamw, sgd, ... (any torch.optim)."
    ),
    lr: str | None = typer.Option(
        None, "--lr", metavar="LR|find",
        help="Head learning rate (default: the backbone's), or find: the range test picks it "
        "(tlreg lr-find).",
    ),
    layer_decay: float | None = typer.Option(
        None, "--layer-decay", help="LR factor per layer from the head."
    ),
    backbone_lr_mult: float | None = typer.Option(None, "--backbone-lr-mult"),
    min_lr: float | None = typer.Option(None, "--min-lr"),
    weight_decay: float | None = typer.Option(None, "--weight-decay"),
    momentum: float | None = typer.Option(None, "--momentum"),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help=f"{', '.join(SCHEDULERS)} (docs/optim.md)."
    ),
    warmup_epochs: float | None = typer.Option(None, "--warmup-epochs"),
    step_size: int | None = typer.Option(None, "--step-size"),
    gamma: float | None = typer.Option(None, "--gamma"),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing"),
    class_weights: str | None = typer.Option(
        None, "--class-weights", metavar="none|auto|FILE",
        help="Weigh the loss per class: auto (n / (classes x n_c); multi-label: pos_weight), "
        "or a YAML / JSON file of class: weight (default none).",
    ),
    sampler: str | None = typer.Option(
        None, "--sampler", metavar="random|balanced",
        help="balanced: draw training images with probability 1 / their class's size, "
        "deterministic per seed and sharded under DDP (default random).",
    ),
    solver: str | None = typer.Option(
        None, "--solver",
        help="auto (cv when the head trains alone and --epochs is unset), cv (head fitted to "
        "its optimum, regularisation by k-fold CV), sgd (--epochs of gradient steps), lbfgs.",
    ),
    lp_ft: bool | None = typer.Option(
        None, "--lp-ft/--no-lp-ft",
        help="Fit the head on frozen features before the backbone trains (LP-FT; default on).",
    ),
    cv_folds: int | None = typer.Option(
        None, "--cv-folds", help="Folds for choosing the head's regularisation (default 5)."
    ),
    val_split: float | None = typer.Option(
        None, "--val-split", help="Hold out this fraction of each class (data without a val split)."
    ),
    path_column: PathColumn = None,
    label_column: LabelColumn = None,
    split_column: SplitColumn = None,
    image_column: ImageColumn = None,
    root: Root = None,
    label_delimiter: LabelDelimiter = None,
    multi_label: MultiLabel = None,
    source_arg: SourceArg = None,
    img_size: int | None = typer.Option(None, "--img-size"),
    augment: str | None = typer.Option(
        None, "--augment", metavar="|".join(AUGMENTS),
        help="Training augmentation preset: light (crops, flips), standard (+ colour jitter; "
        "on when the backbone trains), strong (+ RandAugment, random erasing 0.25); the knobs "
        "below override it.",
    ),
    no_augment: bool | None = typer.Option(
        None, "--no-augment", help="The same as --augment none.", show_default=False
    ),
    crop_scale: float | None = typer.Option(
        None, "--crop-scale",
        help="Smallest random-crop area; 0: no random crop (default: measured by the probe, "
        "else 0.08).",
    ),
    hflip: float | None = typer.Option(
        None, "--hflip", help="Horizontal-flip probability (default: measured, else 0.5)."
    ),
    color_jitter: float | None = typer.Option(
        None, "--color-jitter", help="Colour-jitter strength (default: measured, else 0.4)."
    ),
    auto_augment: str | None = typer.Option(
        None, "--auto-augment", metavar="SPEC",
        help="timm's RandAugment / AutoAugment / AugMix, e.g. rand-m9-mstd0.5-inc1; none: off "
        "(default: the preset's).",
    ),
    reprob: float | None = typer.Option(
        None, "--reprob", metavar="P",
        help="Random-erasing probability (timm's RandomErasing; default: the preset's, else 0).",
    ),
    mixup: float | None = typer.Option(
        None, "--mixup", metavar="ALPHA",
        help="Mixup alpha (timm's Mixup, soft-target cross-entropy; one label per image).",
    ),
    cutmix: float | None = typer.Option(
        None, "--cutmix", metavar="ALPHA",
        help="CutMix alpha (with --mixup: one of the two per batch).",
    ),
    drop_path: float | None = typer.Option(
        None, "--drop-path", metavar="RATE",
        help="Stochastic depth of the backbone while it trains (timm's drop_path_rate).",
    ),
    cache: bool | None = typer.Option(
        None, "--cache/--no-cache", help="Cache frozen-backbone features."
    ),
    cache_dir: str | None = typer.Option(None, "--cache-dir"),
    feature_dtype: str | None = typer.Option(
        None, "--feature-dtype", help="How cached features are stored: float32, or float16 "
        "(half the bytes; docs/cache.md has its measured accuracy effect)."
    ),
    decoded_cache: str | None = typer.Option(
        None,
        "--decoded-cache",
        help="Decode images once: auto (memory within --decoded-cache-gb, else disk, else "
        "off), off, memory, disk; stream decodes every epoch and gives memory's batches.",
    ),
    decoded_cache_gb: float | None = typer.Option(
        None, "--decoded-cache-gb", help="Memory budget for the decoded-image cache (GiB)."
    ),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:1."),
    precision: str | None = typer.Option(None, "--precision", help="auto, fp32, bf16, fp16."),
    channels_last: bool | None = typer.Option(None, "--channels-last/--no-channels-last"),
    compile: bool | None = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model."
    ),
    workers: int | None = typer.Option(None, "--workers"),
    seed: int | None = typer.Option(None, "--seed"),
    quiet: bool | None = typer.Option(None, "--quiet/--no-quiet", "-q"),
    devices: int | None = typer.Option(
        None, "--devices", help="Start N processes here (torchrun's agent, DDP); see docs."
    ),
    sync_bn: bool | None = typer.Option(
        None, "--sync-bn/--no-sync-bn", help="SyncBatchNorm across processes (CUDA only)."
    ),
    lr_scaling: str | None = typer.Option(
        None, "--lr-scaling", help="none, or linear: lr x number of processes."
    ),
    early_stopping: int | None = typer.Option(
        None, "--early-stopping", metavar="PATIENCE",
        help="Stop when --monitor has not improved for PATIENCE epochs.",
    ),
    calibrate: bool | None = typer.Option(
        None, "--calibrate/--no-calibrate", help="Fit a temperature on val for the best "
        "epoch's probabilities (default on; one label per image)."
    ),
    monitor: str | None = typer.Option(
        None, "--monitor", help=f"What picks the best epoch (the one exported) and early "
        f"stopping watches: {', '.join(MONITORS)} (default val_accuracy).",
    ),
    min_delta: float | None = typer.Option(
        None, "--min-delta", help="An epoch is better only by more than this (default 0)."
    ),
    callback: list[str] | None = typer.Option(
        None, "--callback", help="A registered callback (tlreg plugins); repeatable."
    ),
    callback_arg: list[str] | None = typer.Option(
        None, "--callback-arg", help="key=value for the --callback (NAME:key=value with several)."
    ),
    log: list[str] | None = typer.Option(
        None, "--log", metavar="NAME",
        help=LOG_HELP,
    ),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write RUN/report.html at the end (tlreg report)."
    ),
) -> None:
    """Train a head (and, by policy, the backbone) on an image folder."""
    if devices is not None and devices != 1:
        _launch(ctx, devices)
        return
    options = _options(locals())
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.trainer import fit

    if resume is not None:
        result = fit(resume=resume, **options)
    elif config is not None:
        result = fit(TrainConfig.from_yaml(config, **options))
    else:
        if "data" not in options or "out" not in options:
            raise UsageError("tlreg train needs DATA_DIR and --out (or --config FILE)")
        result = fit(TrainConfig.from_dict(options))
    s = result.summary
    from tlreg.engine import distributed

    if not distributed.is_main():  # rank 0 reports for every process
        return
    typer.echo(
        (f"val mAP {s['val_map']:.4f} (best {s['best_val_map']:.4f}), " if "val_map" in s
         else "")
        + f"val accuracy {s['val_accuracy']:.4f} (best {s['best_val_accuracy']:.4f}) "
        f"after {s['epochs']} epochs, {s['wall_seconds']:.1f}s; "
        f"{s['skipped_files']} files skipped -> {result.run_dir}"
        + (f" (stopped early: {s['stop_reason']})" if s.get("stopped_early") else "")
    )
    if report:
        _write_report(result.run_dir)


def _write_report(run_dir: Path) -> None:
    """RUN/report.html (tlreg.runs.report). The run's files are all saved by now: a page that
    cannot be drawn says why and leaves the exit status alone (`tlreg report RUN` redraws it)."""
    from tlreg.runs.report import write_report

    try:
        typer.echo(f"report: {write_report(run_dir)}")
    except Exception as exc:  # one page's plotting or decoding, not the run
        typer.echo(f"note: report.html not written ({type(exc).__name__}: {exc}); "
                   f"`tlreg report {run_dir}` tries again", err=True)


def _options(values: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig options from train's flags (unset ones left to the config's defaults)."""
    options = {
        k: v
        for k, v in values.items()
        if v is not None
        and k not in {"ctx", "config", "resume", "report", "head_arg", "policy_arg", "devices",
                      "callback", "callback_arg", "source_arg", "log", "no_augment",
                      *SOURCE_OPTIONS}
    }
    if values.get("no_augment"):
        if options.get("augment", "none") != "none":
            raise UsageError(f"--no-augment and --augment {options['augment']} disagree; "
                             "give one")
        options["augment"] = "none"
    head_arg, policy_arg, callback = values["head_arg"], values["policy_arg"], values["callback"]
    callback_arg, log = values["callback_arg"], values["log"]
    if head_arg:
        options["head_args"] = parse_kv(head_arg, "head-arg")
    if policy_arg:
        options["policy_args"] = parse_kv(policy_arg, "policy-arg")
    if sources := source_args(values, values["source_arg"]):
        options["source_args"] = sources
    if callback:
        options["callbacks"] = list(callback)
    if callback_arg:
        options["callback_args"] = callback_args(callback or [], callback_arg)
    if log:
        options["log"] = list(log)
    return options


@functools.wraps(train)
def lr_find(**values: Any) -> None:
    if values.get("resume") is not None or values.get("devices") not in (None, 1):
        raise UsageError("tlreg lr-find sweeps a new run's rate in one process; --resume and "
                         "--devices do not apply")
    as_json = values.pop("json_output", False)
    options = _options(values)
    options.pop("lr", None)  # the sweep chooses it
    if as_json:
        options["quiet"] = True  # stdout is the JSON document alone
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.trainer import lr_find as run_lr_find

    config = values.get("config")
    if config is not None:
        cfg = TrainConfig.from_yaml(config, **options)
    else:
        if "data" not in options or "out" not in options:
            raise UsageError("tlreg lr-find needs DATA_DIR and --out (or --config FILE)")
        cfg = TrainConfig.from_dict(options)
    sweep = run_lr_find(cfg)
    if as_json:
        print_json(sweep.to_dict())
        return
    print_table(["suggestion", "head lr"], [[name, "-" if lr is None else f"{lr:.3g}"]
                                            for name, lr in sweep.suggestions.items()])
    typer.echo(f"{len(sweep.lrs)} steps in {sweep.seconds:.1f}s ({sweep.stopped}) -> "
               f"{Path(cfg.out) / 'lr_find.png'}, {Path(cfg.out) / 'lr_find.json'}; "
               "tlreg train --lr find trains at the valley")


lr_find.__doc__ = ("The learning-rate range test (fastai's lr_find): the loss over rates from "
                   "1e-7 to 10, suggestions, lr_find.png; every tlreg train option applies.")


def _launch(ctx: typer.Context, devices: int) -> None:
    """`--devices N`: run this same command (without --devices) in N torchrun workers."""
    from tlreg.engine import distributed

    if devices < 1:
        raise UsageError(f"--devices must be >= 1, got {devices}")
    argv = ["train", *_command_line(ctx, skip="devices")]
    if ctx.find_root().params.get("debug"):
        argv.insert(0, "--debug")
    distributed.launch(argv, devices)


def _command_line(ctx: Any, skip: str) -> list[str]:
    """The options and arguments given to this command, as a command line again."""
    opts: list[str] = []
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == skip or value is None:
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
            opts.append(param.opts[0] if value else param.secondary_opts[0])
        elif getattr(param, "multiple", False):
            for item in value:
                opts += [param.opts[0], str(item)]
        else:
            opts += [param.opts[0], str(value)]
    return [*opts, "--", *args] if args else opts
