"""Training augmentation measured by the probe: the rule, the sample, the run that records it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from images import colour_folder
from PIL import Image

from tlreg.data.augment import (
    CROP_SCALES,
    KEEP_CROPS,
    KEEP_FLIPS,
    TIMM,
    choose,
    keeps,
    measure,
    weaker,
)
from tlreg.data.batched import BatchAugment
from tlreg.engine.config import TrainConfig
from tlreg.engine.probe import spread as _spread
from tlreg.engine.trainer import fit
from tlreg.errors import UsageError


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLREG_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


def ramp_folder(root: Path, per_class: int = 16, val_per_class: int = 6, size: int = 40) -> Path:
    """Classes that only a mirror confuses: grey ramps rising or falling left to right."""
    rng = random.Random(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for name, sign in (("rising", 1), ("falling", -1)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("RGB", (size, size))
                img.putdata([(v, v, v) for y in range(size) for x in range(size)
                             for v in [max(0, min(255, 128 + sign * (x - size // 2) * 6
                                                  + rng.randint(-20, 20)))]])
                img.save(folder / f"{name}_{i:03d}.png")
    return root


def tiny(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=str(data), out=str(out), backbone="timm:test_resnet", pretrained=False,
                img_size=32, batch_size=8, epochs=1, workers=0, quiet=True, device="cpu",
                policy="finetune")
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_rule_keeps_the_strongest_views_the_probe_survives() -> None:
    a = choose(clean=1.0, crops={0.08: 0.5, 0.25: KEEP_CROPS}, flipped=1.0,
               jitters={0.4: 0.95}, images=100)
    assert (a.crop_scale, a.hflip, a.color_jitter) == (0.25, TIMM.hflip, 0.4)
    assert a.reason.startswith("crops down to 25% of the image, flips, colour jitter 0.4")
    # Every crop floor loses the label: the eval transform's centre crop, never the whole
    # image (a floor of 1 would train on another framing than the one evaluated).
    whole = choose(clean=1.0, crops={0.08: 0.5, 0.25: 0.5, 0.5: 0.5, 1.0: 1.0}, flipped=1.0,
                   jitters={}, images=100)
    assert whole.crop_scale == 0.0 and 1.0 not in CROP_SCALES
    assert whole.reason.startswith("no random crops, flips")
    a = choose(clean=0.8, crops={0.08: 0.8 * KEEP_CROPS - 0.01, 0.25: 0.1, 0.5: 0.2, 1.0: 0.7},
               flipped=0.8 * KEEP_FLIPS - 0.01, jitters={0.4: 0.5, 0.2: 0.75}, images=100)
    assert (a.crop_scale, a.hflip, a.color_jitter) == (0.0, 0.0, 0.2)
    assert a.reason.startswith("no random crops, no flips, colour jitter 0.2")
    assert a.measured["crop_accuracy"] == {"0.08": pytest.approx(0.71), "0.25": 0.1, "0.5": 0.2,
                                           "1.0": 0.7}
    assert a.measured["jitter_accuracy"] == {"0.4": 0.5, "0.2": 0.75}
    a = choose(clean=0.9, crops={}, flipped=0.9, jitters={0.4: 0.1, 0.2: 0.1}, images=8)
    assert (a.crop_scale, a.color_jitter) == (0.0, 0.0)  # nothing measured, nothing kept
    assert keeps(0.0, 0.0)  # nothing to lose: a probe that labels nothing right keeps all


def test_weaker_steps_down_the_knob_the_probe_labels_worst() -> None:
    a = choose(clean=1.0, crops={0.08: 0.5, 0.25: 0.93}, flipped=0.96, jitters={0.4: 0.91},
               images=100)
    steps = [a]
    while (step := weaker(steps[-1])) is not None:
        steps.append(step)
    got = [(s.crop_scale, s.hflip, s.color_jitter) for s in steps]
    assert got == [(0.25, 0.5, 0.4), (0.25, 0.5, 0.2), (0.25, 0.5, 0.0), (0.5, 0.5, 0.0),
                   (0.0, 0.5, 0.0), (0.0, 0.0, 0.0)]


def test_views_each_kept_alone_are_weakened_until_kept_together() -> None:
    """A probe wrong only on mirrored and brightened views: alone each is kept, not together."""
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 1.0, "interpolation": "bilinear", "crop_mode": "center"}
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(3, 32, 32).contiguous()
    images = [ramp] * 64

    def predict(batch: torch.Tensor) -> torch.Tensor:
        mirrored = batch[..., :16].mean((1, 2, 3)) > batch[..., 16:].mean((1, 2, 3))
        brightened = batch.mean((1, 2, 3)).abs() > 0.05  # a whole ramp's mean is 0
        return (mirrored & brightened).long()

    labels = torch.zeros(len(images), dtype=torch.long)
    a = measure(images, labels, predict, config, batch_size=16, seed=0,
                given={"crop_scale": 0.0})
    m = a.measured
    assert m["flipped_accuracy"] == 1.0 and m["jitter_accuracy"]["0.4"] == 1.0
    assert m["crop_accuracy"]["0.08"] == 1.0  # alone, every view keeps the label
    together = m["together"]
    assert together[0] | {"accuracy": 0} == {"crop_scale": 0.0, "hflip": 0.5,
                                              "color_jitter": 0.4, "accuracy": 0}
    # Jitter steps down first (a tie with flips), then off: flips alone were measured above.
    assert [s["color_jitter"] for s in together] == [0.4, 0.2]
    assert all(s["accuracy"] < KEEP_CROPS for s in together)  # measured 0.55, 0.67
    assert (a.crop_scale, a.hflip, a.color_jitter) == (0.0, 0.5, 0.0)  # the crop as given
    assert a.reason.startswith("no random crops, flips, no colour jitter")


def test_a_crop_floor_of_one_is_kept_only_when_the_user_asks() -> None:
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875, "interpolation": "bilinear", "crop_mode": "center"}
    images = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8) for _ in range(8)]
    labels = torch.zeros(len(images), dtype=torch.long)

    def predict(batch: torch.Tensor) -> torch.Tensor:  # right on every view
        return torch.zeros(len(batch), dtype=torch.long)

    a = measure(images, labels, predict, config, batch_size=4, seed=0)
    assert a.crop_scale == 0.08 and a.measured["crop_accuracy"] == {"0.08": 1.0}
    asked = measure(images, labels, predict, config, batch_size=4, seed=0,
                    given={"crop_scale": 1.0})  # --crop-scale 1
    assert asked.crop_scale == 1.0
    assert asked.reason.startswith("crops of the whole image (aspect-ratio jitter only)")


def test_sample_takes_every_class_and_is_seeded() -> None:
    labels = [0] * 500 + [1] * 3 + [2] * 40
    picked = _spread(labels, 64, seed=1)
    assert len(picked) == 64 == len(set(picked)) and picked == sorted(picked)
    assert sum(labels[i] == 1 for i in picked) == 3  # the rare class gives all it has
    assert abs(sum(labels[i] == 0 for i in picked) - sum(labels[i] == 2 for i in picked)) <= 1
    assert picked == _spread(labels, 64, seed=1) != _spread(labels, 64, seed=2)
    assert sorted(_spread(labels[:10], 64, seed=0)) == list(range(10))


def test_no_random_crop_is_the_eval_crop_on_both_paths() -> None:
    from tlreg.data.augment import Augment
    from tlreg.data.batched import BatchEval
    from tlreg.data.images import build_transform

    config = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.8, "interpolation": "bilinear", "crop_mode": "center"}
    img = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    plain = BatchAugment(config, scale=None, hflip=0.0, jitter=0.0)([img], [0], 0)
    assert torch.allclose(plain, BatchEval(config)([img]), atol=1e-6)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    off = Augment(crop_scale=0.0, hflip=0.0, color_jitter=0.0)
    assert torch.equal(build_transform(config, train=True, augment=off)(pil),
                       build_transform(config, train=False)(pil))
    mirrored = build_transform(config, train=True, augment=Augment(0.0, 1.0, 0.0))(pil)
    assert torch.equal(mirrored, build_transform(config, train=False)(pil).flip(-1))


def test_batch_augment_flip_rate_is_the_one_asked_for() -> None:
    config = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    img = torch.arange(3 * 16 * 16, dtype=torch.float32).view(3, 16, 16).remainder(256)
    img = img.to(torch.uint8)
    kw = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "jitter": 0.0}
    never = BatchAugment(config, hflip=0.0, **kw)([img] * 32, list(range(32)), 0)
    always = BatchAugment(config, hflip=1.0, **kw)([img] * 32, list(range(32)), 0)
    assert torch.equal(always, never.flip(-1))
    assert torch.equal(never, never[:1].expand_as(never))


def test_a_run_measures_flips_and_crops_and_records_them(tmp_path: Path) -> None:
    result = fit(tiny(ramp_folder(tmp_path / "ramps"), tmp_path / "run"))
    a = result.summary["augment"]
    m = a["measured"]
    assert m["images"] == 32 and m["clean_accuracy"] >= 0.9  # the probe tells them apart
    assert m["flipped_accuracy"] < KEEP_FLIPS * m["clean_accuracy"]  # a mirror swaps them
    assert a["hflip"] == 0.0 and "no flips" in a["reason"]
    assert a["crop_scale"] in (0.0, 0.08, 0.25, 0.5) and a["color_jitter"] in (0, 0.2, 0.4)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["crop_scale"], saved["hflip"]) == (a["crop_scale"], 0.0)  # resume repeats it
    assert json.loads((tmp_path / "run" / "run.json").read_text())["augment"] == a


def test_colours_keep_flips_and_what_the_user_sets_is_kept(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "colours")
    a = fit(tiny(data, tmp_path / "run")).summary["augment"]
    assert (a["crop_scale"], a["hflip"], a["color_jitter"]) == (0.08, TIMM.hflip, 0.4)
    a = fit(tiny(data, tmp_path / "run2", crop_scale=0.6, hflip=0.0)).summary["augment"]
    assert (a["crop_scale"], a["hflip"]) == (0.6, 0.0) and a["measured"]["images"] == 24
    assert a["color_jitter"] in (0.0, 0.2, 0.4)  # measured: the user left it
    a = fit(tiny(data, tmp_path / "run3", crop_scale=0.6, hflip=0.0, color_jitter=0.0))
    assert a.summary["augment"] | {"measured": {}} == {
        "crop_scale": 0.6, "hflip": 0.0, "color_jitter": 0.0, "reason": "as set",
        "measured": {}}


def test_frozen_runs_do_not_measure_and_bad_values_are_errors(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "colours")
    summary = fit(tiny(data, tmp_path / "run", policy="feature-extract", epochs=None)).summary
    assert "augment" not in summary
    for key, value in (("crop_scale", -0.1), ("crop_scale", 1.5), ("hflip", -0.1),
                       ("color_jitter", -1)):
        with pytest.raises(UsageError, match=key):
            tiny(data, tmp_path / "bad", **{key: value})
