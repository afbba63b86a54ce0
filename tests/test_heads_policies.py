"""Built-in heads (fresh logits, arguments, sizes) and freezing policies (pure plans)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch import nn

import tlreg
from tlreg.errors import UsageError
from tlreg.models import heads
from tlreg.models.policies import (
    FreezePlan,
    Policy,
    feature_extract,
    finetune,
    gradual,
    partial,
)

# -- heads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["timm:test_resnet", "timm:test_vit"])
@pytest.mark.parametrize("head", ["linear", "mlp", "cosine"])
def test_fresh_heads_give_finite_logits(backbone, head):
    torch.manual_seed(0)
    model = tlreg.create_model(backbone, 5, head=head, pretrained=False)
    x = torch.randn(4, 3, 160, 160)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (4, 5)
        assert torch.isfinite(logits).all()
        # Explicit initialisation: small logits (a cosine head is bounded by its scale, 16).
        assert logits.abs().max() <= 16.0 + 1e-4, (mode, logits.abs().max())
    assert all(torch.isfinite(p).all() for p in model.head.parameters())


def test_linear_head():
    head = heads.linear(96, 3)
    assert [type(m) for m in head] == [nn.Linear]
    assert float(head[0].weight.detach().std()) < 0.02 and not head[0].bias.any()
    dropped = heads.linear(96, 3, dropout=0.5)
    assert [type(m) for m in dropped] == [nn.Dropout, nn.Linear] and dropped[0].p == 0.5


def test_mlp_head_arguments_and_sizes():
    head = heads.mlp(10, 3, hidden=(8, 4), dropout=0.0, activation="gelu", norm=None)
    assert [type(m) for m in head] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    # 10*8+8 + 8*4+4 + 4*3+3
    assert sum(p.numel() for p in head.parameters()) == 88 + 36 + 15
    head = heads.mlp(10, 3, hidden=8, dropout=0.1, activation="silu", norm="layernorm")
    assert [type(m) for m in head] == [nn.LayerNorm, nn.Dropout, nn.Linear, nn.SiLU,
                                       nn.Dropout, nn.Linear]
    # LayerNorm(10) 20 + 10*8+8 + 8*3+3
    assert sum(p.numel() for p in head.parameters()) == 20 + 88 + 27
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        heads.mlp(10, 3, activation="swish")
    with pytest.raises(ValueError, match="unknown norm 'groupnorm'"):
        heads.mlp(10, 3, norm="groupnorm")


def test_cosine_head_scale():
    torch.manual_seed(0)
    head = heads.cosine(16, 4, scale=10.0)
    x = torch.randn(8, 16)
    out = head(x)
    assert out.abs().max() <= 10.0 + 1e-5
    # Logits are cosines times the scale: invariant to the feature norm.
    assert torch.allclose(head(x * 7.0), out, atol=1e-5)
    assert sum(p.numel() for p in head.parameters()) == 16 * 4 + 1

    fixed = heads.cosine(16, 4, scale=10.0, learn_scale=False)
    assert [n for n, _ in fixed.named_parameters()] == ["weight"]
    assert "scale" in fixed.state_dict()


def test_fixed_cosine_scale_stays_fixed_under_freezing():
    model = tlreg.create_model("timm:test_resnet", 3, head="cosine",
                               head_args={"learn_scale": False}, pretrained=False)
    assert model.num_trainable() == 3 * 96  # the weight only: the scale is not a parameter
    model.apply_policy(0)
    assert model.num_trainable() == 3 * 96


# -- policies ----------------------------------------------------------------------------------


def test_feature_extract_and_finetune():
    plan = feature_extract().plan(5, 7)
    assert plan == FreezePlan(frozenset(), ("frozen",) * 5) and plan.backbone_frozen
    assert feature_extract(frozen_bn="eval").plan(3, 0).backbone_frozen
    assert not feature_extract(frozen_bn="train").plan(3, 0).backbone_frozen
    plan = finetune().plan(4, 0)
    assert plan.trainable == {0, 1, 2, 3} and plan.bn == ("train",) * 4
    assert not plan.backbone_frozen
    assert finetune(trainable_bn="eval").plan(2, 0).bn == ("eval", "eval")


def test_partial():
    assert partial(freeze_first=2).plan(5, 0) == FreezePlan(
        frozenset({2, 3, 4}), ("frozen", "frozen", "train", "train", "train"))
    assert partial(train_last=1).plan(5, 3).trainable == {4}
    assert partial(train_last=9).plan(5, 0).trainable == {0, 1, 2, 3, 4}  # clamped
    assert partial(freeze_first=9).plan(5, 0).trainable == frozenset()
    assert partial(train_last=0).plan(5, 0).backbone_frozen
    assert partial(train_last=2, frozen_bn="eval", trainable_bn="frozen").plan(4, 0).bn == (
        "eval", "eval", "frozen", "frozen")
    with pytest.raises(UsageError, match="exactly one of"):
        partial()
    with pytest.raises(UsageError, match="exactly one of"):
        partial(freeze_first=1, train_last=1)
    with pytest.raises(UsageError, match=">= 0"):
        partial(train_last=-1)


def test_gradual_every():
    policy = gradual(every=2)
    counts = [len(policy.plan(5, epoch).trainable) for epoch in range(12)]
    assert counts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # Unfrozen from the top: the last stage first.
    assert policy.plan(5, 4).trainable == {3, 4}
    with pytest.raises(UsageError, match="every must be >= 1"):
        gradual(every=0)


def test_gradual_schedule():
    policy = gradual(schedule={0: 0, 2: 1, 4: 3})
    assert [len(policy.plan(5, e).trainable) for e in range(7)] == [0, 0, 1, 1, 3, 3, 3]
    # YAML/JSON give string keys; an unlisted start means head only.
    policy = gradual(schedule={"3": 2, "1": 1})
    assert [len(policy.plan(5, e).trainable) for e in range(5)] == [0, 1, 1, 2, 2]
    with pytest.raises(UsageError, match="schedule entries must be >= 0"):
        gradual(schedule={0: -1})


def test_bn_rules_are_checked():
    for make in (feature_extract, finetune):
        with pytest.raises(UsageError, match="unknown BatchNorm rule 'freeze'"):
            make("freeze")
    with pytest.raises(UsageError, match="choose from frozen, eval, train"):
        partial(train_last=1, trainable_bn="on")


def test_policies_are_frozen_protocol_values():
    for policy in (feature_extract(), finetune(), partial(train_last=1), gradual(every=3)):
        assert isinstance(policy, Policy)
        with pytest.raises(dataclasses.FrozenInstanceError):
            policy.name = "x"  # type: ignore[misc]
    assert partial(train_last=1) == partial(train_last=1)
    assert hash(gradual(schedule={1: 1})) == hash(gradual(schedule={1: 1}))


def test_policies_module_is_pure():
    code = ("import sys, tlreg.models.policies as p; p.gradual(every=2).plan(5, 3); "
            "print(any(m.split('.')[0] in {'torch', 'timm'} for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"
