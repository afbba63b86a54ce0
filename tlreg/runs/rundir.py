"""A run folder's life: one writer, no half-started leftovers, and what it was started on.

Layout::

    RUN/config.yaml  run.json  model.json  history.json  summary.json  training.png  log.csv
    RUN/tensorboard/ (--log tensorboard)   RUN/lr_find.json  lr_find.png (--lr find)
    RUN/checkpoints/best/   RUN/checkpoints/last/   RUN/checkpoints/frozen.safetensors
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tlreg.errors import UsageError
from tlreg.lock import LOCK_NAME, exclusive

#: What a run writes in its folder (a folder holding only these and no saved epoch is a run
#: killed before it started).
RUN_FILES = ("config.yaml", "model.json", "run.json", "history.json", "summary.json",
             "training.png", "log.csv", "tensorboard", "lr_find.json", "lr_find.png",
             "checkpoints", "val_predictions.json", "familiarity.safetensors", "report.html")


def leftover(name: str) -> bool:
    """A killed writer's temporary file (`.NAME.XXXX.tmp`, `.NAME.tmp-XXXX`): not a user's."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def remove(paths: Iterable[Path]) -> None:
    """Files and folders, whichever each is; missing ones are fine."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def has_epoch(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last").exists() or (
        run_dir / "checkpoints" / ".last.old").exists()


def unstarted(run_dir: Path) -> bool:
    """A run folder killed before its first epoch was saved: nothing in it to keep."""
    if not (run_dir / "config.yaml").is_file() or has_epoch(run_dir):
        return False
    return all(p.name in RUN_FILES or p.name == LOCK_NAME or p.name.startswith(".")
               for p in run_dir.iterdir())


def check_out_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs an empty (or missing, or never-started) folder."""
    if resume:
        return
    if run_dir.is_dir() and unstarted(run_dir):
        return  # cleaned under the lock (clean_stale)
    if run_dir.exists() and (not run_dir.is_dir() or any(
            p.name != LOCK_NAME and not leftover(p.name) for p in run_dir.iterdir())):
        raise UsageError(f"output folder {run_dir} already exists and is not empty; "
                         f"choose another --out, or continue it with --resume {run_dir}")


def clean_stale(run_dir: Path, resume: bool, say: Callable[[str], None]) -> None:
    """Under the lock, nobody else writes here: leftovers of killed writers go."""
    if not run_dir.is_dir():
        return
    if not resume and unstarted(run_dir):
        say(f"note: {run_dir} holds a run killed before its first epoch; starting it again")
        remove(run_dir / name for name in RUN_FILES)
    for folder in (run_dir, run_dir / "checkpoints"):
        remove(folder.glob(".*.tmp*") if folder.is_dir() else [])


def locked(run_dir: Path, resume: bool, say: Callable[[str], None]) -> Any:
    """One writer per run folder: a second `tlreg train` with the same --out (or --resume)
    is refused with the other process's pid (tlreg.lock).

    A new run that fails before its first epoch is saved leaves no folder behind; otherwise
    the user would be stuck: --out is not empty, and --resume has no epoch to continue from.
    """
    check_out_dir(run_dir, resume)  # before creating anything in a folder that is not ours
    if resume and not run_dir.is_dir():
        return contextlib.nullcontext()  # the trainer says it is not a run
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return _guarded(run_dir, exclusive(run_dir, created=created), created, resume, say)


@contextlib.contextmanager
def _guarded(run_dir: Path, lock: Any, created: bool, resume: bool,
             say: Callable[[str], None]) -> Iterator[None]:
    with lock:
        clean_stale(run_dir, resume, say)
        try:
            yield
        except BaseException:
            if created and not (run_dir / "checkpoints" / "last").exists():
                remove(run_dir / name for name in RUN_FILES)
            raise


def read_run_json(run_dir: Path) -> dict[str, Any]:
    """run.json, or {} when it is missing or unreadable (a run from an older tlreg)."""
    try:
        data = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fingerprint(config: Any, samples: Sequence[Any], classes: Sequence[str],
                train_images: int, val_images: int,
                data_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the run's numbers depend on: data, classes, model, policy, input, loss."""
    cfg = config
    listing = "\n".join(f"{s.path}\t{s.label}" + (f"\t{s.key}" if s.key else "") for s in samples)
    fp = {"classes": list(classes),
          "samples_sha256": hashlib.sha256(listing.encode()).hexdigest(),
          "train_images": train_images, "val_images": val_images,
          "data_config": data_config, "backbone": cfg.backbone,
          "pretrained": cfg.pretrained, "weights": cfg.weights, "head": cfg.head,
          "head_args": cfg.head_args, "policy": cfg.policy, "policy_args": cfg.policy_args,
          "optimizer": cfg.optimizer, "scheduler": cfg.scheduler,
          "label_smoothing": cfg.label_smoothing}
    return json.loads(json.dumps(fp, default=str))  # as run.json holds it


def check_resume(run_dir: Path, now: Mapping[str, Any], resume_anyway: bool,
                 say: Callable[[str], None]) -> None:
    """Refuse to continue a run on a changed world, with a one-line diff.

    Classes, inputs, model and loss must match; a changed file list (added or removed
    images) is refused unless --resume-anyway.
    """
    stored = read_run_json(run_dir).get("fingerprint")
    if not isinstance(stored, dict):
        return  # a run from a tlreg without fingerprints: nothing to compare
    soft = {"samples_sha256", "train_images", "val_images"}
    diff = [k for k in now if stored.get(k) != now[k]]
    hard = [k for k in diff if k not in soft]

    def show(k: str) -> str:
        if k == "samples_sha256":
            return "the file list changed"
        was, new = (json.dumps(v)[:80] for v in (stored.get(k), now[k]))
        return f"{k} {was} -> {new}"

    if hard:
        raise UsageError(f"cannot resume {run_dir}: it was started on something else: "
                         + "; ".join(show(k) for k in hard)
                         + ". Start a new run (another --out) instead")
    if diff and not resume_anyway:
        raise UsageError(f"cannot resume {run_dir}: "
                         + "; ".join(show(k) for k in diff)
                         + ". Pass --resume-anyway to continue on the current files")
    if diff:
        say("note: resuming on a changed file list (--resume-anyway): "
            + "; ".join(show(k) for k in diff))
