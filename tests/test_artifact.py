"""Head-only artifacts: format, strict verified loading, timm export, size.

Named pretrained weights come from `LocalHub` (tests/hub_server.py), which serves
`timm/test_resnet.r160_in1k` the way the real Hub does: timm downloads them through the real
`huggingface_hub` client, so "pretrained" here is the genuine timm code path, offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hub_server import TEST_TOKEN, LocalHub
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save, save_file

from tlreg._io import save_checkpoint
from tlreg.errors import (
    ArtifactError,
    BackboneMismatchError,
    BackboneMismatchWarning,
    BackboneUnavailableError,
    ChecksumError,
    FormatVersionError,
    UnsafeFileError,
    UsageError,
)
from tlreg.models.backbones import weights_sha256
from tlreg.models.transfer import TransferModel, create_model
from tlreg.runs.checkpoint import write_model_json
from tlreg.sharing.api import load_artifact, parse_source
from tlreg.sharing.exporters import export_run, export_timm
from tlreg.sharing.format import BACKBONE_FILE, CONFIG_FILE, HEAD_FILE, file_sha256
from tlreg.sharing.save import save_artifact

ROOT = Path(__file__).resolve().parents[1]
TIMM_REPO = "timm/test_resnet.r160_in1k"  # where timm looks for `test_resnet` weights
BACKBONE = "timm:test_resnet"


# -- fixtures and helpers shared with test_hub.py ------------------------------------------------


def _timm_weights(seed: int) -> bytes:
    """A full `test_resnet` checkpoint (1000-class classifier included) as timm publishes it."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=1000)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


_WEIGHTS: dict[int, bytes] = {}


def timm_weights(seed: int = 0) -> bytes:
    if seed not in _WEIGHTS:
        _WEIGHTS[seed] = _timm_weights(seed)
    return _WEIGHTS[seed]


@pytest.fixture
def hub(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A LocalHub that is *the* Hub for this test: default endpoint, token, timm's weights."""
    with LocalHub() as local:
        monkeypatch.setattr(constants, "ENDPOINT", local.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            local.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
        local.create_repo(TIMM_REPO)
        local.put_file(TIMM_REPO, "model.safetensors", timm_weights(0))
        yield local
        assert local.errors == []


def served_backbone_sha256(seed: int = 0) -> str:
    """Canonical hash of the served weights as a backbone (classifier dropped)."""
    state = {k: v for k, v in _load_bytes(timm_weights(seed)).items() if not k.startswith("fc.")}
    return weights_sha256(state)


def _load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def nudge_head(model: TransferModel, seed: int = 1) -> None:
    """Make the head differ from any fresh initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def train_step(model: TransferModel, seed: int = 0) -> None:
    """One plain SGD step under the model's policy (BN rules included), as training does.

    (By hand rather than torch.optim, whose first use costs seconds of imports.)
    """
    gen = torch.Generator().manual_seed(seed)
    model.train()
    x = torch.randn(4, 3, 64, 64, generator=gen)
    y = torch.arange(4) % model.info.num_classes
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.sub_(0.5 * p.grad)
                p.grad = None
    model.eval()


def images(n: int = 3, size: int = 64, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def logits(model: TransferModel, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def tiny_png() -> bytes:
    """A valid 1x1 PNG, without importing matplotlib."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def make_run(run_dir: Path, model: TransferModel, *, pretrained_sha256: str | None = None
             ) -> Path:
    """A run directory laid out as tlreg.engine.trainer writes it (best = epoch 1, last = 2)."""
    save_checkpoint(run_dir / "checkpoints" / "best", model.state_dict(),
                    {"epoch": 1, "val_accuracy": 0.875})
    save_checkpoint(run_dir / "checkpoints" / "last", model.state_dict(),
                    {"epoch": 2, "val_accuracy": 0.75})
    write_model_json(run_dir, model, {"pretrained_sha256": pretrained_sha256})
    history = [{"epoch": 1, "train_loss": 0.5, "val_loss": 0.3125, "val_accuracy": 0.875,
                "lr": [0.1], "seconds": 1.0},
               {"epoch": 2, "train_loss": 0.25, "val_loss": 0.5, "val_accuracy": 0.75,
                "lr": [0.1], "seconds": 1.0}]
    (run_dir / "history.json").write_text(json.dumps(history))
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": "finished", "val_accuracy": 0.75, "best_val_accuracy": 0.875,
         "best_epoch": 1, "val_images": 8, "wall_seconds": 2.0}))
    (run_dir / "training.png").write_bytes(tiny_png())
    # Things that must never leave the machine: an absolute data path, optimizer state.
    (run_dir / "config.yaml").write_text(f"data: {run_dir.resolve()}/secret_data\nout: runs\n")
    return run_dir


def rewrite_config(folder: Path, **changes) -> dict:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    for dotted, value in changes.items():
        target = cfg
        *parents, key = dotted.split("__")
        for p in parents:
            target = target[p]
        target[key] = value
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return cfg


def pretrained_model(num_classes: int = 2, **kwargs) -> TransferModel:
    return create_model(BACKBONE, num_classes, pretrained=True,
                        label_names=[f"c{i}" for i in range(num_classes)], **kwargs)


# -- the format -------------------------------------------------------------------------------


def test_random_init_artifact_stores_full_backbone_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 3, pretrained=False, label_names=["ant", "bee", "wasp"])
    nudge_head(model)
    folder = save_artifact(model, tmp_path / "art", metrics={"val_acc": 0.5, "bad": "x"})

    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", BACKBONE_FILE, CONFIG_FILE, HEAD_FILE]
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["format"] == "tlreg-head" and cfg["format_version"] == 1
    assert cfg["backbone"]["weights"] == "full" and cfg["backbone"]["weights_source"] == "random"
    assert cfg["backbone"]["weights_sha256"] is None
    assert cfg["label_names"] == ["ant", "bee", "wasp"] and cfg["num_classes"] == 3
    assert cfg["data_config"]["input_size"] == [3, 160, 160]
    assert cfg["data_config"]["mean"] == [0.5, 0.5, 0.5]
    assert cfg["metrics"] == {"val_acc": 0.5}
    for name in (HEAD_FILE, BACKBONE_FILE):
        assert cfg["files"][name]["sha256"] == file_sha256(folder / name)
    assert set(load_file(folder / HEAD_FILE)) == {"0.weight", "0.bias"}
    assert set(load_file(folder / BACKBONE_FILE)) == set(model.backbone.state_dict())

    loaded = load_artifact(folder)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)
    assert loaded.info.label_names == ("ant", "bee", "wasp")
    assert loaded.data_config["input_size"] == (3, 160, 160)
    assert not loaded.training


def test_feature_extract_on_pretrained_weights_stores_only_the_head(hub: LocalHub,
                                                                    tmp_path: Path) -> None:
    model = pretrained_model()
    nudge_head(model)
    folder = save_artifact(model, tmp_path / "art", dataset="user/ants-bees")

    assert not (folder / BACKBONE_FILE).exists()
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    bb = cfg["backbone"]
    assert bb["weights"] == "none" and bb["weights_source"] == "timm"
    assert bb["weights_sha256"] == served_backbone_sha256(0)
    assert bb["hub_id"] == TIMM_REPO and bb["revision"] == hub.head(TIMM_REPO)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "tlreg"
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.base_model == TIMM_REPO
    assert card.data.datasets == ["user/ants-bees"]
    assert "from_pretrained(" in card.text and "| 1 | c1 |" in card.text

    loaded = load_artifact(folder)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_partial_training_stores_only_the_changed_backbone_tensors(hub: LocalHub,
                                                                   tmp_path: Path) -> None:
    model = pretrained_model(policy="partial", policy_args={"train_last": 1})
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train_step(model)
    folder = save_artifact(model, tmp_path / "art")  # rebuilds the pretrained state itself

    delta = load_file(folder / BACKBONE_FILE)
    changed = {k for k, v in model.backbone.state_dict().items() if not torch.equal(v, before[k])}
    assert set(delta) == changed
    last = model.num_stages - 1
    params = {k for k in delta if k in model.stage_of}
    assert params and all(model.stage_of[k] == last for k in params)
    assert any(k.endswith("running_mean") for k in delta)  # BN statistics that moved
    assert len(delta) < len(before)
    assert json.loads((folder / CONFIG_FILE).read_text())["backbone"]["weights"] == "delta"

    loaded = load_artifact(folder)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)


def test_export_run_uses_the_recorded_hash_and_skips_the_download(hub: LocalHub,
                                                                  tmp_path: Path) -> None:
    model = pretrained_model()
    nudge_head(model)
    run = make_run(tmp_path / "run", model, pretrained_sha256=served_backbone_sha256(0))
    hub.clear_log()
    folder = export_run(run, tmp_path / "out")

    assert hub.downloads() == []
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["metrics"] == {"epoch": 1.0, "val_accuracy": 0.875, "val_loss": 0.3125}
    assert cfg["files"]["training.png"]["sha256"] == file_sha256(run / "training.png")
    assert "![training curve](training.png)" in (folder / "README.md").read_text()
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", CONFIG_FILE, HEAD_FILE, "training.png"]
    text = "".join(p.read_text(errors="replace") for p in folder.iterdir())
    assert str(tmp_path) not in text and "secret_data" not in text


def test_export_run_refuses_when_the_pretrained_weights_changed(hub: LocalHub,
                                                               tmp_path: Path) -> None:
    model = pretrained_model(policy="finetune")
    train_step(model)
    run = make_run(tmp_path / "run", model, pretrained_sha256="0" * 64)
    with pytest.raises(BackboneMismatchError, match="the stored delta would be wrong"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- verification -------------------------------------------------------------------------------


@pytest.fixture
def random_artifact(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 2, pretrained=False, label_names=["a", "b"])
    return save_artifact(model, tmp_path / "art")


def test_tampered_tensor_file_is_a_checksum_error(random_artifact: Path) -> None:
    head = load_file(random_artifact / HEAD_FILE)
    head["0.bias"] = head["0.bias"] + 1
    save_file(head, random_artifact / HEAD_FILE)
    with pytest.raises(ChecksumError, match=r"head.safetensors .* is corrupt or was modified"):
        load_artifact(random_artifact)


def test_config_from_a_future_format_version_is_refused(random_artifact: Path) -> None:
    rewrite_config(random_artifact, format_version=3, tlreg_version="9.0")
    with pytest.raises(FormatVersionError,
                       match=r"format version 3 is newer than this tlreg supports \(2\).*"
                             r"pip install -U 'tlreg>=9.0'"):
        load_artifact(random_artifact)


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "something-else"}, "is not a tlreg artifact config"),
    ({"num_classes": 3}, "2 label names for 3 classes"),
    ({"head__args": "x"}, "head.args must be dict"),
    ({"backbone__weights": "none"}, "'files' has backbone.safetensors"),
    ({"data_config__input_size": "224"}, r"data_config.input_size must be \[channels"),
    ({"data_config__input_size": [3, 200000, 1]}, "sides in"),
    ({"data_config__std": [0.5, 0, 0.5]}, r"data_config.std must be 1 or 3 numbers > 0"),
    ({"data_config__crop_pct": "big"}, "crop_pct must be in"),
    ({"num_classes": 10**9}, r"num_classes must be in \[2, 1000000\]"),
])
def test_malformed_configs_are_clear_errors(random_artifact: Path, changes: dict,
                                            message: str) -> None:
    rewrite_config(random_artifact, **changes)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(random_artifact)


def _pickle_bomb(marker: Path) -> bytes:
    class Bomb:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled!"))

    return pickle.dumps(Bomb())


def test_a_folder_holding_a_pickle_is_refused_unopened(random_artifact: Path,
                                                       tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (random_artifact / "model.pt").write_bytes(_pickle_bomb(marker))
    with pytest.raises(UnsafeFileError, match=r"pickle files \(model.pt\).*never loads pickles"):
        load_artifact(random_artifact)
    assert not marker.exists()


def _replace_head(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write new head tensors and record their checksum, as a careless tool might."""
    save_file(tensors, folder / HEAD_FILE)
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg["files"][HEAD_FILE]["sha256"] = file_sha256(folder / HEAD_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))


def test_head_tensors_are_loaded_strictly(random_artifact: Path) -> None:
    head = load_file(random_artifact / HEAD_FILE)
    _replace_head(random_artifact, {"0.weight": head["0.weight"][:, :10].contiguous(),
                                    "0.bias": head["0.bias"]})
    with pytest.raises(ArtifactError, match=r"tensor '0.weight' is float32\[2, 10\], the model "
                                            r"expects float32\[2, 96\]"):
        load_artifact(random_artifact)
    _replace_head(random_artifact, {"0.weight": head["0.weight"], "extra": head["0.bias"]})
    with pytest.raises(ArtifactError, match=r"missing 0\.bias, unexpected extra"):
        load_artifact(random_artifact)
    _replace_head(random_artifact, {"0.weight": head["0.weight"].double(),
                                    "0.bias": head["0.bias"]})
    with pytest.raises(ArtifactError, match=r"is float64\[2, 96\], the model expects float32"):
        load_artifact(random_artifact)


def test_an_unknown_backbone_names_the_package_that_provides_it(random_artifact: Path) -> None:
    rewrite_config(random_artifact, backbone__name="fancynet", backbone__provider="acme-vision",
                   backbone__provider_version="1.2.0")
    with pytest.raises(BackboneUnavailableError,
                       match=r"backbone 'fancynet' is not available here.*provided by the "
                             r"package 'acme-vision'.*pip install 'acme-vision==1.2.0'"):
        load_artifact(random_artifact)


def test_a_timm_model_missing_here_names_the_timm_version(random_artifact: Path) -> None:
    rewrite_config(random_artifact, backbone__timm_name="resnet_from_2031",
                   backbone__timm_version="9.9.0")
    with pytest.raises(BackboneUnavailableError,
                       match=r"timm model 'resnet_from_2031'.*made with timm 9.9.0.*"
                             r"pip install -U 'timm>=9.9.0'"):
        load_artifact(random_artifact)


def test_backbone_weights_hash_mismatch_refuses_unless_allowed(hub: LocalHub,
                                                               tmp_path: Path) -> None:
    model = pretrained_model()
    nudge_head(model)
    folder = save_artifact(model, tmp_path / "art")
    hub.put_file(TIMM_REPO, "model.safetensors", timm_weights(1))  # upstream weights changed

    with pytest.raises(BackboneMismatchError,
                       match=r"hash to [0-9a-f]{64}, but the head was trained on weights hashing "
                             r"to [0-9a-f]{64}.*--allow-backbone-mismatch"):
        load_artifact(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_artifact(folder, allow_backbone_mismatch=True)
    assert any(issubclass(w.category, BackboneMismatchWarning) for w in caught)
    assert loaded.info.label_names == ("c0", "c1")


def test_saving_never_clobbers_unrelated_files_and_is_atomic(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 2, pretrained=False)
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(UsageError, match="is not empty and is not a tlreg artifact"):
        save_artifact(model, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"

    folder = save_artifact(model, tmp_path / "art")
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    nudge_head(model)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "notes"]  # no temp leftovers


def test_sources_resolve_local_first_then_hub(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source("user/repo") == ("hub", "user/repo", None)
    assert parse_source("user/repo@v1.0") == ("hub", "user/repo", "v1.0")
    (tmp_path / "user" / "repo").mkdir(parents=True)
    assert parse_source("user/repo") == ("artifact", "user/repo", None)
    assert parse_source("hf:user/repo") == ("hub", "user/repo", None)
    with pytest.raises(UsageError, match="neither an existing local path nor a Hub repo id"):
        parse_source("no_such_thing")


def test_a_run_directory_loads_with_its_data_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 2, pretrained=False)
    model.info = replace(model.info, data_config={**model.data_config, "input_size": (3, 96, 96)})
    nudge_head(model)
    run = make_run(tmp_path / "run", model)
    loaded = load_artifact(run)
    assert loaded.data_config["input_size"] == (3, 96, 96)
    x = images()
    torch.testing.assert_close(logits(loaded, x), logits(model, x), atol=1e-6, rtol=0)
    folder = export_run(run, tmp_path / "out")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    assert cfg["data_config"]["input_size"] == [3, 96, 96]


# -- timm export --------------------------------------------------------------------------------


_TIMM_ONLY = """
import sys
sys.modules["tlreg"] = None  # importing tlreg now fails: the export must stand alone
import timm, torch
from safetensors.torch import load_file, save_file
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"logits": model(x)}, sys.argv[3])
cfg = model.pretrained_cfg
print(cfg["label_names"], cfg["mean"], cfg["input_size"], cfg["interpolation"])
"""


def test_timm_export_loads_without_tlreg_and_gives_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(BACKBONE, 3, pretrained=False, label_names=["x", "y", "z"])
    model.info = replace(model.info, data_config={**model.data_config, "mean": (0.4, 0.5, 0.6)})
    nudge_head(model)
    out = export_timm(model, tmp_path / "timm")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["x", "y", "z"] and cfg["num_features"] == 96
    assert cfg["pretrained_cfg"]["mean"] == [0.4, 0.5, 0.6]
    assert {"fc.weight", "fc.bias"} <= set(load_file(out / "model.safetensors"))

    x = images()
    save_file({"x": x}, tmp_path / "x.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    proc = subprocess.run(
        [sys.executable, "-c", _TIMM_ONLY, str(out), str(tmp_path / "x.safetensors"),
         str(tmp_path / "y.safetensors")],
        capture_output=True, text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "['x', 'y', 'z'] [0.4, 0.5, 0.6] [3, 160, 160] bilinear" in proc.stdout
    torch.testing.assert_close(load_file(tmp_path / "y.safetensors")["logits"],
                               logits(model, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", ["timm:test_vit", "timm:test_efficientnet"])
def test_timm_export_maps_the_head_onto_each_models_classifier(backbone: str,
                                                               tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    model = create_model(backbone, 2, pretrained=False, head_args={"dropout": 0.1})
    nudge_head(model)
    out = export_timm(model, tmp_path / "timm")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images(2, 64 if "efficientnet" in backbone else 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits(model, x), atol=1e-6, rtol=0)


def test_timm_export_needs_a_linear_head(tmp_path: Path) -> None:
    model = create_model(BACKBONE, 2, head="mlp", pretrained=False)
    with pytest.raises(UsageError, match=r"needs a linear head.*'mlp' head\. Use --format tlreg"):
        export_timm(model, tmp_path / "timm")
    assert not (tmp_path / "timm").exists()


# -- size -----------------------------------------------------------------------------------------


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_artifact_size",
                                                  ROOT / "bench" / "artifact_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_feature_extract_artifact_on_resnet18_is_under_one_percent(tmp_path: Path) -> None:
    bench = _bench_module()
    result = bench.measure(tmp_path)
    assert result["full_model_bytes"] > 40_000_000  # resnet18: 11.7 M float32 parameters
    assert result["artifact_files"].keys() == {"README.md", CONFIG_FILE, HEAD_FILE}
    assert result["artifact_bytes"] < 0.01 * result["full_model_bytes"]
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    section = doc.split(bench.BEGIN, 1)[1].split(bench.END, 1)[0]
    assert f"| {result['full_model_bytes']:,} |" in section
    assert f"| {result['head_bytes']:,} |" in section


def test_an_oversized_config_is_refused_unparsed(random_artifact: Path) -> None:
    cfg = json.loads((random_artifact / CONFIG_FILE).read_text())
    cfg["padding"] = "x" * (2 << 20)
    (random_artifact / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="over the 1,048,576 a tlreg config may have"):
        load_artifact(random_artifact)


def test_a_damaged_header_with_a_matching_checksum_is_an_artifact_error(
        random_artifact: Path) -> None:
    raw = bytearray((random_artifact / HEAD_FILE).read_bytes())
    raw[8:12] = b"\x00\xff{["  # the JSON header, damaged
    (random_artifact / HEAD_FILE).write_bytes(bytes(raw))
    cfg = json.loads((random_artifact / CONFIG_FILE).read_text())
    cfg["files"][HEAD_FILE]["sha256"] = file_sha256(random_artifact / HEAD_FILE)
    (random_artifact / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="is not a readable safetensors file"):
        load_artifact(random_artifact)


@pytest.mark.parametrize("source", ["a/..", "user/na--me", "user/name@../../etc",
                                    "user/name@a b", "user/name@.hidden/x"])
def test_unsafe_repo_ids_and_revisions_are_refused(source: str) -> None:
    from tlreg.hubclient import split_revision

    with pytest.raises(UsageError, match=r"invalid (Hub repo id|revision)"):
        split_revision(source)
