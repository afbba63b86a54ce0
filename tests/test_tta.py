"""Test-time augmentation (`--tta`): the averaged logits against passes computed by hand."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from images import colour_folder
from PIL import Image
from torchvision import transforms as T

from tlreg.data.images import build_transform
from tlreg.data.tta import TTA, five_crop, flip, get_tta, tta_logits
from tlreg.errors import UsageError
from tlreg.models.transfer import TransferModel, create_model
from tlreg.predict import evaluate, predict

SIZE = 32
CROP_PCT = 0.875  # resize to floor(32 / 0.875) = 36, then crop 32
MEAN = STD = (0.5, 0.5, 0.5)


def config(**kw: object) -> dict[str, object]:
    return {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "mean": MEAN,
            "std": STD, "crop_pct": CROP_PCT, "crop_mode": "center", **kw}


@pytest.fixture(scope="module")
def model() -> TransferModel:
    torch.manual_seed(0)
    m = create_model("timm:test_resnet", 2, pretrained=False, label_names=("blue", "red"))
    m.info = dataclasses.replace(m.info, data_config=config())
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Noise images, landscape and portrait, so the corners and the centre all differ."""
    root = tmp_path_factory.mktemp("noise")
    rng = random.Random(0)
    out = []
    for i, (w, h) in enumerate([(48, 40), (40, 52), (45, 45), (60, 38), (41, 50)]):
        img = Image.new("RGB", (w, h))
        img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(w * h)])
        img.save(root / f"img{i}.png")
        out.append(str(root / f"img{i}.png"))
    return out


def rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def logits_of(results: list[dict]) -> torch.Tensor:
    return torch.tensor([r["logits"] for r in results])


def by_hand_five_crops(path: str) -> list[torch.Tensor]:
    """Short side to 36, normalised; then the four corners and the centre, sliced by hand."""
    resized = T.Compose([T.Resize(int(SIZE / CROP_PCT), T.InterpolationMode.BILINEAR),
                         T.ToTensor(), T.Normalize(MEAN, STD)])(rgb(path))
    h, w = resized.shape[-2:]
    top, left = round((h - SIZE) / 2), round((w - SIZE) / 2)
    return [resized[:, :SIZE, :SIZE], resized[:, :SIZE, -SIZE:], resized[:, -SIZE:, :SIZE],
            resized[:, -SIZE:, -SIZE:], resized[:, top:top + SIZE, left:left + SIZE]]


def test_flip_logits_are_the_mean_of_the_two_passes(model: TransferModel,
                                                    files: list[str]) -> None:
    tf = build_transform(model.data_config, train=False)
    x = torch.stack([tf(rgb(f)) for f in files])
    with torch.inference_mode():
        want = (model(x) + model(x.flip(-1))) / 2
        got = tta_logits(model, x, flip(model.data_config))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(want, model(x), atol=1e-4)  # the mirror image does change them
    torch.testing.assert_close(logits_of(predict(model, files, tta="flip")), want,
                               atol=1e-6, rtol=0)


def test_five_crop_logits_are_the_mean_of_the_five_crops(model: TransferModel,
                                                         files: list[str]) -> None:
    with torch.inference_mode():
        want = torch.stack([torch.stack([model(c[None])[0] for c in by_hand_five_crops(f)]).mean(0)
                            for f in files])
    got = logits_of(predict(model, files, tta="five-crop", batch_size=5))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The fifth view is the eval transform's one centre crop.
    tf, views = build_transform(model.data_config, train=False), five_crop(model.data_config)
    for f in files:
        crops = views.transform(rgb(f))
        assert crops.shape == (5, 3, SIZE, SIZE)
        torch.testing.assert_close(crops[4], tf(rgb(f)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["squash", "border"])
def test_five_crop_every_crop_mode_gives_five_input_size_views(mode: str,
                                                               files: list[str]) -> None:
    views = five_crop(config(crop_mode=mode))
    for f in files:
        assert views.transform(rgb(f)).shape == (5, 3, SIZE, SIZE)
    if mode == "squash":  # a square resize: the centre view is eval's crop
        tf = build_transform(config(crop_mode=mode), train=False)
        torch.testing.assert_close(views.transform(rgb(files[0]))[4], tf(rgb(files[0])))


def test_none_is_the_old_path_bitwise(model: TransferModel, files: list[str],
                                      tmp_path: Path) -> None:
    tf = build_transform(model.data_config, train=False)
    with torch.inference_mode():
        old = torch.cat([model(torch.stack([tf(rgb(f)) for f in files[i:i + 2]])).float()
                         for i in range(0, len(files), 2)])
    assert torch.equal(logits_of(predict(model, files, batch_size=2, tta="none")), old)
    assert predict(model, files, batch_size=2) == predict(model, files, batch_size=2, tta="none")
    data = colour_folder(tmp_path / "colours", per_class=1, val_per_class=3, size=40)
    plain = evaluate(model, str(data / "val"))
    assert plain["tta"] == "none" and evaluate(model, str(data / "val"), tta="none") == plain
    flipped = evaluate(model, str(data / "val"), tta="flip")
    assert flipped["tta"] == "flip" and flipped["images"] == 6


@pytest.mark.parametrize("tta", ["flip", "five-crop"])
def test_batch_size_does_not_change_tta_logits(model: TransferModel, files: list[str],
                                               tta: str) -> None:
    one = logits_of(predict(model, files, batch_size=1, tta=tta))
    three = logits_of(predict(model, files, batch_size=3, tta=tta))  # 3 + a partial batch of 2
    torch.testing.assert_close(one, three, atol=1e-5, rtol=0)


def test_unknown_tta_is_a_usage_error_before_any_work(model: TransferModel) -> None:
    assert list(TTA) == ["none", "flip", "five-crop"]
    with pytest.raises(UsageError, match=r"unknown tta 'bogus'; choose from none, flip, five-crop"):
        get_tta("bogus")
    with pytest.raises(UsageError, match="unknown tta"):  # not "no such file"
        predict(model, ["/no/such/image.png"], tta="bogus")
    with pytest.raises(UsageError, match="unknown tta"):
        evaluate(model, "/no/such/folder", tta="Flip")
    with pytest.raises(UsageError, match="crop_pct <= 1"):
        five_crop(config(crop_pct=1.2))


def test_cli_eval_and_predict_take_tta(model: TransferModel, files: list[str], tmp_path: Path,
                                       cli) -> None:
    artifact = model.save_pretrained(str(tmp_path / "artifact"))
    data = colour_folder(tmp_path / "colours", per_class=1, val_per_class=3, size=40)
    code, out, err = cli("eval", str(artifact), str(data / "val"), "--tta", "flip", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tta"] == "flip"
    assert report == evaluate(model, str(data / "val"), tta="flip")
    code, out, err = cli("eval", str(artifact), str(data / "val"), "--tta", "five-crop")
    assert code == 0, err
    assert "images (TTA five-crop)" in out
    code, out, err = cli("predict", str(artifact), *files[:2], "--tta", "five-crop", "--json")
    assert code == 0, err
    torch.testing.assert_close(logits_of(json.loads(out)),
                               logits_of(predict(model, files[:2], tta="five-crop")))
    # A bad name is refused before the model is loaded: the missing source is never reached.
    code, _, err = cli("predict", str(tmp_path / "no-such-model"), files[0], "--tta", "bogus")
    assert code == 2
    assert "unknown tta 'bogus'; choose from none, flip, five-crop" in err
    assert "Traceback" not in err
