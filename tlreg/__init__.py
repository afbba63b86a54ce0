"""tlreg: transfer learning for image classification on any timm backbone.

The package imports neither torch nor timm until a name that needs them is used, so the CLI
starts instantly and `import tlreg` is cheap in a notebook.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "create_model": "tlreg.models.transfer",
    "TransferModel": "tlreg.models.transfer",
    "BackboneSpec": "tlreg.models.backbones",
    "FreezePlan": "tlreg.models.policies",
    "build_optimizer": "tlreg.engine.optim",
    "fit": "tlreg.engine.trainer",
    "lr_find": "tlreg.engine.trainer",
    "TrainConfig": "tlreg.engine.config",
    "TlregError": "tlreg.errors",
}

__all__ = [  # noqa: RUF022 - listed explicitly so linters and IDEs see the lazy names
    "__version__", "BackboneSpec", "FreezePlan", "TlregError", "TrainConfig", "TransferModel",
    "build_optimizer", "create_model", "fit", "lr_find",
]

if TYPE_CHECKING:  # pragma: no cover
    from tlreg.engine.config import TrainConfig
    from tlreg.engine.optim import build_optimizer
    from tlreg.engine.trainer import fit, lr_find
    from tlreg.errors import TlregError
    from tlreg.models.backbones import BackboneSpec
    from tlreg.models.policies import FreezePlan
    from tlreg.models.transfer import TransferModel, create_model


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tlreg' has no attribute {name!r}")
