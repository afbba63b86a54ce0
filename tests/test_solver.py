"""Heads fitted to their optimum (tlreg.engine.solver), `--policy auto`, LP-FT, defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from images import colour_folder

from tlreg.engine import auto
from tlreg.engine.config import TrainConfig
from tlreg.engine.head_fit import cv_steps
from tlreg.engine.solver import (
    DEFAULT_CS,
    _basis,
    _walk_path,
    cv_linear,
    fit_logistic,
    logistic_objective,
    stratified_folds,
)
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError
from tlreg.models.heads import mlp
from tlreg.sharing.api import load_artifact
from tlreg.sharing.exporters import export_run

sklearn = pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.mktemp("feature-cache")
    monkeypatch.setenv("TLREG_CACHE_DIR", str(cache))
    return cache


def blobs(n: int = 120, d: int = 20, k: int = 3, seed: int = 0,
          noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian classes with features on very different scales."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, d, generator=g)
    x = centres[y] + noise * torch.randn(n, d, generator=g)
    return x * torch.logspace(-2, 2, d), y


def tiny(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, workers=0, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# -- the solver reaches the optimum --------------------------------------------------------


@pytest.mark.parametrize("C", [0.01, 0.3, 10.0])
def test_lbfgs_reaches_scikit_learns_optimum(C: float) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = blobs()
    x = x.double()
    w, b, _ = fit_logistic(x, y, 3, C, tol=1e-9, max_iter=5000)
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(x.numpy(), y.numpy())
    ours = logistic_objective(w, b, x, y, C).item()
    theirs = logistic_objective(torch.tensor(ref.coef_), torch.tensor(ref.intercept_), x, y,
                                C).item()
    assert ours <= theirs * (1 + 1e-6)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_the_hand_written_gradient_vanishes_where_autograd_says_the_optimum_is() -> None:
    x, y = blobs(n=40, d=6)
    x = (x / x.std(0)).double()
    w, b, _ = fit_logistic(x, y, 3, 0.5, label_smoothing=0.1, tol=1e-10)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    logistic_objective(w, b, x, y, 0.5, label_smoothing=0.1).backward()
    assert w.grad.abs().max() < 1e-7 and b.grad.abs().max() < 1e-7


@pytest.mark.parametrize("d", [20, 250])
def test_cv_fit_is_the_optimum_at_its_c_on_raw_features(d: int) -> None:
    """The folded head on raw features is scikit-learn's fit on standardised ones: solved in
    full (20 features) and in the images' span (250 features, over twice the 90 images)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(n=90, d=d)
    assert (_basis(x.double()) is None) == (d == 20)
    result = cv_linear(x, y, 3, seed=0)
    assert result.folds == 5 and result.C in [p["C"] for p in result.path]
    scaler = StandardScaler().fit(x.double().numpy())
    ref = LogisticRegression(C=result.C, tol=1e-12, max_iter=100_000).fit(
        scaler.transform(x.double().numpy()), y.numpy())
    ours = x.double() @ result.state["weight"].double().T + result.state["bias"].double()
    theirs = torch.tensor(ref.decision_function(scaler.transform(x.double().numpy())))
    # Multinomial logits are defined up to a constant per row.
    diff = (ours - ours.mean(1, keepdim=True)) - (theirs - theirs.mean(1, keepdim=True))
    assert diff.abs().max().item() < 1e-3 * theirs.abs().max().item()


def test_the_threaded_path_scores_points_in_order_and_raises_a_folds_error() -> None:
    """Folds run ahead of the point being scored, but each point is taken once, in order, with
    its folds' fits in fold order; a fold's error reaches the caller."""
    taken: list[tuple[int, list]] = []

    def solve(f: int, i: int) -> tuple:
        return (f, i, 0)

    def take(i: int, fits: list) -> bool:
        taken.append((i, fits))
        return i == 3

    pool = _walk_path(solve, take, 5, 8, workers=2)
    assert pool is not None
    pool.shutdown()
    assert taken == [(i, [(f, i, 0) for f in range(5)]) for i in range(4)]

    def broken(f: int, i: int) -> tuple:
        if (f, i) == (2, 1):
            raise ValueError("fold 2 diverged")
        return (f, i, 0)

    with pytest.raises(ValueError, match="fold 2 diverged"):
        _walk_path(broken, lambda i, fits: False, 5, 4, workers=2)


def test_c_is_chosen_like_scikit_learns_grid_search() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, PredefinedSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(n=150, noise=3.0, seed=3)
    result = cv_linear(x, y, 3, seed=0)
    folds = stratified_folds(y, 5, 0).numpy()
    grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=10_000)),
                        {"logisticregression__C": [p["C"] for p in result.path]},
                        cv=PredefinedSplit(folds)).fit(x.double().numpy(), y.numpy())
    best = grid.cv_results_["mean_test_score"].max()
    assert max(p["cv_accuracy"] for p in result.path) == pytest.approx(best, abs=1 / len(y))


def test_strong_regularisation_is_chosen_for_noise_and_weak_for_signal() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(100) % 2
    noise = cv_linear(torch.randn(100, 30, generator=g), y, 2)
    signal = cv_linear(torch.randn(100, 30, generator=g) + 3 * y[:, None], y, 2)
    assert signal.cv_accuracy == 1.0 and noise.cv_accuracy < 0.75
    assert noise.C <= 0.1 < signal.C


@pytest.mark.parametrize("workers", [2, 3])
def test_folds_solved_in_threads_give_the_same_fit_and_each_folds_accuracy(workers: int) -> None:
    """`workers` (what `tlreg rank` uses) changes how folds are scheduled, not what they
    compute: the path, C, fold accuracies and weights are bitwise those of one worker, and the
    fold accuracies are the held-out counts the CV accuracy sums. The path stops before its
    end, so folds that ran ahead past the stop are left out too."""
    x, y = blobs(n=150, d=40, k=3, noise=3.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cv_linear(x, y, 3, folds=5, seed=3)
        two = cv_linear(x, y, 3, folds=5, seed=3, workers=workers)
    finally:
        torch.set_num_threads(threads)
    assert len(one.path) < len(DEFAULT_CS)
    assert one.path == two.path and one.C == two.C and one.iterations == two.iterations
    assert one.fold_accuracies == two.fold_accuracies and len(one.fold_accuracies) == 5
    assert all(torch.equal(one.state[k], two.state[k]) for k in one.state)
    sizes = torch.bincount(stratified_folds(y, 5, 3)).tolist()
    correct = sum(a * n for a, n in zip(one.fold_accuracies, sizes, strict=True))
    assert correct / len(y) == pytest.approx(one.cv_accuracy, abs=1e-12)
    assert len(set(one.fold_accuracies)) > 1  # per fold, not the mean five times


def test_folds_are_stratified_and_seeded() -> None:
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 20)
    folds = stratified_folds(y, 5, seed=1)
    for f in range(5):
        assert torch.bincount(y[folds == f], minlength=3).tolist() == [2, 1, 4]
    assert torch.equal(folds, stratified_folds(y, 5, seed=1))
    assert not torch.equal(folds, stratified_folds(y, 5, seed=2))


def test_a_class_with_one_image_falls_back_to_c_1_without_cv() -> None:
    x, y = blobs(n=21, k=2)
    y[0] = 2  # one image of class 2
    result = cv_linear(x, y, 3)
    assert (result.folds, result.C, result.cv_accuracy) == (0, 1.0, None)
    assert "fewer than 2" in result.reason


def test_nonlinear_heads_get_cv_chosen_steps_and_decay() -> None:
    x, y = blobs(n=60, d=16, noise=0.5)
    result = cv_steps(lambda: mlp(16, 3, hidden=32, norm=None, dropout=0.0), x, y, lr=1e-2,
                      batch=16, max_epochs=8)
    assert result.method == "steps-cv" and result.folds == 3 and result.standardised
    assert result.steps in {p["steps"] for p in result.path}
    assert result.weight_decay in {p["weight_decay"] for p in result.path}
    head = mlp(16, 3, hidden=32, norm=None, dropout=0.0)
    head.load_state_dict(result.state)
    head.eval()
    with torch.no_grad():  # raw features in: the standardisation is folded into layer 1
        assert (head(x).argmax(1) == y).float().mean() > 0.9


# -- the trainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("colours"), classes=("red", "blue", "green"))


def test_default_feature_extract_is_one_recorded_cv_fit(colours: Path, tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", policy="feature-extract"))
    s = result.summary
    assert s["epochs"] == 1 and s["val_accuracy"] == 1.0
    hf = s["head_fit"]
    assert hf["method"] == "lbfgs-cv" and hf["folds"] == 5 and hf["standardised"]
    assert hf["C"] in [p["C"] for p in hf["path"]] and hf["iterations"] > 0
    assert hf["cv_accuracy"] == max(p["cv_accuracy"] for p in hf["path"])
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "solver: cv" in config and "epochs: 1" in config


def test_epochs_given_means_gradient_epochs(colours: Path, tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", policy="feature-extract", epochs=3))
    assert result.summary["epochs"] == 3 and "head_fit" not in result.summary
    with pytest.raises(UsageError, match="cached features"):
        fit(tiny(colours, tmp_path / "x", policy="finetune", solver="cv"))


def test_val_only_signal_does_not_change_the_fit(colours: Path, tmp_path: Path) -> None:
    """C and the head come from training folds only: a planted val set changes nothing."""
    planted = tmp_path / "planted"
    shutil.copytree(colours / "train", planted / "train")
    # val: the training images under swapped labels, a signal that only a cheat could use
    for src, dst in (("red", "blue"), ("blue", "green"), ("green", "red")):
        shutil.copytree(colours / "train" / src, planted / "val" / dst)
    a = fit(tiny(colours, tmp_path / "a", policy="feature-extract"))
    b = fit(tiny(planted, tmp_path / "b", policy="feature-extract"))
    assert a.summary["head_fit"]["C"] == b.summary["head_fit"]["C"]
    assert a.summary["head_fit"]["path"] == b.summary["head_fit"]["path"]
    for (k, va), vb in zip(a.model.head.state_dict().items(),
                           b.model.head.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert b.summary["val_accuracy"] == 0.0 and a.summary["val_accuracy"] == 1.0


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_exported_standardised_head_predicts_the_runs_logits(colours: Path, tmp_path: Path,
                                                             head: str) -> None:
    result = fit(tiny(colours, tmp_path / "run", policy="feature-extract", head=head))
    assert result.summary["head_fit"]["standardised"] == (head == "linear")
    folder = export_run(tmp_path / "run", tmp_path / "artifact")
    loaded = load_artifact(folder)
    x = torch.rand(5, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-5, atol=1e-5)


def test_lp_ft_starts_the_backbone_under_the_probe_head(colours: Path, tmp_path: Path) -> None:
    # lr so small that one epoch leaves the head where the probe put it
    result = fit(tiny(colours, tmp_path / "run", policy="finetune", epochs=1, lr=1e-12))
    probe = result.summary["linear_probe"]
    assert probe["method"] == "lbfgs-cv"
    no_lp = fit(tiny(colours, tmp_path / "plain", policy="finetune", epochs=1, lr=1e-12,
                     lp_ft=False))
    assert "linear_probe" not in no_lp.summary
    assert not torch.allclose(result.model.head[0].weight, no_lp.model.head[0].weight)
    # LP-FT keeps BatchNorm in eval mode (the probe saw eval-mode features); without it, train.
    bn = torch.nn.modules.batchnorm._BatchNorm
    result.model.train()
    no_lp.model.train()
    assert not any(m.training for m in result.model.backbone.modules() if isinstance(m, bn))
    assert all(m.training for m in no_lp.model.backbone.modules() if isinstance(m, bn))
    assert json.loads((tmp_path / "run" / "model.json").read_text())["info"]["policy_args"] == {
        "trainable_bn": "eval"}
    fe = fit(tiny(colours, tmp_path / "fe", policy="feature-extract"))
    torch.testing.assert_close(result.model.head[0].weight, fe.model.head[0].weight,
                               rtol=1e-4, atol=1e-6)


def test_finetune_defaults_follow_the_rule(colours: Path, tmp_path: Path) -> None:
    result = fit(tiny(colours, tmp_path / "run", policy="finetune"))
    rule = result.summary["finetune_defaults"]
    want = auto.finetune_defaults(train_images=36, global_batch=8, head_lr=1e-3, probed=True)
    assert rule == want.record()
    assert result.summary["epochs"] == want.epochs == auto.MAX_EPOCHS  # 5 steps an epoch
    saved = TrainConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert (saved.epochs, saved.lr, saved.warmup_epochs) == (want.epochs, want.lr,
                                                             want.warmup_epochs)


def test_auto_decides_records_and_resumes_as_decided(colours: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    small = fit(tiny(colours, tmp_path / "small"))  # the default policy is auto
    decision = small.summary["policy_auto"]
    assert decision["policy"] == "feature-extract" and "36 training images" in decision["reason"]
    assert small.summary["head_fit"]["method"] == "lbfgs-cv"
    # With the size rule lowered and nothing "separated", the same data get fine-tuned.
    monkeypatch.setattr(auto, "MIN_TRAIN_IMAGES", 1)
    monkeypatch.setattr(auto, "MIN_CLASS_IMAGES", 1)
    monkeypatch.setattr(auto, "SEPARATED", 1.01)
    result = fit(tiny(colours, tmp_path / "big", epochs=2))
    d = result.summary["policy_auto"]
    assert d["policy"] == "partial" and d["policy_args"] == {"train_last": 3}
    assert d["measured"]["probe_cv_accuracy"] == result.summary["linear_probe"]["cv_accuracy"]
    model_json = json.loads((tmp_path / "big" / "model.json").read_text())
    assert (model_json["info"]["policy"], model_json["info"]["policy_args"]) == (
        "partial", {"train_last": 3, "trainable_bn": "eval"})
    saved = TrainConfig.from_yaml(tmp_path / "big" / "config.yaml")
    assert saved.policy == "partial" and saved.augment is True  # it trains: augmented
    assert result.model.num_trainable() > sum(p.numel() for p in result.model.head.parameters())
    # --resume continues the decided policy and keeps the record of the decision.
    resumed = fit(resume=tmp_path / "big", epochs=3)
    assert resumed.summary["epochs"] == 3
    assert resumed.summary["policy_auto"] == d
    assert resumed.summary["linear_probe"] == result.summary["linear_probe"]


@pytest.mark.parametrize(("n", "smallest", "probe", "want"), [
    (50, 25, 0.8, "feature-extract"),  # too few images
    (500, 5, 0.8, "feature-extract"),  # a class too small
    (499, 250, 0.8, "feature-extract"),
    (500, 50, 0.995, "feature-extract"),  # already separated
    (500, 50, None, "feature-extract"),
    (500, 50, 0.95, "partial"),
    (500, 50, 0.7, "finetune"),
])
def test_decision_rule(n: int, smallest: int, probe: float | None, want: str) -> None:
    d = auto.decide(train_images=n, smallest_class=smallest, probe_accuracy=probe, num_stages=7)
    assert d.policy == want and d.reason.startswith(want)
    if want == "partial":
        assert d.policy_args == {"train_last": 4}


def test_finetune_epochs_aim_at_a_step_budget() -> None:
    big = auto.finetune_defaults(train_images=50_000, global_batch=32, head_lr=1e-3,
                                 probed=True)
    small = auto.finetune_defaults(train_images=100, global_batch=32, head_lr=1e-3,
                                   probed=True)
    mid = auto.finetune_defaults(train_images=1280, global_batch=32, head_lr=1e-3, probed=True)
    assert (big.epochs, small.epochs, mid.epochs) == (auto.MIN_EPOCHS, auto.MAX_EPOCHS, 5)
    assert mid.lr == pytest.approx(1e-3 / 10) and 0 < mid.warmup_epochs < mid.epochs
    plain = auto.finetune_defaults(train_images=1280, global_batch=32, head_lr=1e-3,
                                   probed=False)
    assert plain.lr == 1e-3 and plain.warmup_epochs == 1.0
    assert auto.finetune_defaults(train_images=100, global_batch=32, head_lr=1e-3,
                                  probed=True, epochs=1).warmup_epochs < 1
