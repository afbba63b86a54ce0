"""timm's augmentation and regularisation by name: presets, RandAugment, erasing, Mixup /
CutMix against formulas written here, drop path, the batched cache's fallback, bad values."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm.data
import torch
import yaml
from images import colour_folder
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy

from tlreg.data.augment import AUGMENTS, TIMM, of_config
from tlreg.data.batched import BatchAugment
from tlreg.data.images import build_transform
from tlreg.data.mixup import BatchMix
from tlreg.engine import objective
from tlreg.engine.config import TrainConfig
from tlreg.engine.loop import SGD
from tlreg.engine.trainer import Interrupted, fit
from tlreg.errors import UsageError
from tlreg.progress import Progress

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": MEAN, "std": STD,
               "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return colour_folder(tmp_path_factory.mktemp("aug") / "colours", per_class=8,
                         val_per_class=3, size=36)


def tiny(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, epochs=1, workers=0, quiet=True, device="cpu",
                policy="finetune", lp_ft=False)
    return TrainConfig(**(base | kw))  # type: ignore[arg-type]


def smoothed_onehot(y: torch.Tensor, k: int, s: float) -> torch.Tensor:
    """timm's smoothing of a one-hot row: s / k off the label, 1 - s + s / k on it."""
    return torch.full((len(y), k), s / k).scatter_(1, y[:, None], 1 - s + s / k)


def fix_draws(monkeypatch: pytest.MonkeyPatch, lam: float, centre: int | None = None) -> None:
    """Mixup's numpy draws made constant: lam from Beta, 'mix' from rand, the box centre."""
    monkeypatch.setattr(np.random, "beta", lambda a, b, size=None: lam)
    monkeypatch.setattr(np.random, "rand", lambda *shape: 0.0)  # below prob 1: the batch mixes
    if centre is not None:
        monkeypatch.setattr(np.random, "randint", lambda low, high, size=None: centre)


# -- Mixup / CutMix: numbers -----------------------------------------------------------------


def test_mixup_images_targets_and_loss_are_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    k, s, lam = 3, 0.1, 0.7
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    fix_draws(monkeypatch, lam)
    mixed, soft = BatchMix(0.2, 0.0, k, label_smoothing=s)(x.clone(), y, seed=3, step=0)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    onehot = smoothed_onehot(y, k, s)
    torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot.flip(0))
    logits = torch.randn(6, k, generator=gen)
    by_hand = -(soft * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(objective.loss(logits, soft, 0.1, soft=True), by_hand)
    torch.testing.assert_close(by_hand, SoftTargetCrossEntropy()(logits, soft))
    assert objective.correct(logits, soft, soft=True) == (logits.argmax(1) == soft.argmax(1)).sum()
    # An odd batch: timm mixes even ones; the last image keeps itself and its own target.
    mixed, soft = BatchMix(0.2, 0.0, k, label_smoothing=s)(x[:5].clone(), y[:5], 3, 0)
    torch.testing.assert_close(mixed[:4], lam * x[:4] + (1 - lam) * x[:4].flip(0))
    torch.testing.assert_close(mixed[4], x[4])
    torch.testing.assert_close(soft[4], onehot[4])


def test_cutmix_pastes_the_box_and_weighs_the_targets_by_its_area(
        monkeypatch: pytest.MonkeyPatch) -> None:
    k, lam = 4, 0.75
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 0, 1, 2])
    fix_draws(monkeypatch, lam, centre=4)  # a 4x4 box (side 8 * sqrt(1 - lam)) at the centre
    mixed, soft = BatchMix(0.0, 1.0, k)(x.clone(), y, seed=0, step=0)
    expected = x.clone()
    expected[:, :, 2:6, 2:6] = x.flip(0)[:, :, 2:6, 2:6]
    torch.testing.assert_close(mixed, expected)
    kept = 1 - 16 / 64  # the area not pasted over
    onehot = smoothed_onehot(y, k, 0.0)
    torch.testing.assert_close(soft, kept * onehot + (1 - kept) * onehot.flip(0))


def test_mixing_is_seeded_by_seed_and_step_and_leaves_numpy_alone() -> None:
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    mix = BatchMix(1.0, 1.0, 3)
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a, ya = mix(x.clone(), y, 5, 2)
    assert np.array_equal(np.random.get_state()[1], state)  # timm's draws did not touch it
    b, yb = mix(x.clone(), y, 5, 2)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    others = [mix(x.clone(), y, 5, step)[1] for step in range(3, 8)]
    assert any(not torch.equal(ya, o) for o in others)


class OneBatch:
    """A feed of one fixed batch, with the run's mixing (the Feed protocol of engine.loop)."""

    sharded = False

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 mix: BatchMix) -> None:
        self.model, self.x, self.y, self.mix = model, x, y, mix

    def forward(self, epoch: int) -> Any:
        return self.model

    def train_mode(self) -> None:
        self.model.train()

    def train_batches(self, epoch: int, seed: int) -> tuple[int, Iterator[Any]]:
        return 1, iter([(self.x.clone(), self.y)])

    def evaluate(self) -> Any:
        raise AssertionError("not used")


def test_the_loop_trains_on_the_mixed_batch_with_soft_cross_entropy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    k, s, lam = 3, 0.2, 0.6
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, 2, 2, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, k))
    fix_draws(monkeypatch, lam)
    losses: list[float] = []
    loop = SGD(OneBatch(model, x, y, BatchMix(0.5, 0.0, k, label_smoothing=s)),
               optimizer=torch.optim.SGD(model.parameters(), lr=0.0), scheduler=None,
               per_step=False, epochs=1, label_smoothing=s, runtime=None,
               on_step=lambda step, loss: losses.append(float(loss)))
    with Progress(quiet=True) as progress:
        stats = loop.train_epoch(0, 0, progress)
    onehot = smoothed_onehot(y, k, s)
    target = lam * onehot + (1 - lam) * onehot.flip(0)
    logits = model(lam * x + (1 - lam) * x.flip(0))
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean()  # smoothing counted once
    assert losses == [pytest.approx(by_hand.item(), abs=1e-6)]
    assert stats.loss == pytest.approx(by_hand.item(), abs=1e-6)
    right = (logits.argmax(1) == target.argmax(1)).sum().item()
    assert stats.accuracy == pytest.approx(right / 6)


# -- presets and knobs: timm's own transforms ------------------------------------------------


@pytest.mark.parametrize("name", ["light", "standard", "strong"])
def test_each_preset_builds_the_transform_timm_would(name: str) -> None:
    a = of_config(TrainConfig(data="d", out="o", augment=name))
    ours = build_transform(DATA_CONFIG, train=True, augment=a)
    knobs = {"light": {"color_jitter": 0.0}, "standard": {"color_jitter": 0.4},
             "strong": {"color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1",
                        "re_prob": 0.25, "re_mode": "pixel"}}[name]
    theirs = timm.data.create_transform(32, is_training=True, interpolation="bicubic",
                                        mean=MEAN, std=STD, scale=(0.08, 1.0), hflip=0.5,
                                        **knobs)
    assert [type(t).__name__ for t in ours.transforms] == [type(t).__name__
                                                          for t in theirs.transforms]
    assert repr(ours) == repr(theirs)  # every transform's parameters
    if name == "strong":
        names = [type(t).__name__ for t in ours.transforms]
        assert "RandAugment" in names and "ColorJitter" not in names  # timm drops it under RA
        erase = ours.transforms[-1]
        assert (type(erase).__name__, erase.probability, erase.mode) == ("RandomErasing",
                                                                         0.25, "pixel")


def test_presets_and_knobs_as_the_config_resolves_them() -> None:
    assert set(AUGMENTS) == {"none", "light", "standard", "strong"}
    cfg = TrainConfig(data="d", out="o", augment="standard")
    assert cfg.augment is True and of_config(cfg) == TIMM  # what tlreg always did
    assert TrainConfig(data="d", out="o", augment="none").augment is False
    assert TrainConfig(data="d", out="o", augment="yes").augment is True  # older YAML
    cfg = TrainConfig(data="d", out="o", augment="strong", auto_augment="rand-m5", reprob=0.1)
    assert (cfg.auto_augment, cfg.reprob) == ("rand-m5", 0.1)  # knobs win over the preset
    off = of_config(TrainConfig(data="d", out="o", augment="strong", auto_augment="none"))
    assert (off.auto_augment, off.reprob) == (None, 0.25)
    # A knob on images with augment unset turns augmentation on (the images path).
    assert TrainConfig(data="d", out="o", mixup=0.2).augment is True
    # No random crop: timm's eval crop, then the flip, RandAugment, normalise, erasing.
    a = of_config(TrainConfig(data="d", out="o", augment="strong", crop_scale=0.0))
    names = [type(t).__name__ for t in build_transform(DATA_CONFIG, train=True,
                                                       augment=a).transforms]
    assert names == ["Resize", "CenterCrop", "RandomHorizontalFlip", "RandAugment",
                     "MaybeToTensor", "Normalize", "RandomErasing"]


def test_batched_erasing_is_timms_per_image_seeded_by_index() -> None:
    img = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    kw = {"scale": (0.5, 1.0), "jitter": 0.4}
    plain = BatchAugment(DATA_CONFIG, **kw)([img] * 6, list(range(6)), 7)
    rng = torch.get_rng_state()
    erased = BatchAugment(DATA_CONFIG, reprob=1.0, **kw)([img] * 6, list(range(6)), 7)
    assert torch.equal(torch.get_rng_state(), rng)
    changed = (erased != plain).any(1)  # (image, y, x): one rectangle per image
    for j in range(6):
        ys, xs = changed[j].nonzero(as_tuple=True)
        assert len(ys) > 0
        box = changed[j, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.float().mean() > 0.95  # per-pixel noise: a rectangle, hardly a pixel equal
    one = BatchAugment(DATA_CONFIG, reprob=1.0, **kw)([img], [4], 7)
    assert torch.equal(one[0], erased[4])  # batch composition changes nothing


def test_the_cache_says_once_which_knob_sends_training_per_image(colours: Path,
                                                                 tmp_path: Path) -> None:
    from tlreg.data.sources import open_source
    from tlreg.engine.inputs import Inputs
    from tlreg.engine.runtime import Runtime

    split = open_source(str(colours), None, 0, {})
    said: list[str] = []
    for cfg in (tiny(colours, tmp_path / "a", augment="strong"),
                tiny(colours, tmp_path / "b", augment="strong", auto_augment="none")):
        inputs = Inputs(cfg, DATA_CONFIG, Runtime(torch.device("cpu"), None, False), said.append)
        inputs.prepare(split, of_config(cfg))
        notes = [m for m in said if m.startswith("note:")]
        if cfg.auto_augment != "none":
            assert len(notes) == 1 and "--auto-augment rand-m9-mstd0.5-inc1" in notes[0]
            assert inputs.decoded_train is None  # timm's per-image transform, from the files
            assert "RandAugment" in repr(inputs.train_tf)
        else:  # erasing alone stays batched
            assert len(notes) == 1 and inputs.decoded_train is not None
            assert inputs.train_batch_tf.erase.probability == 0.25


# -- drop path -------------------------------------------------------------------------------


def test_drop_path_reaches_the_training_model_and_not_the_saved_one(colours: Path,
                                                                    tmp_path: Path) -> None:
    from tlreg.sharing.api import load_artifact
    from tlreg.sharing.exporters import export_run

    result = fit(tiny(colours, tmp_path / "run", backbone="timm:test_vit", drop_path=0.2))
    rates = [m.drop_prob for m in result.model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["drop_path"] == 0.2
    loaded = load_artifact(export_run(tmp_path / "run", tmp_path / "artifact"))
    assert not any(isinstance(m, DropPath) for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():  # in eval mode drop path is the identity: same outputs
        torch.testing.assert_close(loaded.eval()(x), result.model.eval()(x))


# -- bad values: one error before anything is written ----------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"augment": "bogus"}, "augment must be one of none, light, standard, strong"),
    ({"reprob": -0.1}, r"reprob must be in \[0, 1\]"),
    ({"reprob": 1.5}, r"reprob must be in \[0, 1\]"),
    ({"mixup": -0.2}, "mixup must be >= 0"),
    ({"cutmix": -1}, "cutmix must be >= 0"),
    ({"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
    ({"drop_path": -0.1}, r"drop_path must be in \[0, 1\)"),
    ({"auto_augment": "bogus"}, "auto_augment 'bogus' is not a timm augmentation"),
    ({"augment": "none", "reprob": 0.25}, "augment none turns training augmentation off"),
])
def test_bad_values_are_one_usage_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainConfig(data="d", out="o", **options)


def test_mixup_on_features_or_many_labels_fails_before_the_run_folder(colours: Path,
                                                                       tmp_path: Path) -> None:
    pytest.importorskip("torchmetrics")
    out = tmp_path / "features"
    with pytest.raises(UsageError, match="mixes training images, and this head trains on cached"):
        fit(tiny(colours, out, policy="feature-extract", augment="none", mixup=0.2, epochs=None))
    assert not out.exists()
    table = tmp_path / "tags.csv"
    with table.open("w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "tags", "split"])
        for f in sorted(colours.rglob("*.png")):
            split, colour = f.parent.parent.name, f.parent.name
            rows.writerow([str(f), colour + (" bright" if f.stem.endswith(("1", "3")) else ""),
                           split])
    out = tmp_path / "multi"
    with pytest.raises(UsageError, match="cutmix 1 mixes one-label-per-image targets"):
        fit(tiny(table, out, cutmix=1.0, source_args={"label_delimiter": " ",
                                                      "label_column": "tags"}))
    assert not out.exists()


def test_cli_bad_augment_is_one_line_exit_2(colours: Path, tmp_path: Path, cli: Any) -> None:
    code, _, err = cli("train", str(colours), "--out", str(tmp_path / "run"),
                       "--augment", "bogus")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "augment must be one of none, light, standard, strong" in err
    code, _, err = cli("train", str(colours), "--out", str(tmp_path / "run"),
                       "--augment", "strong", "--no-augment")
    assert code == 2 and "disagree" in err
    assert not (tmp_path / "run").exists()


# -- end to end --------------------------------------------------------------------------------


def test_strong_with_mixup_trains_and_records_its_options(colours: Path, tmp_path: Path,
                                                          cli: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    mixed: list[int] = []
    original = BatchMix.__call__

    def counting(self: BatchMix, x: torch.Tensor, *args: Any) -> Any:
        mixed.append(len(x))
        return original(self, x, *args)

    monkeypatch.setattr(BatchMix, "__call__", counting)
    run = tmp_path / "run"
    code, out, err = cli("train", str(colours), "--out", str(run), "--backbone", "timm:test_resnet",
                         "--no-pretrained", "--img-size", "32", "--epochs", "1", "--batch-size",
                         "8", "--workers", "0", "--device", "cpu", "--policy", "finetune",
                         "--augment", "strong", "--mixup", "0.2", "--cutmix", "1.0",
                         "--drop-path", "0.1")
    assert code == 0, err
    assert mixed == [8, 8]  # every training batch, nothing else (not the probe, not val)
    assert out.count("cannot apply --auto-augment rand-m9-mstd0.5-inc1") == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: saved[k] for k in ("augment", "auto_augment", "reprob", "mixup", "cutmix",
                                  "drop_path")} == {
        "augment": "strong", "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
        "mixup": 0.2, "cutmix": 1.0, "drop_path": 0.1}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["augment"]["auto_augment"] == "rand-m9-mstd0.5-inc1"  # the probe's record
    assert summary["augment"]["reprob"] == 0.25
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    assert TrainConfig.from_yaml(run / "config.yaml").augment == "strong"  # it repeats


def test_resume_mixes_and_erases_exactly_as_the_uninterrupted_run(colours: Path,
                                                                  tmp_path: Path) -> None:
    from tlreg._io import read_checkpoint

    cfg = tiny(colours, tmp_path / "ref", epochs=2, augment="light", reprob=0.5, mixup=0.4,
               cutmix=1.0, batch_size=7, lr=0.01)  # odd batches; the batched cache
    reference = fit(cfg)

    def stop_after_first(trainer: Any, epoch: int) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        fit(cfg.replace(out=str(tmp_path / "cut")), callbacks=[stop_after_first])
    resumed = fit(resume=tmp_path / "cut")
    assert resumed.summary["epochs"] == 2
    ref, _, _ = read_checkpoint(reference.run_dir / "checkpoints" / "last")
    got, _, _ = read_checkpoint(resumed.run_dir / "checkpoints" / "last")
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_a_bare_augment_flag_still_means_standard(tmp_path: Path) -> None:
    from tlreg.cli import _bare_augment

    d = str(tmp_path)
    assert _bare_augment(["train", d, "--augment"]) == ["train", d, "--augment", "standard"]
    assert _bare_augment(["train", "--augment", d]) == ["train", "--augment", "standard", d]
    assert _bare_augment(["train", "--augment", "-q"]) == ["train", "--augment", "standard",
                                                           "-q"]
    for word in ("light", "bogus"):  # a word is a preset name (bogus: the config's error)
        assert _bare_augment(["train", "--augment", word, d]) == [
            "train", "--augment", word, d]
