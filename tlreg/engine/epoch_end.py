"""The end of an epoch: its scores, history row, best checkpoint, calibration and callbacks.

Functions of the Trainer (tlreg.engine.trainer), as tlreg.engine.probe's are: what happens
once an epoch has been evaluated, in the order callbacks rely on (on_evaluate_end,
on_epoch_end, the stop shared across ranks, on_save_checkpoint, the files, on_epoch_saved).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tlreg._io import atomic_write_json
from tlreg.engine import distributed, record

if TYPE_CHECKING:
    import torch

    from tlreg.engine.objective import Evaluation
    from tlreg.engine.trainer import Trainer


def report_scores(t: Trainer, loss: float, labels: list[Any], preds: list[Any],
                  prefix: str = "") -> tuple[dict[str, Any], dict[str, Any], list[float] | None]:
    """One evaluation's report, its history columns and (multi-label) tuned thresholds."""
    from tlreg.metrics import classification_report, multilabel_report, tune_thresholds

    classes = t.data.classes
    if t.data.multi_label:  # metrics at 0.5; the checkpoint keeps thresholds tuned here
        report = multilabel_report(labels, preds, classes)
        thresholds = tune_thresholds(labels, preds, len(classes))
        scores = {"val_map": report["map"], "val_micro_f1": report["micro_f1"],
                  "val_macro_f1": report["macro_f1"]}
    else:
        report, thresholds = classification_report(labels, preds, classes), None
        scores = {"val_balanced_accuracy": report["balanced_accuracy"],
                  "val_macro_f1": report["macro_f1"]}
    scores = {"val_loss": loss, "val_accuracy": report["accuracy"], **scores}
    return report, {prefix + k: v for k, v in scores.items()}, thresholds


def end_epoch(t: Trainer, epoch: int, train_loss: float, train_acc: float,
              evaluation: Evaluation, images: int, seconds: float,
              compiling: float | None = None, averaged: Evaluation | None = None) -> None:
    """Score, record and save one evaluated epoch; `averaged` is --ema's evaluation."""
    from tlreg._io import save_checkpoint
    from tlreg.engine.optim import layer_lrs
    from tlreg.metrics import multilabel_report

    val_loss, labels, preds, logits = evaluation
    t.inputs.gather_skipped()
    classes = t.data.classes
    multi = t.data.multi_label
    report, scores, thresholds = report_scores(t, val_loss, labels, preds)
    if thresholds is not None:
        set_thresholds(t, thresholds)
    row = {
        "epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
        **scores, "lr": layer_lrs(t.optimizer),
        "trainable_params": t.model.num_trainable(), "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
    }
    name = t.monitor.name
    score, source = row[name], "model"
    if averaged is not None:  # --ema: the average competes for best on the same metric
        ema_report, ema_scores, ema_thresholds = report_scores(t, *averaged[:3], prefix="ema_")
        row |= ema_scores
        if t.monitor.improves(row.get("ema_" + name), score):
            score, source = row["ema_" + name], "ema"
            report, labels, preds, logits, thresholds = (ema_report, *averaged[1:],
                                                         ema_thresholds)
    if compiling is not None:  # torch.compile's share of `seconds`
        row["compile_seconds"] = compiling
    t.history.append(row)
    is_best = t.monitor.improves(score, t.best_score)
    if is_best:
        t.best_score, t.best_epoch, t.best_from = float(score), epoch + 1, source
        t.best_thresholds = thresholds
        t.best_calibration = calibrate_epoch(t, logits, labels)
    t.callbacks.call("on_evaluate_end", t, epoch, row)
    t.callbacks.call("on_epoch_end", t, epoch)
    share_stop(t)
    t.callbacks.call("on_save_checkpoint", t, epoch)
    if distributed.is_main():  # every rank holds the same state; rank 0 saves it
        if is_best:
            with t.ema.swapped() if source == "ema" else contextlib.nullcontext():
                tensors, frozen = record.checkpoint_tensors(t)
                tensors = {k: v.clone() for k, v in tensors.items()} if source == "ema" \
                    else tensors
            extra = {"thresholds": thresholds,
                     "report_tuned": multilabel_report(labels, preds, classes,
                                                       thresholds)} if multi else {}
            if (t.best_calibration or {}).get("temperature") is not None:
                extra["temperature"] = t.best_calibration["temperature"]
            save_checkpoint(t.run_dir / "checkpoints" / "best", tensors,
                            {"epoch": epoch + 1, "val_accuracy": report["accuracy"],
                             "monitor": t.monitor.name, "score": t.best_score,
                             "weights": source, "report": report, **extra}, frozen=frozen)
            if logits is not None:
                record.write_val_predictions(t, epoch, source, labels, logits)
        record.save_last(t, epoch)
        atomic_write_json(t.run_dir / "history.json", t.history)
    distributed.barrier()  # the epoch's files exist before any rank goes on
    t.say(f"epoch {epoch + 1}/{t.config.epochs}  loss {train_loss:.4f}  "
          f"train acc {train_acc:.3f}  val loss {val_loss:.4f}  "
          f"val acc {report['accuracy']:.3f}"
          + (f"  val mAP {report['map']:.3f}" if multi else "")
          + f"  ({seconds:.1f}s"
          + (f", {compiling:.1f}s compiling)" if compiling else ")"))
    if t.stop_reason is not None:
        t.say(f"stopping early: {t.stop_reason}")
    t.callbacks.call("on_epoch_saved", t, epoch)


def calibrate_epoch(t: Trainer, logits: torch.Tensor | None,
                    labels: list[Any]) -> dict[str, Any] | None:
    """Temperature scaling fitted on this epoch's val logits (one label per image; at
    least two val images), with ECE before and after; None where it cannot apply."""
    import torch

    from tlreg.engine.calibration import calibrate

    if not t.config.calibrate or logits is None or len(labels) < 2:
        return None
    fit = calibrate(logits, torch.tensor(labels, dtype=torch.long))
    return {"temperature": fit.pop("temperature"), "fitted_on": "val",
            "val_images": fit.pop("images"), **fit}


def set_thresholds(t: Trainer, thresholds: list[float]) -> None:
    """The in-memory model carries the thresholds of its weights (this epoch's)."""
    from dataclasses import replace

    t.model.info = replace(t.model.info, thresholds=tuple(thresholds))


def share_stop(t: Trainer) -> None:
    """A stop any rank's callback asked for stops every rank, at the same epoch."""
    asked = t._stop_asked
    if distributed.world() > 1:
        asked = next((r for r in distributed.all_gather_object(asked) if r), None)
    if asked and t.stop_reason is None:
        t.stop_reason = asked
