"""Exporters: a name -> builder table, extended through the entry-point group `tlreg.exporters`.

An exporter turns a trained `TransferModel` into a folder another tool reads. The built-ins
register in tlreg's own pyproject.toml, exactly as a plugin package would register its own::

    [project.entry-points."tlreg.exporters"]
    tlreg = "tlreg.sharing.exporters:export_tlreg"   # the head-only artifact (docs/format.md)
    timm = "tlreg.sharing.exporters:export_timm"     # a plain timm folder
    onnx = "tlreg.sharing.onnx:export_onnx"          # model.onnx + preprocess.json

so `export_run(..., format=NAME)` and `tlreg export --format NAME` resolve every name the same
way backbones, heads and policies resolve: `tlreg.registry.get("exporter", NAME)`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tlreg._io import MODEL_JSON, save_file
from tlreg.errors import PluginError, UnknownNameError, UsageError
from tlreg.runs.checkpoint import load_run_model
from tlreg.sharing.card import base_model, deploy_card
from tlreg.sharing.format import (
    CARD_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    TIMM_WEIGHTS,
    clean_metrics,
    jsonable_data_config,
    problem_fields,
)
from tlreg.sharing.save import cpu_tensors, save_artifact, write_folder_atomically, write_json

if TYPE_CHECKING:
    from torch import nn

    from tlreg.models.transfer import TransferModel


class Exporter(Protocol):
    """What an entry point of `tlreg.exporters` gives: `exporter(model, out_dir, **kwargs)`.

    It writes `out_dir` (ideally through `tlreg.sharing.save.write_folder_atomically`, so a
    reader never sees half a folder) and returns the folder it wrote. `export_run` passes
    `metrics` (the checkpoint's validation metrics), `dataset` (a Hub dataset id or None),
    `pretrained_sha256` (the hash of the weights the run started from, or None) and
    `training_curve` (training.png, or None). An exporter must accept and may ignore any
    keyword it does not use, so new context can be passed without breaking plugins.
    """

    def __call__(self, model: TransferModel, out_dir: str | os.PathLike[str],
                 **kwargs: Any) -> Path: ...


def exporter_names() -> list[str]:
    """The registered exporter names, from package metadata only (imports nothing)."""
    from tlreg.plugins import find_plugins

    return sorted({p.name for p in find_plugins("exporter")})


def get_exporter(name: str) -> Exporter:
    """The exporter registered as `name`; an unknown name says which ones there are."""
    from tlreg.registry import get

    try:
        return get("exporter", name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc} (registered: {', '.join(exporter_names()) or 'none'})"
                               ) from None


# -- exporting runs ------------------------------------------------------------------------------


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               checkpoint: str = "best", *, format: str = "tlreg",
               dataset: str | None = None, options: Mapping[str, Any] | None = None) -> Path:
    """Turn a run directory into a shareable folder with the exporter named `format`.

    Metrics are the checkpoint's validation metrics, the curve is training.png, the pretrained
    weights hash from model.json; nothing else from the run (no paths, no optimizer state) goes in.
    `options` are the exporter's own keywords (onnx: opset, dynamic_batch, fp16, check_images).
    """
    exporter = get_exporter(format)  # before any work: an unknown name is a usage error
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_JSON).is_file():
        raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON})")
    model = load_run_model(run_dir, checkpoint)
    meta = json.loads((run_dir / MODEL_JSON).read_text(encoding="utf-8"))
    curve = run_dir / CURVE_FILE
    out = exporter(model, out_dir, metrics=run_metrics(run_dir, checkpoint), dataset=dataset,
                   pretrained_sha256=meta.get("pretrained_sha256"),
                   training_curve=curve if curve.is_file() else None, **dict(options or {}))
    if not isinstance(out, str | os.PathLike):
        raise PluginError(f"exporter {format!r} returned {type(out).__name__}, expected the "
                          f"path of the folder it wrote")
    return Path(out)


def run_metrics(run_dir: Path, checkpoint: str = "best") -> dict[str, float]:
    """Validation metrics of a run's checkpoint: its epoch's `val_*` values from history.json.

    Falls back to the checkpoint's state.json, then to summary.json's validation entries.
    """
    from tlreg._io import STATE_FILE, checkpoint_dir

    run_dir = Path(run_dir)
    found = checkpoint_dir(run_dir / "checkpoints" / checkpoint)
    state = _read_json(found / STATE_FILE) if found is not None else None
    state = state if isinstance(state, dict) else {}
    history = _read_json(run_dir / "history.json")
    epoch = state.get("epoch")
    if isinstance(history, list) and epoch is not None:
        for row in history:
            if isinstance(row, dict) and row.get("epoch") == epoch:
                picked = {k: v for k, v in row.items() if k.startswith("val_")}
                return clean_metrics({"epoch": epoch, **picked})
    picked = {k: v for k, v in state.items() if k.startswith("val_")}
    if picked:
        return clean_metrics({"epoch": epoch, **picked} if epoch is not None else picked)
    summary = _read_json(run_dir / "summary.json")
    if not isinstance(summary, dict):
        return {}
    return clean_metrics({k: v for k, v in summary.items()
                          if re.match(r"(best_)?val_", k) and not k.endswith(_COUNTS)})


_COUNTS = ("_images", "_files", "_seconds")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the built-in exporters ----------------------------------------------------------------------


def export_tlreg(model: TransferModel, out_dir: str | os.PathLike[str], *,
                 metrics: Mapping[str, Any] | None = None, dataset: str | None = None,
                 pretrained_sha256: str | None = None,
                 training_curve: str | os.PathLike[str] | None = None, **_: Any) -> Path:
    """`tlreg`: the head-only artifact (docs/format.md); `save_artifact` as an exporter."""
    return save_artifact(model, out_dir, metrics=metrics, dataset=dataset,
                         pretrained_sha256=pretrained_sha256, training_curve=training_curve)


def export_timm(model: TransferModel, out_dir: str | os.PathLike[str], *,
                metrics: Mapping[str, Any] | None = None, dataset: str | None = None,
                **_: Any) -> Path:
    """`timm`: a plain timm folder; `timm.create_model("local-dir:OUT", pretrained=True)`.

    Pushed, `timm.create_model("hf-hub:REPO", pretrained=True)` and transformers'
    `pipeline("image-classification", model=REPO)` load it. Only a linear head maps onto timm's
    own classifier; other heads are an error. Run context (metrics, dataset) has no place in
    timm's config: it goes into the model card (README.md) only.
    """
    from torch import nn

    from tlreg.models import _timm

    info = model.info
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.head.modules()
              if not isinstance(m, nn.Linear | nn.Dropout | nn.Sequential | nn.Identity)]
    if info.head != "linear" or len(linears) != 1 or others:
        raise UsageError(f"--format timm needs a linear head (timm's classifier is one linear "
                         f"layer); this model has a {info.head!r} head. Use --format tlreg")
    full = _timm.create_backbone(info.timm_name, info.tag, pretrained=False)
    full.load_state_dict(model.backbone.state_dict(), strict=True)
    full.reset_classifier(info.num_classes)
    classifier = full.get_classifier()
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != linears[0].weight.shape:
        raise UsageError(f"timm model {info.timm_name!r} has no single linear classifier of the "
                         f"head's shape; use --format tlreg")
    classifier.load_state_dict(linears[0].state_dict())
    config = _timm_config(model, full)
    state = cpu_tensors(full.state_dict())
    card = deploy_card("timm", labels=config["label_names"], architecture=config["architecture"],
                       backbone=info.backbone, head=info.head, base_model=base_model(info),
                       problem_type=config.get("problem_type"),
                       thresholds=config.get("thresholds"),
                       metrics=clean_metrics(metrics or {}), dataset=dataset)

    def write(tmp: Path) -> None:
        save_file(state, tmp / TIMM_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")

    out_dir = Path(out_dir)
    write_folder_atomically(out_dir, write)
    return out_dir


def _timm_config(model: TransferModel, full: nn.Module) -> dict[str, Any]:
    drop = {"url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "label_names",
            "label_descriptions", "label_offset", "test_input_size", "test_crop_pct"}
    cfg = {k: v for k, v in dict(full.pretrained_cfg).items() if k not in drop and v is not None}
    cfg.update(jsonable_data_config(model.data_config))
    cfg["num_classes"] = model.info.num_classes
    cfg["custom_load"] = False
    architecture = cfg.pop("architecture", None) or model.info.timm_name
    cfg = json.loads(json.dumps(cfg, default=list))
    labels = list(model.info.label_names) or [str(i) for i in range(model.info.num_classes)]
    out = {"architecture": architecture, "num_classes": model.info.num_classes,
           "num_features": int(full.num_features), "label_names": labels,
           "pretrained_cfg": cfg}
    # What the logits mean (timm has no field for it; transformers' name and values): a
    # multi-label model's are independent sigmoids, with the thresholds tuned on val.
    return out | {k: v for k, v in problem_fields(model.info.problem_type,
                                                  model.info.thresholds).items()
                  if k != "format_version"}
