"""The training engine on tiny random-init timm models: accuracy, freezing, caching, resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from images import HYMENOPTERA, colour_folder, count_backbone_images, hymenoptera_subset
from PIL import Image

import tlreg
from tlreg.engine.config import TrainConfig
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError
from tlreg.models.transfer import TransferModel


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("feature-cache")
    monkeypatch.setenv("TLREG_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def ants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real photos not found at {HYMENOPTERA}")
    return hymenoptera_subset(tmp_path_factory.mktemp("ants"))


def tiny(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, epochs=3, workers=0, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def snapshot(model: TransferModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_feature_extract_learns_separable_data_and_keeps_backbone(colours: Path,
                                                                   tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", epochs=15, lr=0.05))
    # Rebuild the initial model with the same seed to compare against.
    torch.manual_seed(0)
    start = snapshot(tlreg.create_model("timm:test_resnet", 2, pretrained=False))
    end = result.model.state_dict()
    assert result.summary["val_accuracy"] > 0.9
    assert result.summary["feature_cache"] is True
    for k, v in end.items():
        if k.startswith("backbone."):
            assert torch.equal(v, start[k]), f"frozen {k} changed"
    assert any(not torch.equal(end[k], start[k]) for k in end if k.startswith("head."))


def test_run_directory_contents(colours: Path, tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", epochs=2))
    run = result.run_dir
    for name in ("config.yaml", "run.json", "model.json", "history.json", "summary.json",
                 "training.png", "checkpoints/best/model.safetensors",
                 "checkpoints/best/state.json", "checkpoints/last/model.safetensors",
                 "checkpoints/last/train_state.safetensors", "checkpoints/last/state.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["train_images"] == 24
    assert summary["val_images"] == 12 and summary["skipped_files"] == 0
    assert {"val_accuracy", "best_val_accuracy", "wall_seconds"} <= set(summary)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # LR per layer group: the head at the base rate, cosine-annealed between epochs.
    assert history[0]["lr"]["head"] < 1e-3 and history[1]["lr"]["head"] < history[0]["lr"]["head"]
    assert set(history[0]["lr"]) == {"head", "layer0", "layer1", "layer2", "layer3", "layer4"}
    # The resolved config repeats the run.
    again = TrainConfig.from_yaml(run / "config.yaml", out=str(tmp_path / "again"))
    assert again.head == "linear" and again.policy == "feature-extract" and again.lr == 1e-3
    from tlreg.runs.checkpoint import load_run_model

    model = load_run_model(run, "last")
    assert model.info.label_names == ("blue", "red")


@pytest.mark.parametrize("policy,args", [
    ("feature-extract", {}), ("finetune", {}), ("partial", {"train_last": 2}),
    ("gradual", {"every": 1})])
def test_policies_finish_on_real_photos(ants: Path, tmp_path: Path, policy: str,
                                        args: dict) -> None:
    result = fit(tiny(ants, tmp_path / "run", policy=policy, policy_args=args, epochs=2,
                      augment=policy != "feature-extract"))
    assert result.summary["epochs"] == 2
    assert 0.0 <= result.summary["val_accuracy"] <= 1.0
    assert result.summary["feature_cache"] is (policy == "feature-extract")


def test_gradual_unfreezes_stage_by_stage_with_one_optimizer(ants: Path, tmp_path: Path) -> None:
    """Each stage is bitwise unchanged before its epoch and changes after; groups never change."""
    snaps: list[dict[str, torch.Tensor]] = []
    optimizers: list[tuple[int, int]] = []

    def record(trainer: object, epoch: int) -> None:
        snaps.append(snapshot(trainer.model))  # type: ignore[attr-defined]
        opt = trainer.optimizer  # type: ignore[attr-defined]
        optimizers.append((id(opt), len(opt.param_groups)))

    cfg = tiny(ants, tmp_path / "run", policy="gradual", policy_args={"every": 1}, epochs=5,
               augment=False, lr=0.01)
    torch.manual_seed(0)
    first = snapshot(tlreg.create_model("timm:test_resnet", 2, pretrained=False))
    result = fit(cfg, callbacks=[record])
    model = result.model
    assert len(set(optimizers)) == 1, "optimizer object or group count changed"
    stages = model.num_stages  # test_resnet: 5 stages, stage 4 is the last
    states = [first, *snaps]
    for stage in range(stages):
        unfreeze_epoch = stages - stage  # gradual every=1: epoch e trains the last e stages
        names = [f"backbone.{n}" for n, s in model.stage_of.items() if s == stage]
        for epoch in range(1, len(states)):
            changed = any(not torch.equal(states[epoch][n], states[epoch - 1][n]) for n in names)
            # epoch index e (1-based) trained with plan(e-1): stage trains iff e-1 >= unfreeze
            assert changed == (epoch - 1 >= unfreeze_epoch), (stage, epoch)


def test_feature_cache_computes_each_image_once(colours: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    import shutil

    shutil.copytree(colours, data)
    seen = count_backbone_images(monkeypatch)
    first = fit(tiny(data, tmp_path / "a"))
    assert sum(seen) == 36  # 24 train + 12 val, once each, although 3 epochs ran
    seen.clear()
    second = fit(tiny(data, tmp_path / "b"))
    assert sum(seen) == 0
    logits_a = first.model.head(torch.ones(2, first.model.feature_dim))
    logits_b = second.model.head(torch.ones(2, second.model.feature_dim))
    assert torch.equal(logits_a, logits_b), "cached and uncached runs differ"
    assert torch.equal(first.model.state_dict()["head.0.weight"],
                       second.model.state_dict()["head.0.weight"])
    touched = next((data / "train" / "red").glob("*.png"))
    time.sleep(0.01)
    os.utime(touched, None)
    fit(tiny(data, tmp_path / "c"))
    assert sum(seen) == 1
    seen.clear()
    fit(tiny(data, tmp_path / "d", img_size=48))  # another data config is another entry
    assert sum(seen) == 36


def test_lbfgs_solver_on_cached_features(colours: Path, tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", solver="lbfgs", epochs=2))
    assert result.summary["val_accuracy"] > 0.9
    with pytest.raises(UsageError, match="lbfgs"):
        fit(tiny(colours, tmp_path / "x", solver="lbfgs", policy="finetune"))


def test_unreadable_and_odd_images(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data", per_class=6, val_per_class=3)
    red = data / "train" / "red"
    (red / "not-an-image.jpg").write_bytes(b"this is text")
    good = next(red.glob("*.png"))
    (red / "truncated.png").write_bytes(good.read_bytes()[:60])
    img = Image.open(good)
    img.convert("L").save(red / "grey.png")
    img.convert("CMYK").save(red / "cmyk.jpg")
    img.convert("P").save(red / "palette.gif")
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(red / "alpha.png")
    img.save(red / "photo.webp")
    img.save(red / "photo.bmp")
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        result = fit(tiny(data, tmp_path / "run", epochs=1))
    assert result.summary["skipped_files"] == 2
    assert {Path(p).name for p in result.summary["skipped"]} == {"not-an-image.jpg",
                                                                  "truncated.png"}
    assert result.summary["train_images"] == 12 + 8


def test_val_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    from tlreg.data.folder import folder as discover

    root = colour_folder(tmp_path / "d", per_class=10, val_per_class=0)
    flat = tmp_path / "flat"
    (root / "train").rename(flat)
    a = discover(flat, val_split=0.2, seed=1)
    b = discover(flat, val_split=0.2, seed=1)
    assert a == b and len(a.val) == 4 and len(a.train) == 16
    assert sorted(s.label for s in a.val) == [0, 0, 1, 1]


def _cli(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "tlreg", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("case", ["empty-class", "single-class", "unknown-val-class", "missing"])
def test_bad_data_is_a_clear_error_before_training(tmp_path: Path, case: str) -> None:
    data = colour_folder(tmp_path / "data", per_class=3, val_per_class=2)
    expected = {
        "empty-class": "has no images",
        "single-class": "single class",
        "unknown-val-class": "not in training: green",
        "missing": "does not exist",
    }[case]
    if case == "empty-class":
        (data / "train" / "green").mkdir()
    elif case == "single-class":
        import shutil

        shutil.rmtree(data / "train" / "blue")
        shutil.rmtree(data / "val" / "blue")
    elif case == "unknown-val-class":
        (data / "val" / "green").mkdir()
        Image.new("RGB", (8, 8)).save(data / "val" / "green" / "x.png")
    else:
        data = tmp_path / "nowhere"
    out = tmp_path / "run"
    code, _, err = _cli(["train", str(data), "--out", str(out), "--backbone", "timm:test_resnet",
                         "--no-pretrained", "--epochs", "1", "--quiet"])
    assert code == 2 and expected in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_is_never_overwritten(colours: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = _cli(["train", str(colours), "--out", str(out), "--backbone",
                         "timm:test_resnet", "--no-pretrained", "--epochs", "1", "--quiet"])
    assert code == 2 and "already exists" in err and "--resume" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_bad_options_and_config(tmp_path: Path, colours: Path) -> None:
    with pytest.raises(UsageError, match="scheduler must be one of"):
        TrainConfig(data="d", out="o", scheduler="exp")
    bad = tmp_path / "run.yaml"
    bad.write_text("data: x\nout: y\nlearning_rate: 3\n")
    code, _, err = _cli(["train", "--config", str(bad)])
    assert code == 2 and "unknown config keys: learning_rate" in err
    good = tmp_path / "good.yaml"
    good.write_text(f"data: {colours}\nout: {tmp_path / 'from-yaml'}\nbackbone: timm:test_resnet\n"
                    "pretrained: false\nepochs: 1\nimg_size: 32\nworkers: 0\nquiet: true\n")
    code, _, err = _cli(["train", "--config", str(good), "--epochs", "2"])
    assert code == 0, err
    assert json.loads((tmp_path / "from-yaml" / "summary.json").read_text())["epochs"] == 2


def test_eval_and_predict_cli(colours: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(tiny(colours, run, epochs=10, lr=0.05))
    code, out, err = _cli(["eval", str(run), str(colours / "val"), "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["images"] == 12 and report["accuracy"] > 0.9
    assert sum(map(sum, report["confusion_matrix"])) == 12
    assert set(report["per_class"]) == {"blue", "red"}
    # ECE from predict's own probabilities of the same images, by the calibration module.
    code, out, err = _cli(["predict", str(run), str(colours / "val"), "--top-k", "2", "--json"])
    assert code == 0, err
    from tlreg.engine.calibration import expected_calibration_error

    rows = json.loads(out)
    probs = torch.tensor([[next(p["probability"] for p in r["predictions"] if p["label"] == c)
                           for c in ("blue", "red")] for r in rows])
    truth = torch.tensor([0 if "/blue/" in r["file"] else 1 for r in rows])
    assert report["ece"] == pytest.approx(expected_calibration_error(probs, truth), abs=1e-6)
    code, out, _ = _cli(["eval", str(run), str(colours / "val")])
    assert f"ECE {report['ece']:.4f} on 12 images" in out
    code, out, err = _cli(["predict", str(run), str(colours / "val" / "red"), "--top-k", "2",
                           "--json", "--csv", str(tmp_path / "p.csv")])
    assert code == 0, err
    preds = json.loads(out)
    assert len(preds) == 6 and all(len(p["predictions"]) == 2 for p in preds)
    assert sum(p["predictions"][0]["label"] == "red" for p in preds) >= 5
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 12
    code, _, err = _cli(["predict", str(run), str(tmp_path / "missing.jpg")])
    assert code == 2 and "no such file" in err


RESUME_SCRIPT = """
import sys
from tlreg.engine.config import TrainConfig
from tlreg.engine.trainer import fit
cfg = TrainConfig.from_yaml(sys.argv[1])
fit(cfg)
"""


def test_resume_after_sigkill_matches_uninterrupted_run(ants: Path, tmp_path: Path) -> None:
    """SIGKILL mid-epoch (workers > 0, augmentation on), resume, compare every tensor."""
    from tlreg._io import read_checkpoint

    cfg = tiny(ants, tmp_path / "killed", policy="finetune", epochs=4, augment=True, workers=2,
               batch_size=4, lr=0.01, decoded_cache="off")  # the DataLoader-worker path
    reference = fit(cfg.replace(out=str(tmp_path / "reference")))
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.to_yaml())
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # somewhere inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(last.read_text())
    assert 1 <= state["epoch"] <= 4
    resumed = fit(resume=tmp_path / "killed")
    assert resumed.summary["epochs"] == 4
    ref_tensors, _, _ = read_checkpoint(reference.run_dir / "checkpoints" / "last")
    got_tensors, _, _ = read_checkpoint(resumed.run_dir / "checkpoints" / "last")
    assert ref_tensors.keys() == got_tensors.keys()
    for k in ref_tensors:
        assert torch.equal(ref_tensors[k], got_tensors[k]), k


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compile_trains_the_same_model_and_reports_its_compile_time(colours: Path,
                                                                    tmp_path: Path) -> None:
    # 24 training images in batches of 8: one shape, so exactly one compilation
    kw = dict(policy="finetune", epochs=1, decoded_cache="memory")
    eager = fit(tiny(colours, tmp_path / "eager", **kw))
    compiled = fit(tiny(colours, tmp_path / "compiled", compile=True, **kw))
    first = compiled.history[0]
    assert 0 < first["compile_seconds"] < first["seconds"]
    assert compiled.summary["compile_seconds"] == first["compile_seconds"]
    assert "compile_seconds" not in eager.summary and "compile_seconds" not in eager.history[0]
    saved = json.loads((tmp_path / "compiled" / "history.json").read_text())
    assert saved[0]["compile_seconds"] == first["compile_seconds"]
    for (name, a), b in zip(eager.model.state_dict().items(),
                            compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import tlreg.data.decoded

    calls: list[int] = []
    real = tlreg.data.decoded.decode_all

    def counting(samples: list, *args: object, **kwargs: object) -> object:
        calls.append(len(samples))
        return real(samples, *args, **kwargs)

    monkeypatch.setattr(tlreg.data.decoded, "decode_all", counting)
    return calls


def test_cpu_feature_pass_decodes_first_and_feeds_the_backbone_the_same_inputs(
        ants: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_decodes(monkeypatch)
    inputs: list[torch.Tensor] = []
    original = TransferModel.inference_features

    def recording(self: TransferModel) -> torch.nn.Module:
        extract = original(self)
        extract.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
        return extract

    monkeypatch.setattr(TransferModel, "inference_features", recording)
    decoded = fit(tiny(ants, tmp_path / "decoded", cache=False))
    assert calls == [16, 8]  # train, then val: each decoded once, before any forward pass
    from_decoded, inputs[:] = list(inputs), []
    loader = fit(tiny(ants, tmp_path / "loader", cache=False, decoded_cache="off"))
    assert calls == [16, 8]
    assert len(from_decoded) == len(inputs) == 2 + 1  # batches of 8
    for a, b in zip(from_decoded, inputs, strict=True):
        assert torch.equal(a, b), "the decoded path changed the backbone's input"
    torch.testing.assert_close(decoded.model.head.state_dict(), loader.model.head.state_dict(),
                               atol=1e-6, rtol=1e-5)
    import tlreg.engine.inputs

    monkeypatch.setattr(tlreg.engine.inputs, "_DECODE_CHUNK", 5)  # memory bounded: 5 at a time
    calls.clear()
    chunked = fit(tiny(ants, tmp_path / "chunked", cache=False))
    assert calls == [5, 5, 5, 1, 5, 3]
    torch.testing.assert_close(chunked.model.head.state_dict(), loader.model.head.state_dict(),
                               atol=1e-5, rtol=1e-4)


def test_decoded_cache_is_off_for_crop_modes_it_cannot_reproduce(
        colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import tlreg.engine.prepare

    real = tlreg.engine.prepare._data_config
    monkeypatch.setattr(tlreg.engine.prepare, "_data_config",
                        lambda model, size: {**real(model, size), "crop_mode": "squash"})
    calls = _count_decodes(monkeypatch)
    fit(tiny(colours, tmp_path / "ft", policy="finetune", epochs=1, decoded_cache="memory",
             quiet=False))
    fit(tiny(colours, tmp_path / "fe", epochs=1))
    assert calls == []
    said = capsys.readouterr().out
    assert said.count("--decoded-cache memory is off for crop_mode 'squash'") == 1
    fit(tiny(colours, tmp_path / "fe-explicit", epochs=1, decoded_cache="disk", quiet=False))
    assert calls == []
    assert capsys.readouterr().out.count("--decoded-cache disk is off for crop_mode") == 1


def test_frozen_backbone_is_written_once_and_linked_into_each_checkpoint(
        colours: Path, tmp_path: Path) -> None:
    from tlreg._io import read_checkpoint
    from tlreg.engine.trainer import Interrupted
    from tlreg.runs.checkpoint import load_run_model

    def stop_after_two(trainer: object, epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    cfg = tiny(colours, tmp_path / "run", epochs=4, lr=0.05)
    with pytest.raises(Interrupted):
        fit(cfg, callbacks=[stop_after_two])
    resumed = fit(resume=tmp_path / "run")
    fit(cfg.replace(out=str(tmp_path / "reference")))
    ckpts = tmp_path / "run" / "checkpoints"
    shared = (ckpts / "frozen.safetensors").stat()
    for name in ("best", "last"):
        linked = (ckpts / name / "frozen.safetensors").stat()
        assert (linked.st_ino, linked.st_dev) == (shared.st_ino, shared.st_dev)
        tensors, _, _ = read_checkpoint(ckpts / name)
        assert any(k.startswith("backbone.") for k in tensors)
    from safetensors.torch import load_file

    assert all(k.startswith("head.") for k in load_file(ckpts / "last" / "model.safetensors"))
    got, _, _ = read_checkpoint(ckpts / "last")
    want, _, _ = read_checkpoint(tmp_path / "reference" / "checkpoints" / "last")
    assert got.keys() == want.keys() == resumed.model.state_dict().keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model = load_run_model(tmp_path / "run", "last")
    assert torch.equal(model.state_dict()["head.0.weight"], want["head.0.weight"])


def test_feature_pass_over_the_decode_budget_uses_the_dataloader(
        colours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_backbone_images(monkeypatch)
    with pytest.warns(UserWarning, match="over its budget.*DataLoader instead"):
        result = fit(tiny(colours, tmp_path / "run", epochs=1, cache=False,
                          decoded_cache_gb=1e-6))
    assert sum(seen) == 36 and result.summary["val_accuracy"] is not None
