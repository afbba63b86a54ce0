"""Exporters: the `tlreg.exporters` entry-point group, the built-ins, a third-party one, errors.

The third-party exporter is a real distribution (a dist-info folder `importlib.metadata` finds,
from conftest's `plugin_site`), used unmodified through `tlreg plugins` and `tlreg export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_artifact import BACKBONE, make_run, nudge_head

from tlreg.models.transfer import create_model
from tlreg.plugins import find_plugins
from tlreg.registry import get
from tlreg.sharing.exporters import export_run, export_timm, export_tlreg
from tlreg.sharing.format import CONFIG_FILE, HEAD_FILE

GROUP = "tlreg.exporters"

# Writes one JSON file saying what it was given: the model's labels and every keyword argument.
LABELS_EXPORTER = '''
import json
from pathlib import Path

def export_labels(model, out_dir, *, metrics=None, **kwargs):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps({
        "labels": list(model.info.label_names), "metrics": metrics, "kwargs": sorted(kwargs)}))
    return out
'''


def _labels_plugin(site):
    return site.add("tlreg-labels-export", {GROUP: {"labels": "tlreg_labels_mod:export_labels"}},
                    {"tlreg_labels_mod": LABELS_EXPORTER}, version="0.2.0")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory (best = epoch 1) on the tiny random-init backbone: no download."""
    torch.manual_seed(0)
    model = create_model(BACKBONE, 2, pretrained=False, label_names=["ant", "bee"])
    nudge_head(model)
    return make_run(tmp_path / "run", model)


def test_the_table_lists_the_built_ins() -> None:
    mine = {p.name: p.value for p in find_plugins("exporter") if p.dist == "tlreg"}
    assert mine == {"tlreg": "tlreg.sharing.exporters:export_tlreg",
                    "timm": "tlreg.sharing.exporters:export_timm",
                    "onnx": "tlreg.sharing.onnx:export_onnx"}
    assert get("exporter", "tlreg") is export_tlreg
    assert get("exporter", "timm") is export_timm


def test_export_run_resolves_the_built_ins_by_name(run: Path, tmp_path: Path) -> None:
    art = export_run(run, tmp_path / "art", format="tlreg", dataset="user/ants")
    cfg = json.loads((art / CONFIG_FILE).read_text())
    assert (art / HEAD_FILE).is_file() and cfg["dataset"] == "user/ants"
    assert cfg["metrics"] == {"epoch": 1.0, "val_loss": 0.3125, "val_accuracy": 0.875}
    timm_dir = export_run(run, tmp_path / "timm", format="timm", dataset="user/ants")
    assert sorted(p.name for p in timm_dir.iterdir()) == ["README.md", CONFIG_FILE,
                                                          "model.safetensors"]
    assert "dataset" not in json.loads((timm_dir / CONFIG_FILE).read_text())  # the card's only
    assert "- user/ants" in (timm_dir / "README.md").read_text()


def test_a_third_party_exporter_is_listed_and_used(plugin_site, cli, run: Path,
                                                   tmp_path: Path) -> None:
    _labels_plugin(plugin_site)
    code, out, err = cli("plugins", "--json")
    assert code == 0, err
    assert json.loads(out)[GROUP] and {"name": "labels", "distribution": "tlreg-labels-export",
                                       "version": "0.2.0",
                                       "value": "tlreg_labels_mod:export_labels"} in (
        json.loads(out)[GROUP])
    code, out, err = cli("plugins")
    assert code == 0 and "labels" in out and "tlreg-labels-export" in out

    code, out, err = cli("export", "--help")
    assert code == 0 and "labels, onnx, timm, tlreg" in out, out

    code, out, err = cli("export", str(run), str(tmp_path / "out"), "--format", "labels",
                         "--dataset", "user/ants")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'out'} (")
    written = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert written == {"labels": ["ant", "bee"],
                       "metrics": {"epoch": 1.0, "val_loss": 0.3125, "val_accuracy": 0.875},
                       "kwargs": ["dataset", "pretrained_sha256", "training_curve"]}


@pytest.mark.parametrize(("name", "hint"), [("tensorrt", ""),
                                            ("tlrg", "; did you mean 'tlreg'?")])
def test_an_unknown_format_is_one_line_naming_the_choices(cli, run: Path, tmp_path: Path,
                                                          name: str, hint: str) -> None:
    code, out, err = cli("export", str(run), str(tmp_path / "out"), "--format", name)
    assert code == 2 and out == ""
    assert err.startswith(f"error: unknown exporter {name!r}{hint} (registered: ")
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "timm" in err and "tlreg" in err
    assert not (tmp_path / "out").exists()
