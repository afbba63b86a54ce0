"""Plugin discovery with real distributions: good, broken, wrong-typed, colliding, pip-installed.

Each test plugin is a real distribution (a dist-info folder that `importlib.metadata` finds on
`sys.path`, or a package installed with pip), never a mock of the discovery code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import tlreg
from tlreg import plugins, registry
from tlreg.errors import PluginError, UnknownNameError, UsageError
from tlreg.models.backbones import get_backbone
from tlreg.registry import find, get_head, get_policy

PKGS = Path(__file__).parent / "plugin_pkgs"
BB, HEADS, POLICIES = "tlreg.backbones", "tlreg.heads", "tlreg.policies"

GOOD_SOURCE = '''
from tlreg.models.backbones import BackboneSpec
from tlreg.models.policies import partial

tiny_vit = BackboneSpec("test_vit", head="scaled-linear", policy="top-one",
                        summary="timm's tiny test ViT")

def scaled_linear(in_features, num_classes, scale=2.0):
    from torch import nn
    layer = nn.Linear(in_features, num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

def top_one():
    return partial(train_last=1)
'''


def _good(site, name="tlreg-good", module="tlreg_good_mod"):
    return site.add(name, {
        BB: {"tiny_vit": f"{module}:tiny_vit"},
        HEADS: {"scaled-linear": f"{module}:scaled_linear"},
        POLICIES: {"top-one": f"{module}:top_one"},
    }, {module: GOOD_SOURCE})


def _broken(site):
    return site.add("tlreg-broken", {BB: {"broken_bb": "tlreg_broken_mod:spec"}},
                    {"tlreg_broken_mod": 'raise RuntimeError("kaboom: missing CUDA toolkit")\n'})


def _run(cmd, env, *args):
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)


# -- discovery from metadata ------------------------------------------------------------------


def test_builtins_register_through_entry_points():
    found = plugins.find_plugins()
    mine = {(p.kind, p.name) for p in found if p.dist == "tlreg"}
    assert {("backbone", n) for n in ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny",
                                      "mobilenetv3_large_100", "vit_small_patch16_224")} <= mine
    assert {("head", "linear"), ("head", "mlp"), ("head", "cosine")} <= mine
    assert {("policy", n) for n in ("feature-extract", "finetune", "partial", "gradual")} <= mine
    versions = {p.version for p in found if p.dist == "tlreg"}
    assert versions == {tlreg.__version__}
    assert found == sorted(found, key=lambda p: (list(plugins.GROUPS).index(p.kind), p.name,
                                                 p.dist))


def test_listing_imports_nothing():
    """find_plugins reads metadata only: no plugin module, no torch, no timm."""
    code = ("import sys, tlreg.plugins as p; found = p.find_plugins(); "
            "assert any(x.dist == 'tlreg' for x in found); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'timm'} or m.startswith('tlreg.models.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_normalize_dist_is_pip_style():
    assert plugins.normalize_dist("tlreg_EfficientNet.lite") == "tlreg-efficientnet-lite"
    assert plugins.normalize_dist("tlreg--x__y") == "tlreg-x-y"


def test_dist_info_plugin_is_used_by_name(plugin_site):
    _good(plugin_site)
    found = {(p.kind, p.name): p for p in plugins.find_plugins()}
    assert found["backbone", "tiny_vit"].dist == "tlreg-good"
    assert found["head", "scaled-linear"].version == "0.1.0"
    assert get_backbone("tiny_vit").timm_name == "test_vit"
    assert callable(get_head("scaled-linear")) and callable(get_policy("top-one"))

    # The spec's defaults name the plugin's own head and policy.
    model = tlreg.create_model("tiny_vit", 3, pretrained=False)
    assert (model.info.provider, model.info.head, model.info.policy) == (
        "tlreg-good", "scaled-linear", "top-one")
    # top-one = partial(train_last=1): test_vit's last stage is block 5 plus the final norm
    # (41728 + 128, see test_model.py), and the head is 64 * 3 + 3.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 41856 + 195
    # And explicitly, mixed with built-ins.
    model = tlreg.create_model("timm:test_resnet", 2, head="scaled-linear", policy="top-one",
                               pretrained=False)
    assert model.head.weight.shape == (2, 96)


def test_plugins_command_shows_dist_info_plugin(plugin_site, tlreg_cmd):
    _good(plugin_site, name="Tlreg_Good.Pkg")
    res = _run(tlreg_cmd, plugin_site.env(), "plugins", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    row = next(r for r in data[BB] if r["name"] == "tiny_vit")
    assert row == {"name": "tiny_vit", "distribution": "tlreg-good-pkg", "version": "0.1.0",
                   "value": "tlreg_good_mod:tiny_vit"}
    assert [r["distribution"] for r in data[HEADS] if r["name"] == "scaled-linear"] == [
        "tlreg-good-pkg"]
    table = _run(tlreg_cmd, plugin_site.env(), "plugins").stdout
    assert "top-one" in table and "tlreg-good-pkg" in table


# -- a broken plugin --------------------------------------------------------------------------


def test_broken_plugin_does_not_break_listing(plugin_site, cli):
    _broken(plugin_site)
    code, out, err = cli("backbones", "list", "--json")
    assert code == 0, err
    names = {r["name"]: r["distribution"] for r in json.loads(out)}
    assert names["broken_bb"] == "tlreg-broken" and names["resnet50"] == "tlreg"
    assert "kaboom" not in err
    # Models from other packages still build.
    assert tlreg.create_model("resnet18", 2, pretrained=False).info.provider == "tlreg"


def test_check_names_package_and_error(plugin_site, tlreg_cmd, cli):
    _broken(plugin_site)
    res = _run(tlreg_cmd, plugin_site.env(), "plugins", "--check")
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "'broken_bb'" in errors[0] and "tlreg-broken 0.1.0" in errors[0]
    assert "RuntimeError: kaboom: missing CUDA toolkit" in errors[0]
    assert "Traceback" not in res.stderr
    assert "FAILED" in res.stdout and "resnet50" in res.stdout

    code, out, _ = cli("plugins", "--check", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 1
    assert rows["broken_bb"]["ok"] is False and "kaboom" in rows["broken_bb"]["error"]
    assert rows["resnet50"]["ok"] is True and rows["resnet50"]["error"] is None


def test_version_lists_plugins_and_check_reports_a_tlreg_range_that_excludes_us(
        plugin_site, cli):
    import tlreg

    ok = plugin_site.add("tlreg-ranged", {"tlreg.heads": {"ranged": "tlreg_ranged_mod:head"}},
                         {"tlreg_ranged_mod": "def head(i, n):\n    pass\n"}, version="1.2.0",
                         requires=("tlreg>=0.1", "numpy>=1"))
    plugin_site.add("tlreg-future", {"tlreg.heads": {"future": "tlreg_future_mod:head"},
                                     "tlreg.policies": {"later": "tlreg_future_mod:head"}},
                    {"tlreg_future_mod": "def head(i, n):\n    pass\n"}, version="3.0.0",
                    requires=("tlreg>=9.0,<10",))
    code, out, _ = cli("--version")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"tlreg {tlreg.__version__} (torch ")
    assert "  tlreg-future 3.0.0: 1 head, 1 policy" in lines
    assert "  tlreg-ranged 1.2.0: 1 head" in lines
    code, out, err = cli("plugins", "--check")
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: package tlreg-future 3.0.0 supports tlreg <10,>=9.0, but tlreg "
                      f"{tlreg.__version__} is installed; install a tlreg-future release for "
                      "this tlreg"]
    assert ok.name not in err
    code, out, _ = cli("plugins", "--check", "--json")
    bad = [r for r in json.loads(out) if not r["ok"]]
    assert code == 1 and [r["distribution"] for r in bad] == ["tlreg-future"]


def test_broken_plugin_warns_once_then_strict_mode_fails(plugin_site, cli, monkeypatch):
    _broken(plugin_site)
    # --pretrained loads every spec: the broken one is skipped with one warning naming it.
    code, out, err = cli("backbones", "list", "--pretrained", "--json")
    assert code == 0, err
    assert "broken_bb" not in {r["name"] for r in json.loads(out)}
    warned = [ln for ln in err.splitlines() if "tlreg-broken" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "kaboom" in warned[0]
    code, out, err = cli("backbones", "list", "--pretrained", "--json")
    assert code == 0 and "tlreg-broken" not in err  # once per process

    monkeypatch.setenv("TLREG_STRICT_PLUGINS", "1")
    code, out, err = cli("backbones", "list", "--pretrained")
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "tlreg-broken 0.1.0" in err and "kaboom" in err
    with pytest.raises(PluginError, match="tlreg-broken"):
        registry.try_load(find("backbone", "broken_bb"))


def test_using_a_broken_plugin_names_it(plugin_site, cli):
    _broken(plugin_site)
    with pytest.raises(PluginError, match=r"backbone 'broken_bb' from package tlreg-broken "
                                          r"0\.1\.0 failed to load: RuntimeError: kaboom"):
        tlreg.create_model("broken_bb", 2, pretrained=False)
    code, _, err = cli("backbones", "show", "broken_bb")
    assert code == 1 and err.startswith("error: ") and "tlreg-broken" in err


def test_disable_plugins_hides_a_package(plugin_site, cli, monkeypatch):
    _broken(plugin_site)
    _good(plugin_site)
    monkeypatch.setenv("TLREG_DISABLE_PLUGINS", "TLREG_Broken, other-pkg")
    assert "broken_bb" not in {p.name for p in plugins.find_plugins()}
    assert "tiny_vit" in {p.name for p in plugins.find_plugins()}
    code, out, _ = cli("backbones", "list", "--json")
    assert code == 0 and "broken_bb" not in out and "tiny_vit" in out
    with pytest.raises(UnknownNameError, match="broken_bb"):
        find("backbone", "broken_bb")
    monkeypatch.setenv("TLREG_DISABLE_PLUGINS", "tlreg-broken")
    _, out, err = cli("plugins", "--check", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert "broken_bb" not in rows and "tlreg-broken" not in err
    assert rows["tiny_vit"]["ok"] and rows["resnet50"]["ok"]


# -- wrong types ------------------------------------------------------------------------------


def test_wrong_type_entries_are_reported_with_the_package(plugin_site, cli):
    source = '''
def not_a_spec():
    return "resnet50"

NOT_CALLABLE = 42

def bad_policy_factory():
    return "freeze everything"

def bad_head_factory(in_features, num_classes):
    return [in_features, num_classes]
'''
    plugin_site.add("tlreg-wrong", {
        BB: {"wrong_bb": "tlreg_wrong_mod:not_a_spec"},
        HEADS: {"wrong-head": "tlreg_wrong_mod:NOT_CALLABLE",
                "list-head": "tlreg_wrong_mod:bad_head_factory"},
        POLICIES: {"wrong-policy": "tlreg_wrong_mod:bad_policy_factory",
                   "missing-attr": "tlreg_wrong_mod:nope"},
    }, {"tlreg_wrong_mod": source}, version="2.0")
    with pytest.raises(PluginError, match=r"backbone 'wrong_bb' from package tlreg-wrong 2\.0 "
                                          r"is function, expected a tlreg\."
                                          r"BackboneSpec"):
        get_backbone("wrong_bb")
    with pytest.raises(PluginError, match=r"head 'wrong-head' from package tlreg-wrong 2\.0 "
                                          r"is int, expected a callable"):
        get_head("wrong-head")
    with pytest.raises(PluginError, match=r"'missing-attr' from package tlreg-wrong 2\.0 "
                                          r"failed to load: AttributeError"):
        get_policy("missing-attr")
    # Factories that return the wrong thing are caught when the model is built.
    with pytest.raises(PluginError, match=r"policy 'wrong-policy' from package tlreg-wrong "
                                          r"returned str, not a Policy"):
        tlreg.create_model("timm:test_resnet", 2, policy="wrong-policy", pretrained=False)
    with pytest.raises(PluginError, match=r"head 'list-head' from package tlreg-wrong "
                                          r"returned list, not an nn.Module"):
        tlreg.create_model("timm:test_resnet", 2, head="list-head", pretrained=False)

    results = {p.name: err for p, err in registry.check_all() if p.dist == "tlreg-wrong"}
    assert results["wrong_bb"] and results["wrong-head"] and results["missing-attr"]
    assert results["wrong-policy"] is None  # a callable: only its result can be checked
    code, _, err = cli("plugins", "--check")
    assert code == 1 and err.count("tlreg-wrong 2.0") == 3


# -- collisions -------------------------------------------------------------------------------


def _colliding(site):
    site.add("tlreg_collide.A", {BB: {"shared_bb": "tlreg_collide_a:spec"}},
             {"tlreg_collide_a": 'from tlreg import BackboneSpec\n'
                                 'spec = BackboneSpec("test_resnet")\n'}, version="1.0")
    site.add("tlreg-collide-b", {BB: {"shared_bb": "tlreg_collide_b:spec"}},
             {"tlreg_collide_b": 'from tlreg import BackboneSpec\n'
                                 'spec = BackboneSpec("test_vit")\n'}, version="3.1")


def test_colliding_names_need_the_distribution(plugin_site, cli):
    _colliding(plugin_site)
    with pytest.raises(UsageError) as exc:
        get_backbone("shared_bb")
    msg = str(exc.value)
    assert "tlreg-collide-a 1.0" in msg and "tlreg-collide-b 3.1" in msg
    assert "'tlreg-collide-a:shared_bb'" in msg and "'tlreg-collide-b:shared_bb'" in msg

    # pip-style normalisation: every spelling of the distribution name picks the same package.
    for spelling in ("tlreg-collide-a", "tlreg_collide_a", "TLREG.Collide_A"):
        assert get_backbone(f"{spelling}:shared_bb").timm_name == "test_resnet"
    assert get_backbone("tlreg_collide_b:shared_bb").timm_name == "test_vit"

    model = tlreg.create_model("tlreg_collide_b:shared_bb", 2, pretrained=False)
    assert model.info.provider == "tlreg-collide-b" and model.feature_dim == 64

    code, _, err = cli("backbones", "show", "shared_bb")
    assert code == 2 and err.startswith("error: ") and "tlreg-collide-a 1.0" in err
    assert "tlreg-collide-b 3.1" in err
    code, out, err = cli("backbones", "show", "tlreg-collide-a:shared_bb", "--json")
    assert code == 0, err
    assert json.loads(out)["distribution"] == "tlreg-collide-a"

    with pytest.raises(UnknownNameError, match="in package 'tlreg-collide-c'"):
        get_backbone("tlreg-collide-c:shared_bb")


def test_collision_with_a_broken_duplicate_uses_the_working_one(plugin_site, monkeypatch):
    plugin_site.add("tlreg-dup-ok", {HEADS: {"fancy": "tlreg_dup_ok:head"}},
                    {"tlreg_dup_ok": "def head(i, n):\n    from torch import nn\n"
                                     "    return nn.Linear(i, n)\n"})
    plugin_site.add("tlreg-dup-bad", {HEADS: {"fancy": "tlreg_dup_bad:head"}},
                    {"tlreg_dup_bad": "raise ImportError('no module named cupy')\n"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = get_head("fancy")
    assert head is get_head("tlreg-dup-ok:fancy")
    assert [str(w.message) for w in caught if "tlreg-dup-bad" in str(w.message)]
    monkeypatch.setenv("TLREG_STRICT_PLUGINS", "1")
    registry.clear_cache()
    with pytest.raises(PluginError, match=r"tlreg-dup-bad 0\.1\.0 failed to load: ImportError"):
        get_head("fancy")


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name", "suggestion"), [
    ("backbone", "resnet5", "'resnet50'"),
    ("backbone", "vit_small_patch16", "'vit_small_patch16_224'"),
    ("head", "lineer", "'linear'"),
    ("policy", "fine-tune", "'finetune'"),
    ("policy", "feature_extract", "'feature-extract'"),
])
def test_unknown_names_suggest(kind, name, suggestion):
    with pytest.raises(UnknownNameError) as exc:
        find(kind, name)
    assert str(exc.value).startswith(f"unknown {kind} '{name}'")
    assert f"did you mean {suggestion}" in str(exc.value)


def test_unknown_names_without_a_close_match():
    with pytest.raises(UnknownNameError) as exc:
        get_backbone("xyz_backbone")
    assert "'timm:xyz_backbone'" in str(exc.value)  # points at the timm: namespace
    with pytest.raises(UnknownNameError, match="did you mean 'test_resnet'"):
        get_backbone("timm:test_resnt")


def test_timm_namespace_and_qualified_builtins():
    spec = get_backbone("timm:resnet18.a1_in1k")
    assert (spec.timm_name, spec.tag, spec.source) == ("resnet18", "a1_in1k", "timm")
    assert get_backbone("tlreg:resnet50") == get_backbone("resnet50")
    assert get_backbone("resnet50").arch == "resnet50.a1_in1k"


# -- a real pip install -----------------------------------------------------------------------


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=300)


def _can_build_without_isolation() -> bool:
    """Whether this environment can build a wheel itself: setuptools >= 70.1, or older with
    the `wheel` package (a fresh Python 3.11 venv has setuptools 65 and no `wheel`)."""
    from importlib import metadata

    try:
        version = tuple(int(re.match(r"\d*", x).group() or 0)
                        for x in metadata.version("setuptools").split(".")[:2])
    except metadata.PackageNotFoundError:
        return False
    if version >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def pip_installed_plugin(tmp_path_factory):
    """tests/plugin_pkgs/tlreg-demo-plugin, pip-installed into this environment for the module."""
    src = tmp_path_factory.mktemp("pkg") / "tlreg-demo-plugin"
    shutil.copytree(PKGS / "tlreg-demo-plugin", src)  # keep build/ and egg-info out of the repo
    _pip("uninstall", "-y", "tlreg-demo-plugin")  # a leftover from an interrupted run
    args = ["install", "--no-deps", "-q"]
    if _can_build_without_isolation():
        args += ["--no-build-isolation", "--no-index"]  # fast, and no network at all
    res = _pip(*args, str(src))
    if res.returncode != 0:
        pytest.fail(f"pip install of the demo plugin failed:\n{res.stdout}\n{res.stderr}")
    registry.clear_cache()
    try:
        yield "tlreg-demo-plugin"
    finally:
        res = _pip("uninstall", "-y", "tlreg-demo-plugin")
        sys.modules.pop("tlreg_demo_plugin", None)
        registry.clear_cache()
        assert res.returncode == 0, res.stderr
        assert _pip("show", "tlreg-demo-plugin").returncode != 0, "demo plugin left installed"
        assert "tlreg-demo-plugin" not in {p.dist for p in plugins.find_plugins()}


def test_pip_installed_plugin_is_listed_and_used(pip_installed_plugin, tlreg_cmd, cli):
    res = subprocess.run([*tlreg_cmd, "plugins"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, COLUMNS="200"))
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if "tlreg-demo-plugin" in ln]
    assert len(rows) == 3
    assert any("demo_resnet" in r for r in rows) and any("demo-head" in r for r in rows)
    assert any("demo-last-two" in r and "0.2.0" in r for r in rows)
    _, out, _ = cli("plugins", "--check", "--json")
    assert {r["name"]: r["ok"] for r in json.loads(out)
            if r["distribution"] == pip_installed_plugin} == {
        "demo_resnet": True, "demo-head": True, "demo-last-two": True}

    # All three by name, explicitly ...
    model = tlreg.create_model("demo_resnet", 3, head="demo-head", policy="demo-last-two",
                               pretrained=False)
    assert model.info.provider == "tlreg-demo-plugin"
    assert (model.info.head, model.info.policy) == ("demo-head", "demo-last-two")
    # demo-last-two trains test_resnet's last two stages (layer3 42432 + layer4 267840, BN
    # affine included under the 'eval' rule); demo-head is 96*8+8 + 8*3+3 = 803.
    assert model.num_trainable() == 42432 + 267840 + 803
    assert model.plan.bn == ("frozen", "frozen", "frozen", "eval", "eval")
    # ... and as the backbone's defaults.
    model = tlreg.create_model("tlreg_demo_plugin:demo_resnet", 3, pretrained=False)
    assert (model.info.head, model.info.policy) == ("demo-head", "demo-last-two")
