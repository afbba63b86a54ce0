"""Name resolution, backbone specs, listing and describing backbones."""

from __future__ import annotations

import pytest
import torch

from tlreg.errors import UnknownNameError
from tlreg.models.backbones import BackboneSpec, get_backbone, timm_spec, weights_sha256
from tlreg.models.catalog import describe_backbone, list_backbones
from tlreg.registry import find

BUILTINS = ["convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "resnet18", "resnet50",
            "vit_small_patch16_224"]


def test_builtin_specs():
    for name in BUILTINS:
        spec = get_backbone(name)
        assert isinstance(spec, BackboneSpec) and spec.source == "timm"
        assert spec.timm_name == name and spec.tag and spec.summary
        assert set(spec.defaults()) == {"head", "policy", "lr", "layer_decay"}
    assert get_backbone("resnet50").arch == "resnet50.a1_in1k"
    assert find("backbone", "resnet50").qualified_name == "tlreg:resnet50"


def test_spec_sources():
    assert BackboneSpec("resnet18", weights_file="w.safetensors").source == "file"
    assert BackboneSpec("resnet18", loader=dict).source == "loader"
    assert BackboneSpec("resnet18").arch == "resnet18"


def test_timm_namespace():
    assert timm_spec("test_vit") == BackboneSpec("test_vit", summary="raw timm model")
    spec = get_backbone("timm:vit_small_patch16_224.augreg_in21k_ft_in1k")
    assert (spec.timm_name, spec.tag) == ("vit_small_patch16_224", "augreg_in21k_ft_in1k")
    with pytest.raises(UnknownNameError, match="unknown timm model 'resnet_500'; did you mean"):
        get_backbone("timm:resnet_500")


def test_qualified_builtins_and_unknown_packages():
    assert get_backbone("TLREG:resnet18") == get_backbone("resnet18")
    with pytest.raises(UnknownNameError, match="unknown backbone 'nope:resnet18' in package "
                                               "'nope'"):
        get_backbone("nope:resnet18")


def test_list_patterns():
    rows = list_backbones("res*")
    assert [r["name"] for r in rows if r["distribution"] == "tlreg"] == ["resnet18", "resnet50"]
    assert all(set(r) == {"name", "distribution", "version"} for r in rows)
    assert [r["name"] for r in list_backbones("*vit*") if r["distribution"] == "tlreg"] == [
        "vit_small_patch16_224"]
    assert list_backbones("no_such_*") == []
    tiny = list_backbones("timm:test_res*")
    assert tiny == [{"name": "timm:test_resnet", "distribution": "timm",
                     "timm_name": "test_resnet"}]


def test_list_pretrained():
    rows = {r["name"]: r["timm_name"] for r in list_backbones(pretrained=True)
            if r["distribution"] == "tlreg"}
    assert rows == {name: get_backbone(name).arch for name in BUILTINS}
    names = [r["name"] for r in list_backbones("timm:resnet18.*", pretrained=True)]
    assert "timm:resnet18.a1_in1k" in names
    assert "timm:test_resnet.r160_in1k" in [
        r["name"] for r in list_backbones("timm:test_res*", pretrained=True)]


def test_describe_cnn():
    info = describe_backbone("timm:test_resnet")
    assert (info["distribution"], info["timm_name"], info["tag"]) == ("timm", "test_resnet", None)
    assert info["parameters"] == 372688 and info["feature_width"] == 96
    assert (info["num_stages"], info["num_layers"]) == (5, 5)
    # By hand from timm's definition: see tests/test_model.py's docstring.
    assert [s["parameters"] for s in info["stages"]] == [7472, 18560, 36384, 42432, 267840]
    assert [s["modules"] for s in info["stages"]] == [
        ["bn1", "conv1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    assert info["stages"][0]["name"] == "stem" and info["stages"][4]["layers"] == "4"
    cfg = info["data_config"]
    assert cfg["input_size"] == (3, 160, 160) and cfg["interpolation"] == "bilinear"
    assert set(cfg) == {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert info["defaults"]["head"] == "linear" and info["weights_source"] == "timm"


def test_describe_names_the_tail_modules():
    vit = describe_backbone("timm:test_vit")
    assert vit["stages"][-1]["modules"] == ["blocks.5", "norm"]
    assert vit["stages"][-1]["parameters"] == 41728 + 128
    mnv3 = describe_backbone("mobilenetv3_large_100")
    assert mnv3["feature_width"] == 1280 and mnv3["distribution"] == "tlreg"
    assert mnv3["stages"][-1]["modules"] == ["blocks.6", "conv_head"]
    assert mnv3["num_layers"] == 17 and mnv3["stages"][1]["layers"] == "1"


def test_weights_sha256_is_canonical():
    a = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2)}
    b = {"a": torch.ones(2), "b": torch.arange(6, dtype=torch.float32).reshape(3, 2).t().t()
         .reshape(2, 3)}
    assert weights_sha256(a) == weights_sha256(b)
    assert weights_sha256(a) != weights_sha256({**a, "a": torch.ones(2, dtype=torch.float64)})
    assert weights_sha256(a) != weights_sha256({**a, "a": torch.tensor([1.0, 2.0])})
    assert weights_sha256(a) != weights_sha256({**a, "b": a["b"].reshape(3, 2)})
    assert len(weights_sha256(a)) == 64
