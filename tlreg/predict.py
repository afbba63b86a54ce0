"""Inference and evaluation with a trained model: from a run directory, an artifact or the Hub."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import UsageError

if TYPE_CHECKING:
    import torch

    from tlreg.data.sources import Sample
    from tlreg.models.transfer import TransferModel
    from tlreg.onnx_predict import OnnxModel


def load_model(source: str, *, checkpoint: str = "best", device: str = "cpu",
               **hub_options: Any) -> TransferModel | OnnxModel:
    """A run directory (has model.json), an artifact folder, or a Hub id (`hf:` forces it).

    A `.onnx` file, or a folder holding model.onnx and preprocess.json, loads as an
    `OnnxModel` (onnxruntime, Pillow and NumPy only: neither torch nor timm is imported), on
    `device`; `predict` takes either.
    """
    from tlreg.onnx_predict import is_onnx_source, load_onnx

    if is_onnx_source(source):
        return load_onnx(source, device)
    from tlreg.sharing.api import load_artifact

    return load_artifact(source, checkpoint=checkpoint, **hub_options)


def expand_inputs(inputs: Sequence[str], path_column: str = "path") -> list[str]:
    """Image files, the images inside folders (recursively, sorted), and the files a table
    (.csv, .tsv, .parquet) lists in `path_column`, relative to the table's folder."""
    from tlreg.data.images import IMAGE_EXTENSIONS
    from tlreg.data.sources import TABLE_SUFFIXES

    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            from tlreg.data.table import read_table

            columns, rows = read_table(path)
            if path_column not in columns:
                raise UsageError(f"{path} has no column {path_column!r} (its columns: "
                                 f"{', '.join(columns)}); name the right one with --path-column")
            files += [str(path.parent / row[path_column].strip()) for _, row in rows]
        elif path.is_dir():
            files += [str(p) for p in sorted(path.rglob("*"))
                      if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            files.append(str(path))
        else:
            raise UsageError(f"no such file or folder: {item}")
    if not files:
        raise UsageError(f"no images found in {', '.join(inputs)}")
    return files


def _logits(model: TransferModel, samples: Sequence[Sample], batch_size: int,
            device: str, tta: str = "none") -> tuple[torch.Tensor, list[int]]:
    """Logits for the decodable samples (in order) and the positions that failed to decode.

    With `tta` (a name in `tlreg.data.tta.TTA`) each is the mean of its views' logits."""
    import torch

    from tlreg.data.images import make_loader
    from tlreg.data.tta import get_tta, tta_logits

    views = get_tta(tta)(model.data_config)
    loader = make_loader(list(samples), views.transform, batch_size=batch_size,
                         shuffle=False, seed=0, workers=0)
    model = model.to(device).eval()
    out, failed = [], []
    with torch.inference_mode():
        for batch in loader:
            failed += batch.bad
            if len(batch.labels):
                out.append(tta_logits(model, batch.images.to(device), views).cpu())
    return (torch.cat(out) if out else torch.empty(0, model.info.num_classes)), failed


def _check_options(batch_size: int, device: str, top_k: int = 1, tta: str = "none") -> None:
    """The same checks as training's options, before any image is read."""
    from tlreg.data.tta import get_tta
    from tlreg.engine.config import check_device

    _check_counts(batch_size, top_k)
    check_device(device)
    get_tta(tta)


def _check_counts(batch_size: int, top_k: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise UsageError(f"top_k must be an integer >= 1, got {top_k!r}")


def predict(model: TransferModel | OnnxModel, inputs: Sequence[str], *, top_k: int = 1,
            batch_size: int = 32, device: str = "cpu",
            path_column: str = "path", tta: str = "none") -> list[dict[str, Any]]:
    """Top-k labels and probabilities per image; unreadable files get an `error` entry.

    `inputs` are image files, folders, or tables listing files in `path_column`. A multi-label
    model's probabilities are independent sigmoids: each result also has `labels`, every label
    whose probability reaches its threshold (tuned on val), and top-k still ranks them.
    `tta` ("none", "flip", "five-crop": `tlreg.data.tta`) averages the logits of several views
    of each image; `logits` are then that mean. An `OnnxModel` (from `load_model("x.onnx")`)
    gives the same results through onnxruntime; its device is the one it was loaded on and
    it has no TTA."""
    from tlreg.onnx_predict import OnnxModel

    if isinstance(model, OnnxModel):
        _check_counts(batch_size, top_k)
        if tta != "none":
            raise UsageError(f"--tta {tta} needs the PyTorch model; an ONNX model predicts "
                             f"with --tta none")
        files = expand_inputs(inputs, path_column)
        out, failed = model.logits(files, batch_size)
        return format_predictions(files, out.tolist(), _probabilities(out, model.thresholds),
                                  failed, model.label_names, model.thresholds, top_k)
    _check_options(batch_size, device, top_k, tta)
    from tlreg.data.sources import Sample

    files = expand_inputs(inputs, path_column)
    logits, failed = _logits(model, [Sample(f, 0) for f in files], batch_size, device, tta)
    thresholds = multi_label_thresholds(model)
    probs = logits.softmax(-1) if thresholds is None else logits.sigmoid()
    labels = model.info.label_names or tuple(str(i) for i in range(model.info.num_classes))
    return format_predictions(files, logits.tolist(), probs.tolist(), failed, labels,
                              thresholds, top_k)


def _probabilities(logits: Any, thresholds: Sequence[float] | None) -> list[list[float]]:
    """Softmax (one label) or sigmoids (many) of a float32 NumPy array, as torch computes them."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    if thresholds is not None:
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).tolist()
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).tolist()


def format_predictions(files: Sequence[str], logits: Sequence[Sequence[float]],
                       probs: Sequence[Sequence[float]], failed: Sequence[int],
                       labels: Sequence[str], thresholds: Sequence[float] | None,
                       top_k: int) -> list[dict[str, Any]]:
    """`predict`'s results from plain lists (no torch): one format for PyTorch and ONNX.

    `logits` / `probs` have a row per decodable file, in order; `failed` are the positions of
    the others. Top-k ranks by probability, the lower index first on a tie.
    """
    results: list[dict[str, Any]] = []
    row = 0
    bad = set(failed)
    for i, f in enumerate(files):
        if i in bad:
            results.append({"file": f, "error": "unreadable image"})
            continue
        p = probs[row]
        k = max(1, min(top_k, len(p)))
        idx = sorted(range(len(p)), key=lambda j: -p[j])[:k]
        result: dict[str, Any] = {"file": f, "logits": list(logits[row]), "predictions": [
            {"label": labels[j], "index": j, "probability": float(p[j])} for j in idx]}
        if thresholds is not None:
            result["labels"] = [labels[j] for j, q in enumerate(p) if q >= thresholds[j]]
        results.append(result)
        row += 1
    return results


def multi_label_thresholds(model: TransferModel) -> list[float] | None:
    """A multi-label model's per-class thresholds (0.5 where none were tuned), else None."""
    from tlreg.engine.objective import MULTI_LABEL

    info = model.info
    if info.problem_type != MULTI_LABEL:
        return None
    return list(info.thresholds) if len(info.thresholds) == info.num_classes else (
        [0.5] * info.num_classes)


def evaluate(model: TransferModel, data: str, *, batch_size: int = 32, device: str = "cpu",
             source_args: Mapping[str, Any] | None = None,
             tta: str = "none") -> dict[str, Any]:
    """Accuracy, per-class precision / recall, the confusion matrix and (one label per image)
    the expected calibration error `ece` of the softmax probabilities.

    `data` is a folder of `<class>/` folders (every image is scored), or any other source
    (a table with a split column, `hf:...`): its validation split is scored. `tta` scores
    the mean logits of several views of each image (`tlreg.data.tta`); the report names it.
    """
    import torch

    from tlreg.data.folder import scan_folder
    from tlreg.data.sources import FOLDER, Sample, label_classes, multi_hot, open_source, resolve
    from tlreg.engine.calibration import expected_calibration_error
    from tlreg.metrics import classification_report, multilabel_report
    from tlreg.onnx_predict import OnnxModel

    if isinstance(model, OnnxModel):
        raise UsageError("eval scores the PyTorch model: give it the run or artifact the ONNX "
                         "file was exported from")
    _check_options(batch_size, device, tta=tta)
    classes = model.info.label_names
    if not classes:
        raise UsageError("this model has no label names to match the data's labels against")
    thresholds = multi_label_thresholds(model)
    if resolve(data)[0] == FOLDER and not source_args and thresholds is None:
        _, samples = scan_folder(Path(data), classes)
    else:
        split = open_source(data, None, 0, source_args)
        if split.multi_label and thresholds is None:
            raise UsageError(f"{data} is multi-label and this model predicts one label per "
                             "image; score it with a multi-label model")
        names = [[split.classes[i] for i in label_classes(s.label)] for s in split.val]
        unknown = sorted({n for row in names for n in row} - set(classes))
        if unknown:
            raise UsageError(f"{data} has labels the model was not trained on: "
                             f"{', '.join(map(repr, unknown))}")
        index = {c: i for i, c in enumerate(classes)}
        samples = [Sample(s.path, multi_hot([index[n] for n in row], len(classes))
                          if thresholds is not None else index[row[0]], s.data, s.key)
                   for s, row in zip(split.val, names, strict=True)]
    logits, failed = _logits(model, samples, batch_size, device, tta)
    bad = set(failed)
    labels = [s.label for i, s in enumerate(samples) if i not in bad]
    if thresholds is not None:
        report = multilabel_report(labels, logits.sigmoid().tolist(), classes, thresholds)
    else:
        report = classification_report(labels, logits.argmax(1).tolist(), classes)
        # How far the softmax confidences are from the accuracy they come with (Guo et al.'s
        # top-label ECE, 15 bins); None with no image scored.
        report["ece"] = expected_calibration_error(
            logits.float().softmax(1), torch.tensor(labels)) if labels else None
    report["skipped"] = [samples[i].path for i in sorted(bad)]
    report["tta"] = tta
    return report
