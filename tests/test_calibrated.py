"""Temperature scaling wired through a run: fitted on val at the best epoch, stored with the
weights, applied by predict / eval / ONNX, and `--reject-below`'s "unknown"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from images import colour_folder

from tlreg import fit
from tlreg.cli import main
from tlreg.engine.calibration import expected_calibration_error, fit_temperature
from tlreg.errors import ArtifactError, UsageError
from tlreg.predict import evaluate, load_model, predict

BACKBONE = "timm:test_resnet"


@pytest.fixture(scope="module")
def confident_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model over-confident on val on purpose: the head is fitted to its optimum on clean,
    separable colours (large logits), and a third of val is labelled the other colour."""
    root = tmp_path_factory.mktemp("calib")
    data = colour_folder(root / "data", per_class=16, val_per_class=9)
    for name, other in (("red", "blue"), ("blue", "red")):
        for f in sorted((data / "val" / name).glob("*.png"))[:3]:
            shutil.move(f, data / "val" / other / f"flipped_{f.name}")
    torch.manual_seed(0)
    fit(data=str(data), out=str(root / "run"), backbone=BACKBONE, pretrained=False,
        quiet=True, cache_dir=str(root / "cache"), seed=0)
    return data, root / "run"


def _val_logits(run: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    model = load_model(str(run))
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    out = predict(model, files, calibrated=False)
    classes = list(model.info.label_names)
    labels = torch.tensor([classes.index(Path(f).parent.name) for f in files])
    return torch.tensor([r["logits"] for r in out]), labels, files


def test_temperature_is_fitted_on_val_and_stored_with_the_best_weights(confident_run):
    data, run = confident_run
    summary = json.loads((run / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["fitted_on"] == "val" and cal["val_images"] == 18
    # Over-confident: T softens, and the ECE on val drops.
    assert cal["temperature"] > 1.5
    assert cal["ece_after"] < cal["ece_before"] - 0.05
    # The stored T is the one the best weights' logits on the val images give, and nothing
    # else: recomputed here from the files alone.
    logits, labels, _ = _val_logits(run, data)
    assert cal["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    model = load_model(str(run))
    assert model.info.temperature == pytest.approx(cal["temperature"])
    state = json.loads(next((run / "checkpoints" / "best").glob("state.json")).read_text())
    assert state["temperature"] == pytest.approx(cal["temperature"])


def test_predict_and_eval_apply_the_temperature(confident_run):
    data, run = confident_run
    model = load_model(str(run))
    t = model.info.temperature
    logits, labels, files = _val_logits(run, data)
    calibrated = predict(model, files, top_k=2)
    for r, row in zip(calibrated, logits, strict=True):
        want = (row / t).softmax(0)
        assert [p["probability"] for p in r["predictions"]] == pytest.approx(
            sorted(want.tolist(), reverse=True), abs=1e-6)
    raw = predict(model, files, calibrated=False)
    assert raw[0]["predictions"][0]["probability"] > calibrated[0]["predictions"][0][
        "probability"]  # T > 1 softens
    report = evaluate(model, str(data / "val"))
    assert report["temperature"] == pytest.approx(t)
    assert report["ece"] == pytest.approx(
        expected_calibration_error(logits.softmax(1), labels), abs=1e-6)
    assert report["ece_calibrated"] == pytest.approx(
        expected_calibration_error((logits / t).softmax(1), labels), abs=1e-6)
    assert report["ece_calibrated"] < report["ece"]


def test_val_predictions_file_has_every_val_image(confident_run):
    _, run = confident_run
    vp = json.loads((run / "val_predictions.json").read_text())
    assert vp["classes"] == ["blue", "red"]
    assert vp["temperature"] == pytest.approx(json.loads(
        (run / "summary.json").read_text())["calibration"]["temperature"])
    rows = {Path(r["file"]).name: r for r in vp["rows"]}
    assert len(rows) == 18
    flipped = [r for n, r in rows.items() if n.startswith("flipped_")]
    assert len(flipped) == 6 and all(r["predicted"] != r["label"] for r in flipped)
    for r in vp["rows"]:
        assert r["probability"] == pytest.approx(r["top"][0][1], abs=1e-6)
        assert sum(p for _, p in r["top"]) == pytest.approx(1.0, abs=1e-5)


def test_reject_below_answers_unknown(confident_run, capsys):
    data, run = confident_run
    model = load_model(str(run))
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    out = predict(model, files, reject_below=1.0)  # nothing is that sure after scaling
    assert all(r["rejected"] and r["label"] == "unknown" for r in out)
    out = predict(model, files, reject_below=0.01)
    assert not any(r["rejected"] for r in out)
    assert [r["label"] for r in out] == [r["predictions"][0]["label"] for r in out]
    report = evaluate(model, str(data / "val"), reject_below=0.5)
    assert report["coverage"] == 1.0 and report["accuracy_kept"] == pytest.approx(2 / 3)
    with pytest.raises(UsageError, match=r"reject_below must be a probability in \(0, 1\]"):
        predict(model, files, reject_below=0)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(run), files[0], "--reject-below", "1.0"])
    assert exit_.value.code == 0
    assert "unknown" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(run), files[0], "--reject-below", "1.5"])
    assert exit_.value.code == 2


def test_artifact_and_onnx_carry_the_temperature(confident_run, tmp_path):
    data, run = confident_run
    from tlreg.sharing.api import load_artifact
    from tlreg.sharing.exporters import export_run

    t = load_model(str(run)).info.temperature
    art = export_run(str(run), tmp_path / "art")
    config = json.loads((art / "config.json").read_text())
    assert config["temperature"] == pytest.approx(t)
    assert load_artifact(str(art)).info.temperature == pytest.approx(t)
    # A damaged temperature is refused, not applied.
    bad = dict(config, temperature=-1.0)
    (art / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="temperature must be a number in"):
        load_artifact(str(art))
    pytest.importorskip("onnxruntime")
    onnx_dir = export_run(str(run), tmp_path / "onnx", format="onnx")
    pre = json.loads((onnx_dir / "preprocess.json").read_text())
    assert pre["temperature"] == pytest.approx(t)
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))[:4]
    a = predict(load_model(str(onnx_dir)), files, top_k=2)
    b = predict(load_model(str(run)), files, top_k=2)
    for x, y in zip(a, b, strict=True):
        assert [p["probability"] for p in x["predictions"]] == pytest.approx(
            [p["probability"] for p in y["predictions"]], abs=1e-5)


def test_no_temperature_when_val_is_all_right_or_turned_off(tmp_path):
    data = colour_folder(tmp_path / "data", per_class=8, val_per_class=4)
    torch.manual_seed(0)
    r = fit(data=str(data), out=str(tmp_path / "run"), backbone=BACKBONE, pretrained=False,
            quiet=True, cache_dir=str(tmp_path / "cache"))
    cal = r.summary["calibration"]
    assert r.summary["best_val_accuracy"] == 1.0  # separable colours
    assert cal["temperature"] is None and "classified right" in cal["reason"]
    assert load_model(str(tmp_path / "run")).info.temperature is None
    assert json.loads((tmp_path / "run" / "val_predictions.json").read_text())[
        "temperature"] is None
    r = fit(data=str(data), out=str(tmp_path / "off"), backbone=BACKBONE, pretrained=False,
            quiet=True, cache_dir=str(tmp_path / "cache"), calibrate=False)
    assert "calibration" not in r.summary
    assert load_model(str(tmp_path / "off")).info.temperature is None


# -- familiarity: the k-th nearest training image in feature space --------------------------


def test_familiarity_is_a_conformal_p_value_on_synthetic_features():
    from tlreg.engine import familiarity

    g = torch.Generator().manual_seed(0)
    centre = torch.randn(64, generator=g) * 3
    train = centre + torch.randn(800, 64, generator=g)
    val = centre + torch.randn(400, 64, generator=g)
    new = centre + torch.randn(2000, 64, generator=g)  # more of the same distribution
    far = -centre + torch.randn(200, 64, generator=g)  # something else
    bank = familiarity.build(train, torch.zeros(800, dtype=torch.long), val)
    assert bank["bank"].dtype == torch.float16 and bank["k"].item() == familiarity.K
    p_new, p_far = familiarity.familiarity(new, bank), familiarity.familiarity(far, bank)
    assert p_new.min() > 0 and p_new.max() <= 1
    for q in (0.05, 0.1, 0.25):  # about a share q of new in-distribution images turned away
        assert float((p_new < q).float().mean()) == pytest.approx(q, abs=0.03)
    assert float((p_far < 0.05).float().mean()) == 1.0
    # The bank keeps every class's share when it is capped.
    labels = torch.tensor([0] * 600 + [1] * 200)
    idx = familiarity.subsample(labels, 100, seed=0)
    assert len(idx) == 100 and int((labels[idx] == 1).sum()) == 25
    with pytest.raises(UsageError, match="different backbones"):
        familiarity.kth_similarity(torch.randn(3, 8), bank["bank"])
    with pytest.raises(UsageError, match="width 64, the model's are 32"):
        familiarity.check(bank, 32, "bank")


def test_frozen_run_stores_a_bank_and_predict_rejects_unfamiliar(confident_run, tmp_path):
    data, run = confident_run
    from safetensors.torch import load_file

    summary = json.loads((run / "summary.json").read_text())
    assert summary["familiarity"] == {"k": 5, "bank_images": 32, "val_images": 18}
    stored = load_file(run / "familiarity.safetensors")
    assert stored["bank"].shape == (32, load_model(str(run)).feature_dim)
    model = load_model(str(run))
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    out = predict(model, files, reject_unfamiliar=0.5)
    fam = [r["familiarity"] for r in out]
    assert all(0 < f <= 1 for f in fam)
    assert [r["rejected"] for r in out] == [f < 0.5 for f in fam]
    # The val images are the calibration set: their p-values are their ranks among the 18
    # stored scores (ties rank together), over 19.
    assert all(abs(f * 19 - round(f * 19)) < 1e-5 and 2 <= round(f * 19) <= 19 for f in fam)
    assert sum(fam) / len(fam) == pytest.approx(0.5 + 1 / 19, abs=0.1)
    report = evaluate(model, str(data / "val"), reject_unfamiliar=0.5)
    assert report["coverage"] == pytest.approx(sum(f >= 0.5 for f in fam) / 18)
    # Features the bank was not built from: a fine-tuned run has no bank.
    torch.manual_seed(0)
    fit(data=str(data), out=str(tmp_path / "ft"), backbone=BACKBONE, pretrained=False,
        quiet=True, policy="finetune", epochs=1, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "ft" / "familiarity.safetensors").exists()
    with pytest.raises(UsageError, match="backbone stayed frozen"):
        predict(load_model(str(tmp_path / "ft")), files, reject_unfamiliar=0.05)


def test_an_exported_artifact_carries_the_bank_and_older_readers_are_unaffected(
        confident_run, tmp_path):
    """`tlreg export` of a frozen run ships familiarity.safetensors: the artifact rejects the
    same images as the run. It is recorded beside config.json's `files` (which an older tlreg
    checks against the names it knows), and verified by its checksum."""
    from tlreg.errors import ChecksumError
    from tlreg.sharing.api import load_artifact
    from tlreg.sharing.exporters import export_run

    data, run = confident_run
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    art = export_run(str(run), tmp_path / "art")
    config = json.loads((art / "config.json").read_text())
    assert "familiarity.safetensors" not in config["files"]
    assert config["familiarity"]["bank_images"] == 32 and config["familiarity"]["k"] == 5
    from_run = predict(load_model(str(run)), files, reject_unfamiliar=0.5)
    from_art = predict(load_artifact(str(art)), files, reject_unfamiliar=0.5)
    assert [r["familiarity"] for r in from_art] == [r["familiarity"] for r in from_run]
    assert [r["label"] for r in from_art] == [r["label"] for r in from_run]
    assert any(r["rejected"] for r in from_art) and not all(r["rejected"] for r in from_art)
    # A modified bank is refused, not used.
    bank = art / "familiarity.safetensors"
    raw = bytearray(bank.read_bytes())
    raw[-1] ^= 0xFF
    bank.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"familiarity\.safetensors .* corrupt"):
        load_artifact(str(art))
    bank.unlink()
    with pytest.raises(ArtifactError, match=r"recorded in config\.json but missing"):
        load_artifact(str(art))
    # An artifact without the record (an older tlreg's) loads, and has no bank.
    (art / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                 if k != "familiarity"}))
    model = load_artifact(str(art))
    assert model.familiarity is None
    with pytest.raises(UsageError, match="backbone stayed frozen"):
        predict(model, files[:1], reject_unfamiliar=0.5)


def test_an_onnx_export_of_a_frozen_run_has_a_familiarity_output(confident_run, tmp_path, cli):
    """The bank goes into model.onnx as a second output: onnxruntime alone gives the run's
    familiarity (to one val rank) and `predict model.onnx --reject-unfamiliar` rejects what
    the run rejects; --no-familiarity, or a run with no bank, writes a version-1 file with one
    output, and --reject-unfamiliar on it is one clear error."""
    ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra")
    from test_artifact import make_run

    from tlreg.models.transfer import create_model

    data, run = confident_run
    files = sorted(str(p) for p in (data / "val").rglob("*.png"))
    out = tmp_path / "onnx"
    code, _, err = cli("export", str(run), str(out), "--format", "onnx",
                       "--check-images", str(data / "val"))
    assert code == 0, err
    cfg = json.loads((out / "preprocess.json").read_text())
    assert cfg["format_version"] == 2 and cfg["familiarity_output"] == "familiarity"
    assert cfg["familiarity"] == {"k": 5, "bank_images": 32, "val_images": 18}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "familiarity"]
    from_run = predict(load_model(str(run)), files, reject_unfamiliar=0.5)
    from_onnx = predict(load_model(str(out)), files, reject_unfamiliar=0.5)
    step = 1 / 19  # 18 val scores: p-values move in steps of 1/19
    # A val image ties with its own stored score, so float rounding may move it by one step;
    # other images (here the training images) rarely sit that close to a val score.
    assert [r["familiarity"] for r in from_onnx] == pytest.approx(
        [r["familiarity"] for r in from_run], abs=step + 1e-6)
    train = sorted(str(p) for p in (data / "train").rglob("*.png"))
    got, want = ([r["familiarity"] for r in predict(load_model(str(src)), train,
                                                    reject_unfamiliar=0.5)] for src in (out, run))
    assert got == pytest.approx(want, abs=step + 1e-6)
    assert sum(abs(g - w) < 1e-6 for g, w in zip(got, want, strict=True)) >= 0.9 * len(train)
    assert [r["rejected"] for r in from_onnx] == [f["familiarity"] < 0.5 for f in from_onnx]
    assert any(r["rejected"] for r in from_onnx) and not all(r["rejected"] for r in from_onnx)
    # the CLI, and the plain path (no --reject-unfamiliar) gives no familiarity
    code, text, err = cli("predict", str(out / "model.onnx"), *files, "--reject-unfamiliar",
                          "0.5", "--json")
    assert code == 0, err
    assert [r["label"] for r in json.loads(text)] == [r["label"] for r in from_onnx]
    assert "familiarity" not in predict(load_model(str(out)), files[:2])[0]
    # batches of one: the same values
    code, _, err = cli("export", str(run), str(tmp_path / "fixed"), "--format", "onnx",
                       "--no-dynamic-batch")
    assert code == 0, err
    fixed = predict(load_model(str(tmp_path / "fixed")), files, reject_unfamiliar=0.5)
    assert [r["familiarity"] for r in fixed] == pytest.approx(
        [r["familiarity"] for r in from_onnx], abs=step + 1e-6)
    # half precision: within the tolerance export checks (10 val ranks)
    code, _, err = cli("export", str(run), str(tmp_path / "half"), "--format", "onnx", "--fp16")
    assert code == 0, err
    half = predict(load_model(str(tmp_path / "half")), files, reject_unfamiliar=0.5)
    assert [r["familiarity"] for r in half] == pytest.approx(
        [r["familiarity"] for r in from_run], abs=10 * step + 1e-6)
    # --no-familiarity: the version-1 file any tlreg reads
    code, _, err = cli("export", str(run), str(tmp_path / "plain"), "--format", "onnx",
                       "--no-familiarity")
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "preprocess.json").read_text())
    assert plain["format_version"] == 1 and "familiarity_output" not in plain
    code, _, err = cli("predict", str(tmp_path / "plain"), files[0], "--reject-unfamiliar",
                       "0.5")
    assert code == 2 and "has none" in err and "--reject-below" in err, err
    # asking for the output from a run with no bank: one error, nothing written
    bare = make_run(tmp_path / "bare", create_model(BACKBONE, 2, pretrained=False,
                                                    label_names=["blue", "red"]))
    code, _, err = cli("export", str(bare), str(tmp_path / "nothing"), "--format", "onnx",
                       "--familiarity")
    assert code == 2 and "familiarity bank" in err, err
    assert not (tmp_path / "nothing").exists()


@pytest.mark.slow
def test_unfamiliar_photos_are_rejected_and_held_out_val_kept(shared_dir, tmp_path):
    """Real weights and photos: efficientnet_lite0 frozen on hymenoptera's train folder (its
    val split is the calibration set); hymenoptera's own val folder is held out, and the photos
    bundled with scikit-image (a rocket, a cat, coins, ...) are something else."""
    skimage_data = Path(pytest.importorskip("skimage.data").__file__).parent
    photos = sorted(str(p) for p in skimage_data.iterdir() if p.suffix in (".png", ".jpg"))
    hym = shared_dir / "data" / "hymenoptera_data"
    fit(data=str(hym / "train"), val_split=0.3, out=str(tmp_path / "run"),
        backbone="efficientnet_lite0", quiet=True, cache_dir=str(tmp_path / "cache"))
    model = load_model(str(tmp_path / "run"))
    report = evaluate(model, str(hym / "val"), reject_unfamiliar=0.05)
    assert report["coverage"] >= 0.9  # measured 0.974 (153 held-out images)
    out = [r for r in predict(model, photos, reject_unfamiliar=0.05) if "error" not in r]
    assert len(out) >= 20
    assert sum(r["rejected"] for r in out) >= 0.8 * len(out)  # measured 26 of 26
    # The softmax alone cannot: at the probability that keeps as much of val, most photos pass.
    by_prob = [r for r in predict(model, photos, reject_below=0.8) if "error" not in r]
    assert sum(r["rejected"] for r in by_prob) < 0.5 * len(by_prob)  # measured 3 of 26
