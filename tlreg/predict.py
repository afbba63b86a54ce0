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
            device: str, tta: str = "none",
            familiar: bool = False) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """Logits for the decodable samples (in order), the positions that failed to decode and,
    with `familiar`, each image's familiarity (tlreg.engine.familiarity; else None).

    With `tta` (a name in `tlreg.data.tta.TTA`) each is the mean of its views' logits (and the
    familiarity that of the mean of their features)."""
    import torch

    from tlreg.data.images import make_loader
    from tlreg.data.tta import get_tta, tta_logits
    from tlreg.engine.familiarity import familiarity
    from tlreg.engine.runtime import reuse_freed_memory

    views = get_tta(tta)(model.data_config)
    loader = make_loader(list(samples), views.transform, batch_size=batch_size,
                         shuffle=False, seed=0, workers=0)
    model = model.to(device).eval()
    out, failed, feats = [], [], []
    with torch.inference_mode(), reuse_freed_memory(next(model.parameters()).device):
        for batch in loader:
            failed += batch.bad
            if not len(batch.labels):
                continue
            images = batch.images.to(device)
            if not familiar:
                out.append(tta_logits(model, images, views).cpu())
                continue
            f = model.forward_features(views.expand(images)).float()
            logits = model.head(f).float()
            n = len(images)
            out.append(logits.reshape(views.count, n, -1).mean(0).cpu())
            feats.append(f.reshape(views.count, n, -1).mean(0).cpu())
    logits = torch.cat(out) if out else torch.empty(0, model.info.num_classes)
    if not familiar:
        return logits, failed, None
    bank = model.familiarity or {}
    x = torch.cat(feats) if feats else torch.empty(0, model.feature_dim)
    return logits, failed, familiarity(x, bank) if len(x) else torch.empty(0)


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


#: What `predict` answers for an image whose top probability is under `reject_below`.
UNKNOWN = "unknown"


def predict(model: TransferModel | OnnxModel, inputs: Sequence[str], *, top_k: int = 1,
            batch_size: int = 32, device: str = "cpu", path_column: str = "path",
            tta: str = "none", reject_below: float | None = None,
            calibrated: bool = True,
            reject_unfamiliar: float | None = None) -> list[dict[str, Any]]:
    """Top-k labels and probabilities per image; unreadable files get an `error` entry.

    `inputs` are image files, folders, or tables listing files in `path_column`. One label per
    image: probabilities are the softmax of the logits divided by the temperature fitted on val
    when the model has one (`calibrated=False`: the plain softmax). `reject_below=P` adds
    `label` to each result, the top label or "unknown" when its probability is under P (and
    `rejected`). A multi-label model's probabilities are independent sigmoids: each result
    also has `labels`, every label whose probability reaches its threshold (tuned on val), and
    top-k still ranks them. `reject_unfamiliar=Q` adds `familiarity`, the share of val images
    that look less like the training images than this one (k-th nearest neighbour in feature
    space, a conformal p-value: tlreg.engine.familiarity), and answers "unknown" under Q, so
    about a share Q of new in-distribution images are turned away and, on the measurements in
    docs/training.md, nearly every image of something else. `tta` ("none", "flip",
    "five-crop": `tlreg.data.tta`) averages the logits of several views of each image;
    `logits` are then that mean. An `OnnxModel` (from `load_model("x.onnx")`) gives the same
    results through onnxruntime; its device is the one it was loaded on and it has no TTA."""
    from tlreg.onnx_predict import OnnxModel

    check_reject_below(reject_below)
    check_reject_below(reject_unfamiliar, "reject_unfamiliar")
    if isinstance(model, OnnxModel):
        if reject_unfamiliar is not None and not model.has_familiarity:
            raise UsageError("--reject-unfamiliar needs an ONNX export of a run whose backbone "
                             "stayed frozen (its model.onnx has a familiarity output); this "
                             "one has none: export that run, or use --reject-below")
        _check_counts(batch_size, top_k)
        if tta != "none":
            raise UsageError(f"--tta {tta} needs the PyTorch model; an ONNX model predicts "
                             f"with --tta none")
        _check_reject(reject_below, model.thresholds)
        files = expand_inputs(inputs, path_column)
        out, fam, failed = model.outputs(files, batch_size,
                                         familiar=reject_unfamiliar is not None)
        t = model.temperature if calibrated else None
        return format_predictions(files, out.tolist(), _probabilities(out, model.thresholds, t),
                                  failed, model.label_names, model.thresholds, top_k,
                                  reject_below, None if fam is None else fam.tolist(),
                                  reject_unfamiliar)
    _check_options(batch_size, device, top_k, tta)
    from tlreg.data.sources import Sample

    thresholds = multi_label_thresholds(model)
    _check_reject(reject_below, thresholds)
    files = expand_inputs(inputs, path_column)
    logits, failed, familiar = _logits(model, [Sample(f, 0) for f in files], batch_size, device,
                                       tta, familiar=_has_bank(model, reject_unfamiliar))
    t = model.info.temperature if calibrated else None
    probs = (logits.sigmoid() if thresholds is not None
             else (logits / t if t else logits).softmax(-1))
    labels = model.info.label_names or tuple(str(i) for i in range(model.info.num_classes))
    return format_predictions(files, logits.tolist(), probs.tolist(), failed, labels,
                              thresholds, top_k, reject_below,
                              None if familiar is None else familiar.tolist(),
                              reject_unfamiliar)


def _has_bank(model: TransferModel, reject_unfamiliar: float | None) -> bool:
    """Whether familiarity is scored: the model has a bank (checked here) and it is asked for."""
    if reject_unfamiliar is None:
        return False
    if model.familiarity is None:
        raise UsageError("--reject-unfamiliar needs the training features of a run whose "
                         "backbone stayed frozen (RUN/familiarity.safetensors); this model has "
                         "none: predict from that run's folder, or use --reject-below")
    from tlreg.engine.familiarity import check

    check(model.familiarity, model.feature_dim, "the model's familiarity bank")
    return True


def check_reject_below(p: float | None, name: str = "reject_below") -> None:
    if p is not None and (isinstance(p, bool) or not isinstance(p, int | float)
                          or not 0 < p <= 1):
        raise UsageError(f"{name} must be a probability in (0, 1], got {p!r}")


def _check_reject(p: float | None, thresholds: Sequence[float] | None) -> None:
    if p is not None and thresholds is not None:
        raise UsageError("--reject-below is for one label per image; a multi-label model "
                         "answers no label at all when none reaches its threshold")


def _probabilities(logits: Any, thresholds: Sequence[float] | None,
                   temperature: float | None = None) -> list[list[float]]:
    """Softmax (one label, of logits / T) or sigmoids (many) of a float32 NumPy array, as
    torch computes them."""
    import numpy as np

    from tlreg.preprocess import softmax

    x = np.asarray(logits, dtype=np.float32)
    if thresholds is not None:
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).tolist()
    return softmax(x, temperature).tolist()


def format_predictions(files: Sequence[str], logits: Sequence[Sequence[float]],
                       probs: Sequence[Sequence[float]], failed: Sequence[int],
                       labels: Sequence[str], thresholds: Sequence[float] | None,
                       top_k: int, reject_below: float | None = None,
                       familiarity: Sequence[float] | None = None,
                       reject_unfamiliar: float | None = None) -> list[dict[str, Any]]:
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
        if familiarity is not None:
            result["familiarity"] = float(familiarity[row])
        if reject_below is not None or reject_unfamiliar is not None:
            result["rejected"] = (
                (reject_below is not None and float(p[idx[0]]) < reject_below)
                or (reject_unfamiliar is not None and familiarity is not None
                    and float(familiarity[row]) < reject_unfamiliar))
            result["label"] = UNKNOWN if result["rejected"] else labels[idx[0]]
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
             tta: str = "none", reject_below: float | None = None,
             reject_unfamiliar: float | None = None) -> dict[str, Any]:
    """Accuracy, per-class precision / recall, the confusion matrix and (one label per image)
    the expected calibration error `ece` of the softmax probabilities; with a temperature
    fitted on val, also `ece_calibrated`, the ECE of softmax(logits / T). `reject_below=P`
    adds `coverage` (the share of images whose calibrated top probability reaches P) and
    `accuracy_kept` (the accuracy on those): what answering "unknown" under P costs and buys;
    `reject_unfamiliar=Q` counts images whose familiarity is under Q as unknown too.

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
    check_reject_below(reject_below)
    check_reject_below(reject_unfamiliar, "reject_unfamiliar")
    classes = model.info.label_names
    if not classes:
        raise UsageError("this model has no label names to match the data's labels against")
    thresholds = multi_label_thresholds(model)
    _check_reject(reject_below, thresholds)
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
    logits, failed, familiar = _logits(model, samples, batch_size, device, tta,
                                       familiar=_has_bank(model, reject_unfamiliar))
    bad = set(failed)
    labels = [s.label for i, s in enumerate(samples) if i not in bad]
    if thresholds is not None:
        report = multilabel_report(labels, logits.sigmoid().tolist(), classes, thresholds)
    else:
        report = classification_report(labels, logits.argmax(1).tolist(), classes)
        # How far the softmax confidences are from the accuracy they come with (Guo et al.'s
        # top-label ECE, 15 bins); None with no image scored.
        y = torch.tensor(labels, dtype=torch.long)
        report["ece"] = expected_calibration_error(logits.float().softmax(1), y) if labels \
            else None
        t = model.info.temperature
        probs = (logits.float() / (t or 1.0)).softmax(1)
        if t is not None:
            report["temperature"] = t
            report["ece_calibrated"] = expected_calibration_error(probs, y) if labels else None
        if reject_below is not None or reject_unfamiliar is not None:
            kept = probs.max(1).values >= (reject_below or 0.0)
            if familiar is not None:
                kept &= familiar >= reject_unfamiliar
                report["reject_unfamiliar"] = reject_unfamiliar
            report["reject_below"] = reject_below
            report["coverage"] = float(kept.float().mean()) if labels else None
            report["accuracy_kept"] = (float((logits.argmax(1)[kept] == y[kept]).float().mean())
                                       if kept.any() else None)
    report["skipped"] = [samples[i].path for i in sorted(bad)]
    report["tta"] = tta
    return report
