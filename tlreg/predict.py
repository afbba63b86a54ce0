"""Inference and evaluation with a trained model: from a run directory, an artifact or the Hub."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

    from tlreg.models.transfer import TransferModel


def load_model(source: str, *, checkpoint: str = "best", **hub_options: Any) -> TransferModel:
    """A run directory (has model.json), an artifact folder, or a Hub id (`hf:` forces it)."""
    from tlreg.sharing.api import load_artifact

    return load_artifact(source, checkpoint=checkpoint, **hub_options)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files, and the images inside folders (recursively, sorted)."""
    from tlreg.data.images import IMAGE_EXTENSIONS

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += [str(p) for p in sorted(path.rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            files.append(str(path))
        else:
            raise UsageError(f"no such file or folder: {item}")
    if not files:
        raise UsageError(f"no images found in {', '.join(inputs)}")
    return files


def _logits(model: TransferModel, files: Sequence[str], batch_size: int,
            device: str) -> tuple[torch.Tensor, list[int]]:
    """Logits for the decodable files (in order) and the positions that failed to decode."""
    import torch

    from tlreg.data.images import build_transform, make_loader
    from tlreg.data.sources import Sample

    transform = build_transform(model.data_config, train=False)
    loader = make_loader([Sample(f, 0) for f in files], transform, batch_size=batch_size,
                         shuffle=False, seed=0, workers=0)
    model = model.to(device).eval()
    out, failed = [], []
    with torch.inference_mode():
        for batch in loader:
            failed += batch.bad
            if len(batch.labels):
                out.append(model(batch.images.to(device)).float().cpu())
    return (torch.cat(out) if out else torch.empty(0, model.info.num_classes)), failed


def _check_options(batch_size: int, device: str, top_k: int = 1) -> None:
    """The same checks as training's options, before any image is read."""
    from tlreg.engine.config import check_device

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be an integer >= 1, got {top_k!r}")
    check_device(device)


def predict(model: TransferModel, inputs: Sequence[str], *, top_k: int = 1,
            batch_size: int = 32, device: str = "cpu") -> list[dict[str, Any]]:
    """Top-k labels and probabilities per image; unreadable files get an `error` entry."""
    _check_options(batch_size, device, top_k)
    files = expand_inputs(inputs)
    logits, failed = _logits(model, files, batch_size, device)
    probs = logits.softmax(-1)
    k = max(1, min(top_k, probs.shape[-1]))
    labels = model.info.label_names or tuple(str(i) for i in range(model.info.num_classes))
    results: list[dict[str, Any]] = []
    row = 0
    bad = set(failed)
    for i, f in enumerate(files):
        if i in bad:
            results.append({"file": f, "error": "unreadable image"})
            continue
        p, idx = probs[row].topk(k)
        results.append({"file": f, "logits": logits[row].tolist(), "predictions": [
            {"label": labels[j], "index": j, "probability": float(q)}
            for q, j in zip(p.tolist(), idx.tolist(), strict=True)]})
        row += 1
    return results


def evaluate(model: TransferModel, data_dir: str, *, batch_size: int = 32,
             device: str = "cpu") -> dict[str, Any]:
    """Accuracy, per-class precision / recall and the confusion matrix on `<class>/` folders."""
    from tlreg.data.folder import scan_folder
    from tlreg.metrics import classification_report

    _check_options(batch_size, device)
    classes = model.info.label_names
    if not classes:
        raise UsageError("this model has no label names to match class folders against")
    _, samples = scan_folder(Path(data_dir), classes)
    logits, failed = _logits(model, [s.path for s in samples], batch_size, device)
    bad = set(failed)
    labels = [s.label for i, s in enumerate(samples) if i not in bad]
    report = classification_report(labels, logits.argmax(1).tolist(), classes)
    report["skipped"] = [samples[i].path for i in sorted(bad)]
    return report
