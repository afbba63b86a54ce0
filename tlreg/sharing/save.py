"""Writing an artifact: the head, the backbone's delta, config.json and the card, atomically.

Only what cannot be rebuilt by name is stored: for a named pretrained backbone (timm's Hub
weights, a plugin's loader) the tensors training changed, for any other backbone all of it.
Every folder tlreg writes for sharing (an artifact, a timm export, a pulled copy) goes through
`write_folder_atomically`, so a reader finds the old folder or the new one, never half of each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg._io import follow_umask, save_file, temp_dir
from tlreg.errors import ArtifactError, BackboneMismatchError, TlregError, UsageError
from tlreg.sharing.card import model_card
from tlreg.sharing.format import (
    BACKBONE_FILE,
    CARD_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    FAMILIARITY_FILE,
    FORMAT_NAME,
    HEAD_FILE,
    NAMED_SOURCES,
    WEIGHTS_DELTA,
    WEIGHTS_FULL,
    WEIGHTS_NONE,
    clean_metrics,
    dist_version,
    few,
    file_sha256,
    jsonable_data_config,
    problem_fields,
    tensor_desc,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from tlreg.models.transfer import ModelInfo, TransferModel


def save_artifact(model: TransferModel, directory: str | os.PathLike[str], *,
                  metrics: Mapping[str, Any] | None = None,
                  training_curve: str | os.PathLike[str] | None = None,
                  pretrained_state: Mapping[str, Tensor] | None = None,
                  pretrained_sha256: str | None = None,
                  dataset: str | None = None) -> Path:
    """Write `model` as an artifact folder at `directory`, atomically; returns the folder.

    For a named pretrained backbone the stored delta is computed against `pretrained_state`
    (the backbone state dict before training); without it, the pretrained backbone is rebuilt
    (and downloaded if needed). `pretrained_sha256` (a run's recorded hash) skips that rebuild
    when the backbone did not change, and otherwise checks the rebuilt weights are the same.
    """

    directory = Path(directory)
    head = cpu_tensors(model.head.state_dict())
    mode, backbone, weights_hash = _backbone_part(model, pretrained_state, pretrained_sha256)
    curve = Path(training_curve) if training_curve else None
    if curve is not None and not curve.is_file():
        raise UsageError(f"training curve {curve} does not exist")
    config = _config(model, mode, weights_hash, metrics, dataset)
    bank = _familiarity(model)

    def write(tmp: Path) -> None:
        save_file(head, tmp / HEAD_FILE, metadata={"format": "pt"})
        if mode != WEIGHTS_NONE:
            save_file(backbone, tmp / BACKBONE_FILE, metadata={"format": "pt"})
        if curve is not None:
            shutil.copyfile(curve, tmp / CURVE_FILE)
        config["files"] = {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size}
                           for p in sorted(tmp.iterdir())}
        if bank is not None:  # beside `files`, so an older tlreg still reads the artifact
            path = tmp / FAMILIARITY_FILE
            save_file(bank, path, metadata={"format": "pt"})
            config["familiarity"] = {"sha256": file_sha256(path), "size": path.stat().st_size,
                                     "k": int(bank["k"].item()), "bank_images": len(bank["bank"]),
                                     "val_images": len(bank["val_scores"])}
        write_json(tmp / CONFIG_FILE, config)
        (tmp / CARD_FILE).write_text(model_card(config, has_curve=curve is not None),
                                     encoding="utf-8")

    write_folder_atomically(directory, write)
    return directory


def _familiarity(model: TransferModel) -> dict[str, Tensor] | None:
    """The model's training-feature bank (a frozen run's), checked, or None."""
    if model.familiarity is None:
        return None
    from tlreg.engine.familiarity import check

    check(model.familiarity, model.feature_dim, "cannot save the model's familiarity bank: it",
          ArtifactError)
    return cpu_tensors(model.familiarity)


# -- the backbone: nothing, a delta, or all of it ------------------------------------------------


def _backbone_part(model: TransferModel, pretrained_state: Mapping[str, Tensor] | None,
                   pretrained_sha256: str | None) -> tuple[str, dict[str, Tensor], str | None]:
    """(weights mode, tensors for backbone.safetensors, canonical hash of pretrained weights)."""
    from tlreg.models.backbones import weights_sha256

    current = model.backbone.state_dict()
    source = model.info.weights_source
    if source not in NAMED_SOURCES:  # random init or a local file: nobody can rebuild it
        known = weights_sha256(_restrict(pretrained_state, current)) if pretrained_state else None
        return WEIGHTS_FULL, cpu_tensors(current), known or pretrained_sha256
    unchanged = pretrained_sha256 and weights_sha256(current) == pretrained_sha256
    if pretrained_state is None and unchanged:
        return WEIGHTS_NONE, {}, pretrained_sha256
    if pretrained_state is None:
        pretrained_state = pretrained_backbone(model.info).state_dict()
    pretrained_state = _restrict(pretrained_state, current)
    got = weights_sha256(pretrained_state)
    if pretrained_sha256 and got != pretrained_sha256:
        raise BackboneMismatchError(
            f"the pretrained weights of backbone {model.info.backbone!r} now hash to {got}, but "
            f"the run was trained on weights hashing to {pretrained_sha256}: the stored delta "
            f"would be wrong. Export on a machine with the original weights")
    delta = {}
    for name, tensor in current.items():
        ref = pretrained_state[name]
        if ref.shape != tensor.shape or ref.dtype != tensor.dtype:
            raise ArtifactError(f"backbone tensor {name!r} is {tensor_desc(tensor)} in the model "
                                f"but {tensor_desc(ref)} in the pretrained weights")
        if not _equal(ref, tensor):
            delta[name] = tensor
    return (WEIGHTS_DELTA if delta else WEIGHTS_NONE), cpu_tensors(delta), got


def _restrict(state: Mapping[str, Tensor] | None, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's own keys from `state` (a full-model state dict may carry a classifier)."""
    state = dict(state or {})
    missing = sorted(set(like) - set(state))
    if missing:
        raise ArtifactError(f"pretrained state lacks backbone tensors {few(missing)}")
    return {k: state[k] for k in like}


def _equal(a: Tensor, b: Tensor) -> bool:
    import torch

    return bool(torch.equal(a.detach().cpu(), b.detach().cpu()))


def pretrained_backbone(info: ModelInfo) -> nn.Module:
    """The named pretrained backbone `info` was built on (downloads through timm if needed)."""
    from tlreg.models.backbones import build_backbone, get_backbone

    return build_backbone(get_backbone(info.backbone), name=info.backbone, pretrained=True)


# -- config.json: what the model is and where each part came from ------------------------------


def _config(model: TransferModel, mode: str, weights_hash: str | None,
            metrics: Mapping[str, Any] | None, dataset: str | None) -> dict[str, Any]:
    import timm

    from tlreg import __version__

    info = model.info
    return {
        "format": FORMAT_NAME,
        **problem_fields(info.problem_type, info.thresholds),
        # softmax(logits / T), fitted on val; a tlreg that predates it reads the artifact
        # and gives the plain softmax (same classes, uncalibrated probabilities)
        **({"temperature": info.temperature} if info.temperature is not None else {}),
        "tlreg_version": __version__,
        "backbone": {
            "name": info.backbone,
            "provider": info.provider,
            "provider_version": dist_version(info.provider),
            "timm_name": info.timm_name,
            "tag": info.tag,
            "timm_version": timm.__version__,
            "weights_source": info.weights_source,
            "hub_id": info.hub_id,
            "revision": _cached_revision(info.hub_id) if info.weights_source == "timm" else None,
            "weights_sha256": weights_hash,
            "weights": mode,
            "feature_dim": model.feature_dim,
            "global_pool": _global_pool(model.backbone),
        },
        "head": {"name": info.head, "provider": _provider("head", info.head),
                 "args": dict(info.head_args)},
        "policy": {"name": info.policy, "provider": _provider("policy", info.policy),
                   "args": dict(info.policy_args)},
        "num_classes": info.num_classes,
        "label_names": list(info.label_names) or [str(i) for i in range(info.num_classes)],
        "data_config": jsonable_data_config(model.data_config),
        "metrics": clean_metrics(metrics),
        "dataset": dataset,
    }


def _global_pool(backbone: nn.Module) -> str | None:
    pool = getattr(backbone, "global_pool", None)
    if isinstance(pool, str):
        return pool
    pool_type = getattr(pool, "pool_type", None)
    return pool_type if isinstance(pool_type, str) else None


def _provider(kind: str, name: str) -> str | None:
    from tlreg.registry import find

    try:
        return find(kind, name).dist
    except TlregError:
        return None


def _cached_revision(hub_id: str | None) -> str | None:
    """The commit of the weights in the local HF cache, when timm fetched them from the Hub."""
    if not hub_id:
        return None
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo, _, rev = hub_id.partition("@")
    ref = (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
           / "refs" / (rev or "main"))
    try:
        value = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value if re.fullmatch(r"[0-9a-f]{40}", value) else None


# -- the folder swap -----------------------------------------------------------------------------


def write_folder_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh sibling folder, then swap it in for `directory`.

    An existing folder is only replaced when it is empty or a tlreg artifact, so a typo in the
    output path cannot wipe unrelated files; on any failure the old folder stays as it was.
    """
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():  # a swap killed between its two renames
        os.replace(old, directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not _replaceable(directory):
        raise UsageError(f"{directory} is not empty and is not a tlreg artifact; "
                         f"choose a new folder (nothing was written)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, prefix=f".{directory.name}.tmp-")
    try:
        write(tmp)
        follow_umask(tmp)
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not directory.exists():
            os.replace(old, directory)
        raise


def _replaceable(directory: Path) -> bool:
    if _is_onnx_export(directory):
        return True
    try:
        cfg = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    is_artifact = isinstance(cfg, dict) and cfg.get("format") == FORMAT_NAME
    is_timm_export = isinstance(cfg, dict) and "architecture" in cfg and "pretrained_cfg" in cfg
    return is_artifact or is_timm_export


def _is_onnx_export(directory: Path) -> bool:
    """A folder `--format onnx` wrote: its preprocess.json says so."""
    from tlreg.preprocess import FORMAT_NAME as ONNX_FORMAT
    from tlreg.preprocess import PREPROCESS_FILE

    try:
        cfg = json.loads((directory / PREPROCESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == ONNX_FORMAT


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (no NaN), indented: what every config file in a shared folder is."""
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def cpu_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached contiguous CPU copies: what safetensors writes, never aliasing the model."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
