"""Backbone specs: which timm model, which weights, and the defaults that suit it.

A `BackboneSpec` is plain data; building it into a module imports torch and timm lazily, so
plugins can define specs at import time without slowing down `tlreg --help`.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tlreg.errors import WeightsError, first_line
from tlreg.specs import BackboneSpec, StateDict

if TYPE_CHECKING:
    from torch import Tensor, nn

#: `best-of:RANK_DIR` names the backbone `tlreg rank --out RANK_DIR` recommended.
BEST_OF_PREFIX = "best-of:"
#: The file `tlreg rank --out DIR` writes (tlreg.analysis.rank) and `best-of:DIR` reads.
RANK_FILE = "rank.json"


def resolve_best_of(name: str) -> str:
    """`best-of:RANK_DIR` -> the backbone recorded first (`best`) in RANK_DIR/rank.json.

    Any other name comes back unchanged. Called where a training config is checked, so the run
    records the real name. A missing, damaged or empty rank.json is one UsageError.
    """
    if not name.startswith(BEST_OF_PREFIX):
        return name
    from tlreg._io import read_json
    from tlreg.errors import UsageError

    where = name.removeprefix(BEST_OF_PREFIX).strip()
    if not where:
        raise UsageError(f"{BEST_OF_PREFIX} needs the folder `tlreg rank --out DIR` wrote: "
                         f"--backbone {BEST_OF_PREFIX}DIR")
    path = Path(where).expanduser()
    if path.is_dir() or path.name != RANK_FILE:
        path = path / RANK_FILE
    if not path.is_file():
        raise UsageError(f"--backbone {name}: no {path}; write it first with "
                         f"tlreg rank DATA --backbones PATTERNS --out {where}")
    best = read_json(path, {"best": (str, type(None)), "rows": list}, what="rank file")["best"]
    if not best or not best.strip() or best.startswith(BEST_OF_PREFIX):
        raise UsageError(f"rank file {path} recommends no backbone (every candidate was skipped "
                         "or failed); rank again with other --backbones or a larger --budget")
    return best


def get_backbone(name: str) -> BackboneSpec:
    """A BackboneSpec for a registered name, or for any timm model as `timm:<name>[.<tag>]`."""
    from tlreg.registry import TIMM_PREFIX, get

    if name.startswith(TIMM_PREFIX):
        return timm_spec(name.removeprefix(TIMM_PREFIX))
    return get("backbone", name)


def timm_spec(arch: str) -> BackboneSpec:
    """A spec for any raw timm model, `name` or `name.tag` (the `timm:` namespace)."""
    from tlreg.errors import UnknownNameError
    from tlreg.models import _timm
    from tlreg.registry import suggest

    name, _, tag = arch.partition(".")
    if not _timm.is_model(name):
        hint = suggest(name, _timm.list_models(f"{name[:3]}*"))
        raise UnknownNameError(f"unknown timm model {name!r}{hint}")
    return BackboneSpec(timm_name=name, tag=tag or None, summary="raw timm model")


def weights_sha256(state_dict: StateDict) -> str:
    """Canonical SHA-256 over sorted names, dtypes, shapes and bytes: same weights, same hash.

    Independent of the file format, key order and device the weights came from.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_backbone(spec: BackboneSpec, *, name: str, pretrained: bool = True,
                   weights: str | os.PathLike[str] | None = None,
                   drop_path: float | None = None) -> nn.Module:
    """The timm model for `spec`, classifier removed, with the weights asked for.

    `weights` (a safetensors file) overrides the spec's source. Every failure to get weights
    is one `WeightsError` naming the backbone, the source, and how to supply a file instead.
    `drop_path` is timm's `drop_path_rate` (training only: it is not part of the model's info).
    """
    from tlreg.errors import UsageError
    from tlreg.models import _timm

    weights_file = weights or spec.weights_file
    if pretrained and weights_file is None and spec.loader is None:
        try:
            return _timm.create_backbone(spec.timm_name, spec.tag, pretrained=True,
                                         drop_path=drop_path)
        except UsageError:
            raise
        except Exception as exc:  # network, offline mode, missing file: all the same to a user
            offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
            raise WeightsError(
                f"could not get pretrained weights for backbone {name!r} from timm's source "
                f"{spec.arch!r}{offline}: {type(exc).__name__}: {first_line(exc)}. "
                f"Supply them from a file with --weights FILE.safetensors (weights=... in Python), "
                f"or use --no-pretrained"
            ) from exc
    model = _timm.create_backbone(spec.timm_name, spec.tag, pretrained=False,
                                  drop_path=drop_path)
    if not pretrained:
        return model
    if weights_file is not None:
        state, source = _read_safetensors(Path(weights_file), name), f"file {weights_file}"
    else:
        assert spec.loader is not None
        source = f"loader {getattr(spec.loader, '__qualname__', spec.loader)!r}"
        try:
            state = spec.loader()
        except Exception as exc:
            raise WeightsError(f"could not load weights for backbone {name!r} from {source}: "
                               f"{type(exc).__name__}: {exc}") from exc
    load_backbone_state(model, state, name=name, source=source)
    if spec.weights_sha256 and weights is None:
        got = weights_sha256(model.state_dict())
        if got != spec.weights_sha256:
            raise WeightsError(f"weights for backbone {name!r} from {source} hash to {got}, "
                               f"expected {spec.weights_sha256}")
    return model


def load_backbone_state(model: nn.Module, state: StateDict, *, name: str, source: str) -> None:
    """Strict load that tolerates only the original classifier's keys in `state`."""
    from tlreg.models import _timm

    drop = tuple(p + "." for p in _timm.classifier_prefixes(model))
    own = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in own or not k.startswith(drop)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        wrong = re.findall(r"size mismatch for ([^:]+):", str(exc))
        detail = f"wrong shape for {_few(wrong)}" if wrong else first_line(exc)
        raise WeightsError(
            f"weights for backbone {name!r} from {source} do not match "
            f"{model.pretrained_cfg.get('architecture')}: {detail}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights for backbone {name!r} from {source} do not match "
            f"{model.pretrained_cfg.get('architecture')}: "
            f"missing {_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)}"
        )


def _read_safetensors(path: Path, name: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise WeightsError(f"weights for backbone {name!r} must be a .safetensors file, "
                           f"got {path} (pickled checkpoints are never loaded)")
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise WeightsError(
            f"could not read weights file {path} for backbone {name!r}: {exc}") from exc


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more



def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# Built-in backbones: a curated set over CNNs and ViTs, registered as entry points in
# pyproject.toml exactly as a third-party plugin would.
resnet18 = BackboneSpec("resnet18", "a1_in1k", lr=1e-3, layer_decay=0.7,
                        summary="ResNet-18, the transfer-learning tutorial's classic")
resnet50 = BackboneSpec("resnet50", "a1_in1k", lr=1e-3, layer_decay=0.7,
                        summary="ResNet-50 (timm A1 recipe)")
efficientnet_b0 = BackboneSpec("efficientnet_b0", "ra_in1k", lr=1e-3, layer_decay=0.7,
                               summary="EfficientNet-B0, small and strong")
convnext_tiny = BackboneSpec("convnext_tiny", "fb_in1k", lr=5e-4, layer_decay=0.7,
                             summary="ConvNeXt-T, a modern CNN")
mobilenetv3_large_100 = BackboneSpec("mobilenetv3_large_100", "ra_in1k", lr=1e-3,
                                     layer_decay=0.7, summary="MobileNetV3-L, for CPUs and phones")
vit_small_patch16_224 = BackboneSpec("vit_small_patch16_224", "augreg_in21k_ft_in1k", lr=5e-4,
                                     layer_decay=0.65, summary="ViT-S/16, a small transformer")
