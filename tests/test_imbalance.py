"""Class imbalance: `--class-weights`, balanced accuracy and macro F1, the small-class warning.

The weighted convex fit is checked against scikit-learn's `class_weight="balanced"`, the
metrics against scikit-learn's, and a run on real photos with one rare class end to end.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from images import HYMENOPTERA, hymenoptera_subset

from tlreg.engine.config import TrainConfig
from tlreg.engine.objective import class_weights
from tlreg.engine.solver import fit_logistic, logistic_objective
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError
from tlreg.metrics import classification_report

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def test_auto_weights_are_scikit_learn_s_balanced() -> None:
    utils = pytest.importorskip("sklearn.utils.class_weight")
    labels = [0] * 30 + [1] * 5 + [2] * 10
    want = utils.compute_class_weight("balanced", classes=np.arange(3), y=np.array(labels))
    assert class_weights("auto", labels, ["a", "b", "c"]) == pytest.approx(want.tolist())
    rows = [(1, 0), (1, 1), (0, 1), (1, 0)]  # multi-label: negatives / positives per class
    assert class_weights("auto", rows, ["a", "b"]) == pytest.approx([1 / 3, 2 / 2])
    assert class_weights("none", labels, ["a", "b", "c"]) is None


def test_weighted_fit_is_scikit_learn_s_weighted_logistic_regression() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 40 + [1] * 8 + [2] * 12)
    x = torch.randn(60, 5, generator=gen, dtype=torch.float64) + y[:, None] * 0.7
    w8 = torch.tensor(class_weights("auto", y.tolist(), ["a", "b", "c"]), dtype=torch.float64)
    w, b, _ = fit_logistic(x, y, 3, C=0.5, tol=1e-10, class_weight=w8)
    ref = linear_model.LogisticRegression(C=0.5, class_weight="balanced", tol=1e-12,
                                          max_iter=10_000).fit(x.numpy(), y.numpy())
    # the multinomial optimum is unique up to a constant shift of the biases
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_), atol=1e-5, rtol=1e-4)
    db = b - torch.from_numpy(ref.intercept_)
    torch.testing.assert_close(db - db.mean(), torch.zeros(3, dtype=torch.float64), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_the_hand_written_gradient_with_weights_is_autograd_s(multi: bool) -> None:
    """At the solution the objective's autograd gradient vanishes: the hand gradient is right."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    if multi:
        y = (torch.rand(50, 3, generator=gen) < 0.3).long()
        cw = torch.tensor(class_weights("auto", [tuple(r) for r in y.tolist()], "abc"),
                          dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (50,), generator=gen)
        cw = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    w, b, _ = fit_logistic(x, y, 3, C=2.0, tol=1e-12, class_weight=cw, label_smoothing=0.1)
    w, b = w.requires_grad_(), b.requires_grad_()
    logistic_objective(w, b, x, y, 2.0, 0.1, class_weight=cw).backward()
    assert w.grad.abs().max() < 1e-7 and b.grad.abs().max() < 1e-7


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_are_scikit_learn_s() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    y[y == 3] = 0  # class 3 is absent from the truth
    p = np.where(rng.random(80) < 0.6, y, rng.integers(0, 4, 80))
    report = classification_report(y.tolist(), p.tolist(), ["a", "b", "c", "d"])
    assert report["balanced_accuracy"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y, p))
    assert report["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(y, p, average="macro", zero_division=0))


@pytest.mark.parametrize(("content", "message"), [
    (None, "takes none, auto or a YAML / JSON file"),
    ("[1, 2]", "must map class names to weights"),
    ("{ants: 1}", "no weight for 'bees'"),
    ("{ants: 1, bees: 2, wasps: 3}", "classes not in the data: 'wasps'"),
    ("{ants: 1, bees: -2}", "the weight of 'bees' must be a positive number"),
    ("{ants: 1, bees: yes}", "the weight of 'bees' must be a positive number"),
])
def test_a_bad_weights_file_is_one_clear_error(tmp_path: Path, content: str | None,
                                              message: str) -> None:
    path = tmp_path / "w.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=message):
        class_weights(str(path), [0, 1], ["ants", "bees"])
    (tmp_path / "ok.json").write_text('{"ants": 1, "bees": 3.5}')
    assert class_weights(str(tmp_path / "ok.json"), [0, 1], ["ants", "bees"]) == [1.0, 3.5]


@pytest.fixture(scope="module")
def rare_bees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 ants and 1 bee to train on (under 5%), 4 of each to validate on: real photos."""
    if not HYMENOPTERA.is_dir():
        pytest.skip("needs ../shared/data")
    root = hymenoptera_subset(tmp_path_factory.mktemp("rare") / "photos", per_class=20,
                              val_per_class=4, size=48)
    rows = []
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            files = sorted((root / split / name).glob("*.jpg"))
            if split == "train" and name == "bees":
                files = files[:1]
            rows += [{"path": str(f.relative_to(root)), "label": name, "split": split}
                     for f in files]
    with (root / "rare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "rare.csv"


def config(data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
        img_size=32, batch_size=8, workers=0, quiet=True, device="cpu", cache=False,
        policy="finetune", epochs=2, lr=0.01)
    return TrainConfig(**(base | kw))


def test_a_rare_class_warns_and_auto_weights_train_and_are_recorded(rare_bees: Path,
                                                                    tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"class 'bees' is under 5% .*--class-weights auto"):
        plain = fit(config(rare_bees, tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["class_weights"] is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*under 5%")
        weighted = fit(config(rare_bees, tmp_path / "auto", class_weights="auto",
                              monitor="val_balanced_accuracy"))
    run = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert run["class_weights"] == pytest.approx({"ants": 21 / 40, "bees": 21 / 2})
    assert weighted.summary["monitor"] == "val_balanced_accuracy"
    for result in (plain, weighted):
        row = result.history[-1]
        assert {"val_balanced_accuracy", "val_macro_f1"} <= set(row)
    # the weighted loss is not the plain one: the same seed trains different heads
    assert plain.history[0]["train_loss"] != weighted.history[0]["train_loss"]


def test_cli_class_weights_file_error_touches_nothing(rare_bees: Path, tmp_path: Path,
                                                      cli) -> None:
    (tmp_path / "w.yaml").write_text("{ants: 1}")
    code, _, err = cli("train", str(rare_bees), "--out", str(tmp_path / "run"), "--backbone",
                       "timm:test_resnet", "--no-pretrained", "--class-weights",
                       str(tmp_path / "w.yaml"))
    assert code == 2 and "no weight for 'bees'" in err
    assert not (tmp_path / "run").exists()
