"""Run directories and checkpoints, written atomically.

A checkpoint is a directory holding `model.safetensors` (the TransferModel state dict),
optionally `frozen.safetensors` (tensors that cannot change during the run, such as a backbone
that stays frozen: a hard link to one file written once per run, so an epoch does not rewrite
them; `model.safetensors` then holds the rest), optionally `train_state.safetensors` (optimizer
and RNG tensors) and `state.json` (everything else). It is written beside its final place and
swapped in with renames, so a reader never sees a half-written pair: after a crash, either the
old or the new checkpoint is there whole. Each checkpoint directory is complete on its own.

Run directory layout::

    RUN/config.yaml  run.json  model.json  history.json  summary.json  training.png
    RUN/checkpoints/best/   RUN/checkpoints/last/
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import MODEL_JSON, atomic_write_json, read_checkpoint, read_json
from tlreg.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from tlreg.models.transfer import ModelInfo, TransferModel

def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON gives lists; timm's data configs use tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def info_to_dict(info: ModelInfo) -> dict[str, Any]:
    d = asdict(info)
    d["label_names"] = list(info.label_names)
    return d


#: A training checkpoint's state.json (the `last` one, which --resume reads).
TRAIN_STATE_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "history": list, "optimizer": dict, "scheduler": dict, "rng": dict,
    "best_val_accuracy": (int, float), "skipped": list,
}
_INFO_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "backbone": str, "timm_name": str, "head": str, "num_classes": int, "policy": str,
    "head_args": dict, "policy_args": dict, "label_names": (list, tuple),
}


def info_from_dict(d: Mapping[str, Any]) -> ModelInfo:
    from tlreg.models.transfer import ModelInfo

    for key, typ in _INFO_SCHEMA.items():
        if not isinstance(d.get(key), typ) or (typ is int and isinstance(d.get(key), bool)):
            raise UsageError(f"model.json's info.{key} is missing or not "
                             f"{getattr(typ, '__name__', 'a list')}: the run file is damaged")
    d = dict(d)
    d["label_names"] = tuple(d.get("label_names") or ())
    known = set(ModelInfo.__dataclass_fields__)
    return ModelInfo(**{k: v for k, v in d.items() if k in known})


def write_model_json(run_dir: Path, model: TransferModel, extra: Mapping[str, Any] = ()) -> None:
    """What the run's model is: ModelInfo, the data config and the pretrained weights hash."""
    data = {"info": info_to_dict(model.info), "data_config": model.data_config, **dict(extra)}
    atomic_write_json(Path(run_dir) / MODEL_JSON, data)


def load_run_model(run_dir: Path, checkpoint: str = "best") -> TransferModel:
    """Rebuild a run's TransferModel (no download: every weight comes from the checkpoint)."""
    from tlreg.models.transfer import build_from_info

    run_dir = Path(run_dir)
    if checkpoint not in {"best", "last"}:
        raise UsageError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    meta_path = run_dir / MODEL_JSON
    if not meta_path.is_file():
        raise UsageError(f"{run_dir} is not a tlreg run directory (no {MODEL_JSON})")
    meta = read_json(meta_path)
    info = info_from_dict(meta["info"])
    if meta.get("data_config"):  # the preprocessing it was trained with (--img-size included)
        info = replace(info, data_config=_tuples(meta["data_config"]))
    model = build_from_info(info, pretrained=False)
    tensors, _, _ = read_checkpoint(run_dir / "checkpoints" / checkpoint)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model
