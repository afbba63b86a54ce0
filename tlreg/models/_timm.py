"""Every timm call tlreg makes, behind one small module (upstream API drift stays here)."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any

import timm
import torch
from timm.data import Mixup, create_transform, resolve_model_data_config
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from timm.models import get_pretrained_cfg, group_parameters
from torch import nn

from tlreg.errors import UsageError

__all__ = [
    "Mixup",
    "RandomErasing",
    "create_transform",
    "feature_width",
    "group_ids",
    "list_models",
    "mixup_target",
    "model_data_config",
    "pretrained_cfg",
]


def create_backbone(timm_name: str, tag: str | None, pretrained: bool,
                    drop_path: float | None = None) -> nn.Module:
    """A timm model with its classifier removed (`num_classes=0`), pooling kept.

    `drop_path`: timm's `drop_path_rate` (stochastic depth, rising linearly over the blocks);
    it adds no parameter, so weights load and save as without it.
    """
    arch = f"{timm_name}.{tag}" if tag else timm_name
    if not drop_path:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0)
    try:
        return timm.create_model(arch, pretrained=pretrained, num_classes=0,
                                 drop_path_rate=drop_path)
    except TypeError as exc:
        if "drop_path_rate" not in str(exc):
            raise
        raise UsageError(f"timm's {timm_name} has no stochastic depth (it takes no "
                         "drop_path_rate); drop --drop-path") from None


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    return timm.list_models(pattern, pretrained=pretrained)


def is_model(timm_name: str) -> bool:
    return timm.is_model(timm_name)


def pretrained_cfg(timm_name: str, tag: str | None) -> dict[str, Any] | None:
    arch = f"{timm_name}.{tag}" if tag else timm_name
    cfg = get_pretrained_cfg(arch, allow_unregistered=False)
    return cfg.to_dict() if cfg is not None else None


def feature_width(model: nn.Module) -> int:
    """Pooled feature width: `head_hidden_size` where a model has one (MobileNetV3: 1280)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def model_data_config(model: nn.Module) -> dict[str, Any]:
    return dict(resolve_model_data_config(model))


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the original classifier, to drop from full-model checkpoints."""
    names = model.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def group_ids(model: nn.Module, coarse: bool) -> dict[str, int]:
    """Parameter name -> group id from timm's `group_matcher` (coarse: stages, fine: layers).

    timm puts parameters that no regex matches (ConvNeXt's `head.norm`, MobileNetV3's
    `conv_head`) into one extra group at the end. Those sit between the last block and the
    head, so tlreg folds them into the last group with timm's own merge marker `(99999,)`.
    """
    matcher = model.group_matcher(coarse=coarse)
    if isinstance(matcher, dict):
        matcher = dict(matcher)
        matcher["_tlreg_tail"] = [(r".*", (99999,))]
    grouped = group_parameters(model, matcher)
    ids: dict[str, int] = {}
    for gid, names in grouped.items():
        for n in names:
            ids[n] = gid
    # Renumber densely from 0 (timm already does; this guards custom callables).
    order = {g: i for i, g in enumerate(sorted(set(ids.values())))}
    return {n: order[g] for n, g in ids.items()}


def group_members(ids: dict[str, int]) -> dict[int, list[str]]:
    """For display: the shortest module prefixes whose parameters all sit in one group."""
    by_prefix: dict[str, set[int]] = defaultdict(set)
    for name, gid in ids.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            by_prefix[".".join(parts[:i])].add(gid)
    members: dict[int, set[str]] = defaultdict(set)
    for name, gid in ids.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if i == len(parts) or len(by_prefix[prefix]) == 1:
                members[gid].add(prefix)
                break
    return {g: sorted(m, key=_natural_key) for g, m in sorted(members.items())}


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in s.replace(".", " . ").split()]


def match(names: list[str], pattern: str) -> list[str]:
    return fnmatch.filter(names, pattern)


def set_channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)
