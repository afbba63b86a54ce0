"""Loading a local artifact folder: verified first, then rebuilt exactly, then filled in.

In order, and stopping at the first failure with a message that says what to do: no pickles,
a config this tlreg can read, every checksum, the backbone installed here (same timm model and
tag), the pretrained weights hashing to what the head was trained on, and every tensor's name,
shape and dtype. Only safetensors are ever read.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlreg.engine.objective import SINGLE_LABEL
from tlreg.errors import (
    ArtifactError,
    BackboneMismatchError,
    BackboneMismatchWarning,
    BackboneUnavailableError,
    PluginError,
    UnknownNameError,
    UsageError,
)
from tlreg.runs.checkpoint import _tuples
from tlreg.sharing.format import (
    BACKBONE_FILE,
    FAMILIARITY_FILE,
    HEAD_FILE,
    WEIGHTS_DELTA,
    WEIGHTS_FULL,
    WEIGHTS_NONE,
    check_no_pickles,
    dist_version,
    few,
    read_config,
    tensor_desc,
    verify_files,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

    from tlreg.models.transfer import ModelInfo, TransferModel
    from tlreg.specs import BackboneSpec


def load_artifact_dir(folder: Path, *, allow_backbone_mismatch: bool = False) -> TransferModel:
    """Verify and load a local artifact folder (see the module docstring for the checks)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.exists() and folder.with_name(f".{folder.name}.old").is_dir():
        folder = folder.with_name(f".{folder.name}.old")  # the old state of a killed swap
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    check_no_pickles(_local_files(folder), str(folder))
    config = read_config(folder)
    verify_files(folder, config)
    model, info = _rebuild(config, allow_backbone_mismatch)
    bb = config["backbone"]

    def read(name: str) -> dict[str, Any]:
        try:  # a damaged header can match its checksum if the file was written so
            return load_file(folder / name)
        except Exception as exc:
            raise ArtifactError(f"{folder / name} is not a readable safetensors file: "
                                f"{exc}") from None

    if bb["weights"] != WEIGHTS_NONE:
        _load_strict(model.backbone, read(BACKBONE_FILE), f"{BACKBONE_FILE} ({bb['weights']})",
                     partial=bb["weights"] == WEIGHTS_DELTA)
    _load_strict(model.head, read(HEAD_FILE), HEAD_FILE, partial=False)
    if config.get("familiarity") is not None:  # verified by verify_files above
        from tlreg.engine.familiarity import check

        model.familiarity = check(read(FAMILIARITY_FILE), model.feature_dim,
                                  str(folder / FAMILIARITY_FILE), ArtifactError)
    model.info = info
    model.eval()
    return model


def _rebuild(config: Mapping[str, Any], allow_mismatch: bool) -> tuple[TransferModel, ModelInfo]:
    """The model config.json describes, with pretrained weights where the artifact needs them."""
    from tlreg.models.backbones import weights_sha256
    from tlreg.models.transfer import ModelInfo, create_model
    from tlreg.registry import get_policy

    bb = config["backbone"]
    spec = _backbone_spec(bb)
    head = config["head"]
    policy = config["policy"].get("name") or "feature-extract"
    policy_args = config["policy"].get("args") or {}
    try:
        get_policy(policy)
    except (UnknownNameError, PluginError):  # inference needs no policy: fall back quietly
        policy, policy_args = "feature-extract", {}
    try:
        model = create_model(
            bb["name"], config["num_classes"], head=head["name"], head_args=head["args"],
            policy=policy, policy_args=policy_args, pretrained=bb["weights"] != WEIGHTS_FULL,
            label_names=tuple(config["label_names"]),
        )
    except (UnknownNameError, PluginError) as exc:
        provider = head.get("provider")
        hint = f" (it came from package {provider!r}: pip install {provider})" if provider else ""
        raise BackboneUnavailableError(f"cannot rebuild the model: {exc}{hint}") from exc
    if model.feature_dim != bb.get("feature_dim", model.feature_dim):
        raise ArtifactError(f"backbone {bb['name']!r} gives {model.feature_dim} features here, the "
                            f"artifact was trained on {bb['feature_dim']}")
    expected = bb.get("weights_sha256")
    if bb["weights"] != WEIGHTS_FULL:
        got = weights_sha256(model.backbone.state_dict())
        if not expected:
            warnings.warn(f"the artifact records no hash for the weights of backbone "
                          f"{bb['name']!r}: they cannot be verified", BackboneMismatchWarning,
                          stacklevel=3)
        elif got != expected:
            message = (f"the pretrained weights of backbone {bb['name']!r} ({spec.arch}) here "
                       f"hash to {got}, but the head was trained on weights hashing to "
                       f"{expected}; its predictions would be wrong")
            if not allow_mismatch:
                raise BackboneMismatchError(
                    message + ". Get the original weights, or pass --allow-backbone-mismatch "
                              "(allow_backbone_mismatch=True) to load anyway")
            warnings.warn(message + " (loaded anyway: allow_backbone_mismatch)",
                          BackboneMismatchWarning, stacklevel=3)
    info = ModelInfo(
        backbone=bb["name"], provider=bb.get("provider") or model.info.provider,
        timm_name=bb["timm_name"], tag=bb.get("tag"), weights_source=bb["weights_source"],
        head=head["name"], num_classes=config["num_classes"], head_args=dict(head["args"]),
        policy=config["policy"].get("name") or policy,
        policy_args=dict(config["policy"].get("args") or {}),
        label_names=tuple(config["label_names"]), hub_id=bb.get("hub_id"),
        data_config=_data_config_from_json(config["data_config"], model.data_config),
        problem_type=config.get("problem_type") or SINGLE_LABEL,
        thresholds=tuple(float(v) for v in config.get("thresholds") or ()),
        temperature=config.get("temperature"),  # checked by read_config
    )
    return model, info


def _backbone_spec(bb: Mapping[str, Any]) -> BackboneSpec:
    """The installed spec for the artifact's backbone, or an error naming who provides it."""
    from tlreg.models import _timm
    from tlreg.models.backbones import get_backbone

    name, timm_name = bb["name"], bb["timm_name"]
    made = f"timm {bb['timm_version']}" if bb.get("timm_version") else "a newer timm"
    if not _timm.is_model(timm_name):
        raise BackboneUnavailableError(
            f"backbone {name!r} needs timm model {timm_name!r}, which the installed timm "
            f"{dist_version('timm')} does not have; the artifact was made with {made}: "
            f"pip install -U 'timm>={bb.get('timm_version') or dist_version('timm')}'")
    try:
        spec = get_backbone(name)
    except (UnknownNameError, PluginError) as exc:
        provider = bb.get("provider")
        version = bb.get("provider_version")
        pin = f"=={version}" if version else ""
        hint = (f"it is provided by the package {provider!r}"
                f"{f' (version {version} made this artifact)' if version else ''}: "
                f"pip install '{provider}{pin}'") if provider and provider != "timm" else \
            f"it needs {made}"
        raise BackboneUnavailableError(f"backbone {name!r} is not available here ({exc}); "
                                       f"{hint}") from exc
    if spec.timm_name != timm_name or (spec.tag or None) != (bb.get("tag") or None):
        raise BackboneMismatchError(
            f"backbone {name!r} is {spec.arch} here, but the artifact was trained on "
            f"{timm_name}{'.' + bb['tag'] if bb.get('tag') else ''}; install the version of "
            f"{bb.get('provider') or 'its package'} that made it ({bb.get('provider_version')})")
    return spec


def _data_config_from_json(saved: Mapping[str, Any], default: Mapping[str, Any]) -> dict[str, Any]:
    return {**default, **_tuples(saved)}


def _load_strict(module: nn.Module, tensors: Mapping[str, Tensor], what: str,
                 partial: bool) -> None:
    """Load with names, shapes and dtypes checked; `partial` allows a subset (a delta)."""
    own = module.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    missing = [] if partial else sorted(set(own) - set(tensors))
    if unexpected or missing:
        raise ArtifactError(f"{what} does not fit the model the config describes: "
                            f"missing {few(missing)}, unexpected {few(unexpected)}")
    for name, tensor in tensors.items():
        ref = own[name]
        if tuple(ref.shape) != tuple(tensor.shape) or ref.dtype != tensor.dtype:
            raise ArtifactError(f"{what}: tensor {name!r} is {tensor_desc(tensor)}, the model "
                                f"expects {tensor_desc(ref)}")
    result = module.load_state_dict(dict(tensors), strict=not partial)
    if result.missing_keys and not partial:  # pragma: no cover - checked above
        raise ArtifactError(f"{what}: missing {few(result.missing_keys)}")


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts]

