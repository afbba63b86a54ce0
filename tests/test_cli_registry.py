"""The `tlreg` CLI's registry commands, its error handling, and its start-up imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tlreg

GROUPS = ("tlreg.backbones", "tlreg.heads", "tlreg.policies", "tlreg.callbacks", "tlreg.datasets",
          "tlreg.exporters")


def _imported(cmd: list[str], *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run a command with -X importtime (as PYTHONPROFILEIMPORTTIME) and list what it imported."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    res = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in res.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return res, modules


@pytest.mark.parametrize("args", [
    ["--help"], ["plugins"], ["plugins", "--json"], ["backbones", "list"],
    ["backbones", "list", "res*", "--json"], ["heads", "list"], ["policies", "list", "--json"],
    ["sources", "list"], ["--version"],
])
def test_installed_cli_starts_without_torch_or_timm(tlreg_cmd, args):
    res, modules = _imported(tlreg_cmd, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "tlreg.cli" in modules and "typer" in modules  # the probe itself works
    heavy = sorted(m for m in modules if m.split(".")[0] in {"torch", "timm", "torchvision"})
    assert heavy == [], f"`tlreg {' '.join(args)}` imported {heavy[:5]}"


def test_python_m_tlreg():
    res = subprocess.run([sys.executable, "-m", "tlreg", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith(f"tlreg {tlreg.__version__} (torch ")


def test_plugins_json_lists_builtins_under_their_groups(tlreg_cmd):
    res = subprocess.run([*tlreg_cmd, "plugins", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert tuple(data) == GROUPS
    mine = {g: {r["name"] for r in rows if r["distribution"] == "tlreg"}
            for g, rows in data.items()}
    assert mine == {
        "tlreg.backbones": {"resnet18", "resnet50", "efficientnet_b0", "convnext_tiny",
                            "mobilenetv3_large_100", "vit_small_patch16_224"},
        "tlreg.heads": {"linear", "mlp", "cosine"},
        "tlreg.policies": {"auto", "feature-extract", "finetune", "partial", "gradual"},
        "tlreg.callbacks": {"early-stopping"},
        "tlreg.datasets": {"csv", "folder", "hf"},
        "tlreg.exporters": {"tlreg", "timm", "onnx"},
    }
    row = next(r for r in data["tlreg.heads"] if r["name"] == "mlp")
    assert row == {"name": "mlp", "distribution": "tlreg", "version": tlreg.__version__,
                   "value": "tlreg.models.heads:mlp"}


def test_plugins_table(cli):
    code, out, err = cli("plugins")
    assert code == 0, err
    assert "feature-extract" in out and "tlreg.heads" not in out and "policy" in out


def test_list_commands(cli):
    code, out, _ = cli("heads", "list", "--json")
    assert code == 0
    assert {r["name"] for r in json.loads(out) if r["distribution"] == "tlreg"} == {
        "linear", "mlp", "cosine"}
    code, out, _ = cli("policies", "list")
    assert code == 0 and "gradual" in out and "partial" in out
    code, out, _ = cli("backbones", "list", "resnet*", "--json")
    assert code == 0
    assert [r["name"] for r in json.loads(out) if r["distribution"] == "tlreg"] == [
        "resnet18", "resnet50"]
    code, out, _ = cli("backbones", "list", "timm:test_vit*", "--json")
    assert code == 0 and "timm:test_vit" in [r["name"] for r in json.loads(out)]
    code, out, _ = cli("backbones", "list", "conv*", "--pretrained", "--json")
    assert code == 0
    assert {"name": "convnext_tiny", "distribution": "tlreg", "version": tlreg.__version__,
            "timm_name": "convnext_tiny.fb_in1k"} in json.loads(out)


def test_backbones_show(cli):
    code, out, err = cli("backbones", "show", "timm:test_resnet", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["parameters"] == 372688 and info["feature_width"] == 96
    assert info["data_config"]["input_size"] == [3, 160, 160]
    code, out, _ = cli("backbones", "show", "timm:test_vit")
    assert code == 0
    for text in ("test_vit", "feature_width", "input_size", "stem", "blocks.5, norm",
                 "layer_decay"):
        assert text in out, text


@pytest.mark.parametrize(("args", "message"), [
    (["backbones", "show", "resnet5"],
     "error: unknown backbone 'resnet5'; did you mean 'resnet50', 'resnet18'?"),
    (["backbones", "show", "timm:not_a_model_at_all"],
     "error: unknown timm model 'not_a_model_at_all'"),
])
def test_errors_are_one_line(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def test_debug_shows_the_traceback(tlreg_cmd):
    plain = subprocess.run([*tlreg_cmd, "backbones", "show", "resnet5"], capture_output=True,
                           text=True, timeout=60)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [ln for ln in plain.stderr.splitlines() if ln.startswith("error:")] == [
        "error: unknown backbone 'resnet5'; did you mean 'resnet50', 'resnet18'?"]
    debug = subprocess.run([*tlreg_cmd, "--debug", "backbones", "show", "resnet5"],
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "UnknownNameError: unknown backbone 'resnet5'" in debug.stderr


def test_usage_errors(cli):
    code, _, err = cli("backbones", "frobnicate")
    assert code == 2 and "No such command" in err
    code, out, _ = cli("--version")
    assert code == 0 and out.splitlines()[0].startswith(f"tlreg {tlreg.__version__} (torch ")


def test_demo_data_is_a_source_and_demo_says_what_to_install_without_it(cli, tmp_path,
                                                                         monkeypatch):
    from tlreg.data.sources import open_source
    from tlreg.plugins import find_plugins
    from tlreg.registry import clear_cache

    if not any(p.dist == "tlreg-demo-data" for p in find_plugins("source")):
        pytest.skip("tlreg-demo-data is not installed")
    split = open_source("demo:hymenoptera", None, 0)
    assert split.classes == ("ants", "bees") and (len(split.train), len(split.val)) == (244, 153)
    from tlreg.errors import UsageError

    with pytest.raises(UsageError, match="unknown demo data set 'wasps'; this package has: "
                                               "demo:hymenoptera"):
        open_source("demo:wasps", None, 0)
    monkeypatch.setenv("TLREG_DISABLE_PLUGINS", "tlreg-demo-data")
    clear_cache()
    code, _, err = cli("demo", "--out", str(tmp_path / "run"))
    assert code == 2 and not (tmp_path / "run").exists()
    assert err.strip().splitlines() == [
        "error: the demo images are a package of their own: pip install tlreg-demo-data (from "
        "the tlreg repository: pip install -e plugins/tlreg-demo-data); or pass --data DIR with "
        "DIR/train/<class> and DIR/val/<class>"]
    monkeypatch.delenv("TLREG_DISABLE_PLUGINS")
    clear_cache()
