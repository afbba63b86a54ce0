"""A third-party tlreg plugin: one backbone, one head and one policy.

Importing it stays cheap (no torch, no timm): the head imports torch only when it is built.
"""

from __future__ import annotations

from tlreg import BackboneSpec
from tlreg.models.policies import FreezePlan

# timm's tiny test ResNet, with this package's head and policy as its defaults.
demo_resnet = BackboneSpec(
    "test_resnet", head="demo-head", policy="demo-last-two", lr=3e-3, layer_decay=0.5,
    summary="timm's tiny test ResNet, registered by a plugin",
)


def demo_head(in_features: int, num_classes: int, hidden: int = 8):
    """Two linear layers with a ReLU between them, initialised explicitly."""
    from torch import nn

    head = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))
    for layer in head:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return head


class LastTwo:
    """Train the last two stages with BatchNorm in eval mode; freeze the rest."""

    name = "demo-last-two"

    def plan(self, num_stages: int, epoch: int) -> FreezePlan:
        trainable = frozenset(range(max(0, num_stages - 2), num_stages))
        return FreezePlan(trainable, tuple("eval" if s in trainable else "frozen"
                                           for s in range(num_stages)))


def demo_last_two() -> LastTwo:
    return LastTwo()
