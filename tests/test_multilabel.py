"""Multi-label: real photos with two or more labels, trained, thresholded, shared and scored.

The labels are honest: each hymenoptera photo keeps its species and gets the tag `bright` when
its mean luminance is above the median of its split (a property of the pixels, so a model can
learn it). Every number a user relies on is checked against scikit-learn.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import test_artifact
import torch
from hub_server import LocalHub
from images import HYMENOPTERA, hymenoptera_subset
from PIL import Image, ImageStat

from tlreg.data.sources import open_source
from tlreg.engine.config import TrainConfig
from tlreg.engine.solver import fit_logistic
from tlreg.engine.trainer import fit
from tlreg.errors import ArtifactError, UsageError
from tlreg.metrics import multilabel_report, tune_thresholds
from tlreg.predict import evaluate, load_model, predict
from tlreg.sharing.api import load_artifact, push_run
from tlreg.sharing.exporters import export_run
from tlreg.sharing.format import CONFIG_FILE

sklearn_metrics = pytest.importorskip("sklearn.metrics")
pytestmark = pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="needs ../shared/data")
hub = test_artifact.hub  # a LocalHub as the Hub, through the real huggingface_hub client
REPO = "tester/tagged-hymenoptera"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tags.csv: species plus `bright` (above its split's median luminance) per photo."""
    root = hymenoptera_subset(tmp_path_factory.mktemp("ml") / "photos", per_class=10,
                              val_per_class=6, size=48)
    rows = []
    for split in ("train", "val"):
        files = sorted((root / split).rglob("*.jpg"))
        light = {}
        for f in files:
            with Image.open(f) as img:
                light[f] = ImageStat.Stat(img.convert("L")).mean[0]
        median = sorted(light.values())[len(light) // 2]
        for f in files:
            tags = [f.parent.name] + (["bright"] if light[f] >= median else [])
            rows.append({"file": str(f.relative_to(root)), "tags": " ".join(tags),
                         "split": split})
    with (root / "tags.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "tags", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "tags.csv"


OPTIONS = {"path_column": "file", "label_column": "tags", "label_delimiter": " "}


def config(table: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=str(table), out=str(out), backbone="timm:test_resnet", pretrained=False,
        img_size=32, batch_size=8, workers=0, quiet=True, device="cpu", cache=False,
        source_args=OPTIONS)
    return TrainConfig(**(base | kw))


def table_labels(table: Path, split: str = "val") -> dict[str, set[str]]:
    with table.open(encoding="utf-8") as fh:
        return {str(table.parent / r["file"]): set(r["tags"].split())
                for r in csv.DictReader(fh) if r["split"] == split}


def test_a_table_with_several_labels_per_row_is_multi_label(tagged: Path) -> None:
    split = open_source(str(tagged), None, 0, OPTIONS)
    assert split.multi_label and split.classes == ("ants", "bees", "bright")
    want = table_labels(tagged, "train")
    assert len(split.train) == 20 and len(split.val) == 12
    for s in split.train:  # 0/1 rows, one entry per class
        assert {c for c, v in zip(split.classes, s.label, strict=True) if v} == want[s.path]
    assert sum(s.label[2] for s in split.train) == 10  # half the split is above its median
    one = open_source(str(tagged), None, 0, OPTIONS | {"multi_label": True})
    assert one.train == split.train
    with pytest.raises(UsageError, match=r"several labels .*drop --single-label"):
        open_source(str(tagged), None, 0, OPTIONS | {"multi_label": False})


def test_one_vs_rest_solver_matches_scikit_learn() -> None:
    """The head's convex fit for 0/1 rows is scikit-learn's one-vs-rest logistic regression."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    multiclass = pytest.importorskip("sklearn.multiclass")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=gen, dtype=torch.float64)
    w_true = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    y = ((x @ w_true.T + 0.5 * torch.randn(80, 3, generator=gen, dtype=torch.float64)) > 0)
    y = y.long()
    w, b, _ = fit_logistic(x, y, 3, C=0.7, tol=1e-10)
    ref = multiclass.OneVsRestClassifier(linear_model.LogisticRegression(
        C=0.7, tol=1e-12, max_iter=10_000)).fit(x.numpy(), y.numpy())
    ref_w = torch.from_numpy(np.stack([e.coef_[0] for e in ref.estimators_]))
    ref_b = torch.from_numpy(np.stack([e.intercept_[0] for e in ref.estimators_]))
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, ref_b, atol=1e-5, rtol=1e-4)


def test_thresholds_are_the_best_f1_per_class() -> None:
    gen = torch.Generator().manual_seed(1)
    y = (torch.rand(60, 4, generator=gen) < 0.4).long()
    p = (0.35 * y + 0.65 * torch.rand(60, 4, generator=gen)).tolist()
    y[:, 3] = 0  # no positive to tune on: 0.5
    t = tune_thresholds(y.tolist(), p, 4)
    assert t[3] == 0.5
    scores = torch.tensor(p)
    for c in range(3):
        def f1(cut: float, c: int = c) -> float:
            return sklearn_metrics.f1_score(y[:, c], (scores[:, c] >= cut).long(),
                                            zero_division=0)
        best = max(f1(float(v)) for v in scores[:, c])
        assert f1(t[c]) == pytest.approx(best)  # no cut does better on these images


def test_train_export_push_pull_predict_the_same_labels(tagged: Path, tmp_path: Path,
                                                       hub: LocalHub) -> None:
    result = fit(config(tagged, tmp_path / "run"))
    s = result.summary
    assert s["problem_type"] == "multi_label_classification" and s["monitor"] == "val_map"
    assert s["head_fit"]["method"] == "lbfgs-cv" and "CV loss" in s["head_fit"]["reason"]
    assert "multi-label" in s["policy_auto"]["reason"]
    assert set(s["thresholds"]) == {"ants", "bees", "bright"}
    assert all(0 <= v <= 1 for v in s["thresholds"].values())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"val_map", "val_micro_f1", "val_macro_f1"} <= set(history[-1])

    out = export_run(tmp_path / "run", tmp_path / "artifact")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    assert cfg["format_version"] == 2 and cfg["problem_type"] == "multi_label_classification"
    assert cfg["thresholds"] == list(s["thresholds"].values())
    assert "threshold" in (out / "README.md").read_text()
    push_run(tmp_path / "run", REPO)
    pulled = load_artifact(REPO)
    assert pulled.info.thresholds == tuple(cfg["thresholds"])

    files = sorted(table_labels(tagged))
    run_model = load_model(str(tmp_path / "run"))
    want = predict(run_model, files, top_k=3)
    got = predict(pulled, files, top_k=3)
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    for r in got:  # every label at or over its threshold, and nothing else
        probs = torch.tensor(r["logits"]).sigmoid().tolist()
        names = ["ants", "bees", "bright"]
        assert r["labels"] == [n for n, q, t in zip(names, probs, cfg["thresholds"],
                                                    strict=True) if q >= t]
        assert len(r["predictions"]) == 3  # --top-k still ranks every label

    timm_dir = export_run(tmp_path / "run", tmp_path / "timm", format="timm")
    timm_cfg = json.loads((timm_dir / CONFIG_FILE).read_text())
    assert timm_cfg["problem_type"] == "multi_label_classification"
    assert timm_cfg["thresholds"] == cfg["thresholds"]


def test_eval_map_and_f1_are_scikit_learn_s(tagged: Path, tmp_path: Path) -> None:
    fit(config(tagged, tmp_path / "run", policy="finetune", epochs=2, lr=0.01,
               label_smoothing=0.1))
    model = load_model(str(tmp_path / "run"))
    report = evaluate(model, str(tagged), source_args=OPTIONS)
    truth = table_labels(tagged)
    files = sorted(truth)
    preds = predict(model, files, top_k=1)
    names = list(model.info.label_names)
    y = torch.tensor([[int(n in truth[f]) for n in names] for f in files])
    p = torch.tensor([r["logits"] for r in preds]).sigmoid()
    t = torch.tensor(model.info.thresholds)
    assert report["images"] == len(files) == 12
    assert report["map"] == pytest.approx(
        sklearn_metrics.average_precision_score(y, p, average="macro"), abs=1e-6)
    for avg in ("micro", "macro"):
        assert report[f"{avg}_f1"] == pytest.approx(
            sklearn_metrics.f1_score(y, (p >= t).long(), average=avg, zero_division=0),
            abs=1e-6)
    assert report["accuracy"] == pytest.approx(
        sklearn_metrics.accuracy_score(y, (p >= t).long()))  # exact match
    state = json.loads((tmp_path / "run" / "checkpoints" / "best" / "state.json").read_text())
    assert state["thresholds"] == list(model.info.thresholds)


def test_multi_label_cli(tagged: Path, tmp_path: Path, cli) -> None:
    args = ["--path-column", "file", "--label-column", "tags", "--label-delimiter", " "]
    code, out, _ = cli("train", str(tagged), "--out", str(tmp_path / "run"), "--backbone",
                       "timm:test_resnet", "--no-pretrained", "--img-size", "32",
                       "--workers", "0", "--no-cache", "--quiet", *args)
    assert code == 0 and "val mAP" in out
    code, out, _ = cli("eval", str(tmp_path / "run"), str(tagged), *args)
    assert code == 0 and out.startswith("mAP ") and "threshold" in out
    image = next(iter(sorted(table_labels(tagged))))
    code, out, _ = cli("predict", str(tmp_path / "run"), image, "--top-k", "2",
                       "--csv", str(tmp_path / "p.csv"))
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 2 and set(rows[0]) >= {"label", "probability", "selected"}


def test_bad_multi_label_input_is_one_error_and_touches_nothing(tagged: Path, tmp_path: Path,
                                                               cli) -> None:
    photos = tagged.parent
    code, _, err = cli("train", str(photos), "--out", str(tmp_path / "a"), "--backbone",
                       "timm:test_resnet", "--no-pretrained", "--monitor", "val_map")
    assert code == 2 and "--monitor val_map is a multi-label metric" in err
    assert not (tmp_path / "a").exists()
    single = fit(config(photos, tmp_path / "single", source_args={}))
    model = load_model(str(single.run_dir))
    with pytest.raises(UsageError, match="is multi-label and this model predicts one label"):
        evaluate(model, str(tagged), source_args=OPTIONS)


def test_without_torchmetrics_multi_label_names_the_extra(tagged: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import torchmetrics fails
    monkeypatch.delitem(sys.modules, "torchmetrics.functional", raising=False)
    with pytest.raises(UsageError, match=r"pip install 'tlreg\[multilabel\]'"):
        fit(config(tagged, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # failed before anything was written
    with pytest.raises(UsageError, match="torchmetrics"):
        multilabel_report([[0, 1]], [[0.2, 0.9]], ["a", "b"])


def test_a_damaged_multi_label_config_is_refused(tagged: Path, tmp_path: Path) -> None:
    fit(config(tagged, tmp_path / "run"))
    out = export_run(tmp_path / "run", tmp_path / "artifact")
    original = json.loads((out / CONFIG_FILE).read_text())
    for change, message in (({"format_version": 1}, "must be format version 2"),
                            ({"thresholds": [0.5]}, "thresholds must be 3 numbers"),
                            ({"thresholds": [0.5, 2.0, 0.1]}, "thresholds must be 3 numbers"),
                            ({"problem_type": "regression"}, "unknown problem_type")):
        (out / CONFIG_FILE).write_text(json.dumps(original | change))
        with pytest.raises(ArtifactError, match=message):
            load_artifact(out)


def test_an_hf_sequence_of_class_labels_is_the_same_multi_label_data(tagged: Path,
                                                                     tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = open_source(str(tagged), None, 0, OPTIONS)
    parts = {}
    for name, samples in (("train", table.train), ("validation", table.val)):
        parts[name] = datasets.Dataset.from_dict(
            {"image": [s.path for s in samples],
             "tags": [[i for i, v in enumerate(s.label) if v] for s in samples]},
            features=datasets.Features({
                "image": datasets.Image(),
                "tags": datasets.Sequence(datasets.ClassLabel(names=list(table.classes)))}))
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    split = open_source(f"hf:{tmp_path / 'saved'}", None, 0, {})
    assert split.multi_label and split.classes == table.classes
    assert [s.label for s in split.train] == [s.label for s in table.train]
    assert [s.label for s in split.val] == [s.label for s in table.val]
    report = multilabel_report([s.label for s in split.val], [[0.5] * 3] * len(split.val),
                               split.classes)
    assert report["images"] == 12
