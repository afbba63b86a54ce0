"""What a backbone plugin provides: a `BackboneSpec`, plain data that imports nothing.

It sits below the registry so the registry can check what a plugin returns, and so plugins can
define specs at import time without slowing down `tlreg --help`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

StateDict = Mapping[str, "Tensor"]


@dataclass(frozen=True)
class BackboneSpec:
    """A named backbone.

    Weights come from timm's default (Hub) source for `timm_name.tag`, from a local safetensors
    file (`weights_file`), or from `loader`, a function a plugin provides that returns a state
    dict (the classifier may be included; it is dropped).
    """

    timm_name: str
    tag: str | None = None
    weights_file: str | None = None
    loader: Callable[[], StateDict] | None = field(default=None, compare=False)
    weights_sha256: str | None = None  # canonical hash the loaded weights must have, if known
    hub_id: str | None = None  # Hub repo the weights come from, for model cards' base_model
    head: str = "linear"
    policy: str = "auto"
    lr: float = 1e-3
    layer_decay: float = 0.75
    summary: str = ""

    @property
    def arch(self) -> str:
        return f"{self.timm_name}.{self.tag}" if self.tag else self.timm_name

    @property
    def source(self) -> str:
        """Where pretrained weights come from: 'loader', 'file' or 'timm'."""
        if self.loader is not None:
            return "loader"
        return "file" if self.weights_file else "timm"

    def defaults(self) -> dict[str, Any]:
        return {"head": self.head, "policy": self.policy, "lr": self.lr,
                "layer_decay": self.layer_decay}
