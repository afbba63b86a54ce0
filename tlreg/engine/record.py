"""What a run writes about itself: how it started (run.json), its checkpoints, how it ended."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import atomic_write_json, atomic_write_text, save_tensors
from tlreg.engine import distributed, replicas
from tlreg.runs import rundir

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import DataSplit
    from tlreg.engine.trainer import Trainer


def write_start(t: Trainer, data: DataSplit) -> None:
    """config.yaml, model.json and run.json of a new run (rank 0 writes every file)."""
    import timm
    import torch

    from tlreg import __version__
    from tlreg.models.backbones import weights_sha256
    from tlreg.runs.checkpoint import write_model_json

    if not distributed.is_main():  # rank 0 writes every file of the run
        return
    t.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(t.run_dir / "config.yaml", t.config.to_yaml())
    if t.config.pretrained:
        t.pretrained_sha256 = weights_sha256(t.model.backbone.state_dict())
    write_model_json(t.run_dir, t.model, {"pretrained_sha256": t.pretrained_sha256})
    atomic_write_json(t.run_dir / "run.json", {
        "tlreg": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "python": sys.version.split()[0], "command": sys.argv, "seed": t.config.seed,
        "device": str(t.device), "threads": torch.get_num_threads(),
        "workers": t.config.workers, "train_images": len(data.train),
        "val_images": len(data.val), "classes": list(data.classes),
        # where the images came from: a table's hash, a data set's revision
        "data_source": json.loads(json.dumps(dict(data.info), default=str)),
        "feature_cache": t.use_features,
        "world_size": t.world, "global_batch_size": t.global_batch,
        "backend": distributed.backend(), "lr_scaling": t.config.lr_scaling,
        "lr_scale": t.lr_scale,
        "class_weights": (None if t.class_weight is None else
                          dict(zip(data.classes, t.class_weight.tolist(), strict=True))),
        **choices(t),  # what auto, LP-FT and the defaults chose: kept for --resume
        "fingerprint": t.fingerprint(data),
    })
    if t.lr_sweep is not None:
        write_lr_find(t.run_dir, t.lr_sweep)


def write_lr_find(out: Path, sweep: Any) -> None:
    """lr_find.json (every step's rate and loss, the suggestions) and lr_find.png."""
    from tlreg.runs.plots import plot_lr_find

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "lr_find.json", sweep.to_dict())
    plot_lr_find(sweep.lrs, sweep.losses, sweep.suggestions, out / "lr_find.png")


def write_summary(t: Trainer, data: DataSplit, wall: float, status: str) -> dict[str, Any]:
    """summary.json and training.png: how the run ended and what it chose."""
    last = t.history[-1] if t.history else {}
    summary = {
        "status": status,
        "val_accuracy": last.get("val_accuracy"),
        "best_val_accuracy": t.best_row().get("val_accuracy"),
        "best_epoch": t.best_epoch,
        "monitor": t.monitor.name, "best_score": t.best_score,
        **({"ema": t.config.ema, "best_weights": t.best_from} if t.ema is not None else {}),
        "stopped_early": t.stop_reason is not None, "stop_reason": t.stop_reason,
        "epochs": len(t.history),
        "train_images": len(data.train), "val_images": len(data.val),
        "skipped_files": len(t.inputs.skipped), "skipped": sorted(t.inputs.skipped),
        "feature_cache": t.use_features,
        "feature_seconds": t.feature_seconds,
        "wall_seconds": wall,
    }
    if t.best_calibration is not None:  # T and ECE before / after, on val (engine.calibration)
        summary["calibration"] = t.best_calibration
    if t.familiarity:
        summary["familiarity"] = t.familiarity
    if data.multi_label:
        best = t.best_row()
        summary |= {"problem_type": t.model.info.problem_type,
                    "val_map": last.get("val_map"), "best_val_map": best.get("val_map"),
                    "best_val_macro_f1": best.get("val_macro_f1"),
                    "thresholds": dict(zip(data.classes, t.best_thresholds or (), strict=False))}
    summary.update(choices(t))
    if t.config.compile:
        summary["compile_seconds"] = sum(h.get("compile_seconds", 0.0) for h in t.history)
    if t.world > 1:
        summary["world_size"] = t.world
        if status == "completed":  # frozen and trained weights alike, bitwise
            summary["replicas_identical"] = replicas.replicas_agree(t.model)
    if distributed.is_main():
        atomic_write_json(t.run_dir / "summary.json", summary)
        if t.history:
            from tlreg.runs.plots import plot_history

            plot_history(t.history, t.run_dir / "training.png")
    if status == "completed":
        distributed.barrier()
    return summary


def choices(t: Trainer) -> dict[str, Any]:
    """What the run chose for the user: the CV fit, the probe, auto's decision, defaults.

    A resumed run made its choices before the interruption; run.json kept them.
    """
    if t.resume:
        run = rundir.read_run_json(t.run_dir)
        kept = {k: run[k] for k in ("linear_probe", "policy_auto", "finetune_defaults",
                                    "augment", "lr_find")
                if k in run}
        return kept | ({"head_fit": t.head_fit.record()} if t.head_fit else {})
    out: dict[str, Any] = {}
    if t.head_fit is not None:
        out["head_fit"] = t.head_fit.record()
    if t.lp_fit is not None:
        out["linear_probe"] = t.lp_fit.record()
    if t.decision is not None:
        out["policy_auto"] = t.decision.record()
    if t.defaults_rule is not None:
        out["finetune_defaults"] = t.defaults_rule
    if t.augment is not None:
        out["augment"] = t.augment.record()
    if t.lr_sweep is not None:  # the curve itself is in lr_find.json
        out["lr_find"] = {"lr": t.config.lr, "suggestion": "valley"
                          if t.lr_sweep.suggestions.get("valley") else "steep",
                          "suggestions": t.lr_sweep.suggestions, "steps": len(t.lr_sweep.lrs),
                          "stopped": t.lr_sweep.stopped, "seconds": t.lr_sweep.seconds}
    return out



def write_familiarity(t: Trainer) -> None:
    """RUN/familiarity.safetensors: the bank of training features and the val scores that
    `predict --reject-unfamiliar` takes p-values against. Only where the backbone stayed frozen
    (the features are those the deployed model computes) and val has 2 images or more."""
    from tlreg.engine import familiarity

    feed = t._built_feed[0] if t._built_feed is not None else None
    if not t.use_features or feed is None or len(feed.x_val) < 2 or len(feed.x_train) < 1:
        t.familiarity = None
        return
    tensors = familiarity.build(feed.x_train, feed.y_train, feed.x_val, seed=t.config.seed)
    t.familiarity = {"k": int(tensors["k"].item()), "bank_images": len(tensors["bank"]),
                     "val_images": len(tensors["val_scores"])}
    if distributed.is_main():
        from tlreg.runs.checkpoint import FAMILIARITY_FILE

        save_tensors(t.run_dir / FAMILIARITY_FILE, tensors)


#: How many classes each row of val_predictions.json keeps, most probable first.
TOP_CLASSES = 5


def write_val_predictions(t: Trainer, epoch: int, weights: str, labels: list[int],
                          logits: torch.Tensor) -> None:
    """val_predictions.json: each val image of the best epoch, its label, the predicted class
    and the top classes' probabilities (calibrated when a temperature was fitted).

    What `tlreg report` shows the worst errors from, without loading the model again. Rows
    follow the val split, less the images that could not be decoded; `file` is None for
    images held in memory (an `hf` data set)."""
    temperature = (t.best_calibration or {}).get("temperature")
    probs = (logits.double() / (temperature or 1.0)).softmax(1)
    top_p, top_i = probs.topk(min(TOP_CLASSES, probs.shape[1]), dim=1)
    samples = [s for s in t.data.val if s.path not in t.inputs.skipped]
    files = ([s.path if s.data is None else None for s in samples]
             if len(samples) == len(labels) else [None] * len(labels))
    rows = [{"file": f, "label": y, "predicted": int(i[0]), "probability": float(p[0]),
             "label_probability": float(probs[n, y]),
             "top": [[int(a), round(float(b), 6)] for a, b in zip(i, p, strict=True)]}
            for n, (f, y, p, i) in enumerate(zip(files, labels, top_p, top_i, strict=True))]
    atomic_write_json(t.run_dir / "val_predictions.json", {
        "epoch": epoch + 1, "weights": weights, "classes": list(t.data.classes),
        "temperature": temperature, "rows": rows})


def save_last(t: Trainer, epoch: int) -> None:
    """checkpoints/last: model, optimizer, scheduler, RNGs, history and callback states."""
    from tlreg.runs.checkpoint import save_train_state

    model_tensors, frozen = checkpoint_tensors(t)
    save_train_state(t.run_dir / "checkpoints" / "last", model_tensors, frozen,
                     t.optimizer, t.scheduler, extra_tensors=t.ema.tensors() if t.ema else None,
                     state={
                         "epoch": epoch + 1, "history": t.history,
                         "best_val_accuracy": t.best_row().get("val_accuracy", -1.0),
                         "best_score": t.best_score, "best_epoch": t.best_epoch,
                         "skipped": sorted(t.inputs.skipped),
                         "wall_seconds": sum(h["seconds"] for h in t.history),
                         "callbacks": t.callbacks.state_dict(),
                         "stop_reason": t.stop_reason,
                         "best_from": t.best_from,
                         "ema_updates": t.ema.updates if t.ema else None,
                         "best_calibration": t.best_calibration,
                         **({"thresholds": t.thresholds, "best_thresholds": t.best_thresholds}
                            if t.thresholds else {})})


def checkpoint_tensors(t: Trainer) -> tuple[dict[str, torch.Tensor], Path | None]:
    """The model tensors a checkpoint writes, and the run's frozen-weights file if any.

    A backbone frozen for the whole run (the feature-cache path) is written once, to
    checkpoints/frozen.safetensors, and hard-linked into each checkpoint instead of being
    rewritten every epoch (44 MB per epoch for a ResNet-18).
    """
    state = t.model.state_dict()
    if not t.use_features:
        return state, None
    path = t.run_dir / "checkpoints" / "frozen.safetensors"
    if not path.is_file():  # written once; a resumed run finds it
        save_tensors(path, {k: v for k, v in state.items() if k.startswith("backbone.")})
    return {k: v for k, v in state.items() if not k.startswith("backbone.")}, path


def load_last(t: Trainer) -> None:
    """Continue where checkpoints/last left off (--resume)."""
    from tlreg.runs.checkpoint import load_train_state

    state = load_train_state(t.run_dir / "checkpoints" / "last", t.model,
                             t.optimizer, t.scheduler, t.device, t.run_dir)
    t.start_epoch = state["epoch"]
    t.history = state["history"]
    t.best_score = state.get("best_score", state["best_val_accuracy"])
    t.best_epoch = state.get("best_epoch") or (
        max(range(len(t.history)), key=lambda i: t.history[i]["val_accuracy"]) + 1
        if t.history else None)
    t.inputs.skipped = set(state["skipped"])
    t._previous_wall = state.get("wall_seconds", 0.0)
    t.callbacks.load_state_dict(state.get("callbacks") or {})
    t.stop_reason = state.get("stop_reason")
    t.best_from = state.get("best_from") or "model"
    if t.ema is not None:
        t.ema.load_tensors(state["extra_tensors"], state.get("ema_updates") or 0)
    t.best_thresholds = state.get("best_thresholds")
    t.best_calibration = state.get("best_calibration")
    if state.get("thresholds"):
        t._set_thresholds(state["thresholds"])
    if t.start_epoch >= t.config.epochs or t.stop_reason:
        t.say(f"{t.run_dir} already finished {t.start_epoch} epochs")
