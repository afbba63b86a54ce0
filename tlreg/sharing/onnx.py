"""The `onnx` exporter: the whole model (backbone + any head) as model.onnx + preprocess.json.

It uses torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`): it traces
the eval-mode model once, needs no extra package (the dynamo exporter needs onnxscript), takes
any opset from 7 up (dynamo: 18 and up) and gives timm's CNNs and ViTs a dynamic batch axis
through `dynamic_axes`. torch marks it deprecated; when it goes, `_export` is the one place to
change. The folder is written aside and swapped in whole, and only after onnxruntime has run
the file on real (or, without any, synthetic) images and matched PyTorch's logits.

A frozen run's familiarity bank (tlreg.engine.familiarity) goes into the graph itself: a second
output, `familiarity`, the conformal p-value `predict --reject-unfamiliar` thresholds, computed
from the pooled features by the same matmul, top-k and count as in PyTorch. So a deployed model
turns away images of something else with onnxruntime alone, and no second file can go missing
or be paired with the wrong model. Such a file is format version 2 (an older tlreg, which
unpacks one output, says to upgrade instead of failing on the second).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.errors import TlregError, UsageError
from tlreg.preprocess import (
    FAMILIARITY_OUTPUT,
    FAMILIARITY_VERSION,
    MODEL_FILE,
    PREPROCESS_FILE,
    Preprocess,
    deploy_config,
)
from tlreg.sharing.card import base_model, deploy_card
from tlreg.sharing.format import CARD_FILE, clean_metrics
from tlreg.sharing.save import write_folder_atomically, write_json

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tlreg.models.transfer import TransferModel

DEFAULT_OPSET = 17  # LayerNormalization as one node; onnxruntime >= 1.12 runs it
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"  # transformers' names
FP32_TOLERANCE = 1e-4  # max abs difference of the logits, onnxruntime vs PyTorch
FP16_TOLERANCE = 2e-2  # relative to the largest logit (at least 1): half precision's rounding
#: familiarity, onnxruntime vs PyTorch: a p-value moves in steps of 1 / (1 + val images); fp32
#: rounding may move an image across one val score, half precision's (features to ~1e-3)
#: across a few more.
FAMILIARITY_STEPS, FAMILIARITY_STEPS_FP16 = 1, 10
INSTALL_HINT = "pip install 'tlreg[onnx]'"


def export_onnx(model: TransferModel, out_dir: str | os.PathLike[str], *,
                opset: int | None = None, dynamic_batch: bool | None = None,
                fp16: bool | None = None,
                check_images: Sequence[str | os.PathLike[str]] | None = None,
                metrics: Mapping[str, Any] | None = None, dataset: str | None = None,
                familiarity: bool | None = None, **_: Any) -> Path:
    """`onnx`: OUT/model.onnx, OUT/preprocess.json (the same fields in the ONNX metadata) and
    the model card OUT/README.md (with the run's metrics and dataset, for `tlreg push`).

    `check_images` are image files for the check after writing (a few synthetic images when
    none are given). `familiarity` (default: whenever the model has a bank) adds the
    `familiarity` output; False leaves it out (format version 1, which any tlreg reads).
    """
    opset = DEFAULT_OPSET if opset is None else opset
    dynamic_batch = True if dynamic_batch is None else bool(dynamic_batch)
    fp16 = bool(fp16)
    bank = _bank(model, familiarity)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise UsageError(f"--opset must be a positive integer, got {opset!r}")
    try:
        import onnx  # noqa: F401 - both are needed before any work
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--format onnx needs {exc.name}: {INSTALL_HINT}") from None
    from tlreg import __version__

    info = model.info
    preprocess = Preprocess.from_config(model.data_config)
    labels = list(info.label_names) or [str(i) for i in range(info.num_classes)]
    config = deploy_config(
        preprocess, labels, info.problem_type, info.thresholds or None, info.temperature,
        backbone=info.backbone, timm_name=info.timm_name, head=info.head, opset=opset,
        dynamic_batch=dynamic_batch, dtype="float16" if fp16 else "float32",
        input_name=INPUT_NAME, output_name=OUTPUT_NAME, tlreg_version=__version__,
        **({"format_version": FAMILIARITY_VERSION, "familiarity_output": FAMILIARITY_OUTPUT,
            "familiarity": {"k": int(bank["k"].item()), "bank_images": len(bank["bank"]),
                            "val_images": len(bank["val_scores"])}} if bank else {}))
    images = _check_batch(preprocess, check_images)
    card = deploy_card("onnx", labels=labels, architecture=info.timm_name,
                       backbone=info.backbone, head=info.head, base_model=base_model(info),
                       problem_type=info.problem_type, thresholds=config.get("thresholds"),
                       metrics=clean_metrics(metrics or {}), dataset=dataset)

    def write(tmp: Path) -> None:
        path = tmp / MODEL_FILE
        _export(model, path, preprocess, opset, dynamic_batch, fp16, bank)
        _add_metadata(path, config)
        write_json(tmp / PREPROCESS_FILE, config)
        check(model, path, images, dynamic_batch, fp16, opset, bank)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")

    out_dir = Path(out_dir)
    write_folder_atomically(out_dir, write)
    return out_dir


def _bank(model: TransferModel, wanted: bool | None) -> dict[str, torch.Tensor] | None:
    """The familiarity bank to build into the graph: the model's, checked; None without."""
    if wanted is not None and not isinstance(wanted, bool):
        raise UsageError(f"familiarity must be true or false, got {wanted!r}")
    if wanted is False or (wanted is None and model.familiarity is None):
        return None
    if model.familiarity is None:
        raise UsageError("familiarity=True needs a model with a familiarity bank (a run whose "
                         "backbone stayed frozen, or its artifact)")
    from tlreg.engine.familiarity import check

    return check(model.familiarity, model.feature_dim, "the model's familiarity bank")


def _with_familiarity(net: torch.nn.Module, bank: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`net` with a second output: tlreg.engine.familiarity.familiarity of its features.

    Restated here rather than traced from tlreg.engine.familiarity: that path chunks the bank
    in a Python loop, reads k with .item() and counts with torch.searchsorted, none of which
    the ONNX exporter turns into a graph. The same matmul, top-k and count in one expression
    trace cleanly, and export checks the two agree.
    """
    import torch
    from torch.nn.functional import normalize

    class WithFamiliarity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            # float32 of the stored float16 rows: the values PyTorch's path multiplies by
            self.register_buffer("bank_t", bank["bank"].float().T.contiguous())
            self.register_buffer("val_scores", bank["val_scores"].float().contiguous())
            self.k = max(1, min(int(bank["k"].item()), len(bank["bank"])))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.net.forward_features(x)
            kth = (normalize(f.float(), dim=1) @ self.bank_t).topk(self.k, dim=1).values[:, -1]
            below = (self.val_scores <= kth[:, None]).sum(1)  # searchsorted(right=True)
            return self.net.head(f), (1 + below).float() / (1 + self.val_scores.numel())

    return WithFamiliarity().eval()


def _export(model: TransferModel, path: Path, preprocess: Preprocess, opset: int,
            dynamic_batch: bool, fp16: bool,
            bank: dict[str, torch.Tensor] | None = None) -> None:
    """torch.onnx.export of an eval-mode CPU copy; exporter failures as one UsageError."""
    import copy
    import warnings

    import torch
    from torch.onnx.errors import OnnxExporterError

    net = copy.deepcopy(model).cpu().eval()
    dtype = torch.float16 if fp16 else torch.float32
    net = net.to(dtype)
    outputs = [OUTPUT_NAME]
    if bank is not None:  # wrapped after the cast: the bank and val scores stay float32
        net, outputs = _with_familiarity(net, bank), [OUTPUT_NAME, FAMILIARITY_OUTPUT]
    # Traced at batch 2 when the axis is dynamic, so nothing batch-1-specific is baked in.
    x = torch.zeros(2 if dynamic_batch else 1, *preprocess.input_size, dtype=dtype)
    axes = ({name: {0: "batch"} for name in [INPUT_NAME, *outputs]} if dynamic_batch
            else None)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=outputs,
                              dynamic_axes=axes, do_constant_folding=True)
    except (OnnxExporterError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot export {model.info.backbone} + {model.info.head} head to ONNX "
                         f"opset {opset}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _add_metadata(path: Path, config: dict[str, Any]) -> None:
    """Every preprocess.json field as a metadata_props entry, its value as JSON text."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in config.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _check_batch(preprocess: Preprocess,
                 files: Sequence[str | os.PathLike[str]] | None) -> np.ndarray:
    """The images the check runs on, preprocessed as `tlreg predict model.onnx` will."""
    import numpy as np
    from PIL import Image

    from tlreg.data.images import load_rgb

    if files:
        return preprocess.batch([load_rgb(f) for f in list(files)[:7]])
    # Smooth gradients with noise, of three aspect ratios: every crop and resize path is hit.
    rng = np.random.default_rng(0)
    out = []
    for w, h in ((97, 75), (64, 128), (200, 200)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels, "RGB"))
    return preprocess.batch(out)


def check(model: TransferModel, path: Path, images: np.ndarray, dynamic_batch: bool,
          fp16: bool, opset: int, bank: dict[str, torch.Tensor] | None = None) -> float:
    """onnxruntime's logits for `images` against PyTorch's (fp32): the max abs difference.

    Each image alone (batch 1), and all in one batch where the batch axis is dynamic. Raises
    a TlregError when they differ by more than the tolerance, a UsageError when onnxruntime
    cannot run the file (an opset too old for one of its operators). With a bank, the
    familiarity output is checked against PyTorch's too.
    """
    import copy

    import numpy as np
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own pybind classes (NotImplemented, Fail)
        raise UsageError(f"onnxruntime cannot run {model.info.backbone} exported at opset "
                         f"{opset}: {_first_line(exc)}; try a newer --opset (default "
                         f"{DEFAULT_OPSET})") from None
    net = copy.deepcopy(model).cpu().float().eval()
    with torch.no_grad():
        features = net.forward_features(torch.from_numpy(images))
        ref = net.head(features).numpy()
    dtype = np.float16 if fp16 else np.float32
    runs = [session.run(None, {INPUT_NAME: images[i:i + 1].astype(dtype)})
            for i in range(len(images))]
    got = [[np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]]
    if dynamic_batch:
        got.append(session.run(None, {INPUT_NAME: images.astype(dtype)}))
    if bank is not None:
        _check_familiarity(model, features, bank, [g[1] for g in got], fp16)
    diff = max(float(np.abs(g[0].astype(np.float32) - ref).max()) for g in got)
    tolerance = FP16_TOLERANCE * max(1.0, float(np.abs(ref).max())) if fp16 else FP32_TOLERANCE
    if not diff <= tolerance:
        raise TlregError(f"the ONNX export of {model.info.backbone} does not match PyTorch: "
                         f"logits differ by {diff:.3g} (tolerance {tolerance:.3g}) on "
                         f"{len(images)} images; nothing was written")
    return diff


def _check_familiarity(model: TransferModel, features: torch.Tensor,
                       bank: dict[str, torch.Tensor], got: list[np.ndarray], fp16: bool) -> None:
    """onnxruntime's familiarity against tlreg.engine.familiarity's, in val-rank steps."""
    import numpy as np

    from tlreg.engine.familiarity import familiarity

    ref = familiarity(features, bank).numpy()
    step = 1 / (1 + len(bank["val_scores"]))
    allowed = (FAMILIARITY_STEPS_FP16 if fp16 else FAMILIARITY_STEPS) * step + 1e-6
    diff = max(float(np.abs(g - ref).max()) for g in got)
    if not diff <= allowed:
        raise TlregError(f"the ONNX export of {model.info.backbone} does not match PyTorch: "
                         f"familiarity differs by {diff / step:.1f} val ranks (at most "
                         f"{allowed / step:.0f}); nothing was written")
