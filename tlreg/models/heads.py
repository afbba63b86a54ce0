"""Built-in heads: the new top layer that replaces a backbone's classifier.

A head plugin is any callable `(in_features, num_classes, **args) -> nn.Module`. Every built-in
initialises its weights explicitly: a fresh head must give small, finite logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_NORMS = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


def _init_linear(layer: nn.Linear, std: float = 0.01) -> nn.Linear:
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(layer.bias)
    return layer


def linear(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """The classic replacement of the top layer: (dropout,) one linear layer."""
    fc = _init_linear(nn.Linear(in_features, num_classes))
    return nn.Sequential(nn.Dropout(dropout), fc) if dropout > 0 else nn.Sequential(fc)


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] | int = (512,),
        dropout: float = 0.2, activation: str = "relu",
        norm: str | None = "batchnorm") -> nn.Module:
    """fastai-style head: [norm, dropout, linear, activation] per hidden layer, a classifier."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"mlp head: unknown activation {activation!r}; "
                         f"choose from {sorted(_ACTIVATIONS)}")
    if norm is not None and norm not in _NORMS:
        raise ValueError(f"mlp head: unknown norm {norm!r}; choose from {sorted(_NORMS)} or None")
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = []
    width = in_features
    for size in sizes:
        if norm:
            layers.append(_NORMS[norm](width))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        fc = nn.Linear(width, size)
        nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
        nn.init.zeros_(fc.bias)
        layers += [fc, _ACTIVATIONS[activation]()]
        width = size
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(_init_linear(nn.Linear(width, num_classes)))
    return nn.Sequential(*layers)


class CosineClassifier(nn.Module):
    """Logits = scale * cos(features, class weight): robust with few images per class."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0,
                 learn_scale: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=1.0)
        # A fixed scale is a buffer, not a frozen parameter: freezing plans set every head
        # parameter trainable, which would silently make a fixed scale learn.
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def cosine(in_features: int, num_classes: int, scale: float = 16.0,
           learn_scale: bool = True) -> nn.Module:
    """Normalised (cosine) classifier, which suits small data sets."""
    return CosineClassifier(in_features, num_classes, scale=scale, learn_scale=learn_scale)
