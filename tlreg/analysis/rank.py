"""`tlreg rank`: which backbone to train, measured on the data before training any.

For every candidate backbone: the frozen feature pass, through the training feature cache
(`tlreg.analysis.features`: a second `rank`, or a later `tlreg train` of that backbone, reads
it), then two scores of the train split's features alone:

* the k-fold cross-validated accuracy of a linear probe (`tlreg.engine.solver.cv_linear`: the
  very fit `tlreg train` gives a frozen backbone's head, same folds, seed and C path), with its
  spread: the standard deviation of the per-fold accuracies at the chosen C;
* LogME (`tlreg.engine.logme`): the evidence of a Bayesian linear model on the features, no
  hyper-parameter and no folds.

The val split, where there is one, only reports the final fit's accuracy. Rows are sorted by
probe CV accuracy, LogME breaking ties (`ORDER`): the probe measures the quantity a user picks
a backbone for, the accuracy of the head tlreg would train, while LogME is a proxy for it;
LogME is what separates backbones when every probe is right on every fold (an easy data set).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.analysis.candidates import RANDOM_PREFIX, Candidate, expand
from tlreg.errors import TlregError, UsageError
from tlreg.models.backbones import RANK_FILE

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import DataSplit, Sample
    from tlreg.models.transfer import TransferModel

__all__ = ["ORDER", "RANDOM_PREFIX", "BackboneScore", "Candidate", "Ranking", "expand",
           "rank", "write_rank"]

ORDER = "probe CV accuracy, then LogME (higher first); skipped and failed candidates last"
PLOT_FILE = "rank.png"
_ESTIMATE_BATCH = 8  # images decoded and run once to estimate a feature pass
#: Threads for LogME and the probe: thousands of small ops (L-BFGS on a few thousand rows),
#: where OpenMP's synchronisation costs more than a second thread gains. On 2 shared cores one
#: thread took 0.5 s for a 140-image probe that took 2.7-4.2 s on two, and 4.3 s (steady) for
#: 1,540 x 1,280 features, 10 classes, against 2.8-19 s on two.
SCORE_THREADS = 1
#: From this much work (train rows x features x classes) the probe's folds are solved in
#: threads, one intra-op thread each. Below it the threads fight over the GIL between small
#: ops: on 2 cores cv_linear took 0.36 s with 2 threads vs 0.19 s with one at 245 x 1,280 x 2,
#: 0.75 vs 0.67 s at 600 x 1,280 x 10, and gained from 1,258 x 1,280 x 10 (2.26 vs 2.46 s) and
#: 1,540 x 1,280 x 10 (14.9 vs 17.9 s).
PARALLEL_FOLD_WORK = 10_000_000


@dataclass(frozen=True)
class BackboneScore:
    """One candidate's row. Scores are None where it was skipped or failed (`reason` says)."""

    name: str  # as shown: the backbone, or random:NAME for a control
    backbone: str  # the name to train (the feature cache's key)
    pretrained: bool
    control: bool
    status: str  # ranked, skipped (--budget) or failed (weights, plugin)
    reason: str = ""
    cv_accuracy: float | None = None  # pooled over the folds at the chosen C (the solver's)
    cv_std: float | None = None  # standard deviation of the per-fold accuracies
    fold_accuracies: tuple[float, ...] = ()
    folds: int = 0
    C: float | None = None
    logme: float | None = None
    val_accuracy: float | None = None  # the final fit on all of train, scored on val
    params: int | None = None
    feature_dim: int | None = None
    computed_images: int | None = None  # images the pass ran the backbone on (0: all cached)
    estimate_seconds: float | None = None  # --budget's estimate of the pass
    build_seconds: float | None = None  # building the model (weights loaded)
    feature_seconds: float | None = None  # the feature pass
    logme_seconds: float | None = None
    probe_seconds: float | None = None  # CV path, fold spread, final fit, val score

    @property
    def score_seconds(self) -> float | None:
        """LogME and the probe together: what ranking costs beyond the feature pass."""
        if self.logme_seconds is None or self.probe_seconds is None:
            return None
        return self.logme_seconds + self.probe_seconds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"score_seconds": self.score_seconds}


@dataclass(frozen=True)
class Ranking:
    """Every candidate's score, best first (`ORDER`), and what the data set was."""

    data: str
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    folds: int
    seed: int
    budget: float | None
    rows: tuple[BackboneScore, ...]
    seconds: float = 0.0

    @property
    def best(self) -> BackboneScore | None:
        """The first ranked row that is not a random-init control."""
        return next((r for r in self.rows if r.status == "ranked" and not r.control), None)

    @property
    def recommendation(self) -> str:
        return _recommend(self)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        ranked = [r for r in self.rows if r.status == "ranked"]
        return {
            "format": "tlreg-rank", "version": 1, "data": self.data,
            "classes": list(self.classes), "train_images": self.train_images,
            "val_images": self.val_images, "folds": self.folds, "seed": self.seed,
            "budget": self.budget, "order": ORDER,
            "best": best.backbone if best else None,
            "best_pretrained": best.pretrained if best else None,
            "recommendation": self.recommendation, "seconds": self.seconds,
            "feature_seconds": sum(r.feature_seconds or 0.0 for r in ranked),
            "score_seconds": sum(r.score_seconds or 0.0 for r in ranked),
            "rows": [r.to_dict() | {"rank": i + 1 if r.status == "ranked" else None}
                     for i, r in enumerate(self.rows)],
        }


# -- scoring --------------------------------------------------------------------------------


def rank(data: str | os.PathLike[str] | DataSplit, backbones: str | Sequence[str], *,
         random_init: bool = False, folds: int = 5, seed: int = 0,
         budget: float | None = None, pretrained: bool = True, img_size: int | None = None,
         cache: bool = True, cache_dir: str | None = None, feature_dtype: str = "float32",
         device: str = "auto", batch_size: int = 64, workers: int = 2,
         val_split: float | None = None,
         source_args: Mapping[str, Any] | None = None,
         say: Callable[[str], None] = lambda _: None) -> Ranking:
    """Score every backbone `backbones` expands to (see `expand`) on `data`, best first.

    `data`: what `tlreg train` takes (a folder, a table, NAME:LOCATION) or a DataSplit.
    `budget`: seconds; a candidate whose estimated feature pass (its uncached images times the
    measured cost of one small batch) is over it is skipped, with the estimate as the reason.
    Random-init candidates are built after `seed_everything(seed)`, as `tlreg train
    --no-pretrained --seed SEED` builds them, so their features cache too.
    """
    from tlreg.data.sources import DataSplit, open_source

    if folds < 2:
        raise UsageError(f"--folds must be at least 2, got {folds}")
    if budget is not None and not budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {budget}")
    candidates = expand(backbones, random_init=random_init, pretrained=pretrained)
    t0 = time.perf_counter()
    split = data if isinstance(data, DataSplit) else open_source(
        data, val_split, seed, source_args)
    where = (str(split.info.get("location", "")) if isinstance(data, DataSplit)
             else os.fspath(data))
    _check_data(split, where)
    rows = [_score(c, split, folds=folds, seed=seed, budget=budget, img_size=img_size,
                   cache=cache, cache_dir=cache_dir, feature_dtype=feature_dtype,
                   device=device, batch_size=batch_size, workers=workers, say=say)
            for c in candidates]
    order = {"ranked": 0, "skipped": 1, "failed": 2}
    rows.sort(key=lambda r: (order[r.status], -_or(r.cv_accuracy), -_or(r.logme)))
    return Ranking(data=where, classes=tuple(split.classes), train_images=len(split.train),
                   val_images=len(split.val), folds=folds, seed=seed, budget=budget,
                   rows=tuple(rows), seconds=time.perf_counter() - t0)


def _or(value: float | None) -> float:
    return -math.inf if value is None else value


def _check_data(split: DataSplit, where: str) -> None:
    if split.multi_label:
        raise UsageError(f"tlreg rank scores one label per image, and {where} has several; "
                         "rank a single-label version of it")
    present = {s.label for s in split.train}
    if len(present) < 2:
        raise UsageError(f"tlreg rank needs training images of at least 2 classes in {where}, "
                         f"got {len(present)}")


def _score(c: Candidate, split: DataSplit, *, folds: int, seed: int, budget: float | None,
           img_size: int | None, cache: bool, cache_dir: str | None, feature_dtype: str,
           device: str, batch_size: int, workers: int,
           say: Callable[[str], None]) -> BackboneScore:
    from tlreg.analysis.features import dataset_features
    from tlreg.engine.runtime import seed_everything
    from tlreg.models.transfer import create_model

    row = BackboneScore(c.label, c.backbone, c.pretrained, c.control, "ranked")
    t0 = time.perf_counter()
    try:
        seed_everything(seed)  # where the Trainer seeds before it builds the model
        model = create_model(c.backbone, len(split.classes), policy="feature-extract",
                             pretrained=c.pretrained, label_names=tuple(split.classes))
    except TlregError as exc:  # weights offline, a broken plugin: this row, not the ranking
        say(f"{c.label}: failed: {exc}")
        return _replace(row, status="failed", reason=str(exc))
    params = sum(p.numel() for p in model.backbone.parameters())
    row = _replace(row, params=params, feature_dim=model.feature_dim,
                   build_seconds=time.perf_counter() - t0)
    samples = [*split.train, *split.val]
    missing = _uncached(model, c.backbone, samples, img_size, cache, cache_dir, feature_dtype)
    row = _replace(row, computed_images=len(missing))
    if budget is not None:
        estimate = _estimate(model, missing, img_size, device)
        row = _replace(row, estimate_seconds=estimate)
        if estimate > budget:
            reason = (f"estimated {estimate:.0f}s for {len(missing)} uncached images, over "
                      f"--budget {budget:g}s")
            say(f"{c.label}: skipped: {reason}")
            return _replace(row, status="skipped", reason=reason)
    say(f"{c.label}: features of {len(split.train)} train + {len(split.val)} val images "
        f"({len(samples) - len(missing)} cached)")
    feats = dataset_features(split, c.backbone, pretrained=c.pretrained, img_size=img_size,
                             cache=cache, cache_dir=cache_dir, feature_dtype=feature_dtype,
                             device=device,
                             batch_size=batch_size, workers=workers, say=say, model=model)
    del model
    row = _replace(row, feature_seconds=feats.seconds)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(SCORE_THREADS)
    try:
        scores = _scores(feats.x_train, feats.y_train, feats.x_val, feats.y_val,
                         len(split.classes), folds, seed)
    finally:
        torch.set_num_threads(threads)
    return _replace(row, **scores)


def _replace(row: BackboneScore, **changes: Any) -> BackboneScore:
    import dataclasses

    return dataclasses.replace(row, **changes)


def _uncached(model: TransferModel, backbone: str, samples: Sequence[Sample],
              img_size: int | None, cache: bool, cache_dir: str | None,
              feature_dtype: str) -> list[Sample]:
    """The samples the feature pass would run the backbone on (the cache's misses)."""
    if not cache:
        return list(samples)
    from tlreg.data.features import FeatureCache, FeatureKey, cache_root
    from tlreg.data.images import build_transform, data_config_for
    from tlreg.models.backbones import weights_sha256

    config = data_config_for(model.data_config, img_size)
    key = FeatureKey.of(backbone, weights_sha256(model.backbone.state_dict()), config,
                        build_transform(config, train=False))
    _, missing = FeatureCache(cache_root(cache_dir), key, feature_dtype).lookup(samples)
    return [samples[i] for i in missing]


def _estimate(model: TransferModel, missing: Sequence[Sample], img_size: int | None,
              device: str) -> float:
    """Seconds the feature pass over `missing` should take here: building the pass's own
    BatchNorm-folded copy of the backbone, plus one small batch decoded and run through it
    (after a warm-up) scaled to every missing image. Measured in float32: on a GPU, where the
    pass runs in bf16, it errs high."""
    if not missing:
        return 0.0
    import torch

    from tlreg.data.images import build_transform, data_config_for, load_sample
    from tlreg.engine.runtime import resolve_device

    config = data_config_for(model.data_config, img_size)
    transform = build_transform(config, train=False)
    t0 = time.perf_counter()
    images = []
    for sample in missing[:_ESTIMATE_BATCH]:
        try:
            images.append(transform(load_sample(sample)))
        except Exception:  # an unreadable file: the pass skips it too
            continue
    if not images:
        return 0.0
    decode = time.perf_counter() - t0
    dev = resolve_device(device)
    t0 = time.perf_counter()  # the pass builds the same copy once (fx trace, BN folding)
    extract = model.inference_features().to(dev).to(memory_format=torch.channels_last)
    setup = time.perf_counter() - t0
    batch = torch.stack(images).to(dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        extract(batch[:1])  # first call: allocations, one-off set-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        extract(batch)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    per_image = (decode + time.perf_counter() - t1) / len(images)
    return setup + per_image * len(missing)


def _scores(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
            num_classes: int, folds: int, seed: int) -> dict[str, Any]:
    """LogME and the CV probe of the train features; the final fit's val accuracy."""
    from tlreg.engine.logme import logme
    from tlreg.engine.solver import cv_linear

    t0 = time.perf_counter()
    evidence = logme(x.double().numpy(), y.numpy(), num_classes=num_classes)
    t1 = time.perf_counter()
    big = x.shape[0] * x.shape[1] * num_classes >= PARALLEL_FOLD_WORK
    fit = cv_linear(x, y, num_classes, folds=folds, seed=seed,
                    workers=min(folds, os.cpu_count() or 1) if big else 1)
    per_fold = fit.fold_accuracies
    val = None
    if len(y_val):
        logits = x_val.double() @ fit.state["weight"].double().T + fit.state["bias"].double()
        val = float((logits.argmax(1) == y_val).double().mean())
    return {"logme": evidence, "cv_accuracy": fit.cv_accuracy, "C": fit.C, "folds": fit.folds,
            "fold_accuracies": per_fold,
            "cv_std": statistics.stdev(per_fold) if len(per_fold) >= 2 else None,
            "val_accuracy": val, "logme_seconds": t1 - t0,
            "probe_seconds": time.perf_counter() - t1}


# -- the recommendation, the files ----------------------------------------------------------


def _recommend(r: Ranking) -> str:
    best = r.best
    if best is None:
        return ("no backbone could be ranked: every candidate was skipped or failed (see "
                "the reasons)")
    text = f"train {best.backbone}: {_summary(best)}"
    ranked = [row for row in r.rows if row.status == "ranked" and not row.control]
    runner = ranked[1] if len(ranked) > 1 else None
    if (runner is not None and best.cv_std is not None and runner.cv_accuracy is not None
            and best.cv_accuracy is not None and best.params and runner.params
            and runner.params < best.params
            and runner.cv_accuracy >= best.cv_accuracy - best.cv_std):
        text += (f"; {runner.name} is within one standard deviation with "
                 f"{runner.params / best.params:.0%} of its parameters")
    control = next((row for row in r.rows if row.status == "ranked" and row.control), None)
    if control is not None and r.rows.index(control) < r.rows.index(best):
        text += (f"; the random-init control {control.name} ranks above it: the scores "
                 "say little about pretraining on this data")
    return text


def _summary(row: BackboneScore) -> str:
    acc = "-" if row.cv_accuracy is None else f"{row.cv_accuracy:.3f}"
    spread = "" if row.cv_std is None else f" ± {row.cv_std:.3f}"
    folds = f" ({row.folds} folds)" if row.folds else " (no CV: a class has < 2 images)"
    return (f"probe CV accuracy {acc}{spread}{folds}, LogME "
            + ("-" if row.logme is None else f"{row.logme:.3f}"))


def write_rank(ranking: Ranking, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """DIR/rank.json (what `--backbone best-of:DIR` reads) and DIR/rank.png, each atomically."""
    from tlreg._io import atomic_write_json

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for rank.json and rank.png")
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / RANK_FILE, out / PLOT_FILE
    _plot(ranking, png_path)
    atomic_write_json(json_path, ranking.to_dict())
    return json_path, png_path


def _plot(ranking: Ranking, path: Path) -> None:
    """LogME against probe CV accuracy (fold spread as error bars), one point per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tlreg.runs.plots import save_png

    rows = [r for r in ranking.rows if r.status == "ranked" and r.logme is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        acc = r.cv_accuracy if r.cv_accuracy is not None else float("nan")
        colour = "tab:grey" if r.control else ("tab:green" if r is ranking.best else "tab:blue")
        ax.errorbar(r.logme, acc, yerr=r.cv_std or 0.0, fmt="o", color=colour, capsize=3)
        ax.annotate(r.name, (r.logme, acc), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    if not rows:
        ax.text(0.5, 0.5, "no backbone ranked", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xlabel="LogME (train features)", ylabel=f"probe {ranking.folds}-fold CV accuracy",
           title=f"tlreg rank: {Path(ranking.data).name or ranking.data}")
    ax.grid(alpha=0.3)
    save_png(fig, path)
