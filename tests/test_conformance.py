"""The conformance kit (tlreg.testing) on tlreg's built-ins, and proof that it catches bad ones."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import tlreg.models.backbones
from tlreg import testing
from tlreg.models.backbones import BackboneSpec, weights_sha256
from tlreg.models.policies import FreezePlan
from tlreg.plugins import find_plugins
from tlreg.registry import clear_cache
from tlreg.testing import (
    BUILTIN_POLICY_ARGS,
    BackboneReport,
    check_all_builtins,
    check_backbone,
    check_head,
    check_plugin,
    check_policy,
)


def _builtin(kind: str) -> list[str]:
    return [p.name for p in find_plugins(kind) if p.dist == "tlreg"]


# -- every built-in conforms -----------------------------------------------------------------


# The two biggest (about 28 M and 26 M parameters) take a couple of seconds each on 2 cores;
# they run by default and `-m "not slow"` leaves them out.
BIG = {"convnext_tiny", "resnet50"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in _builtin("backbone")])
def test_builtin_backbone_conforms(name):
    report = check_backbone(name, pretrained=False)
    assert isinstance(report, BackboneReport)
    assert report.provider == "tlreg"
    assert report.feature_width > 0
    assert 1 <= report.num_stages <= report.num_layers
    assert report.weights_source == "random"
    assert report.weights_sha256 is None


def test_backbone_report_numbers():
    report = check_backbone("resnet18", num_classes=5)
    assert (report.timm_name, report.feature_width, report.num_stages, report.num_layers) == (
        "resnet18", 512, 5, 9)
    assert report.stage_names == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert report.input_size == (3, 224, 224)
    assert report.num_parameters == 11_176_512


@pytest.mark.parametrize("name", _builtin("head"))
def test_builtin_head_conforms(name):
    check_head(name)


@pytest.mark.parametrize(("name", "args"), [
    ("linear", {"dropout": 0.5}),
    ("mlp", {"hidden": [32, 16], "norm": "layernorm", "activation": "gelu"}),
    ("mlp", {"hidden": 8, "norm": None, "dropout": 0.0}),
    ("cosine", {"scale": 8.0, "learn_scale": False}),
])
def test_builtin_head_conforms_with_args(name, args):
    check_head(name, **args)


@pytest.mark.parametrize("name", _builtin("policy"))
def test_builtin_policy_conforms(name):
    plans = check_policy(name, **BUILTIN_POLICY_ARGS.get(name, {}))
    assert len(plans) == 4


@pytest.mark.parametrize(("name", "args"), [
    ("feature-extract", {"frozen_bn": "eval"}),
    ("finetune", {"trainable_bn": "frozen"}),
    ("partial", {"freeze_first": 1, "frozen_bn": "eval"}),
    ("gradual", {"schedule": {0: 0, 2: 2, 3: 5}}),
    ("gradual", {"every": 2, "trainable_bn": "eval"}),
])
def test_builtin_policy_conforms_with_args(name, args):
    check_policy(name, **args)


def test_policy_plans_are_returned():
    plans = check_policy("gradual", epochs=3)
    assert [sorted(p.trainable) for p in plans] == [[], [4], [3, 4]]


def test_check_all_builtins_visits_every_entry(monkeypatch):
    seen = []
    monkeypatch.setattr(testing, "check_backbone", lambda n, **kw: seen.append(("b", n, kw)))
    monkeypatch.setattr(testing, "check_head", lambda n, **kw: seen.append(("h", n, kw)))
    monkeypatch.setattr(testing, "check_policy", lambda n, **kw: seen.append(("p", n, kw)))
    results = check_all_builtins()
    expected = {f"tlreg:{p.name}" for p in find_plugins() if p.dist == "tlreg"
                and p.kind in ("backbone", "head", "policy")}
    assert set(results) == expected
    assert {n for _, n, _ in seen} == expected
    assert ("p", "tlreg:partial", {"train_last": 2}) in seen
    assert all(kw == {"pretrained": False} for k, _, kw in seen if k == "b")


def test_importing_the_kit_does_not_import_torch():
    code = ("import sys, tlreg.testing; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kit_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_head("linear")
    assert torch.equal(torch.rand(3), expected)


# -- pretrained weights from a file: strict load and the pinned hash --------------------------


@pytest.fixture
def patched_resnet18(monkeypatch, tmp_path):
    """Point the built-in entry 'resnet18' at a spec the test controls."""
    from safetensors.torch import save_file

    model = tlreg.models.backbones.build_backbone(BackboneSpec("test_resnet"), name="t",
                                           pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    def use(**fields):
        spec = BackboneSpec("test_resnet", weights_file=str(path), **fields)
        monkeypatch.setattr(tlreg.models.backbones, "resnet18", spec)
        clear_cache()
        return model

    yield use
    monkeypatch.undo()
    clear_cache()


def test_pretrained_from_file_with_pinned_hash(patched_resnet18):
    model = patched_resnet18()
    digest = weights_sha256(model.state_dict())
    patched_resnet18(weights_sha256=digest)
    report = check_backbone("resnet18", pretrained=True)
    assert report.weights_source == "file"
    assert report.weights_sha256 == digest


def test_catches_a_wrong_pinned_hash(patched_resnet18):
    patched_resnet18(weights_sha256="0" * 64)
    with pytest.raises(AssertionError, match=r"backbone 'resnet18' does not build.*hash to"):
        check_backbone("resnet18", pretrained=True)


def test_catches_a_bad_default_lr(patched_resnet18):
    patched_resnet18(lr=0.0)
    with pytest.raises(AssertionError, match="default lr must be > 0"):
        check_backbone("resnet18")


# -- the kit catches bad heads -----------------------------------------------------------------


def wrong_shape_head(in_features, num_classes):
    return nn.Linear(in_features, num_classes + 1)  # bug: one logit too many


def no_parameter_head(in_features, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Identity())  # bug: nothing to train, wrong width


class _Constant(nn.Module):
    def __init__(self, in_features):
        super().__init__()
        self.fc = nn.Linear(in_features, 3)  # bug: ignores num_classes

    def forward(self, x):
        return self.fc(x)


def test_catches_head_with_wrong_shape():
    with pytest.raises(AssertionError,
                       match=r"head 'wrong_shape_head' on timm:test_resnet \(training mode\): "
                             r"logits have shape \(4, 4\), expected \(4, 3\)"):
        check_head(wrong_shape_head)


def test_catches_head_without_parameters():
    with pytest.raises(AssertionError, match="the head has no parameters"):
        check_head(no_parameter_head)


def test_catches_head_that_ignores_num_classes():
    with pytest.raises(AssertionError, match=r"num_classes=7.*shape \(5, 3\), expected \(5, 7\)"):
        check_head(lambda in_features, num_classes: _Constant(in_features))


def test_catches_head_with_nan_logits():
    class Nan(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(AssertionError, match="logits are not all finite"):
        check_head(lambda i, n: Nan(i, n))


def test_head_factory_errors_name_the_arguments():
    with pytest.raises(AssertionError, match=r"head 'mlp' with \{'activation': 'nope'\} on "
                       r"timm:test_resnet does not build.*unknown activation 'nope'"):
        check_head("mlp", activation="nope")


def test_head_that_raises_anything_is_reported():
    with pytest.raises(AssertionError, match=r"does not build.*RuntimeError: .*negative dimension"):
        check_head("mlp", hidden=-1)


# -- the kit catches bad policies -------------------------------------------------------------


class CallCountingGradual:
    """Bad: unfreezes one more stage per call of plan() instead of reading `epoch`.

    So the plan tlreg applies trains a stage that the plan it declared for the epoch says is
    frozen.
    """

    name = "call-counting-gradual"

    def __init__(self):
        self.calls = 0

    def plan(self, num_stages, epoch):
        self.calls += 1
        first = max(0, num_stages - self.calls)
        return FreezePlan(frozenset(range(first, num_stages)),
                          tuple("frozen" if s < first else "train" for s in range(num_stages)))


class TypoRule:
    """Bad: 'freeze' is not a BN rule (tlreg would leave those BN affine parameters trainable)."""

    name = "typo"

    def plan(self, num_stages, epoch):
        return FreezePlan(frozenset(), ("freeze",) * num_stages)


class OffByOne:
    """Bad: counts stages from 1."""

    name = "off-by-one"

    def plan(self, num_stages, epoch):
        return FreezePlan(frozenset({num_stages}), ("train",) * num_stages)


def test_catches_policy_that_declares_frozen_but_leaves_trainable():
    with pytest.raises(AssertionError) as info:
        check_policy(CallCountingGradual)
    msg = str(info.value)
    assert "policy 'CallCountingGradual', epoch 0 of a 5-stage model" in msg
    assert "stage 3 (stage3) is declared frozen, but 12 parameters require grad: layer3." in msg
    assert "not a pure function of (num_stages, epoch)" in msg


def test_catches_unknown_bn_rule():
    with pytest.raises(AssertionError, match=r"unknown BatchNorm rules \['freeze'"):
        check_policy(TypoRule)


def test_catches_stage_out_of_range():
    with pytest.raises(AssertionError, match=r"trainable stages must be ints in 0\.\.4, got \[5\]"):
        check_policy(OffByOne)


def test_catches_factory_that_returns_no_policy():
    with pytest.raises(AssertionError, match="not a tlreg Policy"):
        check_policy(lambda: object())


def test_policy_without_needed_args_gets_a_hint():
    with pytest.raises(AssertionError, match=r"partial.*exactly one of.*pass them"):
        check_policy("partial")


def test_check_plugin_unknown_distribution():
    with pytest.raises(AssertionError, match=r"'no-such-dist' registers no tlreg.*tlreg"):
        check_plugin("no-such-dist")


def test_catches_head_factory_that_returns_no_module():
    with pytest.raises(AssertionError, match=r"factory returned function, not an nn.Module"):
        check_head(lambda i, n: (lambda x: x))


class ShortPlan:
    """Bad: one BatchNorm rule for every model, whatever its stage count."""

    name = "short"

    def plan(self, num_stages, epoch):
        return FreezePlan(frozenset(), ("frozen",))


def test_catches_plan_with_wrong_rule_count():
    with pytest.raises(AssertionError, match=r"plan\(5, 0\): 1 BatchNorm rules for 5 stages"):
        check_policy(ShortPlan)


# -- check_plugin on a third-party distribution ----------------------------------------------

_PLUGIN_SOURCE = """
    from torch import nn

    from tlreg.models.backbones import BackboneSpec
    from tlreg.models.policies import FreezePlan

    tiny = BackboneSpec("test_efficientnet", summary="a tiny third-party backbone")


    def prototypes(in_features, num_classes, hidden=16):
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))


    def one_logit_short(in_features, num_classes):
        return nn.Linear(in_features, num_classes - 1)


    class _TopOnly:
        name = "top-only"

        def plan(self, num_stages, epoch):
            last = num_stages - 1
            return FreezePlan(frozenset({last}),
                              tuple("train" if s == last else "frozen" for s in range(num_stages)))


    def top_only():
        return _TopOnly()
"""


def _third_party(plugin_site, heads):
    plugin_site.add(
        "Conf-Plugin",
        {"tlreg.backbones": {"tiny": "conf_plugin:tiny"},
         "tlreg.heads": {name: f"conf_plugin:{attr}" for name, attr in heads.items()},
         "tlreg.policies": {"top-only": "conf_plugin:top_only"}},
        {"conf_plugin": _PLUGIN_SOURCE},
    )


def test_check_plugin_on_a_third_party_distribution(plugin_site):
    _third_party(plugin_site, {"prototypes": "prototypes"})
    results = check_plugin("conf_plugin", head_args={"prototypes": {"hidden": 8}})
    assert sorted(results) == ["conf-plugin:prototypes", "conf-plugin:tiny", "conf-plugin:top-only"]
    report = results["conf-plugin:tiny"]
    assert (report.provider, report.timm_name, report.num_stages) == (
        "conf-plugin", "test_efficientnet", 6)
    assert [sorted(p.trainable) for p in results["conf-plugin:top-only"]] == [[4]] * 4


def test_check_plugin_names_the_bad_entry(plugin_site):
    _third_party(plugin_site, {"prototypes": "prototypes", "short": "one_logit_short"})
    with pytest.raises(AssertionError, match=r"head 'conf-plugin:short' on timm:test_resnet "
                                             r"\(training mode\): logits have shape \(4, 2\)"):
        check_plugin("Conf-Plugin")
