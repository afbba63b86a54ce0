"""Conformance kit: one call per registered name checks what tlreg relies on.

For plugin authors, in their own pytest suite::

    from tlreg.testing import check_plugin

    def test_conforms_to_tlreg():
        check_plugin("my-tlreg-plugin")

Every check builds through tlreg itself (`create_model`, `apply_policy`), so it tests the path
users take. A failure raises `AssertionError` with a message that names the entry and what is
wrong; a check that passes returns what it measured. The checks run on timm's tiny test models
(`timm:test_resnet`, `timm:test_vit`) where they can, so each takes about a second on a CPU.
torch is imported inside the functions: importing this package stays cheap.

This module is the public API; one module per kind of entry (`backbones`, `heads`,
`policies`), `distributions` for whole packages, and the shared `_asserts` and `_models`.
"""

from __future__ import annotations

from tlreg.testing._models import CNN, VIT
from tlreg.testing.backbones import BackboneReport, check_backbone
from tlreg.testing.distributions import BUILTIN_POLICY_ARGS, check_all_builtins, check_plugin
from tlreg.testing.heads import check_head
from tlreg.testing.policies import check_policy

__all__ = [
    "BUILTIN_POLICY_ARGS",
    "CNN",
    "VIT",
    "BackboneReport",
    "check_all_builtins",
    "check_backbone",
    "check_head",
    "check_plugin",
    "check_policy",
]
