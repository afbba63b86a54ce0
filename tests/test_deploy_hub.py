"""`tlreg push --format timm|onnx`: repos the ecosystem loads without tlreg (issue 17).

Pushed to LocalHub through the real, unpatched `huggingface_hub` client; then read back by
timm (`create_model("hf-hub:...")`) and transformers (`pipeline("image-classification")`) in a
fresh process, and by `tlreg predict model.onnx`, each against `tlreg predict RUN`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_artifact
import torch
from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from huggingface_hub import ModelCard, snapshot_download
from images import photo_files
from test_artifact import BACKBONE, make_run, nudge_head
from test_hub import run_cli

from tlreg.models.transfer import create_model
from tlreg.sharing.api import push_model
from tlreg.sharing.hub import PUSHED_FILES, publishable

hub = test_artifact.hub  # a LocalHub as the Hub for the test (endpoint and token)
REPO = f"{TEST_USER}/ants-vs-bees-deploy"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Four real photos where available (synthetic colours otherwise), of several sizes."""
    return photo_files(tmp_path_factory.mktemp("photos"), per_class=2, size=96)


def _run(tmp_path: Path, head: str = "linear") -> Path:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 2, head=head, pretrained=False, label_names=["ant", "bee"])
    nudge_head(model, seed=3)
    return make_run(tmp_path / f"run-{head}", model)


def _repo_files(local: LocalHub) -> set[str]:
    return set(local.files(REPO)) - {".gitattributes"}


def _probs(results: list[dict]) -> list[dict[str, float]]:
    return [{p["label"]: p["probability"] for p in r["predictions"]} for r in results]


def _predict(monkeypatch, capsys, source: str, photos: list[str]) -> list[dict[str, float]]:
    code, out, err = run_cli(monkeypatch, capsys, "predict", source, *photos, "--top-k", "2",
                             "--json")
    assert code == 0, err
    return _probs(json.loads(out))


# In a fresh process, as a user without tlreg would: timm's hf-hub loader and its transform,
# then transformers' pipeline (its timm wrapper). Prints {"timm": [...], "pipeline": [...]}.
LOAD_ELSEWHERE = r'''
import json, sys
import timm, torch
from PIL import Image
repo, files = sys.argv[1], sys.argv[2:]
model = timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
labels = model.pretrained_cfg["label_names"]
out = {"timm": []}
with torch.no_grad():
    for f in files:
        p = model(transform(Image.open(f).convert("RGB"))[None]).softmax(-1)[0].tolist()
        out["timm"].append(dict(zip(labels, p)))
try:
    from transformers import pipeline
except ImportError:
    out["pipeline"] = None
else:
    classify = pipeline("image-classification", model=repo, device="cpu")
    out["pipeline"] = [{r["label"]: r["score"] for r in classify(f, top_k=2)} for f in files]
print(json.dumps(out))
'''


@pytest.mark.slow  # a fresh process importing torch, timm and transformers: ~10 s on 2 cores
def test_push_format_timm_loads_in_timm_and_transformers(hub: LocalHub, photos, tmp_path,
                                                          monkeypatch, capsys) -> None:
    run = _run(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "push", str(run), REPO, "--format", "timm",
                           "--dataset", "user/ants")
    assert code == 0, err
    assert _repo_files(hub) == {"config.json", "model.safetensors", "README.md"}
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["user/ants"] and "accuracy" in card.data.metrics
    assert f'timm.create_model("hf-hub:{REPO}"' in card.text and "<REPO_ID>" not in card.text
    config = json.loads(hub.files(REPO)["config.json"])
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["ant", "bee"]

    expected = _predict(monkeypatch, capsys, str(run), photos)
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TEST_TOKEN,
           "HF_HUB_DISABLE_XET": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, REPO, *photos], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    readers = ["timm"] + (["pipeline"] if got["pipeline"] is not None else [])
    if importlib.util.find_spec("transformers") is not None:
        assert "pipeline" in readers  # installed here: it must have run
    for reader in readers:
        for want, have in zip(expected, got[reader], strict=True):
            assert max(want, key=want.get) == max(have, key=have.get), reader
            assert have.keys() == want.keys()
            assert all(abs(have[k] - want[k]) <= 1e-5 for k in want), (reader, have, want)


def test_push_format_onnx_predicts_like_the_run(hub: LocalHub, photos, tmp_path, monkeypatch,
                                                 capsys) -> None:
    pytest.importorskip("onnxruntime", reason="the [onnx] extra")
    run = _run(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "push", str(run), REPO, "--format", "onnx")
    assert code == 0, err
    assert _repo_files(hub) == {"model.onnx", "preprocess.json", "README.md"}
    assert "Upload ONNX model (timm:test_resnet, linear head, 2 classes)" in [
        c.title for c in hub.commits(REPO)]
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert card.data.library_name == "onnx" and card.data.pipeline_tag == "image-classification"
    folder = snapshot_download(REPO, local_dir=tmp_path / "pulled")
    expected = _predict(monkeypatch, capsys, str(run), photos)
    got = _predict(monkeypatch, capsys, str(Path(folder) / "model.onnx"), photos)
    for want, have in zip(expected, got, strict=True):
        assert max(want, key=want.get) == max(have, key=have.get)
        assert all(abs(have[k] - want[k]) <= 1e-5 for k in want), (have, want)


def test_switching_format_replaces_the_other_formats_files(hub: LocalHub, tmp_path) -> None:
    run = _run(tmp_path)
    # A random-init backbone is stored whole; make_run's run has a training curve.
    tlreg_files = {"config.json", "head.safetensors", "backbone.safetensors", "README.md",
                   "training.png"}
    push_model(run, REPO)
    assert _repo_files(hub) == tlreg_files
    hub.put_file(REPO, "notes.txt", b"mine")  # a user's own file is never deleted
    push_model(run, REPO, format="timm")
    assert _repo_files(hub) == {"config.json", "model.safetensors", "README.md", "notes.txt"}
    push_model(run, REPO)  # and back: timm's weights go
    assert _repo_files(hub) == tlreg_files | {"notes.txt"}
    assert set(PUSHED_FILES) >= {"model.safetensors", "model.onnx", "preprocess.json"}


def test_a_non_linear_head_to_format_timm_is_one_error_and_pushes_nothing(
        hub: LocalHub, tmp_path, monkeypatch, capsys) -> None:
    run = _run(tmp_path, head="mlp")
    code, out, err = run_cli(monkeypatch, capsys, "push", str(run), REPO, "--format", "timm")
    assert code != 0 and out == ""
    assert "needs a linear head" in err and "'mlp' head" in err and "--format tlreg" in err
    assert len(err.strip().splitlines()) == 1, err
    assert hub._store.get("model", REPO) is None  # not even created


def test_an_unknown_format_is_a_usage_error(hub: LocalHub, tmp_path, monkeypatch,
                                            capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "push", str(_run(tmp_path)), REPO,
                           "--format", "keras")
    assert code == 2 and "keras" in err and "timm" in err and "onnx" in err
    assert hub._store.get("model", REPO) is None


def test_export_folders_are_checked_before_anything_is_pushed(hub: LocalHub, tmp_path,
                                                              monkeypatch, capsys) -> None:
    from tlreg.sharing.exporters import export_run

    run = _run(tmp_path)
    timm_dir = export_run(run, tmp_path / "timm", format="timm")
    assert publishable(timm_dir)[0] == ["config.json", "model.safetensors", "README.md"]
    (timm_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, _, err = run_cli(monkeypatch, capsys, "push", str(timm_dir), REPO)
    assert code != 0 and "model.safetensors is not a valid safetensors file" in err, err
    config = timm_dir / "config.json"  # a config too large to be one is never parsed
    config.write_text('{"architecture": "resnet18", "pad": "' + "x" * (1 << 20) + '"}')
    code, _, err = run_cli(monkeypatch, capsys, "push", str(timm_dir), REPO)
    assert code != 0 and "no readable timm config.json" in err and "larger than" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "push", str(run / "checkpoints"), REPO)
    assert code != 0 and "not a tlreg artifact" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "push", str(timm_dir), REPO, "--format", "onnx")
    assert code == 2 and "only apply when pushing a model or a run" in err, err
    assert hub._store.get("model", REPO) is None
